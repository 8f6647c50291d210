"""Where a GPU step's time goes: torch.profiler's device time per kernel, for each contender of `coatvit benchmark`.

    python benchmarks/profile_gpu.py --model coat_lite_tiny --mode train --vs ours ours-triton timm

Steps are built exactly as `coatvit benchmark` builds them (bf16 autocast, batch 256 by default). On a CPU (no CUDA)
it reports self CPU time per op instead, so the script can be checked anywhere.
"""

from __future__ import annotations

import argparse

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from coatvit.benchmark import BenchmarkConfig, build_model, contender_step


def kernel_times(step, rounds: int, cuda: bool) -> list[tuple[str, float, int]]:
    """(name, milliseconds per step, calls per step) of every GPU kernel (CPU: op), largest first."""
    for _ in range(2):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(rounds):
            step()
        if cuda:
            torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        # CUDA: the kernels themselves (the ATen ops that launch them report the same device time again)
        if cuda and e.device_type == DeviceType.CPU:
            continue
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        if us > 0:
            rows.append((e.key, us / 1e3 / rounds, e.count // rounds))
    return sorted(rows, key=lambda r: -r[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="coat_lite_tiny")
    parser.add_argument("--mode", choices=("infer", "train"), default="train")
    parser.add_argument("--vs", nargs="+", default=["ours", "ours-triton", "timm"])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--amp", default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=12)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    extra = tuple(v for v in args.vs if v != "ours")
    cfg = BenchmarkConfig(model=args.model, batch_size=args.batch_size, img_size=(args.img_size, args.img_size),
                          device=args.device, amp=args.amp, vs=extra, modes=(args.mode,))
    unit = "device" if cuda else "self CPU"
    for impl in args.vs:
        model = build_model(impl, cfg)
        rows = kernel_times(contender_step(impl, args.mode, model, cfg), args.rounds, cuda)
        total = sum(r[1] for r in rows)
        print(f"\n{args.model} {args.mode} {impl}: {total:.2f} ms {unit} time per step "
              f"(batch {args.batch_size}, amp {args.amp})")
        for name, ms, calls in rows[:args.rows]:
            print(f"  {ms:8.2f} ms {100 * ms / total:5.1f}% {calls:5d}x  {name[:110]}")
        del model


if __name__ == "__main__":
    main()
