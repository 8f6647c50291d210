"""CPU training with the MLP as one chunked autograd function vs autograd through its layers (`Mlp.train_chunks`).

Through the layers, autograd keeps two (tokens, hidden) tensors per MLP for backward: fc1's output and the GELU's.
`ChunkedMlp` keeps the first only and recomputes the GELU a chunk at a time in backward. This script prints, per
model, the activations a training step saves for backward (`coatvit.memory.saved_activation_bytes`, which does not
depend on the machine's load) and the time of whole training steps (forward, cross-entropy, backward, AdamW; drop
path off) of both variants, interleaved in one process, median of `--repeats`, after checking that their gradients
agree. The peak memory of a whole step next to timm's comes from `coatvit benchmark --modes train --vs timm`.

    python benchmarks/mlp_backward.py --models coat_lite_tiny:16 coat_tiny:16
    python benchmarks/mlp_backward.py --models coat_lite_tiny:16 coat_tiny:16 --tuned-allocator
"""

from __future__ import annotations

import statistics

import torch

from coatvit.benchmark import BenchmarkConfig, make_step, time_interleaved
from coatvit.memory import saved_activation_bytes
from coatvit.model import Mlp

import _ab


def main() -> None:
    parser = _ab.parser(__doc__.splitlines()[0], ["coat_lite_tiny:16", "coat_tiny:16"], repeats=5)
    parser.add_argument("--tuned-allocator", action="store_true",
                        help="coatvit.tune_cpu_allocator() first, as the coatvit commands (train) do")
    args = parser.parse_args()
    models = _ab.start(args, tune_allocator=args.tuned_allocator)
    default = Mlp.train_chunks
    print("| model | batch | saved for backward, layers / chunked (MiB) | layers ms (faults/step) | "
          "chunked ms (faults/step) | "
          "speedup of the chunked MLP (median of per-repeat ratios, min-max) |")
    print("|---|---|---|---|---|---|")
    try:
        for name, batch in models:
            model, x = _ab.training_model(name, batch, args.img_size)
            saved, grads = {}, {}
            for chunked in (False, True):
                Mlp.train_chunks = chunked
                saved[chunked] = saved_activation_bytes(model, x) / 2**20
                grads[chunked] = _ab.gradients(model, x)
            for a, b in zip(grads[False], grads[True]):
                torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5)
            cfg = BenchmarkConfig(model=name, batch_size=batch, img_size=(args.img_size, args.img_size),
                                  repeats=args.repeats, steps=2, warmup=1)
            step = make_step("train", model, cfg)

            def variant(chunked: bool):
                def run():
                    Mlp.train_chunks = chunked
                    step()
                return run

            faults: dict[str, list[float]] = {}
            times = time_interleaved({"layers": variant(False), "chunked": variant(True)}, cfg, faults)
            ratios = [a / b for a, b in zip(times["layers"], times["chunked"])]
            ms = {k: f"{statistics.median(t) * 1e3:.0f} ({statistics.median(faults[k]):.0f})" for k, t in times.items()}
            change = saved[True] / saved[False] - 1
            print(f"| {name} | {batch} | {saved[False]:.0f} / {saved[True]:.0f} ({change:+.0%}) | {ms['layers']} "
                  f"| {ms['chunked']} | {statistics.median(ratios):.3f}x ({min(ratios):.2f}-{max(ratios):.2f}) |",
                  flush=True)
    finally:
        Mlp.train_chunks = default


if __name__ == "__main__":
    main()
