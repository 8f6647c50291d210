"""Where the time goes: torch.profiler's self time per ATen op, ours next to timm's model of the same name.

Runs with the tuned allocator by default (no page faults in either model, so the table shows the arithmetic and
the memory passes); `--default-allocator` keeps glibc's defaults.

    python benchmarks/profile_ops.py --model coat_lite_tiny --batch-size 16 --threads 2
    python benchmarks/profile_ops.py --model coat_lite_tiny --batch-size 16 --threads 2 --mode train

`--mode train` profiles whole training steps (forward, cross-entropy, backward, AdamW), as `coatvit benchmark` times
them.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import coatvit


def op_times(model: torch.nn.Module, x: torch.Tensor, rounds: int) -> dict[str, tuple[float, int]]:
    """Self CPU milliseconds and calls per forward pass, by ATen op."""
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(rounds):
                model(x)
    return {e.key: (e.self_cpu_time_total / 1e3 / rounds, e.count // rounds) for e in prof.key_averages()}


def train_op_times(model: torch.nn.Module, x: torch.Tensor, rounds: int) -> dict[str, tuple[float, int]]:
    """Self CPU milliseconds and calls per training step (forward, loss, backward, AdamW), by ATen op."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    target = torch.arange(x.shape[0]) % 1000

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), target).backward()
        opt.step()

    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(rounds):
            step()
    return {e.key: (e.self_cpu_time_total / 1e3 / rounds, e.count // rounds) for e in prof.key_averages()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="coat_lite_tiny")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rows", type=int, default=14)
    parser.add_argument("--default-allocator", action="store_true")
    parser.add_argument("--mode", choices=("infer", "train"), default="infer")
    args = parser.parse_args()
    import timm

    torch.set_num_threads(args.threads)
    if not args.default_allocator:
        coatvit.tune_cpu_allocator()
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    if args.mode == "train":
        tables = {"ours": train_op_times(coatvit.create_model(args.model), x, args.rounds),
                  "timm": train_op_times(timm.create_model(args.model), x, args.rounds)}
    else:
        tables = {"ours": op_times(coatvit.create_model(args.model).eval(), x, args.rounds),
                  "timm": op_times(timm.create_model(args.model).eval(), x, args.rounds)}
    totals = {k: sum(ms for ms, _ in t.values()) for k, t in tables.items()}
    ops = sorted(set(tables["ours"]) | set(tables["timm"]),
                 key=lambda op: -max(t.get(op, (0.0, 0))[0] for t in tables.values()))
    print(f"{args.model}, batch {args.batch_size}, {args.img_size} px, {args.threads} threads, torch "
          f"{torch.__version__}, allocator {'default' if args.default_allocator else 'tuned'}; ms per "
          f"{'training step' if args.mode == 'train' else 'forward pass'}")
    print("| op | ours ms | ours % | calls | timm ms | timm % | calls |")
    print("|---|---|---|---|---|---|---|")
    for op in ops[:args.rows]:
        o, t = tables["ours"].get(op, (0.0, 0)), tables["timm"].get(op, (0.0, 0))
        print(f"| {op} | {o[0]:.1f} | {100 * o[0] / totals['ours']:.0f} | {o[1]} | {t[0]:.1f} "
              f"| {100 * t[0] / totals['timm']:.0f} | {t[1]} |")
    print(f"| total | {totals['ours']:.1f} | 100 | | {totals['timm']:.1f} | 100 | |")


if __name__ == "__main__":
    main()
