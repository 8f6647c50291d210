"""Native CPU kernels: C compiled at first use with the system's C compiler, called through ctypes.

Three inference kernels (csrc/cpu_kernels.c), each in place of a chain of eager ops:

- `dwconv_tokens`: CoaT's depthwise convolutions are a few percent of its MACs but, on a CPU, cost far more than
  that: oneDNN spends about 60 us per call on a small map, the CRPE's v is copied out of the qkv projection into a
  layout the convolution takes, the three CRPE windows run as one zero-padded 7x7 kernel, and the sums that follow
  (CPE's residual, CRPE's Q * DWConv(V) added to the attention) are separate passes. The kernel reads the (B, N, C)
  token layout directly, skips the padded zeros per block of 8 channels and writes the sum in the same pass.
- `factor_attention`: the factorized attention's products. As batched matrix products, wide heads need q, k and v
  permuted to (B, h, N, Ch) and the result permuted back, each a copy, and softmax(K) as one more tensor; narrow
  heads (8 and 16 channels) run as one masked (C x C) product per image, 8x and 4x the MACs. The kernel reads q, k,
  v in place from the projection, keeps softmax(K) and V in per-image scratch, computes each head's own products and
  writes the (B, N, C) output.
- `mix_tokens`: a parallel block's co-scale sum for one scale, x + a + resize(a_t) + resize(a_u), where the eager
  ops copy each source's image tokens to a channels-last map, interpolate, concatenate the class token back and add
  three times, each a fresh tensor. The kernel reads the sources' tokens in place, takes PyTorch's bilinear taps
  (align_corners=False) and writes the sum once.

Measured per module and per model in BENCHMARKS.md (benchmarks/native_kernels.py, `coatvit benchmark --vs
ours-no-native`).

Training takes the depthwise convolutions and the attention products too, forward and backward
(`coatvit.model.DepthwiseTokens`, `coatvit.model.NativeFactorAttention`): the convolutions' input gradient is
`dwconv_tokens` with the taps flipped, their weight and bias gradients `dwconv_weight_grad` (a reduction over the
tokens per tap into per-thread buffers added in thread order); `factor_attention_backward` recomputes an image's
softmax and contexts and writes dq, dk, dv side by side into one qkv gradient, with the forward's tiled products.

When they run: CPU float32 inference (nothing for autograd to record) and, but for the co-scale mix, CPU float32
training outside autocast; outside torch.compile, torch.export, tracing and torch.func transforms (those
see the eager ops), when `COATVIT_NATIVE` is not 0/false/no/off (`set_enabled` overrides it) and
the library could be built (Linux, with GCC or Clang). The first use compiles it (about 0.2 s) into
`$COATVIT_CACHE/native` (default `~/.cache/coatvit/native`), named by a hash of the source, compiler and flags, so
later processes load it directly. With no C compiler (`$CC`, else cc, gcc or clang on the PATH) the eager ops
run, silently; a compiler that fails warns once and the eager ops run for the rest of the process.

A file at the expected path that does not load (a damaged cache) is rebuilt.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

from . import runtime

ENV = "COATVIT_NATIVE"
SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.c"

_enabled: bool | None = None  # None: follow the environment variable
_failure: str | None = None  # why the library is not available, once known


def set_enabled(enable: bool | None) -> None:
    """Native kernels where they apply (True) or never (False); None goes back to `COATVIT_NATIVE` (default on)."""
    global _enabled
    _enabled = enable


def enabled() -> bool:
    if _enabled is not None:
        return _enabled
    return not runtime.env_switched_off(ENV)


def failure() -> str | None:
    """Why the library could not be built or loaded (None: it was, or it was not tried yet)."""
    return _failure


def compiler() -> str | None:
    """The C compiler to build with: $CC, else the first of cc, gcc, clang on the PATH."""
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"])
    return next((path for name in ("cc", "gcc", "clang") if (path := shutil.which(name))), None)


def compile_flags() -> list[str]:
    """Optimization, OpenMP and the vector instructions this CPU has (PyTorch's own dispatch level: AVX2/FMA
    on x86-64 machines that PyTorch runs its AVX2 kernels on; the compiler's defaults elsewhere).

    Multiply-adds are contracted into fused ones (one rounding; GCC leaves them apart under -std=c99), and where
    PyTorch runs its AVX-512 kernels the 256-bit vectors may use AVX-512VL's 32 registers and masked operations
    (no 512-bit vectors, so no clock penalty): attention + CRPE 1.0-1.2x per stage but coat_tiny's first at batch
    1 (0.74-0.93x), the CPE 0.9-1.2x (noise), `benchmarks/native_flags.py`."""
    flags = ["-O3", "-shared", "-fPIC", "-fopenmp", "-std=c99", "-ffp-contract=fast"]
    capability = torch.backends.cpu.get_cpu_capability()
    if platform.machine().lower() in ("x86_64", "amd64") and capability in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
        if capability == "AVX512":
            flags += ["-mavx512f", "-mavx512vl", "-mprefer-vector-width=256"]
    return flags


def cache_dir() -> Path:
    return Path(os.environ.get("COATVIT_CACHE") or Path.home() / ".cache" / "coatvit") / "native"


def build(cc: str, flags: list[str], directory: Path) -> Path:
    """The shared library compiled from SOURCE into `directory`, reusing one built before with the same source,
    compiler and flags. Written under a temporary name and renamed, so concurrent processes never load a
    half-written file."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout.split("\n")[0]
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, version, *flags]).encode()).hexdigest()[:16]
    target = directory / f"{SOURCE.stem}-{key}.so"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        result = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"{Path(cc).name} exited with {result.returncode}: "
                               f"{(result.stderr or result.stdout).strip()[:500]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded library, or None where it cannot be built (see `failure`). Built once per process."""
    global _failure
    _failure = None
    if not sys.platform.startswith("linux"):
        _failure = f"built and tested on Linux only, this is {sys.platform}"
        return None
    cc = compiler()
    if cc is None:
        _failure = "no C compiler found ($CC, cc, gcc, clang)"
        return None
    try:
        path = build(cc, compile_flags(), cache_dir())
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:  # a damaged file where the library should be: build it again
            path.unlink(missing_ok=True)
            lib = ctypes.CDLL(str(build(cc, compile_flags(), cache_dir())))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        _failure = f"{type(error).__name__}: {str(error).strip()}"
        warnings.warn(f"coatvit: the native CPU kernels could not be built ({_failure[:300]}); the eager ops run "
                      f"instead. Set {ENV}=0 to skip building them.", RuntimeWarning, stacklevel=3)
        return None
    i, n, ptr = ctypes.c_int, ctypes.c_long, ctypes.c_void_p
    lib.dwconv_tokens.argtypes = [ptr, n, n, ptr, ptr, ptr, i, i, i, i, i, ptr, n, n, ptr, n, n, ptr, n, n, i]
    lib.dwconv_tokens.restype = None
    lib.factor_attention.argtypes = [ptr, n, n, i, i, i, i, ctypes.c_float, ptr, n, n, ptr, ptr, ptr, i, i, i, i]
    lib.factor_attention.restype = i
    lib.mix_tokens.argtypes = [ptr, n, n, ptr, n, n, ptr, n, n, i, i, ptr, n, n, i, i, ptr, n, n, i, i, i, i, i]
    lib.mix_tokens.restype = None
    lib.dwconv_weight_grad.argtypes = [ptr, n, n, ptr, n, n, ptr, i, i, i, i, i, ptr, ptr, i]
    lib.dwconv_weight_grad.restype = i
    lib.factor_attention_backward.argtypes = [ptr, n, n, i, i, i, i, ctypes.c_float, ptr, n, n, ptr, n, n, i]
    lib.factor_attention_backward.restype = i
    lib.gelu_rows.argtypes = [ptr, n, ptr, n, n, n, i]
    lib.gelu_rows.restype = None
    lib.gelu_backward_rows.argtypes = [ptr, n, ptr, n, ptr, n, n, n, i]
    lib.gelu_backward_rows.restype = None
    return lib


def available() -> bool:
    """Whether the native kernels are on and built (building them on the first call)."""
    return enabled() and library() is not None


class DepthwiseWeights(NamedTuple):
    """Depthwise kernels in the layout `dwconv_tokens` reads: weight (K, K, C), bias (C,), per block of 8 channels
    the window its channels use (int32), and K, the largest window."""

    weight: torch.Tensor
    bias: torch.Tensor
    block_windows: torch.Tensor
    window: int


def depthwise_ok(convs: list[torch.nn.Conv2d]) -> bool:
    """Whether each conv is one the kernel computes: a float32 CPU 'same' depthwise conv of an odd square window
    (stride 1, no dilation, zero padding of half the window)."""
    for conv in convs:
        k = conv.kernel_size[0]
        if (conv.kernel_size != (k, k) or k % 2 == 0 or conv.stride != (1, 1) or conv.dilation != (1, 1)
                or conv.padding != (k // 2, k // 2) or conv.padding_mode != "zeros"
                or conv.groups != conv.in_channels or conv.out_channels != conv.in_channels
                or conv.weight.dtype != torch.float32 or conv.weight.device.type != "cpu"):
            return False
    return bool(convs)


def depthwise_weights(convs: list[torch.nn.Conv2d], differentiable: bool = False) -> DepthwiseWeights | None:
    """The depthwise convolutions `convs`, side by side over the channels (CRPE's windows, or CPE's one conv), in
    `dwconv_tokens`' layout; None unless `depthwise_ok(convs)`. `differentiable`: weight and bias are computed from
    the parameters by ops autograd records (training), else from detached parameters."""
    if not depthwise_ok(convs):
        return None
    windows = [k for conv in convs for k in [conv.kernel_size[0]] * conv.out_channels]
    window = max(windows)
    params = [(conv.weight, conv.bias) if differentiable else (conv.weight.detach(), conv.bias)
              for conv in convs]
    parts = [w if w.shape[-1] == window else torch.nn.functional.pad(w, [(window - w.shape[-1]) // 2] * 4)
             for w, _ in params]  # (c, 1, K, K) each, zero-padded to the largest window
    weight = (torch.cat(parts) if len(parts) > 1 else parts[0])[:, 0].permute(1, 2, 0).contiguous()  # (K, K, C)
    biases = [(b if differentiable else b.detach()) if b is not None else w.new_zeros(w.shape[0]) for w, b in params]
    bias = torch.cat(biases) if len(biases) > 1 else biases[0]
    blocks = [max(windows[c:c + 8]) for c in range(0, len(windows) - len(windows) % 8, 8)]
    return DepthwiseWeights(weight, bias.contiguous(), torch.tensor(blocks, dtype=torch.int32), window)


def dwconv_tokens(src: torch.Tensor, weights: DepthwiseWeights, size: tuple[int, int], add: torch.Tensor | None,
                  dst: torch.Tensor, mul: torch.Tensor | None = None) -> None:
    """dst = add + mul * DWConv(src) (mul None: 1, add None: 0) over image tokens (B, H*W, C), each a float32 CPU
    tensor whose channels are contiguous (token and batch strides may be anything, views of a wider projection
    included). `dst` may be `add` itself (an in-place sum) but must not overlap `src` or `mul`."""
    B, N, C = src.shape
    H, W = size
    if N != H * W or weights.weight.shape[-1] != C:
        raise ValueError(f"dwconv_tokens: expected (B, {H * W}, {weights.weight.shape[-1]}) tokens for a {H}x{W} "
                         f"grid, got {tuple(src.shape)}")
    tensors = [t for t in (src, add, dst, mul) if t is not None]
    if any(t.shape != src.shape or t.dtype != torch.float32 or t.device.type != "cpu" or t.stride(-1) != 1
           for t in tensors):
        raise ValueError("dwconv_tokens: src, add, dst and mul must be float32 CPU tensors of one shape with "
                         "contiguous channels")
    if B == 0 or N == 0:
        return
    m, a = ((None, 0, 0) if t is None else (t.data_ptr(), t.stride(0), t.stride(1)) for t in (mul, add))
    library().dwconv_tokens(src.data_ptr(), src.stride(0), src.stride(1), weights.weight.data_ptr(),
                            weights.bias.data_ptr(), weights.block_windows.data_ptr(), weights.window, C, B, H, W,
                            *m, *a, dst.data_ptr(), dst.stride(0), dst.stride(1), torch.get_num_threads())


def dwconv_weight_grad(src: torch.Tensor, grad: torch.Tensor, weights: DepthwiseWeights,
                       size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of `dwconv_tokens`' convolution weights (K, K, C) and bias (C,) for an output gradient `grad`
    over image tokens (B, H*W, C), `src` the convolution's input, both float32 CPU tensors with contiguous channels.
    Taps outside a block of 8 channels' own window (a merged kernel's zero padding) get 0."""
    B, N, C = src.shape
    H, W = size
    K = weights.window
    if (N != H * W or grad.shape != src.shape or weights.weight.shape[-1] != C
            or any(t.dtype != torch.float32 or t.device.type != "cpu" or t.stride(-1) != 1 for t in (src, grad))):
        raise ValueError(f"dwconv_weight_grad: expected float32 CPU tokens (B, {H * W}, {C}) with contiguous channels "
                         f"for src and grad, got {tuple(src.shape)} and {tuple(grad.shape)}")
    grad_w, grad_b = src.new_empty(K, K, C), src.new_empty(C)
    if library().dwconv_weight_grad(src.data_ptr(), src.stride(0), src.stride(1), grad.data_ptr(), grad.stride(0),
                                    grad.stride(1), weights.block_windows.data_ptr(), K, C, B, H, W,
                                    grad_w.data_ptr(), grad_b.data_ptr(), torch.get_num_threads()):
        raise MemoryError(f"dwconv_weight_grad: no memory for {torch.get_num_threads()} buffers of {K}x{K}x{C}")
    return grad_w, grad_b


# widest head `factor_attention` serves: CoaT's widest (coat_lite_medium's 64 channels), as far as it is tested
MAX_HEAD_CHANNELS = 64


def factor_attention_ok(channels: int, heads: int) -> bool:
    """Whether `factor_attention` takes C channels in `heads` heads: C a multiple of 8, heads of at most
    MAX_HEAD_CHANNELS channels."""
    return channels % 8 == 0 and channels % heads == 0 and channels // heads <= MAX_HEAD_CHANNELS


def check_projection(kernel: str, qkv: torch.Tensor, heads: int) -> tuple[int, int, int]:
    """B, N, C of a qkv projection output (B, N, 3C) the attention kernels read: float32 CPU with contiguous,
    non-overlapping rows, C and heads as `factor_attention_ok` allows; else a ValueError naming `kernel`."""
    B, N, C3 = qkv.shape
    if (qkv.dtype != torch.float32 or qkv.device.type != "cpu" or qkv.stride(-1) != 1 or qkv.stride(1) < C3
            or C3 % 3 or not factor_attention_ok(C3 // 3, heads)):
        raise ValueError(f"{kernel}: expected a float32 CPU (B, N, 3C) projection with contiguous rows, C a "
                         f"multiple of 8 and heads of at most {MAX_HEAD_CHANNELS} channels, got {tuple(qkv.shape)} "
                         f"{qkv.dtype} (strides {qkv.stride()}) for {heads} heads")
    return B, N, C3 // 3


def factor_attention(qkv: torch.Tensor, heads: int, scale: float,
                     crpe: tuple[DepthwiseWeights, tuple[int, int]] | None = None) -> torch.Tensor:
    """Per head, Q (scale * softmax over tokens of K)^T V from a qkv projection's output (B, N, 3C) (q, k, v side by
    side, heads side by side in each; a float32 CPU tensor with contiguous rows): a fresh (B, N, C), no head
    permute copied. C and heads as `factor_attention_ok` allows.

    `crpe` (weights, (H, W)): the image tokens 1..N-1 (N = 1 + H*W) also get CRPE's Q * DWConv(V) in the same pass,
    `dwconv_tokens(v[:, 1:], weights, (H, W), add=out[:, 1:], dst=out[:, 1:], mul=q[:, 1:])` row by row of the grid
    while each row's q and output are in the cache (the same result)."""
    B, N, C = check_projection("factor_attention", qkv, heads)
    conv = (None, None, None, 0, 0, 0)
    if crpe is not None:
        weights, (H, W) = crpe
        if N != 1 + H * W or weights.weight.shape[-1] != C:
            raise ValueError(f"factor_attention: expected 1 + {H}x{W} tokens of {weights.weight.shape[-1]} "
                             f"channels for the CRPE's grid, got {tuple(qkv.shape)}")
        conv = (weights.weight.data_ptr(), weights.bias.data_ptr(), weights.block_windows.data_ptr(), weights.window,
                H, W)
    out = qkv.new_empty(B, N, C)
    if out.numel() and library().factor_attention(qkv.data_ptr(), qkv.stride(0), qkv.stride(1), B, N, C, heads,
                                                  scale, out.data_ptr(), out.stride(0), out.stride(1), *conv,
                                                  torch.get_num_threads()):
        raise MemoryError(f"factor_attention: no memory for the scratch of {N} tokens")
    return out


def factor_attention_backward(qkv: torch.Tensor, grad: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """The gradient of `factor_attention(qkv, heads, scale)` with respect to qkv, a fresh (B, N, 3C), for the output
    gradient `grad` (B, N, C); both float32 CPU tensors with contiguous rows. The softmax and the contexts are
    recomputed from qkv."""
    B, N, C = check_projection("factor_attention_backward", qkv, heads)
    if grad.shape != (B, N, C) or grad.dtype != torch.float32 or grad.device.type != "cpu" or grad.stride(-1) != 1:
        raise ValueError(f"factor_attention_backward: expected a float32 CPU (B, N, C) gradient with contiguous rows "
                         f"for a {tuple(qkv.shape)} projection, got {tuple(grad.shape)} {grad.dtype}")
    out = qkv.new_empty(B, N, 3 * C)
    if out.numel() and library().factor_attention_backward(
            qkv.data_ptr(), qkv.stride(0), qkv.stride(1), B, N, C, heads, scale, grad.data_ptr(), grad.stride(0),
            grad.stride(1), out.data_ptr(), out.stride(0), out.stride(1), torch.get_num_threads()):
        raise MemoryError(f"factor_attention_backward: no memory for the scratch of {N} tokens")
    return out


def mix_tokens(x: torch.Tensor, a: torch.Tensor, sources: list[tuple[torch.Tensor, tuple[int, int]]],
               size: tuple[int, int]) -> torch.Tensor:
    """x + ((a + resize(s1)) + resize(s2)), a fresh (B, 1 + H*W, C): a parallel block's co-scale sum for one scale,
    where `sources` are the two other scales' tokens with their grids, resized bilinearly (align_corners=False)
    to `size` (class tokens carried over), as `resize_tokens` does. Float32 CPU tokens with contiguous channels."""
    (s1, size1), (s2, size2) = sources
    B, N, C = x.shape
    H, W = size
    for t, (h, w) in ((x, size), (a, size), (s1, size1), (s2, size2)):
        if (t.dim() != 3 or t.shape[0] != B or t.shape[1] != 1 + h * w or t.shape[2] != C or t.dtype != torch.float32
                or t.device.type != "cpu" or t.stride(-1) != 1 or min(h, w) < 1):
            raise ValueError(f"mix_tokens: expected float32 CPU tokens (B={B}, 1 + H*W, C={C}) with contiguous "
                             f"channels for {h}x{w} grids, got {tuple(t.shape)} {t.dtype}")
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if out.numel():
        library().mix_tokens(x.data_ptr(), x.stride(0), x.stride(1), a.data_ptr(), a.stride(0), a.stride(1),
                             s1.data_ptr(), s1.stride(0), s1.stride(1), *size1, s2.data_ptr(), s2.stride(0),
                             s2.stride(1), *size2, out.data_ptr(), out.stride(0), out.stride(1), B, H, W, C,
                             torch.get_num_threads())
    return out


def check_rows(kernel: str, *tensors: torch.Tensor) -> None:
    """The GELU kernels' operands: float32 CPU matrices of the first one's shape with contiguous rows."""
    for t in tensors:
        if (t.dim() != 2 or t.shape != tensors[0].shape or t.dtype != torch.float32 or t.device.type != "cpu"
                or t.stride(-1) != 1):
            raise ValueError(f"{kernel}: expected float32 CPU matrices of one shape with contiguous rows, got "
                             f"{tuple(t.shape)} {t.dtype} on {t.device.type} with strides {t.stride()}")


def gelu(src: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """GELU(src), the exact (erf) form, to within 1e-6 of PyTorch's, into `out` (a fresh tensor when None; `src`
    itself for in place). Float32 CPU matrices (rows, n) with contiguous rows, any row stride."""
    out = torch.empty_like(src, memory_format=torch.contiguous_format) if out is None else out
    check_rows("gelu", src, out)
    if out.numel():
        library().gelu_rows(src.data_ptr(), src.stride(0), out.data_ptr(), out.stride(0), src.shape[0],
                            src.shape[1], torch.get_num_threads())
    return out


def gelu_backward_(h: torch.Tensor, grad: torch.Tensor, act: torch.Tensor | None = None) -> torch.Tensor:
    """grad <- grad * GELU'(h) in place (the exact GELU's derivative, to within 2e-6 of PyTorch's gelu_backward)
    and, where `act` is given, act <- GELU(h) from the same erf; returns grad. Float32 CPU matrices (rows, n) with
    contiguous rows; `grad` and `act` must not overlap `h` or each other."""
    check_rows("gelu_backward_", h, grad, *([] if act is None else [act]))
    if h.numel():
        library().gelu_backward_rows(h.data_ptr(), h.stride(0), grad.data_ptr(), grad.stride(0),
                                     None if act is None else act.data_ptr(), 0 if act is None else act.stride(0),
                                     h.shape[0], h.shape[1], torch.get_num_threads())
    return grad
