"""Patch embeddings of stages 2-4 as one GEMM over the gathered patches vs the strided convolution, CPU inference.

`PatchEmbed.forward_gemm` gathers each p x p patch of the channels-last map into a row (one copy the size of the
input) and multiplies by the (p*p*C, out) weight, kept between calls; the convolution (oneDNN) is what runs
with `PatchEmbed.gemm_max_patches` 0. This script times each stage's embedding (projection and LayerNorm), every
stage as a GEMM against every stage as a convolution, and whole-model inference with the default threshold (GEMMs
up to 1024 patches) against none, interleaved in one process, tuned allocator, median of `--repeats`, and checks
that the outputs agree to within 1e-5.

    python benchmarks/patch_embed.py --models coat_lite_tiny:1 coat_lite_tiny:16 coat_tiny:1 --repeats 9
"""

from __future__ import annotations

import statistics

import torch

import coatvit
from coatvit.benchmark import BenchmarkConfig, time_interleaved
from coatvit.model import PatchEmbed

import _ab


def compare(label: str, fn, batch: int, repeats: int, gemm_max_patches: int) -> str:
    """One table row: fn() timed with no GEMM embedding and with `PatchEmbed.gemm_max_patches` = gemm_max_patches;
    the GEMM's speedup as the median of per-repeat ratios."""
    variants = {"convolution": 0, "GEMM": gemm_max_patches}
    outputs = []
    for threshold in variants.values():
        PatchEmbed.gemm_max_patches = threshold
        outputs.append(fn())
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)

    def run(threshold):
        PatchEmbed.gemm_max_patches = threshold
        fn()

    steps = {name: (lambda t=t: run(t)) for name, t in variants.items()}
    times = time_interleaved(steps, BenchmarkConfig(repeats=repeats, steps=20 if batch == 1 else 3, warmup=1))
    ratios = [c / g for c, g in zip(times["convolution"], times["GEMM"])]
    conv, gemm = (statistics.median(times[k]) * 1e3 for k in variants)
    return (f"{label} | {conv:.3f} | {gemm:.3f} | {statistics.median(ratios):.3f}x "
            f"({min(ratios):.2f}-{max(ratios):.2f}) |")


def main() -> None:
    parser = _ab.parser(__doc__.splitlines()[0], ["coat_lite_tiny:1", "coat_lite_tiny:16", "coat_tiny:1"],
                        repeats=9)
    args = parser.parse_args()
    models = _ab.start(args)
    default = PatchEmbed.gemm_max_patches
    print("| model | batch | what | convolution ms | GEMM ms | GEMM faster by (median of per-repeat ratios, "
          "min-max) |")
    print("|---|---|---|---|---|---|")
    try:
        for name, batch in models:
            torch.manual_seed(0)
            model = coatvit.create_model(name).eval()
            x = torch.randn(batch, 3, args.img_size, args.img_size)
            dims, stride = model.config.embed_dims, model.config.patch_size
            side = args.img_size // stride
            for i in (1, 2, 3):
                embed = getattr(model, f"patch_embed{i + 1}")
                fmap = torch.randn(batch, side, side, dims[i - 1]).permute(0, 3, 1, 2)  # channels-last view
                side //= 2

                def stage(embed=embed, fmap=fmap):
                    with torch.inference_mode():
                        return embed(fmap)[0]

                print(f"| {name} | {batch} | " + compare(f"stage {i + 1} embedding ({dims[i - 1]} channels in)",
                                                        stage, batch, args.repeats, 1 << 30), flush=True)

            def whole():
                with torch.inference_mode():
                    return model(x)

            print(f"| {name} | {batch} | " + compare(f"whole model (GEMMs up to {default} patches)", whole,
                                                        batch, args.repeats, default), flush=True)
    finally:
        PatchEmbed.gemm_max_patches = default


if __name__ == "__main__":
    main()
