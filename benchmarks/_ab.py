"""Shared command line of the A/B scripts that time one model-level switch on a CPU (crpe_kernels.py,
class_token_shortcut.py, mlp_chunks.py, train_chunks.py, mlp_backward.py, patch_embed.py, onednn_linear.py,
crpe_fusion.py) and of gemm_floor.py: models as NAME:BATCH, image size, threads, repeats, the interleaved A/B
timing and its table; and the command line and device check of the GPU kernel scripts (layer_norm_sweep.py,
fused_mlp.py, cpe_kernel.py, kernel_widths.py)."""

from __future__ import annotations

import argparse
import statistics

import torch

import coatvit
from coatvit.benchmark import BenchmarkConfig, make_step, time_interleaved


def parser(description: str, models: list[str], repeats: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--models", nargs="+", default=models, help="NAME:BATCH")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=repeats)
    return p


def start(args: argparse.Namespace, tune_allocator: bool = True) -> list[tuple[str, int]]:
    """Threads (and by default the tuned allocator) set, a header printed; returns the (name, batch) pairs."""
    torch.set_num_threads(args.threads)
    if tune_allocator:
        coatvit.tune_cpu_allocator()
    print(f"torch {torch.__version__}, {args.threads} threads, {args.img_size} px, median of {args.repeats}, "
          f"allocator {'tuned' if tune_allocator else 'default'}")
    return [(spec.split(":")[0], int(spec.split(":")[1])) for spec in args.models]


def time_switch(name: str, mode: str, batch: int, size: int, repeats: int, switch) -> dict[bool, list[float]]:
    """Seconds per step of model `name` (seed 0) in `mode` with `switch(True)` and `switch(False)` set before each
    step, interleaved (`time_interleaved`; 10 steps per repeat at batch-1 latency, 2 in inference, 1 in training);
    `switch(None)` (the default) afterwards."""
    torch.manual_seed(0)
    model = coatvit.create_model(name)
    step = make_step(mode, model, BenchmarkConfig(model=name, batch_size=batch, img_size=(size, size)))

    def run(on: bool):
        switch(on)
        step()

    steps = 10 if mode == "latency" else 1 if mode == "train" else 2
    try:
        return time_interleaved({True: lambda: run(True), False: lambda: run(False)},
                                BenchmarkConfig(repeats=repeats, steps=steps, warmup=1))
    finally:
        switch(None)


def print_ab_table(models: list[tuple[str, int]], modes: list[str], time_both, repeats: int, img_size: int,
                   on: str, off: str) -> None:
    """The table of a model-level switch: per model and mode, `time_both(name, mode, batch, img_size, repeats)`'s
    medians with the switch on and off (dict keys True / False, seconds per step) and the median per-repeat speedup."""
    print(f"| model | mode | batch | {on} (ms) | {off} (ms) | speedup: median of per-repeat ratios (min-max) |")
    print("|---|---|---|---|---|---|")
    for name, batch in models:
        for mode in modes:
            t = time_both(name, mode, batch, img_size, repeats)
            ratios = [b / a for a, b in zip(t[True], t[False])]
            print(f"| {name} | {mode} | {1 if mode == 'latency' else batch} | {statistics.median(t[True]) * 1e3:.1f} "
                  f"| {statistics.median(t[False]) * 1e3:.1f} | {statistics.median(ratios):.3f}x "
                  f"({min(ratios):.3f}-{max(ratios):.3f}) |", flush=True)


def training_model(name: str, batch: int, img_size: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """Model `name` in train mode (seed 0, drop path off, so that variants compute the same thing) and a random
    batch of images."""
    torch.manual_seed(0)
    model = coatvit.create_model(name, drop_path_rate=0.0).train()
    return model, torch.randn(batch, 3, img_size, img_size)


def gradients(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The parameters' gradients of a fixed loss on `model(x)`, to check that two variants of a training step agree."""
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    return [p.grad.clone() for p in model.parameters()]


def kernel_parser(description: str, shapes: list[str]) -> argparse.ArgumentParser:
    """Command line of the GPU kernel scripts that time one kernel per CoaT shape (layer_norm_sweep.py,
    fused_mlp.py, cpe_kernel.py): which shapes, the batch size, and the device (cuda, or cpu under Triton's
    interpreter)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--shapes", nargs="+", default=shapes, choices=shapes)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    return p


def kernel_device(device: str, script: str) -> str:
    """`device` for a script that times Triton kernels: a visible CUDA GPU, or the CPU under Triton's interpreter
    (to check the script, timings meaningless); anything else ends the script with the reason."""
    from coatvit import kernels

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{script} times kernels on a CUDA GPU; none is visible here (or check it on the CPU under "
                         "TRITON_INTERPRET=1 with --device cpu)")
    if device == "cpu" and not kernels.interpreting():
        raise SystemExit("--device cpu runs the kernels under Triton's interpreter: set TRITON_INTERPRET=1")
    return device
