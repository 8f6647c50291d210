"""CPU training steps with the batch run whole vs a few images at a time (`CoaT.train_in_chunks`).

With glibc's default allocator every activation above its mmap threshold is mapped afresh and faulted in page by
page; run in chunks of a few images, no activation exceeds it and freed memory is reused. The model chunks on its
own only under that allocator (`coatvit.runtime.fresh_pages_for_large_blocks`); this script forces the chunks in
both settings so that `--tuned-allocator` measures what they would cost there. Whole training steps (forward,
cross-entropy, backward, AdamW; drop path off), interleaved in one process, median of `--repeats`; the gradients
of the two variants are checked to agree first.

    python benchmarks/train_chunks.py --models coat_lite_tiny:16 coat_tiny:16
    python benchmarks/train_chunks.py --models coat_lite_tiny:16 coat_tiny:16 --tuned-allocator
    python benchmarks/train_chunks.py --models coat_lite_tiny:16 --chunk-mib 16 24 31

`--chunk-mib` times several chunk sizes (`CoaT.train_chunk_bytes`, the largest activation of one chunk) in the same
run; `--layouts stages pass` times chunks sized per stage (`CoaT.train_chunk_stages`, the default) and chunks of the
whole forward pass sized by stage 1; the speedups are all over the whole batch.

    python benchmarks/train_chunks.py --models coat_lite_tiny:16 coat_tiny:16 --layouts stages pass
"""

from __future__ import annotations

import statistics

import torch

from coatvit import runtime
from coatvit.benchmark import BenchmarkConfig, make_step, time_interleaved
from coatvit.model import CoaT

import _ab


def main() -> None:
    parser = _ab.parser(__doc__.splitlines()[0], ["coat_lite_tiny:16", "coat_tiny:16"], repeats=5)
    parser.add_argument("--tuned-allocator", action="store_true", help="coatvit.tune_cpu_allocator() first")
    parser.add_argument("--chunk-mib", nargs="+", type=int, default=[CoaT.train_chunk_bytes >> 20],
                        help="largest activation of one chunk, MiB (CoaT.train_chunk_bytes); several: one variant each")
    parser.add_argument("--layouts", nargs="+", choices=("stages", "pass"), default=["stages"],
                        help="chunks sized per stage (stages) or the whole forward pass sized by stage 1 (pass)")
    args = parser.parse_args()
    models = _ab.start(args, tune_allocator=args.tuned_allocator)
    runtime.fresh_pages_for_large_blocks = lambda: True  # chunk in either allocator setting (see above)
    default = (CoaT.train_in_chunks, CoaT.train_chunk_bytes, CoaT.train_chunk_stages)
    variants = [(mib, layout) for mib in args.chunk_mib for layout in args.layouts]
    print("| model | batch | images per chunk (of stage 1) | whole batch ms (faults/step) | chunks ms (faults/step) | "
          "speedup of the chunks (median of per-repeat ratios, min-max) |")
    print("|---|---|---|---|---|---|")
    try:
        for name, batch in models:
            model, x = _ab.training_model(name, batch, args.img_size)
            CoaT.train_in_chunks = False
            whole = _ab.gradients(model, x)
            CoaT.train_in_chunks = True
            images = {}
            for mib, layout in variants:
                CoaT.train_chunk_bytes = mib << 20
                CoaT.train_chunk_stages = layout == "stages"
                images[mib] = model.train_chunk_images(x)
                for a, b in zip(whole, _ab.gradients(model, x)):
                    torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5)
            cfg = BenchmarkConfig(model=name, batch_size=batch, img_size=(args.img_size, args.img_size),
                                  repeats=args.repeats, steps=2, warmup=1)
            step = make_step("train", model, cfg)

            def variant(chunks: tuple[int, str] | None):
                def run():
                    CoaT.train_in_chunks = chunks is not None
                    if chunks is not None:
                        CoaT.train_chunk_bytes = chunks[0] << 20
                        CoaT.train_chunk_stages = chunks[1] == "stages"
                    step()
                return run

            steps = {"whole": variant(None)}
            steps.update({v: variant(v) for v in variants})
            faults: dict[str, list[float]] = {}
            times = time_interleaved(steps, cfg, faults)
            faults = {label: statistics.median(f) for label, f in faults.items()}
            whole_ms = statistics.median(times["whole"]) * 1e3
            for v in variants:
                ratios = [w / c for w, c in zip(times["whole"], times[v])]
                print(f"| {name} | {batch} | {images[v[0]]} ({v[0]} MiB, by {v[1]}) | {whole_ms:.0f} "
                      f"({faults['whole']:.0f}) | {statistics.median(times[v]) * 1e3:.0f} ({faults[v]:.0f}) "
                      f"| {statistics.median(ratios):.3f}x ({min(ratios):.2f}-{max(ratios):.2f}) |", flush=True)
    finally:
        CoaT.train_in_chunks, CoaT.train_chunk_bytes, CoaT.train_chunk_stages = default


if __name__ == "__main__":
    main()
