"""The native CPU kernels (coatvit.native): the depthwise convolution, the attention products and the co-scale mix
over token layouts against PyTorch's ops, the model's use of them, and the build: cache, damaged files, no
compiler, a failing compiler, the switch."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import coatvit
from coatvit import native, onednn
from coatvit import model as model_module
from coatvit.model import resize_tokens

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels unavailable: {native.failure()}")


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """A library cache of this test's own and a fresh build decision, restored afterwards."""
    monkeypatch.setenv("COATVIT_CACHE", str(tmp_path))
    native.library.cache_clear()
    yield tmp_path
    native.library.cache_clear()


def reference(convs, src_img, size, add, mul):
    """add + mul * DWConv(src) with PyTorch's convolutions, each conv over its run of channels."""
    B, N, C = src_img.shape
    feat = src_img.transpose(1, 2).reshape(B, C, *size)
    parts = torch.split(feat, [c.in_channels for c in convs], dim=1)
    conv = torch.cat([c(p) for c, p in zip(convs, parts)], dim=1).flatten(2).transpose(1, 2)  # (B, N, C)
    return add + (conv if mul is None else mul * conv)


@needs_native
@pytest.mark.parametrize("windows", [[(3, 24)], [(3, 16), (5, 24), (7, 24)], [(3, 38), (5, 57), (7, 57)],
                                     [(7, 20)], [(5, 3)]])
@pytest.mark.parametrize("size", [(7, 9), (1, 1), (3, 5), (14, 13), (2, 17)])
@pytest.mark.parametrize("with_mul", [False, True])
def test_dwconv_tokens_equals_pytorch_convs(windows, size, with_mul):
    """Windows per channel run (CRPE's 3/5/7 over runs that do not align with blocks of 8, one window, channels past
    the last whole block), grids narrower than the four-pixel path, strided views of a wider projection."""
    torch.manual_seed(0)
    convs = [nn.Conv2d(c, c, k, padding=k // 2, groups=c) for k, c in windows]
    C = sum(c for _, c in windows)
    B, N = 3, size[0] * size[1]
    qkv = torch.randn(B, N, 3 * C)
    q, v = qkv[..., :C], qkv[..., 2 * C:]  # views with a token stride of 3C
    add = torch.randn(B, N, C)
    mul = q if with_mul else None
    with torch.no_grad():
        expected = reference(convs, v, size, add, mul)
        weights = native.depthwise_weights(convs)
        out = torch.empty(B, N, C)
        native.dwconv_tokens(v, weights, size, add=add, dst=out, mul=mul)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        native.dwconv_tokens(v, weights, size, add=add, dst=add, mul=mul)  # in place: dst is add
        torch.testing.assert_close(add, expected, atol=1e-5, rtol=1e-5)


def test_depthwise_weights_only_for_convs_the_kernel_computes():
    assert native.depthwise_weights([nn.Conv2d(8, 8, 3, padding=1, groups=8)]) is not None
    assert native.depthwise_weights([nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="reflect")]) is None
    assert native.depthwise_weights([nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8)]) is None
    assert native.depthwise_weights([nn.Conv2d(8, 8, 4, padding=2, groups=8)]) is None
    assert native.depthwise_weights([nn.Conv2d(8, 8, 3, padding=1, groups=4)]) is None
    assert native.depthwise_weights([nn.Conv2d(8, 8, 3, padding=1, groups=8).double()]) is None
    no_bias = native.depthwise_weights([nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)])
    assert torch.equal(no_bias.bias, torch.zeros(8))


@needs_native
def test_dwconv_tokens_rejects_what_it_cannot_read():
    weights = native.depthwise_weights([nn.Conv2d(8, 8, 3, padding=1, groups=8)])
    x = torch.randn(2, 12, 8)
    with pytest.raises(ValueError, match="expected"):
        native.dwconv_tokens(x, weights, (3, 5), add=x, dst=torch.empty_like(x))
    with pytest.raises(ValueError, match="contiguous channels"):
        native.dwconv_tokens(x, weights, (3, 4), add=x, dst=torch.empty(8, 12, 2).permute(2, 1, 0))


def attention_reference(qkv: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """Per head Q (scale * softmax over tokens of K)^T V, with permuted heads as the eager fast path does it."""
    B, N, C3 = qkv.shape
    split = (B, N, heads, C3 // 3 // heads)
    q, k, v = (t.reshape(split).transpose(1, 2) for t in qkv.unflatten(-1, (3, C3 // 3)).unbind(2))  # (B, h, N, Ch)
    return (q @ (k.softmax(dim=2).transpose(-1, -2) @ v * scale)).transpose(1, 2).reshape(B, N, C3 // 3)


@needs_native
@pytest.mark.parametrize("batch", [1, 3])  # fewer images than threads: passes split; more: images split
@pytest.mark.parametrize("tokens, channels, heads", [(785, 152, 8), (197, 256, 8), (50, 320, 8), (65, 512, 8),
                                                     (3, 24, 1), (1, 16, 2), (130, 72, 4), (3137, 64, 8),
                                                     (77, 128, 8), (13, 40, 8)])
def test_factor_attention_equals_the_eager_products(batch, tokens, channels, heads):
    """Heads of 19, 32, 40, 64, 24, 8, 18 and 5 channels (the Lite models' narrow 8 and 16 included); token counts
    that leave partial tiles of 4, 8 and 64;
    q, k, v as views of a wider projection output, as the model passes them."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        wide = torch.randn(batch, tokens, 3 * channels + 8) * 3
        qkv = wide[..., :3 * channels]  # rows 3C + 8 floats apart
        scale = (channels // heads) ** -0.5
        out = native.factor_attention(qkv, heads, scale)
        # float32 sums over up to 3137 tokens in another order: agreement to about 1e-5 of the values' scale
        torch.testing.assert_close(out, attention_reference(qkv, heads, scale), atol=1e-4, rtol=1e-4)
        assert out.shape == (batch, tokens, channels) and out.is_contiguous()
    finally:
        torch.set_num_threads(threads)


@needs_native
@pytest.mark.parametrize("batch, threads", [(1, 2), (3, 2), (2, 1)])  # passes split among threads, or images
@pytest.mark.parametrize("size, channels, heads", [((14, 14), 152, 8), ((5, 9), 64, 8), ((2, 1), 40, 8),
                                                   ((7, 7), 320, 8)])
def test_factor_attention_adds_the_crpe_term_in_the_same_pass(batch, threads, size, channels, heads):
    """The CRPE's Q * DWConv(V) fused into the attention's output pass: the same bits as the attention and then
    `dwconv_tokens` over the image tokens (CoaT's windows 3, 5 and 7 over runs of heads; grids narrower than a
    window and than a group of four pixels)."""
    torch.manual_seed(0)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ch = channels // heads
        convs = [nn.Conv2d(n * ch, n * ch, k, padding=k // 2, groups=n * ch) for k, n in ((3, 2), (5, 3), (7, 3))]
        weights = native.depthwise_weights(convs)
        qkv = torch.randn(batch, 1 + size[0] * size[1], 3 * channels + 8)[..., :3 * channels] * 3
        q, v = qkv[..., :channels], qkv[..., 2 * channels:]
        expected = native.factor_attention(qkv, heads, 0.3)
        native.dwconv_tokens(v[:, 1:], weights, size, add=expected[:, 1:], dst=expected[:, 1:], mul=q[:, 1:])
        assert torch.equal(native.factor_attention(qkv, heads, 0.3, (weights, size)), expected)
        with pytest.raises(ValueError, match="grid"):
            native.factor_attention(qkv[:, 1:], heads, 0.3, (weights, size))
    finally:
        torch.set_num_threads(saved)


@needs_native
def test_factor_attention_says_what_it_takes():
    assert native.factor_attention_ok(152, 8) and not native.factor_attention_ok(76, 4)  # 76: not a multiple of 8
    assert not native.factor_attention_ok(1040, 8)  # 130-channel heads
    with pytest.raises(ValueError, match="multiple of 8"):
        native.factor_attention(torch.randn(1, 5, 3 * 76), 4, 0.2)
    assert native.factor_attention(torch.randn(0, 5, 3 * 16), 2, 0.2).shape == (0, 5, 16)


def mix_reference(x, a, sources, size):
    """x + ((a + resize(s1)) + resize(s2)) with the reference path's bilinear resize (F.interpolate)."""
    for s, s_size in sources:
        a = a + resize_tokens(s, s_size, size)
    return x + a


@needs_native
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("channels", [152, 20, 8])  # 20: a scalar tail past the last block of 8
@pytest.mark.parametrize("grids", [((28, 28), (14, 14), (7, 7)), ((15, 17), (7, 8), (3, 4)), ((5, 5), (2, 2), (1, 1)),
                                   ((10, 6), (5, 3), (2, 1))])
def test_mix_tokens_equals_resizes_and_sums(batch, channels, grids):
    """Every scale of a parallel block (up- and downsampling by 2 and 4, odd and one-pixel grids) from views of
    wider tensors, as the attention outputs of the model are not; against F.interpolate's bilinear resize."""
    torch.manual_seed(0)
    tokens = [torch.randn(batch, 1 + h * w, channels + 5)[..., :channels] for h, w in grids]
    for i, others in enumerate(((1, 2), (2, 0), (1, 0))):
        x = torch.randn(batch, 1 + grids[i][0] * grids[i][1], channels)
        sources = [(tokens[j], grids[j]) for j in others]
        out = native.mix_tokens(x, tokens[i], sources, grids[i])
        torch.testing.assert_close(out, mix_reference(x, tokens[i], sources, grids[i]), atol=1e-5, rtol=1e-5)
        assert out.is_contiguous()


@needs_native
def test_mix_tokens_says_what_it_takes():
    x = torch.randn(2, 1 + 4 * 4, 16)
    with pytest.raises(ValueError, match="for 2x2 grids"):
        native.mix_tokens(x, x, [(torch.randn(2, 5, 16), (2, 2)), (torch.randn(2, 5, 8), (2, 2))], (4, 4))
    with pytest.raises(ValueError, match="float32"):
        native.mix_tokens(x, x.double(), [(x, (4, 4)), (x, (4, 4))], (4, 4))
    empty = torch.randn(0, 17, 16)
    assert native.mix_tokens(empty, empty, [(empty, (4, 4)), (empty, (4, 4))], (4, 4)).shape == (0, 17, 16)


def gelu_case(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fc1 outputs (37, n) as rows of a wider tensor, their first row with NaN, infinities and values far in the
    tails, and a gradient for them."""
    torch.manual_seed(0)
    h = (torch.randn(37, n + 3) * 4)[:, :n]
    special = torch.tensor([float("nan"), float("inf"), float("-inf"), -100.0, 100.0, 0.0, -5.5, 5.5])
    h[0, :min(n, 8)] = special[:n]
    return h, torch.randn(37, n)


@needs_native
@pytest.mark.parametrize("n", [517, 512, 8, 5, 1])  # 517, 5, 1: tails past the last block of 8
def test_gelu_kernels_equal_pytorchs(n):
    h, g = gelu_case(n)
    expected = F.gelu(h)
    torch.testing.assert_close(native.gelu(h), expected, atol=2e-6, rtol=1e-6, equal_nan=True)
    inplace = h.clone()
    assert native.gelu(inplace, out=inplace) is inplace
    torch.testing.assert_close(inplace, expected, atol=2e-6, rtol=1e-6, equal_nan=True)
    expected_grad = torch.ops.aten.gelu_backward(g, h)
    act = torch.empty(h.shape)
    torch.testing.assert_close(native.gelu_backward_(h, g.clone(), act), expected_grad, atol=2e-6, rtol=1e-5,
                               equal_nan=True)
    torch.testing.assert_close(act, expected, atol=2e-6, rtol=1e-6, equal_nan=True)
    torch.testing.assert_close(native.gelu_backward_(h, g.clone()), expected_grad, atol=2e-6, rtol=1e-5,
                               equal_nan=True)


@needs_native
def test_gelu_kernels_say_what_they_take():
    h = torch.randn(6, 10)
    for bad in (h.double(), h.t(), h[:, ::2], h[0], torch.randn(6, 11)):
        with pytest.raises(ValueError, match="gelu.*float32 CPU matrices of one shape with contiguous rows"):
            native.gelu(h, out=bad) if bad.shape == (6, 11) else native.gelu(bad)
        with pytest.raises(ValueError, match="gelu_backward_: expected float32 CPU matrices"):
            native.gelu_backward_(h, bad)
    assert native.gelu(torch.empty(0, 7)).shape == (0, 7)


def count_calls(monkeypatch, kernel: str = "dwconv_tokens") -> list:
    """The first argument's shape of every call of `native.<kernel>` from now on."""
    calls = []
    real = getattr(native, kernel)

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(native, kernel, counted)
    return calls


@needs_native
@pytest.mark.parametrize("name", ["coat_lite_tiny", "coat_tiny"])
def test_model_runs_the_native_kernels_with_the_reference_logits(monkeypatch, name):
    torch.manual_seed(0)
    model = coatvit.create_model(name).eval()
    x = torch.randn(2, 3, 96, 80)
    monkeypatch.setattr(onednn, "_enabled", False)  # its fused GELU would take the big MLPs (tests/test_onednn.py)
    calls = count_calls(monkeypatch)
    attention_calls = count_calls(monkeypatch, "factor_attention")
    attention_crpes = []
    counted_attention = native.factor_attention
    monkeypatch.setattr(native, "factor_attention",
                        lambda qkv, heads, scale, crpe=None: attention_crpes.append(crpe)
                        or counted_attention(qkv, heads, scale, crpe))
    mix_calls = count_calls(monkeypatch, "mix_tokens")
    gelu_calls = count_calls(monkeypatch, "gelu")
    with torch.no_grad():
        out = model(x)
        assert calls, "the native kernels did not run"
        model.set_fast_path(False)
        expected = model(x)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    # every block's CPE
    assert len(calls) == {"coat_lite_tiny": 8, "coat_tiny": 8 + 6 * 3}[name]
    # the attention products natively in every block but the last (its class-token row only), each with its
    # CRPE in the same pass
    assert len(attention_calls) == {"coat_lite_tiny": 7, "coat_tiny": 8 + 5 * 3}[name]
    assert all(crpe is not None for crpe in attention_crpes)
    # each scale's co-scale sum in every parallel block but the last
    assert len(mix_calls) == {"coat_lite_tiny": 0, "coat_tiny": 5 * 3}[name]
    # the GELU of every MLP that runs in chunks (one chunk each at this size): every serial block's but a Lite
    # model's last, every parallel block's scale but the last block's (their class-token rows only)
    assert len(gelu_calls) == {"coat_lite_tiny": 7, "coat_tiny": 8 + 5 * 3}[name]


@needs_native
def test_the_co_scale_mix_stays_eager_where_drop_path_is_active(monkeypatch):
    """A model in training mode without autograd (a no_grad evaluation inside a training loop) drops paths at
    random: the mix runs as the reference path's sums, which apply them."""
    model = coatvit.create_model("coat_tiny", drop_path_rate=0.5).train()
    mix_calls = count_calls(monkeypatch, "mix_tokens")
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    assert not mix_calls
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    assert len(mix_calls) == 5 * 3


@needs_native
def test_native_kernels_follow_their_switch(monkeypatch):
    torch.manual_seed(0)
    model = coatvit.create_model("coat_lite_tiny").eval()
    x = torch.randn(1, 3, 64, 64)
    calls = count_calls(monkeypatch)
    grad_calls = count_calls(monkeypatch, "dwconv_weight_grad")
    monkeypatch.setenv(native.ENV, "0")
    with torch.no_grad():
        off = model(x)
    model(x).sum().backward()  # training too: PyTorch's convolutions
    assert not calls and not grad_calls
    monkeypatch.setenv(native.ENV, "1")
    with torch.no_grad():
        on = model(x)
    assert calls
    torch.testing.assert_close(on, off, atol=1e-5, rtol=1e-5)


def depthwise_case(windows, residual):
    """Depthwise convs side by side over the channels, tokens (2, 1 + 7*9, C) as a view of a wider tensor (as CRPE's
    v is of the qkv projection), and the reference forward with PyTorch's convolutions."""
    torch.manual_seed(0)
    convs = [nn.Conv2d(c, c, k, padding=k // 2, groups=c) for k, c in windows]
    C = sum(c for _, c in windows)
    x = (torch.randn(2, 1 + 7 * 9, C + 3)[..., :C] * 2).requires_grad_()

    def eager(x):
        conv = reference(convs, x[:, 1:], (7, 9), torch.zeros(()), None)
        return torch.cat((x[:, :1], x[:, 1:] + conv), dim=1) if residual else conv

    return convs, x, eager


@needs_native
@pytest.mark.parametrize("windows", [[(3, 24)], [(3, 16), (5, 24), (7, 24)], [(3, 38), (5, 57), (7, 57)],
                                     [(3, 5), (7, 16)]])  # 152 channels in 19 blocks; 21: a tail of 5
@pytest.mark.parametrize("residual", [True, False])  # CPE: x + DWConv(x) with the class row; CRPE's V: DWConv(x)
def test_depthwise_tokens_gradients_equal_pytorch_convs(windows, residual):
    convs, x, eager = depthwise_case(windows, residual)
    grad = torch.randn(2, 1 + 7 * 9 if residual else 7 * 9, x.shape[-1])
    weights = native.depthwise_weights(convs, differentiable=True)
    out = model_module.DepthwiseTokens.apply(x, weights.weight, weights.bias, weights.block_windows, (7, 9), residual)
    params = [x] + [p for conv in convs for p in (conv.weight, conv.bias)]
    got = torch.autograd.grad(out, params, grad)
    expected_out = eager(x)
    expected = torch.autograd.grad(expected_out, params, grad)
    torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=1e-5)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-5)


@needs_native
def test_depthwise_tokens_double_backward_equals_pytorch_convs():
    """A gradient penalty (create_graph=True) differentiates the eager ops: second-order gradients as PyTorch's."""
    results = []
    for native_op in (True, False):
        convs, x, eager = depthwise_case([(3, 16), (5, 24)], True)
        if native_op:
            weights = native.depthwise_weights(convs, differentiable=True)
            out = model_module.DepthwiseTokens.apply(x, weights.weight, weights.bias, weights.block_windows, (7, 9),
                                                     True)
        else:
            out = eager(x)
        (grad_x,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        params = [p for conv in convs for p in (conv.weight, conv.bias)]
        results.append(torch.autograd.grad(grad_x.square().sum(), params))
    for g, e in zip(*results):  # values up to ~1e4: float32 rounding relative to the largest
        torch.testing.assert_close(g, e, atol=1e-6 * e.abs().max().item(), rtol=1e-5)


@needs_native
def test_dwconv_weight_grad_is_deterministic_and_checks_its_input():
    convs, x, _ = depthwise_case([(3, 16), (7, 24)], False)
    weights = native.depthwise_weights(convs)
    grad = torch.randn(2, 7 * 9, 40)
    first_w, first_b = native.dwconv_weight_grad(x.detach()[:, 1:], grad, weights, (7, 9))
    again_w, again_b = native.dwconv_weight_grad(x.detach()[:, 1:], grad, weights, (7, 9))
    assert torch.equal(first_w, again_w) and torch.equal(first_b, again_b)
    assert torch.equal(first_w[0, :, :16], torch.zeros(7, 16))  # the 3x3 channels' padded taps get 0
    torch.testing.assert_close(first_b, grad.sum((0, 1)), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="expected float32 CPU tokens"):
        native.dwconv_weight_grad(x.detach()[:, 1:], grad[:, :5], weights, (7, 9))


@needs_native
@pytest.mark.parametrize("name", ["coat_lite_tiny", "coat_tiny"])
def test_training_runs_the_native_kernels_with_pytorchs_gradients(monkeypatch, name):
    """A training step's gradients with the native depthwise and attention kernels (forward and backward) against
    PyTorch's ops; every CPE and CRPE takes them (the class-token shortcut skips the last block's CRPE), and every
    block's attention but the last one's (its class-token row only)."""
    torch.manual_seed(0)
    model = coatvit.create_model(name).train()
    x = torch.randn(2, 3, 64, 48)
    grad_calls = count_calls(monkeypatch, "dwconv_weight_grad")
    attention_calls = count_calls(monkeypatch, "factor_attention_backward")
    gelu_calls = count_calls(monkeypatch, "gelu")
    gelu_grad_calls = count_calls(monkeypatch, "gelu_backward_")
    grads = []
    for enabled in (True, False):
        monkeypatch.setattr(model_module.DepthwiseTokens, "enabled", enabled)
        monkeypatch.setattr(model_module.NativeFactorAttention, "enabled", enabled)
        monkeypatch.setattr(model_module.Mlp, "native_gelu", enabled)
        model.zero_grad()
        model(x).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        assert len(grad_calls) == {"coat_lite_tiny": 8 + 7, "coat_tiny": 8 + 8 + 6 * 3 + 5 * 3}[name]
        assert len(attention_calls) == {"coat_lite_tiny": 7, "coat_tiny": 8 + 5 * 3}[name]
        # every MLP's GELU (one chunk each), forward and backward: serial blocks, and each parallel block's
        # shared MLP once per scale
        mlps = {"coat_lite_tiny": 8, "coat_tiny": 8 + 6 * 3}[name]
        assert (len(gelu_calls), len(gelu_grad_calls)) == (mlps, mlps)
    # both float32 gradients against float64 ones (PyTorch's ops): the native kernels' rounding error at most twice
    # PyTorch's plus 1e-5 of the tensor's largest gradient (a few gradients are sums that cancel, where the two
    # float32 results differ by more than 1e-4; an attention scale off by 1e-4 fails it)
    exact = copy.deepcopy(model).double()
    exact(x.double()).square().sum().backward()
    for n, p in exact.named_parameters():
        native_error, eager_error = ((g[n].double() - p.grad).abs().max().item() for g in grads)
        assert native_error <= 2 * eager_error + 1e-5 * p.grad.abs().max().item(), (n, native_error, eager_error)


@needs_native
@pytest.mark.parametrize("batch", [1, 3])  # fewer images than threads: passes split; more: images split
@pytest.mark.parametrize("tokens, channels, heads", [(785, 152, 8), (50, 320, 8), (3137, 64, 8), (130, 72, 4),
                                                     (13, 40, 8), (3, 24, 1), (1, 16, 2)])
def test_factor_attention_backward_equals_autograd(batch, tokens, channels, heads):
    """Heads of 19, 40, 8, 18, 5, 24 and 8 channels; q, k, v as views of a wider projection output."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        wide = torch.randn(batch, tokens, 3 * channels + 8) * 3
        qkv = wide[..., :3 * channels].requires_grad_()
        grad = torch.randn(batch, tokens, channels)
        scale = (channels // heads) ** -0.5
        (expected,) = torch.autograd.grad(attention_reference(qkv, heads, scale), qkv, grad)
        got = native.factor_attention_backward(qkv.detach(), grad, heads, scale)
        torch.testing.assert_close(got, expected, atol=1e-4 * expected.abs().max().item(), rtol=1e-4)
    finally:
        torch.set_num_threads(threads)


@needs_native
def test_native_attention_double_backward_and_input_checks():
    torch.manual_seed(0)
    data = torch.randn(2, 37, 3 * 40)
    results = []
    for native_op in (True, False):
        qkv = data.clone().requires_grad_()
        out = (model_module.NativeFactorAttention.apply(qkv, 8, 0.4) if native_op
               else attention_reference(qkv, 8, 0.4))
        (grad,) = torch.autograd.grad(out.square().sum(), qkv, create_graph=True)
        results.append(torch.autograd.grad(grad.square().sum(), qkv)[0])
    torch.testing.assert_close(results[0], results[1], atol=1e-5 * results[1].abs().max().item(), rtol=1e-4)
    with pytest.raises(ValueError, match="factor_attention_backward"):
        native.factor_attention_backward(torch.randn(1, 5, 3 * 16), torch.randn(1, 4, 16), 2, 0.3)


@needs_native
def test_autocast_keeps_its_own_convolutions(monkeypatch):
    """Under CPU autocast the convolutions run in bf16 as autocast makes them: the native fp32 kernel stays out."""
    torch.manual_seed(0)
    model = coatvit.create_model("coat_lite_tiny").eval()
    x = torch.randn(1, 3, 64, 64)
    calls = count_calls(monkeypatch)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert not calls
    native.set_enabled(False)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(model(x), out)
    finally:
        native.set_enabled(None)


@needs_native
def test_cached_kernel_weights_follow_weight_changes():
    """The (K, K, C) weights are kept between calls; loading new weights, an in-place edit or a replaced parameter
    must not leave the old ones in use."""
    torch.manual_seed(0)
    model = coatvit.create_model("coat_lite_tiny").eval()
    x = torch.randn(1, 3, 64, 64)
    other = coatvit.create_model("coat_lite_tiny").eval()
    with torch.no_grad():
        for p in other.parameters():
            p.normal_(0, 0.05)

    def check():
        with torch.no_grad():
            out = model(x)
            model.set_fast_path(False)
            expected = model(x)
            model.set_fast_path(True)
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
        return out

    first = check()
    model.load_state_dict(other.state_dict())
    assert not torch.allclose(check(), first)
    with torch.no_grad():
        model.crpe1.conv_list[2].weight.mul_(3.0)
        model.cpe2.proj.bias.add_(1.0)
    check()
    model.crpe2.conv_list[0].weight = nn.Parameter(torch.randn_like(model.crpe2.conv_list[0].weight))
    check()


def test_the_library_is_built_once_and_reused(fresh_build):
    if native.compiler() is None:
        pytest.skip("no C compiler on this machine")
    assert native.library() is not None
    built = list((fresh_build / "native").glob("*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    native.library.cache_clear()
    assert native.library() is not None  # a second process: loaded from the cache, not compiled again
    assert built[0].stat().st_mtime_ns == mtime
    assert not list((fresh_build / "native").glob("*.tmp"))


def test_a_damaged_library_file_is_rebuilt(fresh_build):
    if native.compiler() is None:
        pytest.skip("no C compiler on this machine")
    path = native.build(native.compiler(), native.compile_flags(), native.cache_dir())
    path.write_bytes(b"not a shared library")
    assert native.library() is not None
    assert path.read_bytes()[:4] == b"\x7fELF"


def test_no_compiler_means_the_eager_ops_silently(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler-coatvit")
    torch.manual_seed(0)
    model = coatvit.create_model("coat_test").eval()
    x = torch.randn(2, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            out = model(x)
    assert not native.available() and "no C compiler" in native.failure()
    model.set_fast_path(False)
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)


def test_a_failing_compiler_warns_once_and_the_eager_ops_run(fresh_build, monkeypatch, tmp_path):
    script = tmp_path / "broken-cc"
    script.write_text("#!/bin/sh\n[ \"$1\" = --version ] && { echo broken 1.0; exit 0; }\necho 'error: no' >&2\n"
                      "exit 1\n")
    script.chmod(0o755)
    monkeypatch.setenv("CC", str(script))
    model = coatvit.create_model("coat_test").eval()
    x = torch.randn(1, 3, 64, 64)
    with pytest.warns(RuntimeWarning, match="native CPU kernels could not be built.*error: no"):
        with torch.no_grad():
            model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            model(x)  # the decision holds for the process: no second warning, no second build
    assert not list((fresh_build / "native").glob("*"))  # nothing half-written left behind
    monkeypatch.delenv("CC")
    native.library.cache_clear()  # a later build that works clears the reason
    assert native.library() is not None and native.failure() is None


def test_native_kernels_never_run_inside_a_traced_graph(monkeypatch):
    torch.manual_seed(0)
    model = coatvit.create_model("coat_test").eval()
    calls = count_calls(monkeypatch)
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.randn(1, 3, 64, 64), check_trace=False)
        assert not calls
        x = torch.randn(2, 3, 64, 64)
        torch.testing.assert_close(traced(x), model(x), atol=1e-5, rtol=1e-5)


@needs_native
def test_a_build_without_avx2_computes_the_same(fresh_build, monkeypatch):
    """CPUs without AVX2 get the compiler's baseline vectors (SSE on x86-64): the same kernel, the same results."""
    flags = [f for f in native.compile_flags() if f not in ("-mavx2", "-mfma")]
    monkeypatch.setattr(native, "compile_flags", lambda: flags)
    torch.manual_seed(0)
    convs = [nn.Conv2d(c, c, k, padding=k // 2, groups=c) for k, c in [(3, 16), (5, 24), (7, 21)]]
    v, add = torch.randn(2, 77, 61), torch.randn(2, 77, 61)
    with torch.no_grad():
        expected = reference(convs, v, (7, 11), add, None)
        native.dwconv_tokens(v, native.depthwise_weights(convs), (7, 11), add=add, dst=add)
        torch.testing.assert_close(add, expected, atol=1e-5, rtol=1e-5)
        qkv = torch.randn(3, 37, 3 * 152)  # partial stores of 19-channel heads without AVX2's masked store
        torch.testing.assert_close(native.factor_attention(qkv, 8, 0.25), attention_reference(qkv, 8, 0.25),
                                   atol=2e-5, rtol=1e-5)
        tokens = [torch.randn(2, 1 + h * w, 20) for h, w in ((6, 10), (3, 5), (1, 2))]  # a tail of 4 channels
        sources = [(tokens[1], (3, 5)), (tokens[2], (1, 2))]
        torch.testing.assert_close(native.mix_tokens(tokens[0], tokens[0], sources, (6, 10)),
                                   mix_reference(tokens[0], tokens[0], sources, (6, 10)), atol=1e-5, rtol=1e-5)
        h, g = gelu_case(21)  # no FMA: separate multiplies and adds, the same values to within the tolerance
        torch.testing.assert_close(native.gelu(h), F.gelu(h), atol=2e-6, rtol=1e-6, equal_nan=True)
        torch.testing.assert_close(native.gelu_backward_(h, g.clone()), torch.ops.aten.gelu_backward(g, h),
                                   atol=2e-6, rtol=1e-5, equal_nan=True)
    assert len(list((fresh_build / "native").glob("*.so"))) == 1  # built for these flags, in this test's cache
