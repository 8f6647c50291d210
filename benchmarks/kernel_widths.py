"""Whole-model time with the attention kernels on every head width, against some widths on the eager ops.

    python benchmarks/kernel_widths.py                                  (a CUDA GPU; about a minute)
    python benchmarks/kernel_widths.py --models coat_lite_tiny coat_lite_small --eager 64 --mode train
    TRITON_INTERPRET=1 python benchmarks/kernel_widths.py --device cpu --batch-size 1 --img-size 64 --repeats 1
                                                                        (Triton's CPU interpreter: checks only)

The Triton kernels forced on (`COATVIT_TRITON=1`), bf16 autocast on a GPU: for each model, the median step time
with every head width on the kernels and with each `--eager` padded width (16, 32, 64) on the eager ops instead
(`coatvit.kernels.EAGER_HEAD_WIDTHS`, whatever its default), the settings interleaved over `--repeats` rounds.
Each setting is first checked against the kernels-everywhere logits (fp32 on two images). A width whose row is
faster belongs in EAGER_HEAD_WIDTHS.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import coatvit
from coatvit import kernels

import _ab


def step_ms(fn, device: str, steps: int) -> float:
    """Mean milliseconds of `steps` calls after one untimed call."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["coat_lite_tiny"])
    parser.add_argument("--eager", nargs="+", type=int, default=[64], help="padded head widths to try on eager ops")
    parser.add_argument("--mode", choices=("infer", "train"), default="infer")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args()
    _ab.kernel_device(args.device, "kernel_widths.py")
    bad = [w for w in args.eager if w not in (16, 32, 64)]
    if bad:
        raise SystemExit(f"--eager takes padded head widths 16, 32 or 64; got {bad}")
    dev = args.device
    amp = torch.bfloat16 if dev == "cuda" else None
    default_widths = set(kernels.EAGER_HEAD_WIDTHS)
    kernels.set_enabled(True)
    torch.manual_seed(0)
    for name in args.models:
        model = coatvit.create_model(name).to(dev)
        model.train(args.mode == "train")
        x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=dev)
        y = torch.randint(0, model.num_classes, (args.batch_size,), device=dev)
        check = x[:2]
        settings = [frozenset()] + [frozenset({w}) for w in args.eager]

        def run(eager: frozenset):
            kernels.EAGER_HEAD_WIDTHS.clear()
            kernels.EAGER_HEAD_WIDTHS.update(eager)
            if args.mode == "infer":
                with torch.inference_mode(), torch.autocast(dev, amp, enabled=amp is not None):
                    model(x)
            else:
                model.zero_grad(set_to_none=True)
                with torch.autocast(dev, amp, enabled=amp is not None):
                    loss = F.cross_entropy(model(x), y)
                loss.backward()

        with torch.no_grad():
            model.eval()
            kernels.EAGER_HEAD_WIDTHS.clear()
            ref = model(check)
            for eager in settings[1:]:
                kernels.EAGER_HEAD_WIDTHS.update(eager)
                err = (model(check) - ref).abs().max().item()
                kernels.EAGER_HEAD_WIDTHS.clear()
                if not err < 1e-3:
                    raise SystemExit(f"{name}: eager ops for widths {sorted(eager)} change the logits by {err}")
            model.train(args.mode == "train")
        times: dict[frozenset, list[float]] = {s: [] for s in settings}
        for r in range(args.repeats):
            order = settings if r % 2 == 0 else settings[::-1]  # interleaved, alternating order
            for eager in order:
                times[eager].append(step_ms(lambda: run(eager), dev, args.steps))
        kernels.EAGER_HEAD_WIDTHS.clear()
        base = statistics.median(times[frozenset()])
        print(f"{name} {args.mode}, batch {args.batch_size}, {args.img_size} px, {dev}: kernels on every head "
              f"width {base:.2f} ms/step")
        for eager in settings[1:]:
            t = statistics.median(times[eager])
            print(f"  head width {sorted(eager)[0]} on eager ops: {t:.2f} ms/step ({base / t:.2f}x the speed of the "
                  f"kernels everywhere; spread {min(times[eager]):.2f}-{max(times[eager]):.2f})")
    kernels.set_enabled(None)
    kernels.EAGER_HEAD_WIDTHS.clear()
    kernels.EAGER_HEAD_WIDTHS.update(default_widths)


if __name__ == "__main__":
    main()
