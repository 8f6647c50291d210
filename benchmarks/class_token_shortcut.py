"""The class-token shortcut: the last block computes only the class-token rows a token-pooling classifier reads.

`CoaT.forward` skips the image tokens' q, output projection, CRPE, resizes and MLP in the last block (serial
block 4 of a Lite model, the last parallel block of CoaT) when the head pools the class token
(`CoaT.class_token_shortcut`). This script times the model with and without it (`CoaT.shortcut_last_block`),
interleaved in one process, tuned allocator, median of `--repeats`; inference at the given batch, batch-1 latency
and training steps (forward, cross-entropy, backward, AdamW):

    python benchmarks/class_token_shortcut.py --models coat_lite_tiny:16 coat_tiny:16 --modes infer latency train
"""

from __future__ import annotations

import statistics

import torch

import coatvit
from coatvit.benchmark import BenchmarkConfig, make_step, time_interleaved
from coatvit.model import CoaT

import _ab


def time_both(name: str, mode: str, batch: int, size: int, repeats: int) -> dict[bool, list[float]]:
    torch.manual_seed(0)
    model = coatvit.create_model(name)
    step = make_step(mode, model, BenchmarkConfig(model=name, batch_size=batch, img_size=(size, size)))

    def run(shortcut: bool):
        CoaT.shortcut_last_block = shortcut
        step()

    steps = 10 if mode == "latency" else 1 if mode == "train" else 2
    try:
        return time_interleaved({True: lambda: run(True), False: lambda: run(False)},
                                BenchmarkConfig(repeats=repeats, steps=steps, warmup=1))
    finally:
        CoaT.shortcut_last_block = True


def main() -> None:
    parser = _ab.parser(__doc__.splitlines()[0], ["coat_lite_tiny:16", "coat_tiny:16"], repeats=7)
    parser.add_argument("--modes", nargs="+", default=["infer", "latency", "train"],
                        choices=["infer", "latency", "train"])
    args = parser.parse_args()
    models = _ab.start(args)
    print("| model | mode | batch | with shortcut (ms) | without (ms) | speedup: median of per-repeat ratios (min-max) |")
    print("|---|---|---|---|---|---|")
    for name, batch in models:
        for mode in args.modes:
            t = time_both(name, mode, batch, args.img_size, args.repeats)
            ratios = [b / a for a, b in zip(t[True], t[False])]
            print(f"| {name} | {mode} | {1 if mode == 'latency' else batch} | {statistics.median(t[True]) * 1e3:.1f} "
                  f"| {statistics.median(t[False]) * 1e3:.1f} | {statistics.median(ratios):.3f}x "
                  f"({min(ratios):.3f}-{max(ratios):.3f}) |", flush=True)


if __name__ == "__main__":
    main()
