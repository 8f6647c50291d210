"""CRPE convolutions in training: one merged zero-padded 7x7 depthwise kernel vs the per-window kernels.

The fast path runs the merged kernel in inference and the per-window kernels under autograd
(`ConvRelPosEnc.merge_under_autograd`); this script times whole training steps (forward, backward, AdamW) both
ways, interleaved in one process, tuned allocator, median of `--repeats`:

    python benchmarks/crpe_kernels.py --models coat_lite_tiny:16 coat_tiny:8 coat_lite_small:8 --threads 2
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

import coatvit
from coatvit.benchmark import BenchmarkConfig, time_interleaved
from coatvit.model import ConvRelPosEnc

import _ab


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
    args = _ab.parser(__doc__.splitlines()[0], ["coat_lite_tiny:16", "coat_tiny:8"], repeats=5).parse_args()
    models = _ab.start(args)
    print("| model | batch | per-window kernels (ms/step) | merged 7x7 (ms/step) | per-window faster by |")
    print("|---|---|---|---|---|")
    for name, batch in models:
        t = train_steps(name, batch, args.img_size, args.repeats)
        print(f"| {name} | {batch} | {t[False] * 1e3:.0f} | {t[True] * 1e3:.0f} | {t[True] / t[False]:.3f}x |",
              flush=True)


if __name__ == "__main__":
    main()
