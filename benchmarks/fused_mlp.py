"""The fused residual MLP kernel (coatvit.kernels.residual_mlp) against the eager ops, per MLP shape of CoaT.

    python benchmarks/fused_mlp.py                        (a CUDA GPU; under a minute, most of it autotuning)
    python benchmarks/fused_mlp.py --batch-size 128 --shapes lite-s1-64 tiny-s1-152
    TRITON_INTERPRET=1 python benchmarks/fused_mlp.py --device cpu --batch-size 1 --shapes lite-s3-256
                                                          (Triton's CPU interpreter: checks, no useful timings)

A block's `x + MLP(norm2(x))` under bf16 autocast on the (B, N, C) fp32 residual stream of each stage, three ways:
PyTorch's ops (LayerNorm, fc1, GELU, fc2, add; what timm runs), the same with the Triton LayerNorm writing bf16
(the default before the fused kernel), and the fused kernel. Median milliseconds by triton.testing.do_bench, after
checking the kernel against the eager result; the last column is the launch setting the autotuner chose.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from coatvit import kernels

import _ab
from layer_norm_sweep import median_ms

# name: (tokens with the class token, channels, hidden units) of the 224-px stages of coat_lite_tiny, coat_tiny
# and coat_mini: every width the kernel takes (up to 256 channels); models use it for kernels.FUSED_MLP_WIDTHS
SHAPES = {"lite-s1-64": (3137, 64, 512), "lite-s2-128": (785, 128, 1024), "lite-s3-256": (197, 256, 1024),
          "tiny-s1-152": (3137, 152, 608), "tiny-s2-152": (785, 152, 608), "tiny-s3-152": (197, 152, 608),
          "mini-s1-216": (3137, 216, 864)}


def main() -> None:
    args = _ab.kernel_parser(__doc__.splitlines()[0], list(SHAPES)).parse_args()
    dev = _ab.kernel_device(args.device, "fused_mlp.py")
    dtype = torch.bfloat16
    torch.manual_seed(0)
    for name in args.shapes:
        N, C, H = SHAPES[name]
        x = torch.randn(args.batch_size, N, C, device=dev)
        nw, nb = 1 + 0.2 * torch.randn(C, device=dev), 0.2 * torch.randn(C, device=dev)
        fc1, fc2 = torch.nn.Linear(C, H).to(dev), torch.nn.Linear(H, C).to(dev)
        w1, b1, w2, b2 = fc1.weight.detach(), fc1.bias.detach(), fc2.weight.detach(), fc2.bias.detach()

        def eager():
            with torch.autocast(dev, dtype):
                return x + fc2(F.gelu(fc1(F.layer_norm(x, (C,), nw, nb, 1e-6))))

        def triton_norm():
            with torch.autocast(dev, dtype):
                return x + fc2(F.gelu(fc1(kernels.layer_norm(x, nw, nb, 1e-6, dtype))))

        def fused():
            return kernels.residual_mlp(x, nw, nb, 1e-6, w1, b1, w2, b2, dtype)

        with torch.no_grad():
            expected, out = eager(), fused()
            mlp_max = (expected - x).abs().max().item()
            err = (out - expected).abs().max().item()
            if not err <= 2 ** -6 * mlp_max:  # a few bf16 steps of the MLP's output: summation order only
                raise SystemExit(f"{name}: the fused kernel disagrees with the eager ops by {err} "
                                 f"(MLP outputs up to {mlp_max})")
            t_eager, t_norm, t_fused = (median_ms(fn, dev) for fn in (eager, triton_norm, fused))
        best = kernels._kernels().residual_mlp_kernel.best_config
        setting = (f"{best.kwargs['BLOCK_M']} tokens x {best.kwargs['BLOCK_H']} hidden units, {best.num_warps} "
                   f"warps, {best.num_stages} stages")
        moved = x.numel() * 8  # bytes the kernel must move at least: fp32 in, fp32 out
        print(f"{name}: batch {args.batch_size}, {N} tokens, C {C}, hidden {H}: eager {t_eager:.3f} ms, "
              f"Triton LayerNorm + eager {t_norm:.3f} ms, fused {t_fused:.3f} ms ({t_eager / t_fused:.2f}x eager, "
              f"{t_norm / t_fused:.2f}x LayerNorm kernel, {moved / t_fused / 1e6:.0f} GB/s); autotuned {setting}",
              flush=True)


if __name__ == "__main__":
    main()
