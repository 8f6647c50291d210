"""The Triton LayerNorm (coatvit.kernels.layer_norm) against PyTorch's, per LayerNorm shape of CoaT, on a GPU.

    python benchmarks/layer_norm_sweep.py                  (a CUDA GPU; about half a minute)
    python benchmarks/layer_norm_sweep.py --batch-size 64 --shapes s1-64 s3-320
    TRITON_INTERPRET=1 python benchmarks/layer_norm_sweep.py --device cpu --batch-size 1 --shapes s4-512
                                                           (Triton's CPU interpreter: checks, no useful timings)

What a block's norm1/norm2 cost under bf16 autocast, for the (B, N, C) fp32 residual stream of each stage:
PyTorch's LayerNorm (fp32 out, as autocast makes it) plus the bf16 cast the next Linear makes of it, against the
kernel writing bf16 straight away, under each launch setting (elements per program, warps). Median milliseconds
by triton.testing.do_bench; each setting is first checked against PyTorch (the fp32 result rounded to bf16). The
last lines give the fastest setting per row width, by the time summed over its shapes
(`coatvit.kernels.NORM_LAUNCH`).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from coatvit import kernels

import _ab

# name: (tokens with the class token, channels) of the 224-px stages of the Lite models and of CoaT
SHAPES = {"s1-64": (3137, 64), "s2-128": (785, 128), "s3-320": (197, 320), "s4-512": (50, 512),
          "tiny-s1-152": (3137, 152), "tiny-s2-152": (785, 152), "mini-s2-216": (785, 216)}
SETTINGS = [(1024, 1), (2048, 2), (2048, 4), (4096, 4), (4096, 8), (8192, 8), (16384, 8)]  # (elements, warps)


def median_ms(fn, device: str) -> float:
    if device == "cpu":  # the interpreter: a few plain timings
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def main() -> None:
    args = _ab.kernel_parser(__doc__.splitlines()[0], list(SHAPES)).parse_args()
    _ab.kernel_device(args.device, "layer_norm_sweep.py")
    dev = args.device
    torch.manual_seed(0)
    best: dict[int, list] = {}
    for name in args.shapes:
        N, C = SHAPES[name]
        x = torch.randn(args.batch_size, N, C, device=dev)
        w, b = torch.randn(C, device=dev), torch.randn(C, device=dev)
        reference = median_ms(lambda: F.layer_norm(x, (C,), w, b, 1e-6).to(torch.bfloat16), dev)
        expected = F.layer_norm(x, (C,), w, b, 1e-6)
        moved = x.numel() * (4 + 2)  # bytes the kernel must move at least: fp32 in, bf16 out
        print(f"{name}: batch {args.batch_size}, {N} tokens, C {C}; PyTorch LayerNorm + bf16 cast "
              f"{reference:.3f} ms", flush=True)
        block_c = 1 << (C - 1).bit_length()
        chosen = kernels.NORM_LAUNCH.get(block_c)
        for elements, warps in SETTINGS:
            if elements < block_c:
                continue
            kernels.NORM_LAUNCH[block_c] = (elements, warps)
            out = kernels.layer_norm(x, w, b, 1e-6, torch.bfloat16)
            err = ((out.float() - expected).abs() / expected.abs().clamp_min(1e-3)).max().item()
            if not err < 2 ** -7:
                raise SystemExit(f"{name}: kernel disagrees with PyTorch under {elements} elements, {warps} warps "
                                 f"(relative error {err})")
            t = median_ms(lambda: kernels.layer_norm(x, w, b, 1e-6, torch.bfloat16), dev)
            best.setdefault(block_c, []).append((name, elements, warps, t))
            print(f"  {elements:5d} elements, {warps} warps: {t:.3f} ms ({reference / t:4.2f}x PyTorch, "
                  f"{moved / t / 1e6:6.0f} GB/s)", flush=True)
        kernels.NORM_LAUNCH.pop(block_c)
        if chosen is not None:
            kernels.NORM_LAUNCH[block_c] = chosen
    for block_c, rows in sorted(best.items()):
        settings = sorted({(e, w) for _, e, w, _ in rows})
        # the setting with the least time summed over this width's shapes
        total = {s: sum(r[3] for r in rows if (r[1], r[2]) == s) for s in settings}
        e, w = min(settings, key=total.get)
        default = total.get(kernels.NORM_DEFAULT)
        versus = "" if default is None else f", NORM_DEFAULT {default:.3f} ms"
        print(f"best for rows of {block_c} (padded): NORM_LAUNCH[{block_c}] = ({e}, {w}) "
              f"({total[(e, w)]:.3f} ms over {sorted({r[0] for r in rows})}{versus})")


if __name__ == "__main__":
    main()
