"""Triton kernels for CoaT's conv-attention, LayerNorm and MLP on a GPU (by default for CUDA batches of 128+ images).

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
under autocast are widened on load), so outputs match the eager fast path to float rounding. Every grid puts the
heads fastest, so programs that run together read the same token rows; tokens per block and warps per program
come from `LAUNCH`, per padded head width (benchmarks/triton_sweep.py).

A fifth, `layer_norm_kernel`, normalizes many rows per program (PyTorch's LayerNorm gives each 64-320-channel row
a block of threads, mostly idle) and writes its result in the dtype its reader wants: under autocast, bf16 for a
block's norm1/norm2, which only Linear layers read (`coatvit.model.LayerNorm`). On an H100 it runs the (B, N, C)
LayerNorm of CoaT's stages 2.4-12x faster than PyTorch's LayerNorm plus the cast (benchmarks/layer_norm_sweep.py).
Inference only: with autograd recording, PyTorch's LayerNorm runs.

A sixth, `residual_mlp_kernel`, runs a block's MLP sub-layer x + fc2(GELU(fc1(norm2(x)))) in inference under
bf16/fp16 autocast: a tile of token rows per program, the hidden units a few dozen at a time, so the 4-8x wide
hidden activations stay in registers, rounded to the autocast dtype wherever the eager ops round them. Tiles come
from Triton's autotuner. Models use it for the row widths in FUSED_MLP_WIDTHS (coat_lite's 64 and 128 channels):
on an H100 it runs coat_lite's first stage's MLP 2.6x faster than the eager ops (benchmarks/fused_mlp.py).

A seventh, `residual_dwconv_kernel`, runs the CPE in inference: x + DWConv3x3(x) over the image tokens, read in
place in the (B, N, C) token layout, the class token copied, in one pass (the eager ops cast the tokens to a
channels-last map, convolve, add the bias, add the tokens and copy the class token, several passes). It rounds
where a convolution under autocast rounds. Models use it for rows of a multiple of CPE_ALIGNMENT (16) channels
(coat_lite's 64-320): on an H100, 1.8-1.9x the eager ops; coat_lite_tiny inference 16438 img/s with it (15212 in
the session before, without it; benchmarks/cpe_kernel.py, BENCHMARKS.md). The CRPE's 3-7 px convolution stays
with cuDNN: the same kernel with the windows merged into a zero-padded 7x7 was about 2.5x slower than cuDNN there.

When they run (`mode()`, from `set_enabled` or the environment variable `COATVIT_TRITON`):

- `auto` (the default): CUDA tensors on a GPU of compute capability 8.0 or newer, in batches of `AUTO_MIN_BATCH`
  (128) images or more, inference and training. Measured on an H100 (BENCHMARKS.md, bf16 AMP, batch 256):
  inference 1.95x faster for coat_lite_tiny and 1.61x for coat_tiny, training 1.15x for coat_tiny and 1.12x for
  coat_lite_tiny. Smaller batches keep the eager ops, being bound by the CPU's launches (see AUTO_MIN_BATCH), and
  so do attention heads of 40-64 channels (see EAGER_HEAD_WIDTHS). If a launch fails (Triton needs a C compiler
  at run time, say), it warns once and the eager ops serve the rest of the process.
- `on` (`COATVIT_TRITON=1`, `set_enabled(True)`): every CUDA forward, any batch size (EAGER_HEAD_WIDTHS still
  applies; empty it for every head width).
- `off` (`COATVIT_TRITON=0`, `set_enabled(False)`): never.

Never inside torch.compile, torch.export or TorchScript tracing (those see the eager ops, which they fuse or export
themselves). Tests run the same kernels on the CPU under Triton's interpreter (`TRITON_INTERPRET=1`), where CPU
tensors are allowed too when the mode is `on`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import warnings

import torch

ENV = "COATVIT_TRITON"
_enabled: bool | None = None  # None: follow the environment variable
_ENV_VALUES = {"": "auto", "auto": "auto", "1": "on", "true": "on", "yes": "on", "on": "on",
               "0": "off", "false": "off", "no": "off", "off": "off"}


def set_enabled(enable: bool | None) -> None:
    """Kernels always (True) or never (False) for this process; None goes back to `COATVIT_TRITON` (default auto)."""
    global _enabled
    _enabled = enable


def mode() -> str:
    """'auto', 'on' or 'off' (see the module's docstring)."""
    if _enabled is not None:
        return "on" if _enabled else "off"
    value = os.environ.get(ENV, "auto").strip().lower()
    if value not in _ENV_VALUES:  # a GPU speed setting: a typo must not stop a model, on a CPU least of all
        _warn_unknown(value)
        return "auto"
    return _ENV_VALUES[value]


@functools.cache
def _warn_unknown(value: str) -> None:
    warnings.warn(f"{ENV} must be auto, 1 or 0, got {value!r}; using auto (Triton kernels for CUDA inference)",
                  RuntimeWarning, stacklevel=4)


def enabled() -> bool:
    """Whether the kernels are forced on (`mode() == 'on'`)."""
    return mode() == "on"


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


_auto_failure: str | None = None  # why `auto` fell back to the eager ops for the rest of the process


def fall_back(error: BaseException) -> bool:
    """Called when the kernels raised: in `auto` mode, warn once and use the eager ops from then on (True: the
    caller computes the eager result). A missing C compiler or an unsupported GPU stops Triton's first launch; `auto`
    is a speed choice and must not break a model that runs without it. In `on` mode (asked for explicitly), and for
    running out of GPU memory (the eager ops need memory too), the error stands (False)."""
    global _auto_failure
    if mode() != "auto" or isinstance(error, torch.OutOfMemoryError):
        return False
    first_line = str(error).strip().split("\n", 1)[0]
    _auto_failure = f"{type(error).__name__}: {first_line}"
    warnings.warn(f"coatvit: the Triton kernels failed ({_auto_failure[:300]}); using the eager ops from now "
                  f"on. Set {ENV}=0 to skip them, or {ENV}=1 to see the full error.", RuntimeWarning,
                  stacklevel=2)
    return True


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


# `auto` leaves batches smaller than this to the eager ops. Below it a step is bound by the CPU launching ops (on an
# H100, coat_lite_tiny inference takes 9-11 ms per step from 2 to 64 images), and the kernels' launches cost the
# CPU more than the ops they replace. Measured there, kernels on vs off, bf16 inference (BENCHMARKS.md):
# coat_lite_tiny 0.84x at batch 1, 0.88x at 8, 0.92x at 32, 0.93x at 64, 1.24x at 96, 1.41x at 128, 1.51x at
# 256; coat_tiny 0.87x at 1, 0.93x at 32, 0.83x at 64, 1.61x at 256.
AUTO_MIN_BATCH = 128


def decide(mode: str, device_type: str, capability: tuple[int, int] | None, interpreter: bool,
           batch: int = AUTO_MIN_BATCH) -> bool:
    """The policy of `use_kernels`, apart from availability and tracing: `capability` of the CUDA device (None
    elsewhere), `interpreter` whether Triton's CPU interpreter is on, `batch` the images in the input."""
    if mode == "off":
        return False
    if device_type == "cpu":
        return interpreter and mode == "on"
    if device_type != "cuda":
        return False
    return mode == "on" or (capability is not None and capability >= (8, 0) and batch >= AUTO_MIN_BATCH)


def use_kernels(x: torch.Tensor) -> bool:
    """Whether the attention on input `x` runs the Triton kernels."""
    m = mode()
    if m == "off" or torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    if m == "auto" and _auto_failure is not None:
        return False
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):  # they compute in fp32: float64 stays eager
        return False
    capability = None  # auto needs a CUDA GPU of compute capability 8.0+ (ROCm builds report other numbers)
    if x.is_cuda and torch.version.hip is None:
        capability = _capability(x.device.index if x.device.index is not None else torch.cuda.current_device())
    batch = x.shape[0] if x.dim() > 0 else 1
    return decide(m, x.device.type, capability, interpreting(), batch) and available()


def run(launch, *args):
    """`launch(*args)`, or None where the kernel failed and `fall_back` chose the eager ops (the caller then
    computes the eager result)."""
    try:
        return launch(*args)
    except Exception as e:
        if not fall_back(e):
            raise
    return None


def _kernels():
    """The jitted kernels, imported on first use (importing triton costs a second; CPU-only users never pay it)."""
    from . import _triton_kernels

    return _triton_kernels


@dataclasses.dataclass(frozen=True)
class Launch:
    """Launch settings of the kernels for one padded head width: tokens per loop step of the streaming kernels
    (context, context_grad; one program per image and head), tokens per program of the tiled kernels (output,
    input_grad), and warps per program of each."""

    stream_block: int = 64
    stream_warps: int = 4
    tile_block: int = 64
    tile_warps: int = 4


# Per padded head width D; widths not listed take Launch()'s defaults. Chosen by benchmarks/triton_sweep.py on an
# H100 (bf16 autocast, batch 256, one conv-attention module, BENCHMARKS.md): D 16 (coat_lite stage 1, 8-channel
# heads) inference 1.29x the eager ops and forward + backward 1.17x, against 1.24x / 1.09x with the defaults; D 32
# (coat_tiny, 19-channel heads) 2.12x / 1.41x against 1.87x / 1.28x. D 64 is not swept yet. Some settings are far
# slower (D 32 with 64-token tiles on 2 warps or 128-token tiles on 4: 0.3x), so sweep before adding one.
LAUNCH: dict[int, Launch] = {
    16: Launch(stream_block=32, stream_warps=2, tile_block=64, tile_warps=2),
    32: Launch(stream_block=32, stream_warps=2, tile_block=32, tile_warps=2),
}


def launch(D: int) -> Launch:
    return LAUNCH.get(D, Launch())


# Padded head widths whose attention keeps the eager ops even where the policy runs the kernels. D 64 (heads of
# 40 and 64 channels: stage 4 of coat_lite_tiny, stages 3-4 of coat_lite_mini/small/medium, stages 2-4 of
# coat_small): on an H100 the conv-attention module of a 14x14-token, 320-channel stage took 5.5-10.8 ms with the
# kernels under each of four launch settings against 1.2 ms with the eager ops (bf16, batch 256,
# benchmarks/triton_sweep.py; BENCHMARKS.md). benchmarks/kernel_widths.py times whole models either way.
EAGER_HEAD_WIDTHS: set[int] = {64}


def _padded_width(channels: int) -> int:
    """The kernels' padded width (head width D of the attention, row width of the fused MLP): the next power of
    two, at least 16 (`tl.dot`'s minimum)."""
    return max(16, 1 << (channels - 1).bit_length())


def attention_kernels_for(head_channels: int) -> bool:
    """Whether heads of this many channels may take the attention kernels (see EAGER_HEAD_WIDTHS)."""
    return _padded_width(head_channels) not in EAGER_HEAD_WIDTHS


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
    with _device_of(qkv):
        if torch.is_grad_enabled() and (qkv.requires_grad or (conv_v is not None and conv_v.requires_grad)):
            return _FactorAttention.apply(qkv, conv_v, num_heads, scale)
        return _forward(qkv, num_heads, scale, conv_v)[0]


def _device_of(t: torch.Tensor):
    """Triton launches on the current CUDA device and its current stream: make that the tensor's device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()



def _forward(qkv, num_heads, scale, conv_v):
    import triton

    B, N, C3 = qkv.shape
    C = C3 // 3
    Ch = C // num_heads
    D = _padded_width(Ch)
    k = _kernels()
    cfg = launch(D)
    ctx = torch.empty(B, num_heads, D, D, device=qkv.device, dtype=torch.float32)
    stats = torch.empty(B, num_heads, 2, D, device=qkv.device, dtype=torch.float32)  # softmax max and sum
    k.context_kernel[(B * num_heads,)](qkv, ctx, stats, N, C, Ch, num_heads, qkv.stride(0), qkv.stride(1), scale,
                                       D=D, BLOCK_N=cfg.stream_block, num_warps=cfg.stream_warps)
    out = torch.empty(B, N, C, device=qkv.device, dtype=qkv.dtype)
    cv = out if conv_v is None else conv_v  # an unused pointer when there is no CRPE
    k.output_kernel[(B * num_heads, triton.cdiv(N, cfg.tile_block))](
        qkv, ctx, cv, out, N, Ch, num_heads, qkv.stride(0), qkv.stride(1), cv.stride(0), cv.stride(1),
        out.stride(0), out.stride(1), HAS_CRPE=conv_v is not None, D=D, BLOCK_N=cfg.tile_block,
        num_warps=cfg.tile_warps)
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
        cfg = launch(D)
        with _device_of(qkv):
            dctx = torch.empty_like(context)
            delta = torch.empty(B, h, D, device=qkv.device, dtype=torch.float32)
            k.context_grad_kernel[(B * h,)](qkv, grad, context, dctx, delta, N, Ch, h, qkv.stride(0), qkv.stride(1),
                                            grad.stride(0), grad.stride(1), D=D, BLOCK_N=cfg.stream_block,
                                            num_warps=cfg.stream_warps)
            dqkv = torch.empty_strided(qkv.shape, qkv.stride(), dtype=qkv.dtype, device=qkv.device)  # qkv's offsets
            cv = grad if conv_v is None else conv_v
            dcv = None if conv_v is None else torch.empty_strided(conv_v.shape, conv_v.stride(), dtype=conv_v.dtype,
                                                                   device=conv_v.device)
            k.input_grad_kernel[(B * h, triton.cdiv(N, cfg.tile_block))](
                qkv, grad, context, dctx, delta, stats, cv, dqkv, grad if dcv is None else dcv, N, C, Ch, h, ctx.scale,
                qkv.stride(0), qkv.stride(1), grad.stride(0), grad.stride(1), cv.stride(0), cv.stride(1),
                HAS_CRPE=conv_v is not None, D=D, BLOCK_N=cfg.tile_block, num_warps=cfg.tile_warps)
            return dqkv, dcv, None, None


def _rows_and_output(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x as (rows, channels) with unit channel stride (a view where it can be), and an empty output of x's shape
    in `dtype`: the operands of the row-wise kernels (LayerNorm, fused MLP)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2, torch.empty(x.shape, device=x.device, dtype=dtype)


# LayerNorm launch settings per padded row width: (elements per program, i.e. rows x padded width; warps per
# program). Swept on an H100 (benchmarks/layer_norm_sweep.py, batch 256, fp32 in, bf16 out): at widths 64, 128
# and 512 the first choice, NORM_DEFAULT, is within 2% of the fastest setting (or is it); at 256 (CoaT's 152 and
# coat_mini's 216 channels) four rows of one warp take 0.41 ms over the three shapes against 0.49 ms.
NORM_DEFAULT = (4096, 4)
NORM_LAUNCH: dict[int, tuple[int, int]] = {256: (1024, 1)}


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """LayerNorm over the last dimension in fp32, written as `out_dtype` (default: x's dtype). Inference only (no
    backward). With `out_dtype=torch.bfloat16` under autocast it saves the fp32 result's round trip to memory and
    the cast a Linear would make of it: the same bf16 values, as both round the fp32 result to nearest."""
    import triton

    x2, y = _rows_and_output(x, out_dtype or x.dtype)
    M, C = x2.shape
    if M == 0:
        return y
    block_c = triton.next_power_of_2(C)
    elements, warps = NORM_LAUNCH.get(block_c, NORM_DEFAULT)
    block_m = max(1, elements // block_c)
    with _device_of(x):
        _kernels().layer_norm_kernel[(triton.cdiv(M, block_m),)](
            x2, weight, bias, y, M, C, x2.stride(0), C, eps, BLOCK_M=block_m, BLOCK_C=block_c,
            num_warps=warps)
    return y


# Padded row widths (channels rounded up to a power of two, at least 16) whose MLP runs the fused kernel where the
# kernels run. On an H100 (bf16 autocast, batch 256, benchmarks/fused_mlp.py, BENCHMARKS.md), against the LayerNorm
# kernel + the eager MLP: coat_lite stage 1 (64 channels, 512 hidden units) 1.04 vs 1.57 ms (2.69 ms all eager),
# stage 2 (128, 1024) 0.71 vs 0.82 ms; slower at 152-256 channels (0.60-0.83x: coat_tiny, coat_mini, coat_lite
# stage 3), where its GELU and roundings on the hidden tile cost more than the memory traffic they save. The kernel
# itself takes any width up to 256.
FUSED_MLP_WIDTHS: set[int] = {64, 128}


def fused_mlp_for(channels: int) -> bool:
    """Whether rows of this many channels take `residual_mlp` in a model (see FUSED_MLP_WIDTHS)."""
    return _padded_width(channels) in FUSED_MLP_WIDTHS


def residual_mlp(x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float,
                 fc1_weight: torch.Tensor, fc1_bias: torch.Tensor, fc2_weight: torch.Tensor,
                 fc2_bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x + fc2(GELU(fc1(LayerNorm(x)))) in one kernel, the products in `dtype` (the autocast dtype; fp32 for
    plain fp32 products), every intermediate rounded where the eager ops under autocast round it. Inference only.

    The eager ops write and read the hidden activations (4-8x the width of x) three times in the autocast dtype;
    here they never leave the registers, and x is read once and the result written once. Rows of up to 256
    channels (the fp32 accumulator of a tile of rows stays in registers)."""
    import triton

    if _padded_width(x.shape[-1]) > 256:
        raise ValueError(f"residual_mlp takes rows of up to 256 channels, got {x.shape[-1]}; use the eager ops")
    x2, y = _rows_and_output(x, x.dtype)
    M, C = x2.shape
    if M == 0:
        return y
    w1, w2 = fc1_weight.to(dtype).contiguous(), fc2_weight.to(dtype).contiguous()
    with _device_of(x):
        _kernels().residual_mlp_kernel[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)](
            x2, norm_weight, norm_bias, w1, fc1_bias, w2, fc2_bias, y, M, C, w1.shape[0], x2.stride(0), C, eps,
            INTERPRETER=interpreting(), BLOCK_C=_padded_width(C))
    return y


_ROUND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a convolution or Linear computes in on x: the autocast dtype where autocast is on, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


# The CPE kernel runs on rows of a multiple of this many channels. Triton specializes a kernel on integer arguments
# divisible by 16, and only then knows a token row starts on a 16-element boundary and loads its channels in wide
# vectors. On an H100 (bf16 autocast, batch 256, benchmarks/cpe_kernel.py, BENCHMARKS.md): 64 channels 1.80x the
# eager ops, 128 channels 1.88x, but CoaT's 152 channels 0.30x (4.97 ms against 1.47 ms, element-wise loads).
CPE_ALIGNMENT = 16


def cpe_kernel_for(channels: int) -> bool:
    """Whether a CPE over rows of this many channels takes `residual_dwconv` in a model (see CPE_ALIGNMENT)."""
    return channels % CPE_ALIGNMENT == 0


def depthwise_taps(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A depthwise convolution's (C, 1, K, K) weight and (C,) bias as the operands of `residual_dwconv`: the taps
    (K*K, C) and the bias (zeros where None), fp32 and contiguous."""
    C, K = weight.shape[0], weight.shape[-1]
    taps = weight.detach().reshape(C, K * K).t().float().contiguous()
    bias = torch.zeros(C, device=weight.device) if bias is None else bias.detach().float().contiguous()
    return taps, bias


def residual_dwconv(x: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor, size: tuple[int, int],
                    dtype: torch.dtype) -> torch.Tensor:
    """The CPE in one pass: x plus a depthwise KxK convolution (zero padding K // 2; taps and bias from
    `depthwise_taps`) of the image tokens of x (B, N, C), the last H*W tokens, read in place in the token layout;
    the leading (class) tokens copied. The convolution computes in `dtype` as it would under autocast (inputs, taps
    and bias rounded to it, fp32 sums, the result rounded), the sum with x in fp32; returns (B, N, C) in x's dtype.
    Inference only.

    The eager ops cast the tokens to a channels-last map, convolve, add the bias, add the tokens and copy the class
    token beside them, several passes over memory; here one pass reads x and writes the result."""
    import triton

    B, N, C = x.shape
    H, W = size
    K = int(round(taps.shape[0] ** 0.5))
    if taps.shape != (K * K, C) or K % 2 == 0 or N < H * W or dtype not in _ROUND:
        raise ValueError(f"residual_dwconv takes tokens (B, N >= H*W, C), odd KxK taps (K*K, C) and a float dtype, "
                         f"got x {tuple(x.shape)}, size {tuple(size)}, taps {tuple(taps.shape)}, {dtype}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty(B, N, C, device=x.device, dtype=x.dtype)
    if B * H * W == 0:
        return y.copy_(x)
    args = (x, taps, bias, y, B, H, W, C, N - H * W, x.stride(0), x.stride(1), y.stride(0), y.stride(1))
    consts = dict(K=K, ROUND=_ROUND[dtype], BY_HAND=interpreting())
    kernel = _kernels().residual_dwconv_kernel
    if interpreting():  # no autotuning: tiles about the size of the work (the interpreter pays per operation of a
        # program, so few programs)
        block_p, block_c = min(4096, triton.next_power_of_2(B * H * W)), min(256, triton.next_power_of_2(C))
        kernel.fn[(triton.cdiv(B * H * W, block_p), triton.cdiv(C, block_c))](*args, **consts, BLOCK_P=block_p,
                                                                              BLOCK_C=block_c)
    else:
        with _device_of(x):
            kernel[lambda meta: (triton.cdiv(B * H * W, meta["BLOCK_P"]), triton.cdiv(C, meta["BLOCK_C"]))](
                *args, **consts)
    return y
