"""The chunked inference MLP: calling the layers per chunk vs one reused hidden buffer with in-place GELU.

In CPU inference `Mlp.residual_in_chunks` runs x + MLP(norm(x)) a couple of thousand tokens at a time. This script
times whole-model inference with the chunks calling the layers (`Mlp.in_place_chunks = False`, a fresh hidden
tensor, a GELU copy and an fc2 temporary per chunk) and with the in-place variant (the default), at one or more
chunk sizes (`Mlp.chunk_elements`, hidden activations per chunk), interleaved in one process, tuned allocator,
median of `--repeats`. Both variants give bit-identical outputs (checked here too).

    python benchmarks/mlp_chunks.py --models coat_lite_tiny:16 coat_tiny:16 coat_lite_tiny:1 --chunk-elements 1048576
"""

from __future__ import annotations

import statistics

import torch

import coatvit
from coatvit.benchmark import BenchmarkConfig, time_interleaved
from coatvit.model import Mlp

import _ab


def variant(in_place: bool, chunk_elements: int):
    def apply():
        Mlp.in_place_chunks = in_place
        Mlp.chunk_elements = chunk_elements

    return apply


def main() -> None:
    parser = _ab.parser(__doc__.splitlines()[0], ["coat_lite_tiny:16", "coat_tiny:16"], repeats=7)
    parser.add_argument("--chunk-elements", nargs="+", type=int, default=[Mlp.chunk_elements],
                        help="hidden activations per chunk for the in-place variant (the layer variant uses the first)")
    args = parser.parse_args()
    models = _ab.start(args)
    defaults = (Mlp.in_place_chunks, Mlp.chunk_elements)
    variants = {f"layers, {args.chunk_elements[0]}": variant(False, args.chunk_elements[0])}
    variants.update({f"in place, {n}": variant(True, n) for n in args.chunk_elements})
    print("| model | batch | variant, elements per chunk | ms per batch | speedup over the layer variant "
          "(median of per-repeat ratios, min-max) |")
    print("|---|---|---|---|---|")
    try:
        for name, batch in models:
            torch.manual_seed(0)
            model = coatvit.create_model(name).eval()
            x = torch.randn(batch, 3, args.img_size, args.img_size)
            outputs = []

            def step(apply):
                apply()
                with torch.inference_mode():
                    return model(x)

            for apply in variants.values():
                outputs.append(step(apply))
            if not all(torch.equal(outputs[0], o) for o in outputs[1:]):
                raise SystemExit("the variants' outputs differ")
            steps = {label: (lambda a=apply: step(a)) for label, apply in variants.items()}
            times = time_interleaved(steps, BenchmarkConfig(repeats=args.repeats, steps=10 if batch == 1 else 2,
                                                            warmup=1))
            base = times[next(iter(variants))]
            for label, t in times.items():
                ratios = [b / a for a, b in zip(t, base)]
                print(f"| {name} | {batch} | {label} | {statistics.median(t) * 1e3:.1f} | "
                      f"{statistics.median(ratios):.3f}x ({min(ratios):.3f}-{max(ratios):.3f}) |", flush=True)
    finally:
        Mlp.in_place_chunks, Mlp.chunk_elements = defaults


if __name__ == "__main__":
    main()
