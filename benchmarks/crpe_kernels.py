"""CRPE convolutions in training: one merged zero-padded 7x7 depthwise kernel vs the per-window kernels.

The fast path runs the merged kernel in inference and the per-window kernels under autograd
(`ConvRelPosEnc.merge_under_autograd`); this script times whole training steps (forward, backward, AdamW) both
ways, interleaved in one process, tuned allocator, median of `--repeats`:

    python benchmarks/crpe_kernels.py --models coat_lite_tiny:16 coat_tiny:8 coat_lite_small:8 --threads 2
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

import coatvit
from coatvit.benchmark import BenchmarkConfig, time_interleaved
from coatvit.model import ConvRelPosEnc


def train_steps(name: str, batch: int, size: int, repeats: int) -> dict[bool, float]:
    torch.manual_seed(0)
    model = coatvit.create_model(name).train()
    optimizer = torch.optim.AdamW(model.parameters())
    x = torch.randn(batch, 3, size, size)
    target = torch.randint(0, model.num_classes, (batch,))

    def step():
        loss = F.cross_entropy(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def run(merged: bool):
        ConvRelPosEnc.merge_under_autograd = merged
        step()

    try:
        times = time_interleaved({False: lambda: run(False), True: lambda: run(True)},
                                 BenchmarkConfig(repeats=repeats, steps=1, warmup=1))
    finally:
        ConvRelPosEnc.merge_under_autograd = False
    return {merged: statistics.median(t) for merged, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["coat_lite_tiny:16", "coat_tiny:8"], help="NAME:BATCH")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    coatvit.tune_cpu_allocator()
    print(f"torch {torch.__version__}, {args.threads} threads, {args.img_size} px, median of {args.repeats}")
    print("| model | batch | per-window kernels (ms/step) | merged 7x7 (ms/step) | per-window faster by |")
    print("|---|---|---|---|---|")
    for spec in args.models:
        name, batch = spec.split(":")
        t = train_steps(name, int(batch), args.img_size, args.repeats)
        print(f"| {name} | {batch} | {t[False] * 1e3:.0f} | {t[True] * 1e3:.0f} | {t[True] / t[False]:.3f}x |",
              flush=True)


if __name__ == "__main__":
    main()
