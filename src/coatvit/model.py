"""The CoaT family: Co-Scale Conv-Attentional Image Transformers (Xu et al., ICCV 2021).

Read top to bottom in the order of the paper: patch embedding, convolutional position encoding (CPE),
convolutional relative position encoding (CRPE), factorized attention, serial block, parallel block, the model.
Equation numbers refer to docs/coat-spec.md of the project brief (sections 1-2).

Shapes: B batch, N = 1 + H*W tokens (class token first), C channels, h heads, Ch = C / h channels per head.

Modules that the paper shares between blocks (one CPE and one CRPE per scale, one MLP across the scales of a
parallel block) are owned once by the model and handed to the blocks at call time, so `state_dict()` holds every
tensor exactly once. `coatvit.weights` maps the alias keys of the authors' and timm's checkpoints onto them.

Two paths compute the same function. The reference path (`model.set_fast_path(False)`) follows the authors'
operations one by one and is bit-identical to them. The fast path (the default) computes the same equations
with less memory traffic, which is what CoaT's time goes to on a CPU: the image tokens (B, H*W, C) are read as
channels-last maps (B, H, W, C) by the convolutions and resizes instead of being transposed to NCHW and back;
q, k and v stay views of the qkv projection (per-head products only where heads are wide); in inference the
three CRPE convolutions run as one depthwise conv; in CPU inference each serial block runs a few images, each MLP
a few hundred tokens, at a time so that the activations stay in cache; in CPU training each MLP runs as one
autograd function over such chunks that keeps fc1's output for backward but not the GELU's (`ChunkedMlp`); and a
classifier that pools the class token computes only the class-token rows of its last block
(`CoaT.class_token_shortcut`: the image tokens there only feed k and v). Its float summation order differs, so its
outputs match the reference to about 1e-6, not bit for bit (tests/test_fast_path.py). Where a layer has been
replaced (dynamic int8 quantization, a LoRA wrapper) or carries hooks, the fast path calls it instead of reading its
weights (`called_as_built`). In CPU fp32 inference the CPE and CRPE convolutions with the sums around them, and
the attention products, and the parallel blocks' co-scale sums run as native kernels (`coatvit.native`, built with
the system's C compiler at first use), and in CPU fp32 training the depthwise convolutions and the attention
products do, forward and backward (`DepthwiseTokens`, `NativeFactorAttention`). On the meta device (MAC counting)
and under torch.func transforms the reference path runs. Measured, on a CPU the
fast path's lead over timm's port comes mostly from writing less freshly mapped memory (BENCHMARKS.md, "Where the
CPU lead comes from"). On a GPU the attention (forward and backward), the LayerNorms (inference) and, under
autocast, a block's whole MLP sub-layer (inference, `Mlp.residual`) can run as Triton kernels instead
(`coatvit.kernels`: by default for CUDA batches of 128 images or more).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import kernels, native, onednn, runtime
from .config import CoaTConfig

Size = tuple[int, int]


def use_fast(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether `module` takes the fast path for input `x`. On the meta device (MAC counting, `coatvit.flops`)
    the reference path runs: nothing is computed there, and its operations are the paper's MAC count (the fast
    path's masked block-diagonal products and zero-padded kernels would inflate it). So it does under a torch.func
    transform (`functorch_active`)."""
    return module.fast_path and not x.is_meta and not functorch_active()


def functorch_active() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, functional per-sample gradients, ...) is running: its
    wrapped tensors take none of the fast path's layout queries, out= chunks, autograd Function or native kernels,
    so the plain ops of the reference path run (same values)."""
    return torch._C._functorch.maybe_current_level() is not None


def kernel_inference(x: torch.Tensor, *modules: nn.Module) -> bool:
    """Whether `x` is where the inference-only kernels (LayerNorm, fused MLP) may run: a CUDA tensor (or any under
    Triton's interpreter) with nothing for autograd to record through it or the modules' parameters. A cheap first
    test; `kernels.use_kernels` decides the rest."""
    if not (x.is_cuda or kernels.interpreting()):
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for m in modules
                                                                    for p in m.parameters())))


def called_as_built(*modules: nn.Module) -> bool:
    """Whether fast paths may use these modules' parameters instead of calling them: each is exactly the class the
    model built (nn.Linear, nn.Conv2d, nn.GELU; not a quantized, LoRA-wrapped or other replacement) and has no
    forward or backward hooks of its own, so that not calling it changes nothing. Otherwise the modules are called."""
    return all(type(m) in (nn.Linear, nn.Conv2d, nn.GELU) and not hooked(m) for m in modules)


def hooked(module: nn.Module) -> bool:
    """Whether `module` has forward or backward hooks of its own."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def cpu_inference(x: torch.Tensor, *modules: nn.Module) -> bool:
    """Whether CPU-only code may stand in for `modules` on `x`: float32 CPU tokens with nothing for autograd to
    record, outside graph capture and autocast (whose bf16 products and convolutions it would not round like), the
    modules called as built."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or capturing_graph() or not called_as_built(*modules):
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    return not (torch.is_grad_enabled()
                and (x.requires_grad or any(p.requires_grad for m in modules for p in m.parameters())))


def native_inference(x: torch.Tensor, *modules: nn.Module) -> bool:
    """Whether the native CPU kernels (`coatvit.native`) may stand in for `modules` on `x`: `cpu_inference`, the
    kernels on and built."""
    return cpu_inference(x, *modules) and native.available()


def onednn_linear(layer: nn.Linear, x: torch.Tensor, gelu: str | None = None,
                  add: torch.Tensor | None = None) -> torch.Tensor | None:
    """layer(x), then GELU(approximate=`gelu`) or + `add` where given, as one oneDNN call with the layer's weight
    reordered once (`coatvit.onednn`) where that may stand in (`cpu_inference`, oneDNN on, a product of at least
    `onednn.MIN_MACS`); else None, and the caller runs the layer itself."""
    if not (cpu_inference(x, layer) and onednn.worth_it(x.numel() // max(x.shape[-1], 1), layer)
            and onednn.available()):
        return None
    return onednn.linear(x, layer, gelu, add)


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """layer(x), through oneDNN where `onednn_linear` may."""
    out = onednn_linear(layer, x)
    return layer(x) if out is None else out


def derived_weights(owner: nn.Module, params: list[torch.Tensor], build, name: str):
    """build(), a tensor or tuple derived from `params`, kept on `owner` under `name` until a parameter changes (in
    place, or replaced); for inference-only use (built from the parameters' values, outside autograd)."""
    if any(p.is_inference() for p in params):  # no version counter to tell a change by: rebuilt per call
        return build()
    key = tuple((p.data_ptr(), p._version) for p in params)
    kept = owner.__dict__.setdefault("_derived_weights", {})  # a plain attribute: not a buffer, not in the state dict
    cached = kept.get(name)
    if cached is None or cached[0] != key:
        cached = kept[name] = (key, build())
    return cached[1]


def native_conv_weights(owner: nn.Module, convs: list[nn.Conv2d], x: torch.Tensor) -> native.DepthwiseWeights | None:
    """`native.depthwise_weights(convs)` where the native kernel may run on `x` (`native_inference`), else None;
    kept on `owner` until a parameter changes (`derived_weights`)."""
    if not native_inference(x, *convs):
        return None
    return derived_weights(owner, [p for conv in convs for p in conv.parameters()],
                           lambda: native.depthwise_weights(convs), name="native")


def kernel_conv_taps(owner: nn.Module, conv: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The operands of `kernels.residual_dwconv` (`kernels.depthwise_taps` of the depthwise `conv`) where that
    Triton kernel may stand in for `conv` and the residual sum on tokens x: GPU inference (`kernel_inference`) with
    the kernels on (`kernels.use_kernels`) for its width (`kernels.cpe_kernel_for`), the conv called as built and
    zero-padded; else None. Kept on `owner` until a parameter changes (`derived_weights`)."""
    if not (kernel_inference(x, conv) and kernels.cpe_kernel_for(x.shape[-1]) and called_as_built(conv)
            and conv.padding_mode == "zeros" and kernels.use_kernels(x)):
        return None
    return derived_weights(owner, list(conv.parameters()), lambda: kernels.depthwise_taps(conv.weight, conv.bias),
                           name="triton")


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters and state-dict keys) whose fast path runs a Triton kernel in inference where
    the attention kernels run (CUDA batches of 128+ images by default, `coatvit.kernels`): many rows per program
    instead of PyTorch's one row per block of threads, which leaves CoaT's 64-320-channel rows mostly idle threads.

    `feeds_linear`: only Linear layers read the output (a block's norm1 and norm2), so under autocast it is written
    in the autocast dtype, the values the Linear's own cast would make of autocast's fp32 LayerNorm output, without
    the fp32 round trip. The other norms (patch embeddings, final norms) start a residual stream or return
    features and stay fp32 under autocast, as autocast makes them."""

    fast_path = True

    def __init__(self, dim: int, eps: float, feeds_linear: bool = False):
        super().__init__(dim, eps=eps)
        self.feeds_linear = feeds_linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (the device test first: a CPU forward skips the policy's checks; no backward kernel)
        if not (kernel_inference(x, self) and use_fast(self, x) and kernels.use_kernels(x)):
            return super().forward(x)
        out_dtype = x.dtype
        if torch.is_autocast_enabled(x.device.type):
            out_dtype = torch.get_autocast_dtype(x.device.type) if self.feeds_linear else torch.float32
        out = kernels.run(kernels.layer_norm, x, self.weight, self.bias, self.eps, out_dtype)
        return super().forward(x) if out is None else out  # None: the launch failed, PyTorch's LayerNorm runs


class DropPath(nn.Module):
    """Stochastic depth per sample; the same rate in every block (the authors' choice)."""

    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)


class PatchEmbed(nn.Module):
    """Non-overlapping conv patch embedding + LayerNorm. Sizes are floored (no padding), as in the authors' code."""

    def __init__(self, in_chans: int, dim: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=stride, stride=stride)
        self.norm = LayerNorm(dim, eps=1e-5)

    fast_path = True

    # CPU inference embeds up to `gemm_max_patches` patches of a map of 16+ channels (stages 2-4) as one GEMM over
    # the gathered patches instead of the strided convolution (the same products). Measured, interleaved: 1.04-1.98x
    # per stage at up to 784 patches, 0.86-0.96x at 3136-12544 (benchmarks/patch_embed.py, BENCHMARKS.md)
    gemm_min_channels = 16
    gemm_max_patches = 1024

    def gemm_ok(self, x: torch.Tensor) -> bool:
        """Whether the fast path embeds the patches of x as a GEMM (`gemm_min_channels`, `gemm_max_patches`, CPU,
        outside autograd, graph capture and autocast, the convolution called as built)."""
        p = self.proj.stride[0]
        patches = x.shape[0] * (x.shape[2] // p) * (x.shape[3] // p)
        return (x.shape[1] >= self.gemm_min_channels and patches <= self.gemm_max_patches and x.device.type == "cpu"
                and not torch.is_grad_enabled() and not capturing_graph() and not torch.is_autocast_enabled("cpu")
                and called_as_built(self.proj) and self.proj.bias is not None)

    def forward_gemm(self, x: torch.Tensor) -> tuple[torch.Tensor, Size]:
        """The convolution as (B*h*w, p*p*C) gathered patches times the (p*p*C, out) weight, plus the bias."""
        B, C, H, W = x.shape
        p = self.proj.stride[0]
        h, w = H // p, W // p
        weight = derived_weights(self, [self.proj.weight], lambda: self.proj.weight.detach().permute(0, 2, 3, 1)
                                 .reshape(self.proj.out_channels, -1).t().contiguous(), name="gemm")  # (p*p*C, out)
        patches = x[:, :, :h * p, :w * p].permute(0, 2, 3, 1).reshape(B, h, p, w, p, C)
        patches = patches.permute(0, 1, 3, 2, 4, 5).reshape(B * h * w, p * p * C)  # (B*h*w, p*p*C), one copy
        out = torch.addmm(self.proj.bias, patches, weight)  # (B*h*w, out)
        return self.norm(out.view(B, h * w, out.shape[-1])), (h, w)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Size]:
        if use_fast(self, x):
            if self.gemm_ok(x):
                return self.forward_gemm(x)
            # channels-last in and out: the (B, H, W, C) result is already the token layout
            x = self.proj(x.contiguous(memory_format=torch.channels_last))  # (B, C, H, W), channels-last
            size = (x.shape[2], x.shape[3])
            return self.norm(x.permute(0, 2, 3, 1).flatten(1, 2)), size  # (B, H*W, C), a view
        x = self.proj(x)  # (B, C, H, W)
        size = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        return self.norm(x), size


def as_channels_last(tokens: torch.Tensor, size: Size) -> torch.Tensor:
    """Image tokens (B, H*W, C) seen as a channels-last NCHW map (B, C, H, W) without copying."""
    B, _, C = tokens.shape
    return tokens.reshape(B, size[0], size[1], C).permute(0, 3, 1, 2)  # (B, C, H, W), strides of (B, H, W, C)


def as_tokens(feat: torch.Tensor) -> torch.Tensor:
    """A channels-last map (B, C, H, W) as tokens (B, H*W, C); a view when `feat` is channels-last."""
    return feat.permute(0, 2, 3, 1).flatten(1, 2)  # (B, H*W, C)


def native_training(x: torch.Tensor, *modules: nn.Module) -> bool:
    """Whether native kernels with a backward (`DepthwiseTokens`, `NativeFactorAttention`) may stand in for
    `modules` on tokens x while autograd records: CPU float32 with contiguous channels, outside autocast, graph
    capture and torch.func, the modules called as built, the kernels on and built."""
    if capturing_graph() or not torch.is_grad_enabled():  # first: a graph being recorded sees no more of this
        return False
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.stride(-1) == 1
            and not torch.is_autocast_enabled("cpu") and not functorch_active() and called_as_built(*modules)
            and native.available())


def native_depthwise_training(x: torch.Tensor, convs) -> bool:
    """`native_training` for depthwise convs of a kind the kernel computes, `DepthwiseTokens` enabled."""
    return native_training(x, *convs) and DepthwiseTokens.enabled and native.depthwise_ok(list(convs))


class NativeFactorAttention(torch.autograd.Function):
    """CPU training: the factorized attention's products `native.factor_attention(qkv, heads, scale)`, backward
    with `native.factor_attention_backward` (the softmax and contexts recomputed per image, dq, dk, dv written side
    by side into one (B, N, 3C) gradient: no head permutes, and narrow heads without the masked product's MACs). A
    backward that builds a graph (`create_graph=True`) differentiates the eager ops instead."""

    enabled = True  # False: CPU training runs the attention products as PyTorch ops

    @staticmethod
    def forward(ctx, qkv, heads: int, scale: float):
        ctx.save_for_backward(qkv)
        ctx.heads, ctx.scale = heads, scale
        return native.factor_attention(qkv, heads, scale)

    @staticmethod
    def backward(ctx, grad):
        (qkv,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: gradients as ops autograd can differentiate again
            return torch.autograd.grad(NativeFactorAttention.eager(qkv, ctx.heads, ctx.scale), qkv, grad,
                                       create_graph=True)[0], None, None
        grad = grad if grad.stride(-1) == 1 else grad.contiguous()
        return native.factor_attention_backward(qkv, grad, ctx.heads, ctx.scale), None, None

    @staticmethod
    def eager(qkv: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
        """The forward pass as PyTorch ops (for double backward)."""
        B, N, C3 = qkv.shape
        q, k, v = qkv.reshape(B, N, 3, heads, C3 // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, N, Ch)
        out = scale * (q @ (k.softmax(dim=2).transpose(-1, -2) @ v))  # (B, h, N, Ch)
        return out.transpose(1, 2).reshape(B, N, C3 // 3)


class DepthwiseTokens(torch.autograd.Function):
    """CPU training: a depthwise convolution of tokens x (B, N, C), forward and backward with the native kernels.

    `residual` (CPE): (B, N, C) out, the class row passed through and x + DWConv(x) on the image tokens; else (CRPE's
    V): DWConv of x's image tokens, (B, H*W, C). The weights come in the kernel's layout (K, K, C), built from the
    convs' parameters by ops autograd records (`native.depthwise_weights(..., differentiable=True)`). Backward: the
    input gradient is the same kernel with the taps flipped (plus the gradient itself where `residual`), the weight
    and bias gradients one pass of `native.dwconv_weight_grad`. Eager, the convolutions need the tokens copied to a
    map per window, the outputs concatenated back, and oneDNN's depthwise backward is slow on small maps. A backward
    that builds a graph (`create_graph=True`) differentiates the eager ops instead.
    """

    enabled = True  # False: CPU training runs PyTorch's convolutions

    @staticmethod
    def forward(ctx, x, weight, bias, block_windows, size: Size, residual: bool):
        img = x[:, 1:]
        weights = native.DepthwiseWeights(weight, bias, block_windows, weight.shape[0])
        if residual:
            out = x.new_empty(x.shape)
            out[:, :1] = x[:, :1]
            native.dwconv_tokens(img, weights, size, add=img, dst=out[:, 1:])
        else:
            out = x.new_empty(img.shape)
            native.dwconv_tokens(img, weights, size, add=None, dst=out)
        ctx.save_for_backward(x, weight, bias)
        ctx.block_windows, ctx.size, ctx.residual = block_windows, size, residual
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph: gradients as ops autograd can differentiate again
            inputs = [t for t, need in zip((x, weight, bias), needs) if need]
            y = DepthwiseTokens.eager(x, weight, bias, ctx.size, ctx.residual)
            grads = iter(torch.autograd.grad(y, inputs, grad, create_graph=True))
            return (*(next(grads) if need else None for need in needs), None, None, None)
        grad = grad if grad.stride(-1) == 1 else grad.contiguous()
        g_img = grad[:, 1:] if ctx.residual else grad
        weights = native.DepthwiseWeights(weight, bias, ctx.block_windows, weight.shape[0])
        grad_x = grad_w = grad_b = None
        if needs[0]:
            flipped = weights._replace(weight=weight.flip(0, 1).contiguous(), bias=torch.zeros_like(bias))
            grad_x = x.new_empty(x.shape)
            grad_x[:, :1] = grad[:, :1] if ctx.residual else 0
            native.dwconv_tokens(g_img, flipped, ctx.size, add=g_img if ctx.residual else None, dst=grad_x[:, 1:])
        if needs[1] or needs[2]:  # the bias gradient in the same pass (a sum over a strided view is slow)
            grad_w, grad_b = native.dwconv_weight_grad(x[:, 1:], g_img, weights, ctx.size)
        return grad_x, grad_w if needs[1] else None, grad_b if needs[2] else None, None, None, None

    @staticmethod
    def eager(x, weight, bias, size: Size, residual: bool) -> torch.Tensor:
        """The forward pass as PyTorch ops (for double backward)."""
        img = x[:, 1:]
        conv = F.conv2d(as_channels_last(img, size), weight.permute(2, 0, 1).unsqueeze(1), bias,
                        padding=weight.shape[0] // 2, groups=x.shape[-1])
        return torch.cat((x[:, :1], img + as_tokens(conv)), dim=1) if residual else as_tokens(conv)


class ConvPosEnc(nn.Module):
    """CPE: image tokens x <- x + DWConv3x3(x); the class token is passed through untouched."""

    def __init__(self, dim: int, kernel: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)

    fast_path = True

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        B, N, C = x.shape
        H, W = size
        cls_token, img = x[:, :1], x[:, 1:]  # (B, 1, C), (B, H*W, C)
        if use_fast(self, x):
            taps = kernel_conv_taps(self, self.proj, x)
            if taps is not None:  # GPU inference: one Triton pass reads the tokens and writes x + conv
                out = kernels.run(kernels.residual_dwconv, x, *taps, size, kernels.compute_dtype(x))
                if out is not None:  # None: the launch failed, the eager ops run
                    return out
            if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
                # eager inference: the sum goes straight into the output, no concatenation (Dynamo cannot trace
                # a strided out=; compiled, inductor fuses the concatenation itself)
                out = torch.empty_like(x, memory_format=torch.contiguous_format)
                out[:, :1] = cls_token
                weights = native_conv_weights(self, [self.proj], x)
                if weights is not None:  # convolution and sum in one pass over the token layout
                    native.dwconv_tokens(img, weights, size, add=img, dst=out[:, 1:])
                else:
                    torch.add(img, as_tokens(self.proj(as_channels_last(img, size))), out=out[:, 1:])
                return out
            if native_depthwise_training(x, [self.proj]):  # forward and backward natively, no concatenation
                weights = native.depthwise_weights([self.proj], differentiable=True)
                return DepthwiseTokens.apply(x, weights.weight, weights.bias, weights.block_windows, size, True)
            pos = as_tokens(self.proj(as_channels_last(img, size)))  # (B, H*W, C)
            return torch.cat((cls_token, img + pos), dim=1)  # (B, N, C)
        feat = img.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        img = (self.proj(feat) + feat).flatten(2).transpose(1, 2)  # (B, H*W, C)
        return torch.cat((cls_token, img), dim=1)  # (B, N, C)


class ConvRelPosEnc(nn.Module):
    """CRPE: crpe = Q_img * DWConv(V_img), one grouped conv per window size over a contiguous run of heads."""

    def __init__(self, head_dim: int, windows: Sequence[tuple[int, int]]):
        super().__init__()
        self.conv_list = nn.ModuleList(
            nn.Conv2d(heads * head_dim, heads * head_dim, k, padding=k // 2, groups=heads * head_dim)
            for k, heads in windows
        )
        self.channel_splits = [heads * head_dim for _, heads in windows]
        self.max_window = max(k for k, _ in windows)

    def conv_per_window(self, v_img: torch.Tensor,
                        memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
        """DWConv(V_img) of a (B, h*Ch, H, W) map: each window's grouped conv over its run of heads, each input
        part in `memory_format` (a no-op for the parts of a contiguous NCHW map)."""
        parts = torch.split(v_img, self.channel_splits, dim=1)
        return torch.cat([conv(part.contiguous(memory_format=memory_format))
                          for conv, part in zip(self.conv_list, parts)], dim=1)

    def merged_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-window kernels zero-padded to the largest window and stacked: one depthwise conv, same result
        up to float summation order (the added taps multiply zeros)."""
        weights = []
        for conv in self.conv_list:
            pad = (self.max_window - conv.kernel_size[0]) // 2
            weights.append(F.pad(conv.weight, (pad, pad, pad, pad)))  # (c, 1, K, K)
        return torch.cat(weights), torch.cat([conv.bias for conv in self.conv_list])

    # Inference runs the merged kernel; under autograd the per-window convs are faster or equal, their backward
    # being cheaper than the padded 7x7 one's (training step 1.05x coat_lite_tiny, 1.01x coat_lite_small, 1.00x
    # coat_tiny: benchmarks/crpe_kernels.py, BENCHMARKS.md).
    merge_under_autograd = False

    def add_to(self, out: torch.Tensor, q: torch.Tensor, v: torch.Tensor, size: Size) -> torch.Tensor:
        """Fast path: out[:, 1:] += Q_img * DWConv(V_img), all in the token layout (B, N, h*Ch).

        `q` and `v` are token-layout views (B, N, C) of the qkv projection, heads side by side in the channels
        (the same channel order as the reference's (B, h*Ch, H, W)). `out` must be a tensor the caller owns (the
        attention's own fresh product): the sum is written into it, one fused multiply-add without temporaries.
        """
        weights = native_conv_weights(self, list(self.conv_list), out)
        if weights is not None:  # v read in place from the projection, the product summed in the same pass
            native.dwconv_tokens(v[:, 1:], weights, size, add=out[:, 1:], dst=out[:, 1:], mul=q[:, 1:])
            return out
        out[:, 1:].addcmul_(q[:, 1:], self.conv_tokens(v, size))  # (B, H*W, C); the class-token row gets nothing
        return out

    def conv_tokens(self, v: torch.Tensor, size: Size) -> torch.Tensor:
        """Fast path: DWConv(V_img) of a token-layout v (B, N, C), as tokens (B, H*W, C) (a channels-last view)."""
        if native_depthwise_training(v, self.conv_list):  # forward and backward natively, v read in place
            weights = native.depthwise_weights(list(self.conv_list), differentiable=True)
            return DepthwiseTokens.apply(v, weights.weight, weights.bias, weights.block_windows, size, False)
        v_img = as_channels_last(v[:, 1:], size)  # (B, C, H, W), channels-last view of the qkv output
        if (torch.is_grad_enabled() and not self.merge_under_autograd) or not called_as_built(*self.conv_list):
            v_img = self.conv_per_window(v_img, torch.channels_last)
        else:
            weight, bias = self.merged_kernel()
            v_img = F.conv2d(v_img.contiguous(memory_format=torch.channels_last), weight, bias,
                             padding=self.max_window // 2, groups=v_img.shape[1])
        return as_tokens(v_img)

    def forward(self, q: torch.Tensor, v: torch.Tensor, size: Size) -> torch.Tensor:
        B, h, N, Ch = q.shape
        H, W = size
        q_img, v_img = q[:, :, 1:], v[:, :, 1:]  # (B, h, H*W, Ch)
        v_img = v_img.transpose(-1, -2).reshape(B, h * Ch, H, W)  # (B, h*Ch, H, W), each head contiguous
        v_img = self.conv_per_window(v_img).reshape(B, h, Ch, H * W).transpose(-1, -2)  # (B, h, H*W, Ch)
        return F.pad(q_img * v_img, (0, 0, 1, 0))  # (B, h, N, Ch); the class-token row is zero


class FactorAttnConvRelPosEnc(nn.Module):
    """Conv-attention: factorized attention Q (softmax(K)^T V) / sqrt(Ch) plus the CRPE term."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    fast_path = True

    def forward(self, x: torch.Tensor, size: Size, crpe: ConvRelPosEnc | None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """The attention's output for normed tokens x (B, N, C); plus `residual` where given (in CPU inference the
        output projection adds it in the same oneDNN call)."""
        B, N, C = x.shape
        if use_fast(self, x):
            return self.forward_fast(x, size, crpe, residual)
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, h, N, Ch)
        context = k.softmax(dim=2).transpose(-1, -2) @ v  # (B, h, Ch, Ch); softmax over all N tokens
        out = self.scale * (q @ context)  # (B, h, N, Ch); the scale touches only the factorized term
        if crpe is not None:
            out = out + crpe(q, v, size)
        out = out.transpose(1, 2).reshape(B, N, C)  # (B, N, h, Ch) -> (B, N, C)
        return self.proj(out) if residual is None else residual + self.proj(out)

    def forward_fast(self, x: torch.Tensor, size: Size, crpe: ConvRelPosEnc | None,
                     residual: torch.Tensor | None = None) -> torch.Tensor:
        """The same equations with q, k, v kept as (B, N, C) views of the projection.

        Wide heads take per-head products (head permutes of q, k, v and the output, 1/h of the MACs). Narrow heads
        (8 and 16 channels: the Lite models' first two stages) take one (C x C) product per image whose
        off-diagonal head blocks are masked to zero: h times the MACs of this small term, but plain GEMMs over the
        token layout without permutes, which is faster there (benchmarks/attention_products.py).
        """
        B, N, C = x.shape
        h = self.num_heads
        # Triton kernels: CUDA batches of 128+ by default (coatvit/kernels.py)
        if kernels.use_kernels(x) and kernels.attention_kernels_for(C // h):
            qkv = self.qkv(x)  # (B, N, 3C)
            conv_v = None if crpe is None else crpe.conv_tokens(qkv[..., 2 * C:], size)
            out = kernels.run(kernels.factor_attention, qkv, h, self.scale, conv_v)
            if out is not None:  # None: the launch failed, the eager ops below run
                return self.project(out, residual)
        qkv = linear(self.qkv, x)  # (B, N, 3C)
        q, k, v = qkv.unflatten(-1, (3, C)).unbind(2)  # (B, N, C) views, heads side by side
        if self.native_heads and native.factor_attention_ok(C, h):
            out = None
            if native_inference(x, self.qkv):
                # CRPE's term in the same pass over the tokens where its convolutions may run natively
                weights = (None if crpe is None or not self.fused_crpe
                           else native_conv_weights(crpe, list(crpe.conv_list), qkv))
                fused = None if weights is None else (weights, size)
                out = native.factor_attention(qkv, h, self.scale, fused)  # (B, N, C), no head permutes
                if fused is not None:
                    return self.project(out, residual)
            elif native_training(qkv, self.qkv) and NativeFactorAttention.enabled:
                out = NativeFactorAttention.apply(qkv, h, self.scale)  # the same, backward natively too
            if out is not None:
                return self.project(out if crpe is None else crpe.add_to(out, q, v, size), residual)
        k = k.softmax(dim=1)  # (B, N, C); softmax over all N tokens per channel
        if C // h >= self.per_head_min_channels:
            context = self.head_context(k, v)
            out = (q.reshape(B, N, h, C // h).transpose(1, 2) @ context).transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        else:
            context = k.transpose(1, 2) @ v  # (B, C, C)
            # block-diagonal (head i only sees head i), with the scale folded in
            out = q @ (context * self.head_mask(C, x))  # (B, N, C)
        if crpe is not None:
            out = crpe.add_to(out, q, v, size)
        return self.project(out, residual)

    def project(self, out: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """proj(out), plus the residual where given: one oneDNN call where `onednn_linear` may."""
        y = onednn_linear(self.proj, out, add=residual)
        if y is not None:
            return y
        return self.proj(out) if residual is None else residual + self.proj(out)

    def forward_class_token(self, x: torch.Tensor) -> torch.Tensor:
        """The class token's output row alone, (B, 1, C), from normed tokens x (B, N, C): k and v of every token,
        q of the class token only. The CRPE term of the class token is zero, so no convolution runs."""
        B, N, C = x.shape
        h = self.num_heads
        if torch.compiler.is_compiling() or not called_as_built(self.qkv):
            # the whole projection: with freezing, inductor's C++ GEMM template (mode="max-autotune", torch 2.14)
            # drops the storage offset of a frozen weight slice and would multiply by the q rows (wrong logits);
            # a replaced or hooked projection is called as itself
            q, k, v = self.qkv(x).unflatten(-1, (3, C)).unbind(2)
            q = q[:, :1]
        else:
            weight, bias = self.qkv.weight, self.qkv.bias  # rows: q, k, v
            kv = F.linear(x, weight[C:], None if bias is None else bias[C:])  # (B, N, 2C)
            q = F.linear(x[:, :1], weight[:C], None if bias is None else bias[:C])  # (B, 1, C)
            k, v = kv.unflatten(-1, (2, C)).unbind(2)  # (B, N, C) views
        out = q.view(B, h, 1, C // h) @ self.head_context(k.softmax(dim=1), v)  # (B, h, 1, Ch)
        return self.proj(out.reshape(B, 1, C))

    def head_context(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Per head softmax(K)^T V with the 1/sqrt(Ch) scale of the factorized term folded in: (B, h, Ch, Ch) from
        the softmaxed k and from v, (B, N, C) each, heads side by side in the channels."""
        B, N, C = k.shape
        split = (B, N, self.num_heads, C // self.num_heads)
        # (B, h, Ch, N) @ (B, h, N, Ch) -> (B, h, Ch, Ch)
        return (k.reshape(split).permute(0, 2, 3, 1) @ v.reshape(split).transpose(1, 2)) * self.scale

    # head width from which per-head products beat the masked (C x C) product, attention module alone, 2-core
    # CPU, two runs: 0.80-0.83x at 8 channels, 0.86-1.07x at 16, 1.00-1.30x at 19 (CoaT), 1.26-1.30x at 40,
    # 1.55x at 64 (BENCHMARKS.md)
    per_head_min_channels = 18

    # In CPU fp32 inference the attention products of every head width run as one native kernel
    # (`native.factor_attention`), which reads q, k, v in place and writes the (B, N, C) output: no head permutes, and
    # narrow heads without the masked product's extra MACs (benchmarks/native_kernels.py, BENCHMARKS.md)
    native_heads = True

    # ... and add the CRPE term in the kernel's output pass, row by row of the grid while each row's q and output
    # are in the cache, instead of a second pass (`native.dwconv_tokens`) over q, v and the output: 1.01x per model
    # and mode on the 2-core development machine, the same bits (benchmarks/crpe_fusion.py, BENCHMARKS.md)
    fused_crpe = True

    def head_mask(self, dim: int, like: torch.Tensor) -> torch.Tensor:
        """(C, C): `scale` inside the diagonal head blocks, 0 elsewhere."""
        head = torch.arange(dim, device=like.device) // (dim // self.num_heads)
        return (head[:, None] == head[None, :]).to(like.dtype) * self.scale


class Mlp(nn.Module):
    """fc1 -> GELU (exact erf) -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.hidden_features = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))

    # hidden activations per chunk, (rows, hidden) fp32 in 4 MiB: cache-resident, yet few enough chunks that thread
    # start-up stays small (the fastest of 2, 4 and 8 MiB on the 2-core development machine, 1 and 2 threads)
    chunk_elements = 1 << 20

    # Chunks reuse one hidden buffer, take GELU in place and write fc2 straight into the output (the same kernels,
    # bit-identical); measured against calling the layers per chunk: benchmarks/mlp_chunks.py, BENCHMARKS.md
    in_place_chunks = True

    # The chunked paths (inference, and CPU training's `ChunkedMlp`) take the exact GELU as one native pass
    # (`native.gelu`: within 1e-6 of PyTorch's, about 1.8x its speed; benchmarks/native_kernels.py, BENCHMARKS.md)
    native_gelu = True

    @staticmethod
    def native_gelu_ok(h: torch.Tensor, approximate: str) -> bool:
        """Whether the chunk h takes the native GELU kernels: the exact GELU of float32 CPU values, kernels built."""
        return (Mlp.native_gelu and approximate == "none" and h.dtype == torch.float32 and h.device.type == "cpu"
                and native.available())

    @staticmethod
    def gelu_chunk(h: torch.Tensor, approximate: str, out: torch.Tensor) -> torch.Tensor:
        """GELU of a chunk of fc1's output h (rows, hidden) into `out` (h itself: in place), outside autograd."""
        if Mlp.native_gelu_ok(h, approximate):
            return native.gelu(h, out=out)
        if out is h:
            return torch.ops.aten.gelu_(h, approximate=approximate)
        return torch.ops.aten.gelu.out(h, approximate=approximate, out=out)

    @staticmethod
    def gelu_backward_chunk(h: torch.Tensor, grad: torch.Tensor, approximate: str,
                            act: torch.Tensor | None) -> torch.Tensor | None:
        """Backward of the GELU of a chunk h (rows, hidden) outside autograd: grad <- grad * GELU'(h) in place
        and, where `act` is given, act <- GELU(h) (returned), both from one erf per value where native."""
        if Mlp.native_gelu_ok(h, approximate):
            native.gelu_backward_(h, grad, act)
            return act
        if act is not None:
            torch.ops.aten.gelu.out(h, approximate=approximate, out=act)
        torch.ops.aten.gelu_backward.grad_input(grad, h, approximate=approximate, grad_input=grad)
        return act

    def chunk_rows(self) -> int:
        """Tokens per chunk of the chunked paths: `chunk_elements` hidden activations, at least 256 tokens."""
        return max(256, self.chunk_elements // self.hidden_features)

    def layers_as_built(self) -> bool:
        """Whether the fast paths that take fc1, GELU and fc2 apart may (`called_as_built`, biases still there)."""
        return (called_as_built(self.fc1, self.act, self.fc2) and self.fc1.bias is not None
                and self.fc2.bias is not None)

    def residual(self, x: torch.Tensor, norm: LayerNorm, drop_path: DropPath, fast: bool) -> torch.Tensor:
        """x + drop_path(self(norm(x))); with `fast` (the block's fast path), one Triton kernel where
        `fused_ok` allows it (GPU inference under autocast, where the kernels run; `kernels.residual_mlp`)."""
        if fast and self.fused_ok(x, norm, drop_path):
            out = kernels.run(kernels.residual_mlp, x, norm.weight, norm.bias, norm.eps, self.fc1.weight,
                              self.fc1.bias, self.fc2.weight, self.fc2.bias, torch.get_autocast_dtype(x.device.type))
            if out is not None:  # None: the launch failed, the eager ops run
                return out
        x_norm = norm(x)
        if fast and self.train_chunks_ok(x_norm):
            return x + drop_path(self.forward_train_chunks(x_norm))
        return x + drop_path(self(x_norm))

    # CPU training runs the MLP as one autograd function over row chunks (`ChunkedMlp`): backward keeps fc1's output
    # but not the GELU's, recomputing it a chunk at a time while it is in cache. Training at batch 16 then saves 17-26%
    # less for backward (coat_lite_tiny's whole-step peak 1516 -> 1116 MiB), for a step time within a few percent
    # (coat_lite_tiny 1.02-1.04x, coat_tiny 0.97-0.98x; benchmarks/mlp_backward.py, BENCHMARKS.md).
    train_chunks = True

    def train_chunks_ok(self, x: torch.Tensor) -> bool:
        """Whether `residual` runs `ChunkedMlp` on the MLP's input x: fp32 CPU tokens with autograd recording through
        them or the MLP's parameters, outside autocast and graph capture (compiled, the layers run as themselves)."""
        if not self.train_chunks or x.device.type != "cpu" or x.dtype != torch.float32 or not self.layers_as_built():
            return False
        if not torch.is_grad_enabled() or torch.is_autocast_enabled("cpu") or capturing_graph() or functorch_active():
            return False
        return x.requires_grad or any(p.requires_grad for p in self.parameters())

    def forward_train_chunks(self, x: torch.Tensor) -> torch.Tensor:
        """self(x) through `ChunkedMlp`, the chunks as large as in inference (`chunk_elements`)."""
        rows = self.chunk_rows()
        y = ChunkedMlp.apply(x.reshape(-1, x.shape[-1]), self.fc1.weight, self.fc1.bias, self.fc2.weight,
                             self.fc2.bias, rows, self.act.approximate)
        return y.view(*x.shape[:-1], y.shape[-1])

    def fused_ok(self, x: torch.Tensor, norm: LayerNorm, drop_path: DropPath) -> bool:
        """The fused kernel's conditions: fp32 tokens on a CUDA device (or the interpreter) under bf16/fp16
        autocast, nothing for autograd to record, no active drop path, a padded row width in
        `kernels.FUSED_MLP_WIDTHS` (64 and 128 channels by default), and the kernel policy (`kernels.use_kernels`:
        CUDA batches of 128+ images by default)."""
        device = x.device.type
        if not kernel_inference(x, self, norm) or x.dtype != torch.float32:
            return False
        if not torch.is_autocast_enabled(device) or torch.get_autocast_dtype(device) not in (torch.bfloat16,
                                                                                           torch.float16):
            return False
        if drop_path.training and drop_path.rate > 0 or not norm.fast_path:
            return False
        if not self.layers_as_built() or self.act.approximate != "none":  # the first test makes act a GELU
            return False
        return kernels.fused_mlp_for(x.shape[-1]) and kernels.use_kernels(x)

    def residual_in_chunks(self, x: torch.Tensor, norm: nn.LayerNorm,
                           out: torch.Tensor | None = None) -> torch.Tensor:
        """Inference only: x + MLP(norm(x)), a few hundred tokens at a time, into `out` (a contiguous tensor of
        x's shape; a fresh one when None).

        The same per-token arithmetic as `x + self(norm(x))`, but the hidden activations (4-8x the width of x)
        stay in cache instead of making a round trip to memory; on a CPU that halves the MLP's time.
        """
        flat = x.reshape(-1, x.shape[-1])  # (B*N, C)
        out = torch.empty_like(flat) if out is None else out.view(flat.shape)
        rows = self.chunk_rows()
        if not self.in_place_chunks or torch.is_autocast_enabled(x.device.type) or not self.layers_as_built():
            # autocast does not reach out= calls: under it (and where a layer is replaced or hooked) the layers run
            # as themselves
            for i in range(0, flat.shape[0], rows):
                chunk = flat[i:i + rows]
                torch.add(chunk, self(norm(chunk)), out=out[i:i + rows])
            return out.view_as(x)
        hidden = None  # (rows, hidden), reused
        w1, w2 = self.fc1.weight.t(), self.fc2.weight.t()
        for i in range(0, flat.shape[0], rows):
            chunk = flat[i:i + rows]
            normed = norm(chunk)
            # oneDNN where it may: fc1 and the GELU in one call, then fc2 and the residual in another
            h = onednn_linear(self.fc1, normed, gelu=self.act.approximate)
            y = None if h is None else onednn_linear(self.fc2, h, add=chunk)
            if y is not None:
                out[i:i + rows] = y
                continue
            if hidden is None:
                hidden = flat.new_empty(min(rows, flat.shape[0]), self.fc1.out_features)
            h = torch.addmm(self.fc1.bias, normed, w1, out=hidden[:chunk.shape[0]])  # F.linear's own kernel
            self.gelu_chunk(h, self.act.approximate, out=h)
            torch.addmm(self.fc2.bias, h, w2, out=out[i:i + rows]).add_(chunk)  # fc2 + residual, in the output
        return out.view_as(x)


class ChunkedMlp(torch.autograd.Function):
    """fc2(GELU(fc1(x))) of tokens x (M, C) for training, `rows` tokens at a time.

    Autograd through the layers keeps two (M, hidden) tensors for backward, fc1's output (for the GELU) and the
    GELU's (for fc2's weight gradient); this keeps only the first and recomputes the GELU of each chunk in backward,
    where the chunk's hidden gradients stay in cache as well. The same products as the layers', summed over
    chunks for the weight gradients. A backward that builds a graph itself (`create_graph=True`, a gradient
    penalty) recomputes the layers with differentiable ops instead, so the gradients can be differentiated again.
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, rows: int, approximate: str):
        m, hidden = x.shape[0], w1.shape[0]
        h = x.new_empty(m, hidden)  # fc1's output, kept for backward
        y = x.new_empty(m, w2.shape[0])
        act = x.new_empty(min(rows, m), hidden)  # one chunk's GELU, reused
        for i in range(0, m, rows):
            hi = torch.addmm(b1, x[i:i + rows], w1.t(), out=h[i:i + rows])
            ai = Mlp.gelu_chunk(hi, approximate, out=act[:hi.shape[0]])
            torch.addmm(b2, ai, w2.t(), out=y[i:i + rows])
        ctx.save_for_backward(x, h, w1, b1, w2)
        ctx.rows, ctx.approximate = rows, approximate
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, h, w1, b1, w2 = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the saved inputs carry their history, h is recomputed from them
            return (*ChunkedMlp.differentiable_grads(grad_y, x, w1, b1, w2, ctx.approximate), None, None)
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        rows, (m, hidden) = ctx.rows, h.shape
        grad_y = grad_y.contiguous()
        grad_x = torch.empty_like(x) if need_x else None
        grad_w1 = torch.zeros_like(w1) if need_w1 else None
        grad_b1 = h.new_zeros(hidden) if need_b1 else None
        grad_w2 = torch.zeros_like(w2) if need_w2 else None
        act, grad_h = h.new_empty(2, min(rows, m), hidden).unbind(0)  # one chunk's GELU and hidden gradient
        need_h = need_x or need_w1 or need_b1
        for i in range(0, m, rows):
            hi, gi = h[i:i + rows], grad_y[i:i + rows]
            n = hi.shape[0]
            if need_h:  # the hidden gradient and, for fc2's weight gradient, the GELU, in one pass
                gh = torch.mm(gi, w2, out=grad_h[:n])
                ai = Mlp.gelu_backward_chunk(hi, gh, ctx.approximate, act[:n] if need_w2 else None)
            elif need_w2:
                ai = Mlp.gelu_chunk(hi, ctx.approximate, out=act[:n])
            if need_w2:
                grad_w2.addmm_(gi.t(), ai)
            if need_h:
                if need_b1:
                    grad_b1 += gh.sum(0)
                if need_w1:
                    grad_w1.addmm_(gh.t(), x[i:i + rows])
                if need_x:
                    torch.mm(gh, w1, out=grad_x[i:i + rows])
        grad_b2 = grad_y.sum(0) if need_b2 else None
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, None, None

    @staticmethod
    def differentiable_grads(grad_y, x, w1, b1, w2, approximate: str) -> tuple[torch.Tensor, ...]:
        """Gradients of fc2(GELU(fc1(x))) with respect to x, w1, b1, w2, b2, as ops autograd can differentiate."""
        h = F.linear(x, w1, b1)
        grad_h = torch.ops.aten.gelu_backward(grad_y @ w2, h, approximate=approximate)
        return (grad_h @ w1, grad_h.t() @ x, grad_h.sum(0), grad_y.t() @ F.gelu(h, approximate=approximate),
                grad_y.sum(0))


def in_chunks_ok(x: torch.Tensor, block: nn.Module) -> bool:
    """Whether a block may run the fast path's cache-sized chunks: CPU inference without autograd or drop path
    (chunks write into preallocated outputs), outside graph capture (`capturing_graph`; compiled, inductor fuses
    the ops itself).

    Measured on an idle 2-core machine (BENCHMARKS.md), chunking makes coat_lite_tiny inference 1.6x faster with
    1 or 2 threads. On a CPU oversubscribed by other jobs every parallel region waits for a descheduled thread, and
    the many small chunks then cost more than they save: run such jobs with `torch.set_num_threads(1)`.
    """
    if x.device.type != "cpu" or functorch_active():
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in block.parameters())):
        return False
    if block.training and block.drop_path.rate > 0:
        return False
    if kernels.interpreting() and kernels.use_kernels(x):  # the tests' stand-in for a GPU: the GPU's path
        return False
    return not capturing_graph()


def capturing_graph() -> bool:
    """Whether torch.compile / torch.export or torch.jit.trace is recording the forward pass: the chunked paths
    loop over images and tokens in Python, and a recorded graph would keep the loop of the example's batch size."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def images_per_chunk(tokens: int, dim: int) -> int:
    """Images per chunk so that one chunk's qkv activations (tokens x 3C fp32) stay within ~16 MiB (L3)."""
    return max(1, (1 << 22) // (tokens * 3 * dim))


class SerialBlock(nn.Module):
    """x = cpe(x); x = x + drop_path(attn(LN1(x))); x = x + drop_path(MLP(LN2(x)))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop_path: float):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=1e-6, feeds_linear=True)
        self.factoratt_crpe = FactorAttnConvRelPosEnc(dim, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = LayerNorm(dim, eps=1e-6, feeds_linear=True)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    fast_path = True

    def forward(self, x: torch.Tensor, size: Size, cpe: ConvPosEnc | None, crpe: ConvRelPosEnc | None):
        if self.fast_path and in_chunks_ok(x, self):
            return self.forward_in_chunks(x, size, cpe, crpe)
        if cpe is not None:
            x = cpe(x, size)
        x = x + self.drop_path(self.factoratt_crpe(self.norm1(x), size, crpe))
        return self.mlp.residual(x, self.norm2, self.drop_path, self.fast_path)

    def forward_class_token(self, x: torch.Tensor, size: Size, cpe: ConvPosEnc | None) -> torch.Tensor:
        """The block's class-token row alone, (B, 1, C): all a token-pooling classifier reads from a Lite model's
        last block. The image tokens still feed k and v; their q, output projection and MLP are skipped."""
        if cpe is not None:
            x = cpe(x, size)
        x = x[:, :1] + self.drop_path(self.factoratt_crpe.forward_class_token(self.norm1(x)))
        return self.mlp.residual(x, self.norm2, self.drop_path, self.fast_path)

    def forward_in_chunks(self, x: torch.Tensor, size: Size, cpe: ConvPosEnc | None, crpe: ConvRelPosEnc | None):
        """Inference: the same block, a few images at a time, so each image's activations stay in cache."""
        B, N, C = x.shape
        step = images_per_chunk(N, C)
        out = x.new_empty(B, N, C)  # each chunk's MLP writes its rows: no concatenation
        for b in range(0, max(B, 1), step):  # an empty batch runs once, on itself
            xb = x[b:b + step]  # (b, N, C)
            if cpe is not None:
                xb = cpe(xb, size)
            attn = self.factoratt_crpe
            if hooked(attn):  # its hooks see the attention's own output
                xb = xb + attn(self.norm1(xb), size, crpe)
            else:
                xb = attn(self.norm1(xb), size, crpe, residual=xb)  # the sum in the output projection's call
            self.mlp.residual_in_chunks(xb, self.norm2, out=out[b:b + step])
        return out


def resize_tokens(x: torch.Tensor, size: Size, target: Size) -> torch.Tensor:
    """Bilinear resize of the image tokens to the target grid; the source class token is carried along."""
    B, N, C = x.shape
    if size == target:
        return x
    img = x[:, 1:].transpose(1, 2).reshape(B, C, size[0], size[1])  # (B, C, H, W)
    img = F.interpolate(img, size=target, mode="bilinear", align_corners=False)  # (B, C, H', W')
    return torch.cat((x[:, :1], img.flatten(2).transpose(1, 2)), dim=1)  # (B, 1 + H'*W', C)


def resize_tokens_fast(x: torch.Tensor, size: Size, target: Size) -> torch.Tensor:
    """`resize_tokens` on the channels-last view of the image tokens (no transposes)."""
    if size == target:
        return x
    img = as_channels_last(x[:, 1:], size).contiguous(memory_format=torch.channels_last)  # (B, C, H, W)
    img = F.interpolate(img, size=target, mode="bilinear", align_corners=False)  # (B, C, H', W'), channels-last
    return torch.cat((x[:, :1], as_tokens(img)), dim=1)  # (B, 1 + H'*W', C)


class ParallelBlock(nn.Module):
    """Co-scale block over scales 2-4 with feature interpolation (the released models' variant).

    Each scale has its own attention and norms; the attention outputs of the other scales are resized to its grid
    and summed in; one MLP is shared by the three scales (checkpoint keys mlp2/mlp3/mlp4 all name it).
    """

    scales = (2, 3, 4)
    # Sources summed into each scale (indices into scales 2-4), in the authors' order: float addition is not
    # associative, and this order gives bit-identical outputs.
    mix_order = ((1, 2), (2, 0), (1, 0))

    fast_path = True
    native_mix = True  # `add_mix` in one native pass per scale where it can (CPU fp32 inference)

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop_path: float):
        super().__init__()
        for s in self.scales:
            setattr(self, f"norm1{s}", LayerNorm(dim, eps=1e-6, feeds_linear=True))
            setattr(self, f"factoratt_crpe{s}", FactorAttnConvRelPosEnc(dim, num_heads, qkv_bias))
            setattr(self, f"norm2{s}", LayerNorm(dim, eps=1e-6, feeds_linear=True))
        self.drop_path = DropPath(drop_path)
        self.mlp2 = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, xs: list[torch.Tensor], sizes: list[Size], cpes: list, crpes: list) -> list[torch.Tensor]:
        if cpes[0] is not None:
            xs = [cpe(x, size) for cpe, x, size in zip(cpes, xs, sizes)]
        attn = [
            getattr(self, f"factoratt_crpe{s}")(getattr(self, f"norm1{s}")(x), size, crpe)
            for s, x, size, crpe in zip(self.scales, xs, sizes, crpes)
        ]
        xs = self.add_mix(xs, attn, sizes)
        if self.fast_path and in_chunks_ok(xs[0], self):
            return [self.mlp2.residual_in_chunks(x, getattr(self, f"norm2{s}")) for s, x in zip(self.scales, xs)]
        return [self.mlp2.residual(x, getattr(self, f"norm2{s}"), self.drop_path, self.fast_path)
                for s, x in zip(self.scales, xs)]

    def add_mix(self, xs: list[torch.Tensor], attn: list[torch.Tensor], sizes: list[Size]) -> list[torch.Tensor]:
        """x_s + drop_path(a_s') for each scale s, a' the co-scale sums of the attention outputs (`mix`). In CPU fp32
        inference each scale's sum is one native pass over the token layout (`native.mix_tokens`): no resized
        copies, concatenations or partial sums."""
        fast = use_fast(self, xs[0])
        if self.native_mix and fast and not self.training and all(native_inference(t) for t in xs + attn):
            return [native.mix_tokens(x, attn[i], [(attn[j], sizes[j]) for j in others], sizes[i])
                    for i, (x, others) in enumerate(zip(xs, self.mix_order))]
        resize = resize_tokens_fast if fast else resize_tokens
        mixed = self.mix(attn, lambda a, j, i: resize(a, sizes[j], sizes[i]))
        return [x + self.drop_path(a) for x, a in zip(xs, mixed)]

    def mix(self, attn: list[torch.Tensor], resize) -> list[torch.Tensor]:
        """a_s' = a_s + resize(a_t -> grid of s) + resize(a_u -> grid of s), summed in the authors' order;
        `resize(a, j, i)` brings scale j's tokens to scale i's grid."""
        mixed = []
        for i, others in enumerate(self.mix_order):
            a = attn[i]
            for j in others:
                a = a + resize(attn[j], j, i)
            mixed.append(a)
        return mixed

    def forward_class_token(self, xs: list[torch.Tensor], sizes: list[Size], cpes: list) -> list[torch.Tensor]:
        """The class-token rows alone, three (B, 1, C): all a token-pooling classifier reads from the last block.
        A resize carries the source's class token over unchanged, so the mixed class rows are plain sums."""
        if cpes[0] is not None:
            xs = [cpe(x, size) for cpe, x, size in zip(cpes, xs, sizes)]
        attn = [
            getattr(self, f"factoratt_crpe{s}").forward_class_token(getattr(self, f"norm1{s}")(x))
            for s, x in zip(self.scales, xs)
        ]
        xs = [x[:, :1] + self.drop_path(a) for x, a in zip(xs, self.mix(attn, lambda a, j, i: a))]
        return [self.mlp2.residual(x, getattr(self, f"norm2{s}"), self.drop_path, self.fast_path)
                for s, x in zip(self.scales, xs)]


class FeatureInfo(list):
    """timm-style feature description: a list of dicts plus `channels()` and `reduction()`."""

    def channels(self) -> list[int]:
        return [f["num_chs"] for f in self]

    def reduction(self) -> list[int]:
        return [f["reduction"] for f in self]


def _take_indices(indices: int | Sequence[int] | None, n: int = 4) -> list[int]:
    if indices is None:
        return list(range(n))
    if isinstance(indices, int):
        if not 0 < indices <= n:
            raise ValueError(f"expected 1..{n} last scales, got {indices}")
        return list(range(n - indices, n))
    out = sorted(i % n if -n <= i < n else _bad_index(i, n) for i in indices)
    return out


def _bad_index(i: int, n: int) -> int:
    raise ValueError(f"scale index {i} out of range: CoaT has {n} scales (0..{n - 1})")


class CoaT(nn.Module):
    """A CoaT or CoaT-Lite classifier (or, with `features_only=True`, a four-scale backbone).

    Args:
        config: the architecture.
        features_only: drop the final norms and classifier; `forward` returns NCHW maps of `out_indices`.
        out_indices: the scales (0-3, strides 4/8/16/32) a backbone returns.
    """

    def __init__(self, config: CoaTConfig, *, features_only: bool = False, out_indices: Sequence[int] = (0, 1, 2, 3)):
        super().__init__()
        self.config = cfg = config
        dims = cfg.embed_dims
        self.num_classes = cfg.num_classes
        self.num_features = self.head_hidden_size = dims[-1]
        self.features_only = features_only
        self.out_indices = _take_indices(out_indices)
        self.grad_checkpointing = False
        self.fast_path = True

        for i in range(4):
            n = i + 1
            in_chans = cfg.in_chans if i == 0 else dims[i - 1]
            stride = cfg.patch_size if i == 0 else 2
            setattr(self, f"patch_embed{n}", PatchEmbed(in_chans, dims[i], stride))
            setattr(self, f"cls_token{n}", nn.Parameter(torch.zeros(1, 1, dims[i])))
            setattr(self, f"cpe{n}", ConvPosEnc(dims[i], cfg.cpe_kernel) if cfg.use_cpe else None)
            head_dim = dims[i] // cfg.num_heads
            setattr(self, f"crpe{n}", ConvRelPosEnc(head_dim, cfg.crpe_window) if cfg.use_crpe else None)
            setattr(self, f"serial_blocks{n}", nn.ModuleList(
                SerialBlock(dims[i], cfg.num_heads, cfg.mlp_ratios[i], cfg.qkv_bias, cfg.drop_path_rate)
                for _ in range(cfg.serial_depths[i])
            ))
        self.parallel_blocks = nn.ModuleList(
            ParallelBlock(dims[1], cfg.num_heads, cfg.mlp_ratios[1], cfg.qkv_bias, cfg.drop_path_rate)
            for _ in range(cfg.parallel_depth)
        ) if cfg.parallel_depth > 0 else None

        self.feature_info = FeatureInfo(
            dict(num_chs=dims[i], reduction=cfg.patch_size * 2**i,
                 module="parallel_blocks" if i > 0 and cfg.parallel_depth else f"serial_blocks{i + 1}")
            for i in range(4)
        )

        if features_only:
            self.norm2 = self.norm3 = self.norm4 = self.aggregate = self.head = None
            self.head_drop = None
            self.feature_info = FeatureInfo(self.feature_info[i] for i in self.out_indices)
        else:
            parallel = cfg.parallel_depth > 0
            self.norm2 = LayerNorm(dims[1], eps=1e-6) if parallel else None
            self.norm3 = LayerNorm(dims[2], eps=1e-6) if parallel else None
            self.norm4 = LayerNorm(dims[3], eps=1e-6)
            # CoaT: a learned weighted sum (+ bias) of the class tokens of scales 2-4.
            self.aggregate = nn.Conv1d(3, 1, kernel_size=1) if parallel else None
            self.head_drop = nn.Dropout(cfg.drop_rate)
            self.head = nn.Linear(dims[-1], cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.reset_parameters()

    # ----------------------------------------------------------------------------------------------------------
    # init and timm's model API

    def reset_parameters(self) -> None:
        for i in range(1, 5):
            nn.init.trunc_normal_(getattr(self, f"cls_token{i}"), std=0.02, a=-2.0, b=2.0)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {f"cls_token{i}" for i in range(1, 5)}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        matcher = {}
        for i in range(1, 5):
            matcher[f"stem{i}"] = rf"^cls_token{i}|patch_embed{i}|crpe{i}|cpe{i}"
            matcher[f"serial_blocks{i}"] = rf"^serial_blocks{i}\.(\d+)"
        matcher["parallel_blocks"] = [(r"^parallel_blocks\.(\d+)", None), (r"^norm|aggregate", (99999,))]
        return matcher

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass (saves memory, same gradients)."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def set_fast_path(self, enable: bool = True) -> None:
        """Choose the fast path (default; outputs within ~1e-6 of the reference) or the reference path
        (bit-identical to the authors' operations). Weights and state-dict keys are the same for both."""
        self.fast_path = enable
        for m in self.modules():
            if hasattr(type(m), "fast_path"):
                m.fast_path = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if self.features_only:
            raise RuntimeError("a features_only backbone has no classifier")
        pool = self.config.global_pool if global_pool is None else global_pool
        self.config = dataclasses.replace(self.config, num_classes=num_classes, global_pool=pool)  # checks both
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            nn.init.trunc_normal_(self.head.weight, std=0.02, a=-2.0, b=2.0)
            nn.init.zeros_(self.head.bias)

    # ----------------------------------------------------------------------------------------------------------
    # forward

    def check_input(self, x: torch.Tensor) -> None:
        """Raises a ValueError that says what input the model takes."""
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_chans:
            raise ValueError(f"expected images of shape (B, {cfg.in_chans}, H, W), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"expected floating-point images, got {x.dtype}: scale them to [0, 1] and normalize "
                             "(x.float() / 255, then the mean and std of coatvit.data.DataConfig)")
        if min(x.shape[-2:]) < cfg.min_input_size:
            raise ValueError(
                f"input {x.shape[-2]}x{x.shape[-1]} is too small: CoaT needs at least "
                f"{cfg.min_input_size}x{cfg.min_input_size} pixels (stride 32); resize or pad the images")

    def _call(self, block, *args):
        """Run a block (or one of its methods), checkpointed when gradient checkpointing is on."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    # Class-token rows only in the last block (see below): on a 2-core CPU, batch 16, coat_tiny inference 1.08x and
    # training 1.10x faster, coat_lite_tiny within the noise (benchmarks/class_token_shortcut.py, BENCHMARKS.md)
    shortcut_last_block = True

    def class_token_shortcut(self, x: torch.Tensor) -> bool:
        """Whether `forward` may compute only the class-token rows of the last block: a classifier that pools the
        class token reads nothing else from it, so the image tokens' q, output projection, CRPE, resizes and MLP
        there are skipped (same logits, fewer MACs: about 3% of coat_lite_tiny's, 5% of coat_tiny's). Fast path
        only, and only where every CRPE module still serves another block (else its weights would get no
        gradient, which DDP rejects)."""
        cfg = self.config
        if not self.shortcut_last_block or self.features_only or cfg.global_pool != "token" or not use_fast(self, x):
            return False
        if cfg.parallel_depth == 0:
            return cfg.serial_depths[3] >= (2 if cfg.use_crpe else 1)
        return not cfg.use_crpe or cfg.parallel_depth >= 2 or min(cfg.serial_depths[1:]) >= 1

    def forward_scales(self, x: torch.Tensor, num_stages: int = 4,
                       class_token_only: bool = False) -> tuple[list[torch.Tensor], list[Size]]:
        """Serial stages 1..num_stages, then (when all four ran) the parallel blocks.

        Returns the token tensors (B, 1 + H*W, C) of each scale, class token first, and their grid sizes. With
        `class_token_only` (see `class_token_shortcut`) the last block returns only its class-token rows (B, 1, C).
        """
        self.check_input(x)
        B = x.shape[0]
        cfg = self.config
        chunked = self.train_chunk_stages and self.train_chunks_on(x)
        xs: list[torch.Tensor] = []
        sizes: list[Size] = []
        for i in range(1, num_stages + 1):
            if i > 1 and use_fast(self, x):
                x = as_channels_last(xs[-1][:, 1:], sizes[-1])  # (B, C, H, W), a channels-last view
            elif i > 1:
                H, W = sizes[-1]
                # (B, C, H, W), class token dropped; contiguous NCHW like the reference (conv results depend on layout)
                x = xs[-1][:, 1:].transpose(1, 2).reshape(B, xs[-1].shape[-1], H, W).contiguous()
            last = class_token_only and self.parallel_blocks is None and i == 4
            images = self.stage_chunk_images(i, x) if chunked else 0
            (x,), size = self.in_train_chunks(lambda t: self.serial_stage(i, t[0], last), [x], images)
            xs.append(x)
            sizes.append(size)
        if self.parallel_blocks is not None and num_stages == 4:
            images = 0
            if chunked:
                tokens = sizes[1][0] * sizes[1][1] + 1  # scale 2, the largest
                images = self.images_per_train_chunk(B, tokens, cfg.embed_dims[1] * cfg.mlp_ratios[1], x)
            scales, _ = self.in_train_chunks(lambda t: (self.parallel_stage(t, sizes[1:], class_token_only), None),
                                             xs[1:], images)
            xs = xs[:1] + scales
        return xs, sizes

    def serial_stage(self, i: int, x: torch.Tensor, class_token_only: bool) -> tuple[list[torch.Tensor], Size]:
        """Patch embedding, class token and serial blocks of stage i (1-4) on its input map (B, C, H, W): the tokens
        (B, N, C) as a one-element list, and the grid size. With `class_token_only` the last block returns only its
        class-token rows."""
        B = x.shape[0]
        x, size = getattr(self, f"patch_embed{i}")(x)  # (B, H*W, C)
        x = torch.cat((getattr(self, f"cls_token{i}").expand(B, -1, -1), x), dim=1)  # (B, N, C)
        cpe, crpe = getattr(self, f"cpe{i}"), getattr(self, f"crpe{i}")
        blocks = getattr(self, f"serial_blocks{i}")
        for j, blk in enumerate(blocks):
            if class_token_only and j == len(blocks) - 1:
                x = self._call(blk.forward_class_token, x, size, cpe)
            else:
                x = self._call(blk, x, size, cpe, crpe)
        return [x], size

    def parallel_stage(self, scales: list[torch.Tensor], sizes: list[Size],
                       class_token_only: bool) -> list[torch.Tensor]:
        """The parallel blocks over the tokens of scales 2-4."""
        cpes = [self.cpe2, self.cpe3, self.cpe4]
        crpes = [self.crpe2, self.crpe3, self.crpe4]
        for j, blk in enumerate(self.parallel_blocks):
            if class_token_only and j == len(self.parallel_blocks) - 1:
                scales = self._call(blk.forward_class_token, scales, sizes, cpes)
            else:
                scales = self._call(blk, scales, sizes, cpes, crpes)
        return list(scales)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """CoaT-Lite: normed tokens of scale 4 (B, N4, C). CoaT: normed tokens of scales 2-4, a list of three."""
        if self.features_only:
            raise RuntimeError("forward_features needs the final norms; this is a features_only backbone")
        return self.final_norms(self.forward_scales(x)[0])

    def final_norms(self, xs: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        if self.parallel_blocks is None:
            return self.norm4(xs[3])
        return [self.norm2(xs[1]), self.norm3(xs[2]), self.norm4(xs[3])]

    def forward_head(self, x: torch.Tensor | list[torch.Tensor], pre_logits: bool = False) -> torch.Tensor:
        avg = self.config.global_pool == "avg"
        if isinstance(x, (list, tuple)):
            pooled = [t[:, 1:].mean(dim=1) if avg else t[:, 0] for t in x]
            x = self.aggregate(torch.stack(pooled, dim=1)).squeeze(1)  # (B, 3, C) -> (B, C)
        else:
            x = x[:, 1:].mean(dim=1) if avg else x[:, 0]
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """timm's intermediate-feature API: NCHW maps of the requested scales (strides 4/8/16/32).

        CoaT's scales 2-4 are taken after the parallel blocks, so only a Lite model (or a request for scale 0
        alone) can stop early. With `norm=True` the final norms of scales 2-4 are applied where the model has them.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take = _take_indices(indices)
        num_stages = 4
        if stop_early and (self.parallel_blocks is None or max(take) == 0):
            num_stages = max(take) + 1
        xs, sizes = self.forward_scales(x, num_stages)
        final_norms = [None, self.norm2, self.norm3, self.norm4]
        if norm:
            xs = [t if n is None else n(t) for n, t in zip(final_norms, xs)]
        B = x.shape[0]
        intermediates = []
        for i in take:
            t = xs[i][:, 1:]  # (B, H*W, C)
            if output_fmt == "NCHW":
                t = t.transpose(1, 2).reshape(B, t.shape[-1], *sizes[i])  # (B, C, H, W)
            intermediates.append(t.contiguous())
        if intermediates_only:
            return intermediates
        if num_stages < 4 or self.features_only:
            return xs[-1], intermediates
        if not norm:
            xs = [t if n is None else n(t) for n, t in zip(final_norms, xs)]
        final = xs[3] if self.parallel_blocks is None else xs[1:]
        return final, intermediates

    # Training on a CPU whose allocator maps every large block afresh (glibc's defaults) runs the batch a few images
    # at a time: no activation then exceeds glibc's mmap threshold, so freed memory is reused instead of faulted
    # in again. coat_lite_tiny training steps at batch 16 were 1.25x faster that way in a plain process and 0.93x
    # with the allocator tuned (benchmarks/train_chunks.py, BENCHMARKS.md), hence the allocator test.
    train_in_chunks = True

    # Chunk each stage by its own activations (True: stage 1 a few images at a time, later stages more, the parallel
    # blocks of 16 images at 224 px in two chunks) or the whole forward pass by stage 1's (False). Per stage was
    # 1.09-1.10x faster for coat_lite_tiny and 1.08-1.09x for coat_tiny in two runs, in spite of more page faults
    # (benchmarks/train_chunks.py --layouts stages pass, BENCHMARKS.md).
    train_chunk_stages = True

    # largest activation of one chunk (the stage-1 MLP's hidden layer), under glibc's 32 MiB mmap-threshold ceiling:
    # 3 images at 224 px, faster than 2 (16 MiB) in three runs (coat_lite_tiny 1.04-1.17x, coat_tiny 1.01-1.03x);
    # 4 images (28 MiB) brought page faults back (benchmarks/train_chunks.py --chunk-mib, BENCHMARKS.md)
    train_chunk_bytes = 24 << 20

    def train_chunks_on(self, x: torch.Tensor) -> bool:
        """Whether a forward pass on images `x` runs its training chunks (see `train_in_chunks`).

        Per sample the chunks compute what the whole batch does (nothing in CoaT mixes samples), and the weight
        gradients are the sums over chunks; drop path draws each chunk's masks in turn.
        """
        if not (self.train_in_chunks and x.device.type == "cpu" and use_fast(self, x) and torch.is_grad_enabled()):
            return False
        if capturing_graph() or not runtime.fresh_pages_for_large_blocks():
            return False
        return x.requires_grad or any(p.requires_grad for p in self.parameters())

    def images_per_train_chunk(self, batch: int, tokens: int, hidden: float, like: torch.Tensor) -> int:
        """Images per chunk that keep an MLP hidden layer of `tokens` x `hidden` per image within
        `train_chunk_bytes`, or 0 when the whole batch fits."""
        images = max(1, self.train_chunk_bytes // (tokens * int(hidden) * like.element_size()))
        return images if batch > images else 0

    def stage_chunk_images(self, i: int, x: torch.Tensor) -> int:
        """`images_per_train_chunk` for serial stage i (1-4) on its input map `x` (images for stage 1)."""
        cfg = self.config
        stride = cfg.patch_size if i == 1 else 2
        tokens = (x.shape[-2] // stride) * (x.shape[-1] // stride) + 1
        return self.images_per_train_chunk(x.shape[0], tokens, cfg.embed_dims[i - 1] * cfg.mlp_ratios[i - 1], x)

    def train_chunk_images(self, x: torch.Tensor) -> int:
        """Images per chunk of stage 1 in a CPU training forward pass on images `x`, or 0 to run the batch whole."""
        return self.stage_chunk_images(1, x) if self.train_chunks_on(x) else 0

    @staticmethod
    def in_train_chunks(fn, inputs: list[torch.Tensor], images: int):
        """`fn(inputs)` -> (list of tensors, extra), run on chunks of at most `images` images (0: the whole batch),
        as few and as even as that allows (16 images by 3 are 3, 3, 3, 3, 2, 2); the lists are concatenated."""
        if not images:
            return fn(inputs)
        chunks = -(-inputs[0].shape[0] // images)
        outs = [fn(list(part)) for part in zip(*(t.tensor_split(chunks) for t in inputs))]
        return [torch.cat(level) for level in zip(*(o[0] for o in outs))], outs[0][1]

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        images = 0 if self.train_chunk_stages else self.train_chunk_images(x)
        if images:
            def run(t: list[torch.Tensor]) -> tuple[list[torch.Tensor], bool]:
                out = self.forward_batch(t[0])
                return (out, False) if isinstance(out, list) else ([out], True)  # features_only: one map per level

            outs, single = self.in_train_chunks(run, [x], images)
            return outs[0] if single else outs
        return self.forward_batch(x)

    def forward_batch(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """The forward pass over the whole batch at once."""
        if self.features_only:
            return self.forward_intermediates(x, self.out_indices, stop_early=True, intermediates_only=True)
        if self.class_token_shortcut(x):
            xs, _ = self.forward_scales(x, class_token_only=True)
            return self.forward_head(self.final_norms(xs))
        return self.forward_head(self.forward_features(x))
