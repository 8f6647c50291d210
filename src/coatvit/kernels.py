"""Triton kernels for CoaT's conv-attention on a GPU (opt-in).

Two forward kernels replace the factorized attention's chain of eager ops (softmax over tokens, K^T V, Q x
context, the CRPE product and sum, and the head permutes between them), reading q, k and v straight from the qkv
projection's (B, N, 3C) output:

1. `context_kernel`, one program per (image, head): softmax(K)^T V over all N tokens in one streaming pass, with
   the running per-channel maximum and sum of an online softmax (softmax(K) is never written), times 1/sqrt(Ch).
2. `output_kernel`, one program per (image, block of tokens, head): Q x context, plus Q * DWConv(V) for the image
   tokens (the CRPE term, whose depthwise convolution stays with cuDNN), written in the (B, N, C) layout that the
   output projection reads.

Two backward kernels mirror them: `context_grad_kernel` reduces Q^T dOut per (image, head), and
`input_grad_kernel` writes dQ, dK, dV into the projection's (B, N, 3C) gradient and dDWConv(V), recomputing
softmax(K) from the saved per-channel maximum and sum. The softmax backward's sum over tokens comes from the two
small (Ch x Ch) matrices (sum_c' ctx * dctx), so no extra pass over K is needed.

Heads narrower than 16 channels are zero-padded to 16 inside the kernels (`tl.dot` needs 16); the padding is never
read from or written to memory. The products run in IEEE fp32 (no TF32), whatever the input dtype (bf16/fp16
under autocast are widened on load), so outputs match the eager fast path to float rounding.

Enable with `coatvit.kernels.set_enabled(True)` or `COATVIT_TRITON=1`. They run on CUDA tensors, in inference and
under autograd (no double backward), outside torch.compile; everything else takes the eager fast path. Tests run
the same kernels on the CPU under Triton's interpreter (`TRITON_INTERPRET=1`), where CPU tensors are allowed too.
"""

from __future__ import annotations

import functools
import os

import torch

ENV = "COATVIT_TRITON"
_enabled: bool | None = None  # None: follow the environment variable


def set_enabled(enable: bool | None) -> None:
    """Turn the Triton kernels on or off for this process (None: back to `COATVIT_TRITON`)."""
    global _enabled
    _enabled = enable


def enabled() -> bool:
    if _enabled is not None:
        return _enabled
    return os.environ.get(ENV, "0") not in ("", "0", "false", "no")


def interpreting() -> bool:
    """Triton's CPU interpreter (TRITON_INTERPRET=1): kernels run with NumPy on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_kernels(x: torch.Tensor) -> bool:
    """Whether the attention on input `x` runs the Triton kernels."""
    if not enabled() or torch.compiler.is_compiling() or not available():
        return False
    return x.is_cuda or (interpreting() and x.device.type == "cpu")


def _kernels():
    """The jitted kernels, imported on first use (importing triton costs a second; CPU-only users never pay it)."""
    from . import _triton_kernels

    return _triton_kernels


BLOCK_N = 64


def factor_attention(qkv: torch.Tensor, num_heads: int, scale: float,
                     conv_v: torch.Tensor | None = None) -> torch.Tensor:
    """Q softmax(K)^T V * scale (+ Q_img * conv_v) per head, as (B, N, C), from the qkv projection (B, N, 3C).

    `conv_v` is DWConv(V_img) in the token layout (B, N - 1, C). The kernels take any row strides but read
    channels with unit stride (a Linear output; the channels-last conv output seen through `as_tokens`), so other
    layouts are copied first. Differentiable in `qkv` and `conv_v` (backward kernels; no double backward)."""
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    if conv_v is not None and conv_v.stride(-1) != 1:
        conv_v = conv_v.contiguous()
    if torch.is_grad_enabled() and (qkv.requires_grad or (conv_v is not None and conv_v.requires_grad)):
        return _FactorAttention.apply(qkv, conv_v, num_heads, scale)
    return _forward(qkv, num_heads, scale, conv_v)[0]


def _padded_width(head_channels: int) -> int:
    import triton

    return max(16, triton.next_power_of_2(head_channels))


def _forward(qkv, num_heads, scale, conv_v):
    import triton

    B, N, C3 = qkv.shape
    C = C3 // 3
    Ch = C // num_heads
    D = _padded_width(Ch)
    k = _kernels()
    ctx = torch.empty(B, num_heads, D, D, device=qkv.device, dtype=torch.float32)
    stats = torch.empty(B, num_heads, 2, D, device=qkv.device, dtype=torch.float32)  # softmax max and sum
    k.context_kernel[(B, num_heads)](qkv, ctx, stats, N, C, Ch, qkv.stride(0), qkv.stride(1), scale, D=D,
                                     BLOCK_N=BLOCK_N)
    out = torch.empty(B, N, C, device=qkv.device, dtype=qkv.dtype)
    cv = out if conv_v is None else conv_v  # an unused pointer when there is no CRPE
    k.output_kernel[(B, triton.cdiv(N, BLOCK_N), num_heads)](
        qkv, ctx, cv, out, N, Ch, num_heads, qkv.stride(0), qkv.stride(1), cv.stride(0), cv.stride(1),
        out.stride(0), out.stride(1), HAS_CRPE=conv_v is not None, D=D, BLOCK_N=BLOCK_N)
    return out, ctx, stats


class _FactorAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, conv_v, num_heads, scale):
        out, context, stats = _forward(qkv, num_heads, scale, conv_v)
        ctx.save_for_backward(qkv, conv_v, context, stats)
        ctx.num_heads, ctx.scale = num_heads, scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        import triton

        qkv, conv_v, context, stats = ctx.saved_tensors
        grad = grad.contiguous()
        B, N, C3 = qkv.shape
        C, h = C3 // 3, ctx.num_heads
        Ch = C // h
        D = context.shape[-1]
        k = _kernels()
        dctx = torch.empty_like(context)
        delta = torch.empty(B, h, D, device=qkv.device, dtype=torch.float32)
        k.context_grad_kernel[(B, h)](qkv, grad, context, dctx, delta, N, Ch, qkv.stride(0), qkv.stride(1),
                                      grad.stride(0), grad.stride(1), D=D, BLOCK_N=BLOCK_N)
        dqkv = torch.empty_strided(qkv.shape, qkv.stride(), dtype=qkv.dtype, device=qkv.device)  # qkv's offsets
        cv = grad if conv_v is None else conv_v
        dcv = None if conv_v is None else torch.empty_strided(conv_v.shape, conv_v.stride(), dtype=conv_v.dtype,
                                                               device=conv_v.device)
        k.input_grad_kernel[(B, triton.cdiv(N, BLOCK_N), h)](
            qkv, grad, context, dctx, delta, stats, cv, dqkv, grad if dcv is None else dcv, N, C, Ch, h, ctx.scale,
            qkv.stride(0), qkv.stride(1), grad.stride(0), grad.stride(1), cv.stride(0), cv.stride(1),
            HAS_CRPE=conv_v is not None, D=D, BLOCK_N=BLOCK_N)
        return dqkv, dcv, None, None
