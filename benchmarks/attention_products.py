"""Per-head vs masked (C x C) factorized-attention products on the fast path, alone and in whole models.

The fast path computes softmax(K)^T V and Q (.) either per head, or as one (C x C) product per image with the
off-diagonal head blocks masked to zero (h times the MACs of this term, but no head permutes).
`FactorAttnConvRelPosEnc.per_head_min_channels` picks per head for heads of at least that many channels; this
script measures both ways, interleaved in one process, median of `--repeats`:

    python benchmarks/attention_products.py --threads 2 --repeats 7
    python benchmarks/attention_products.py --threads 2 --repeats 7 --models coat_tiny coat_lite_small --batch-size 16
"""

from __future__ import annotations

import argparse
import statistics

import torch

import coatvit
from coatvit.benchmark import BenchmarkConfig, time_interleaved
from coatvit.model import FactorAttnConvRelPosEnc
from coatvit.runtime import tune_cpu_allocator

# (B, N, C, heads): CoaT-Lite stage 1 (8-channel heads), CoaT scales 1-3 (19), CoaT-Lite Small stages 2-4
SHAPES = [(16, 3137, 64, 8), (16, 785, 128, 8), (16, 197, 320, 8), (16, 50, 512, 8),
          (4, 3137, 152, 8), (16, 785, 152, 8), (16, 197, 152, 8)]


def interleaved(steps: dict, repeats: int) -> dict:
    """Median seconds per call of each step, one warm-up call each, interleaved repeats (the project's timer)."""
    cfg = BenchmarkConfig(repeats=repeats, steps=1, warmup=1)
    return {name: statistics.median(t) for name, t in time_interleaved(steps, cfg).items()}


def attention_only(B: int, N: int, C: int, heads: int, repeats: int) -> tuple[float, float]:
    attn = FactorAttnConvRelPosEnc(C, heads).eval()
    x = torch.randn(B, N, C)

    def run(per_head: bool):
        attn.per_head_min_channels = 1 if per_head else 10**9
        return attn.forward_fast(x, (0, 0), None)

    with torch.inference_mode():
        assert torch.allclose(run(True), run(False), atol=1e-5)
        t = interleaved({True: lambda: run(True), False: lambda: run(False)}, repeats)
    return t[True], t[False]


def whole_model(name: str, batch: int, size: int, repeats: int) -> tuple[float, float]:
    model = coatvit.create_model(name).eval()
    x = torch.randn(batch, 3, size, size)
    shipped = FactorAttnConvRelPosEnc.per_head_min_channels

    def run(threshold: int):
        FactorAttnConvRelPosEnc.per_head_min_channels = threshold
        model(x)

    try:
        with torch.inference_mode():
            t = interleaved({"shipped": lambda: run(shipped), "masked": lambda: run(10**9)}, repeats)
    finally:
        FactorAttnConvRelPosEnc.per_head_min_channels = shipped
    return t["shipped"], t["masked"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--models", nargs="*", default=[], help="also time whole models (inference)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--img-size", type=int, default=224)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tune_cpu_allocator()
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats}")
    print("| B | N | C | heads | head channels | per head (ms) | masked C x C (ms) | per head faster by |")
    print("|---|---|---|---|---|---|---|---|")
    for B, N, C, heads in SHAPES:
        per_head, masked = attention_only(B, N, C, heads, args.repeats)
        print(f"| {B} | {N} | {C} | {heads} | {C // heads} | {per_head * 1e3:.2f} | {masked * 1e3:.2f} "
              f"| {masked / per_head:.2f}x |", flush=True)
    for name in args.models:
        shipped, masked = whole_model(name, args.batch_size, args.img_size, args.repeats)
        print(f"{name}, batch {args.batch_size}, {args.img_size} px: shipped rule {shipped * 1e3:.0f} ms, "
              f"masked everywhere {masked * 1e3:.0f} ms ({masked / shipped:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
