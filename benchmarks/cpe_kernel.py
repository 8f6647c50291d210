"""The Triton CPE kernel (coatvit.kernels.residual_dwconv: x + DWConv3x3(x) over the tokens) against the eager ops,
per CPE shape of coat_lite_tiny and coat_tiny.

    python benchmarks/cpe_kernel.py                       (a CUDA GPU; under a minute, most of it autotuning)
    python benchmarks/cpe_kernel.py --batch-size 128 --shapes lite-s1-64 tiny-s1-152
    TRITON_INTERPRET=1 python benchmarks/cpe_kernel.py --device cpu --batch-size 1 --shapes lite-s4-320
                                                          (Triton's CPU interpreter: checks, no useful timings)

Each stage's CPE (ConvPosEnc) as the models run it in inference under bf16 autocast on the fp32 residual stream,
with the kernels off (the eager ops: the tokens cast and copied to a channels-last map, cuDNN's convolution, the
bias, the residual sum written beside the class token) and on (one Triton pass, at every width: the models take it
for multiples of kernels.CPE_ALIGNMENT channels). Median milliseconds by
triton.testing.do_bench, after checking the kernel against the eager result; the last column is the launch setting
the autotuner chose.
"""

from __future__ import annotations

import torch

from coatvit import kernels
from coatvit.model import ConvPosEnc

import _ab
from layer_norm_sweep import median_ms

# name: (tokens per side, channels) of the 224-px stages of coat_lite_tiny and coat_tiny
SHAPES = {"lite-s1-64": (56, 64), "lite-s2-128": (28, 128), "lite-s3-256": (14, 256), "lite-s4-320": (7, 320),
          "tiny-s1-152": (56, 152), "tiny-s2-152": (28, 152), "tiny-s3-152": (14, 152), "tiny-s4-152": (7, 152)}


def main() -> None:
    args = _ab.kernel_parser(__doc__.splitlines()[0], list(SHAPES)).parse_args()
    dev = _ab.kernel_device(args.device, "cpe_kernel.py")
    kernels.CPE_ALIGNMENT = 1  # every width on the kernel when it is on, whatever the models' policy
    torch.manual_seed(0)
    for name in args.shapes:
        side, C = SHAPES[name]
        cpe = ConvPosEnc(C).to(dev).eval()
        x = torch.randn(args.batch_size, 1 + side * side, C, device=dev)
        results = []
        for use in (False, True):  # the eager ops, then the kernel
            kernels.set_enabled(use)
            try:
                with torch.no_grad(), torch.autocast(dev, torch.bfloat16):
                    results += [cpe(x, (side, side)), median_ms(lambda: cpe(x, (side, side)), dev)]
            finally:
                kernels.set_enabled(None)
        eager, t_eager, fast, t_fast = results
        conv_max = (eager - x).abs().max().item()
        err = (fast - eager).abs().max().item()
        if not err <= 2 ** -6 * conv_max:  # the eager ops round the bias sum once more: a bf16 step or two
            raise SystemExit(f"{name}: the CPE kernel disagrees with the eager ops by {err} (convolution outputs up "
                             f"to {conv_max})")
        best = kernels._kernels().residual_dwconv_kernel.best_config if dev == "cuda" else None
        setting = f"{best.kwargs['BLOCK_P']} pixels x {best.kwargs['BLOCK_C']} channels, {best.num_warps} warps" \
            if best else "none (interpreter)"
        moved = x.numel() * 8  # bytes the kernel must move at least: fp32 in, fp32 out
        print(f"{name}: batch {args.batch_size}, {side}x{side} tokens, C {C}: eager {t_eager:.3f} ms, kernel "
              f"{t_fast:.3f} ms ({t_eager / t_fast:.2f}x, {moved / t_fast / 1e6:.0f} GB/s); autotuned {setting}",
              flush=True)


if __name__ == "__main__":
    main()
