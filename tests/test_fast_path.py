"""The fast path (the default) computes the reference path's function: every variant, odd and non-square sizes,
eval and train mode, gradients, gradient checkpointing and the backbone API. Same weights, same keys."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import coatvit
from coatvit import model as model_module
from coatvit import onednn

# Big variants at small inputs keep this file fast; the size is odd, non-square and not a multiple of 32
# (grids 17x25, 8x12, 4x6, 2x3: every parallel-block resize has a real source and target).
SIZE = (68, 100)


@pytest.fixture(autouse=True)
def one_thread():
    # The CI machine has two cores shared with other jobs; one thread avoids OpenMP spin-waits there.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _both(model, fn):
    """fn(model) on the fast path, then on the reference path (same module, same weights)."""
    model.set_fast_path(True)
    fast = fn(model)
    model.set_fast_path(False)
    ref = fn(model)
    model.set_fast_path(True)
    return fast, ref


def _model(name: str, **kw):
    torch.manual_seed(0)
    return coatvit.create_model(name, **kw)


def _max_diff(a, b) -> float:
    if isinstance(a, (list, tuple)):
        return max(_max_diff(x, y) for x, y in zip(a, b))
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", coatvit.list_models())
def test_fast_equals_reference_eval(name):
    model = _model(name).eval()
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        out_fast, out_ref = _both(model, lambda m: m(x))
    assert out_fast.shape == out_ref.shape == (2, model.num_classes)
    assert _max_diff(out_fast, out_ref) < 1e-5, name


@pytest.mark.parametrize("per_head_min_channels", [1, 10**9], ids=["per-head", "masked"])
def test_both_attention_products_equal_reference(monkeypatch, per_head_min_channels):
    # every attention module forced onto one of the two products, values and gradients
    monkeypatch.setattr(model_module.FactorAttnConvRelPosEnc, "per_head_min_channels", per_head_min_channels)
    for name in ("coat_lite_tiny", "coat_tiny"):
        model = _model(name).eval()
        x = torch.randn(2, 3, *SIZE, requires_grad=True)

        def run(m):
            x.grad = None
            out = m(x)
            out.square().sum().backward()
            return out.detach(), x.grad.clone()

        (out_fast, grad_fast), (out_ref, grad_ref) = _both(model, run)
        assert _max_diff(out_fast, out_ref) < 1e-5, name
        assert _max_diff(grad_fast, grad_ref) < 1e-4 * max(1.0, grad_ref.abs().max().item()), name


@pytest.mark.parametrize("size", [(32, 32), (37, 53), (64, 96), (97, 41), (224, 224)])
def test_fast_equals_reference_at_many_sizes(size):
    model = _model("coat_test").eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        assert _max_diff(*_both(model, lambda m: m(x))) < 1e-5, size


def test_chunked_inference_with_many_chunks(monkeypatch):
    # One image per chunk (and MLP chunks of 862 of the 3 * 426 stage-1 tokens): the chunk loops and their
    # concatenation run several times per block.
    calls = []
    monkeypatch.setattr(model_module, "images_per_chunk", lambda tokens, dim: calls.append(tokens) or 1)
    model = _model("coat_tiny").eval()
    x = torch.randn(3, 3, *SIZE)
    with torch.no_grad():
        assert _max_diff(*_both(model, lambda m: m(x))) < 1e-5
    assert len(calls) == sum(model.config.serial_depths)  # every serial block took the chunked path


@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "layers"])
def test_mlp_in_several_token_chunks(monkeypatch, in_place):
    # At most 1000 rows per MLP chunk (coat_tiny's hidden width is 608): the 1278 stage-1 tokens of 3 images run
    # as 1000 + 278 rows, and the chunks give the reference logits.
    monkeypatch.setattr(model_module.Mlp, "chunk_elements", 1000 * 608)
    monkeypatch.setattr(model_module.Mlp, "in_place_chunks", in_place)
    rows = []
    norm = torch.nn.LayerNorm.forward
    monkeypatch.setattr(torch.nn.LayerNorm, "forward", lambda self, x: (x.ndim == 2 and rows.append(x.shape[0]))
                        or norm(self, x))  # the MLP's norm sees (rows, C) chunks, every other norm (B, N, C)
    model = _model("coat_tiny").eval()
    x = torch.randn(3, 3, *SIZE)
    with torch.no_grad():
        assert _max_diff(*_both(model, lambda m: m(x))) < 1e-5
    assert rows[:2] == [1000, 278]  # the first serial block's MLP on the fast path


@pytest.mark.parametrize("name", ["coat_lite_tiny", "coat_tiny"])
def test_in_place_mlp_chunks_are_bit_identical_to_calling_the_layers(monkeypatch, name):
    monkeypatch.setattr(model_module.Mlp, "chunk_elements", 300 * 512)  # several chunks per MLP, a short last one
    monkeypatch.setattr(model_module.Mlp, "native_gelu", False)  # PyTorch's GELU in both: the same kernels
    monkeypatch.setattr(onednn, "_enabled", False)  # and PyTorch's products
    model = _model(name).eval()
    x = torch.randn(3, 3, *SIZE)
    outputs = []
    for in_place in (True, False):
        monkeypatch.setattr(model_module.Mlp, "in_place_chunks", in_place)
        with torch.inference_mode():
            outputs.append(model(x))
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            outputs.append(model(x))  # out= calls escape autocast, so under it the layers run either way
    assert torch.equal(outputs[0], outputs[2]) and torch.equal(outputs[1], outputs[3])
    assert outputs[1].dtype == torch.bfloat16 and not torch.equal(outputs[0], outputs[1].float())
    monkeypatch.setattr(model_module.Mlp, "in_place_chunks", True)
    monkeypatch.setattr(model_module.Mlp, "native_gelu", True)  # the native GELU (where built): within 1e-6 each
    with torch.inference_mode():
        torch.testing.assert_close(model(x), outputs[0], atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(onednn, "_enabled", None)  # oneDNN's products and fused GELU (where present): the same
    with torch.inference_mode():
        torch.testing.assert_close(model(x), outputs[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, size", [("coat_lite_tiny", (97, 131)), ("coat_tiny", (64, 64))])
def test_patch_embeddings_as_gemms_equal_the_convolutions(monkeypatch, name, size):
    """Stages 2-4 embed up to `gemm_max_patches` patches as a GEMM in CPU inference (stage 1's 3-channel image and
    larger maps keep the convolution, and so does training); the same embeddings, and a kept weight that follows
    edits of the convolution's."""
    model = _model(name).eval()
    x = torch.randn(2, 3, *size)
    calls = []
    real = model_module.PatchEmbed.forward_gemm
    monkeypatch.setattr(model_module.PatchEmbed, "forward_gemm", lambda self, t: calls.append(t.shape) or real(self, t))
    with torch.no_grad():
        out, ref = _both(model, lambda m: m(x))
        assert [shape[1] for shape in calls] == list(model.config.embed_dims[:3])
        monkeypatch.setattr(model_module.PatchEmbed, "gemm_max_patches", 2 * (size[0] // 8) * (size[1] // 8) - 1)
        calls.clear()
        conv = model(x)
        assert [shape[1] for shape in calls] == list(model.config.embed_dims[1:3])  # stage 2's map is too large now
        monkeypatch.setattr(model_module.PatchEmbed, "gemm_max_patches", 0)
        calls.clear()
        torch.testing.assert_close(model(x), out, atol=1e-5, rtol=1e-5)
        assert not calls
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(conv, ref, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(model_module.PatchEmbed, "gemm_max_patches", 1 << 30)
    with torch.no_grad():
        model.patch_embed3.proj.weight.mul_(3.0)  # in place: the kept (p*p*C, out) weight must be rebuilt
        out, ref = _both(model, lambda m: m(x))
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    model.patch_embed4.proj.weight = nn.Parameter(torch.randn_like(model.patch_embed4.proj.weight))  # replaced
    with torch.no_grad():
        out, ref = _both(model, lambda m: m(x))
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    calls.clear()
    model(x).sum().backward()  # autograd: the convolutions, their weight gradients as usual
    assert not calls and model.patch_embed3.proj.weight.grad is not None


def test_fast_path_with_autograd_in_eval_mode():
    # With autograd on, the fast path skips the chunking (it writes into preallocated outputs) and must match.
    model = _model("coat_test").eval()
    x = torch.randn(2, 3, *SIZE)
    out_fast, out_ref = _both(model, lambda m: m(x))
    assert out_fast.requires_grad
    assert _max_diff(out_fast, out_ref) < 1e-5


@pytest.mark.parametrize("merge_under_autograd", [False, True], ids=["per-window-crpe", "merged-crpe"])
@pytest.mark.parametrize("name", ["coat_test", "coat_lite_tiny", "coat_tiny"])
def test_fast_equals_reference_train_mode_and_gradients(monkeypatch, name, merge_under_autograd):
    monkeypatch.setattr(model_module.ConvRelPosEnc, "merge_under_autograd", merge_under_autograd)
    model = _model(name, drop_path_rate=0.2).train()
    x = torch.randn(3, 3, 40, 72)
    target = torch.randint(0, model.num_classes, (3,))

    def step(m):
        m.zero_grad()
        torch.manual_seed(123)  # the same drop-path masks, drawn in the same order
        out = m(x)
        torch.nn.functional.cross_entropy(out, target).backward()
        return out.detach(), {k: p.grad.clone() for k, p in m.named_parameters()}

    (out_fast, grads_fast), (out_ref, grads_ref) = _both(model, step)
    assert _max_diff(out_fast, out_ref) < 1e-5
    assert grads_fast.keys() == grads_ref.keys()
    for key, g_ref in grads_ref.items():
        scale = max(1.0, g_ref.abs().max().item())
        assert (grads_fast[key] - g_ref).abs().max().item() < 1e-4 * scale, key


@pytest.mark.parametrize("name", ["coat_test", "coat_lite_tiny", "coat_tiny"])
def test_class_token_shortcut_equals_the_full_last_block(name):
    # forward() computes only the class-token rows of the last block; forward_features() computes every token.
    model = _model(name, drop_path_rate=0.2).train()
    x = torch.randn(3, 3, 40, 72)
    target = torch.randint(0, model.num_classes, (3,))
    assert model.class_token_shortcut(x)
    results = []
    for fn in (model, lambda t: model.forward_head(model.forward_features(t))):
        model.zero_grad()
        torch.manual_seed(7)  # the same drop-path masks, drawn in the same order
        out = fn(x)
        torch.nn.functional.cross_entropy(out, target).backward()
        results.append((out.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}))
    (out_short, grads_short), (out_full, grads_full) = results
    assert _max_diff(out_short, out_full) < 1e-5
    assert grads_short.keys() == grads_full.keys()  # every parameter still gets a gradient (DDP needs it)
    for key, g in grads_full.items():
        assert (grads_short[key] - g).abs().max().item() < 1e-4 * max(1.0, g.abs().max().item()), key


@pytest.mark.parametrize("name,overrides", [
    ("coat_lite_tiny", {"global_pool": "avg"}),  # the pooled image tokens are read
    ("coat_lite_tiny", {"serial_depths": (2, 2, 2, 1)}),  # crpe4 serves only the last block
    ("coat_test", {"parallel_depth": 1, "serial_depths": (1, 0, 1, 1)}),  # crpe2 serves only the last block
])
def test_class_token_shortcut_off_where_it_would_change_anything(name, overrides):
    model = _model(name, **overrides).train()
    x = torch.randn(2, 3, 64, 64)
    assert not model.class_token_shortcut(x)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.set_fast_path(False)
    assert not model.class_token_shortcut(x)


def test_drop_path_really_drops_in_train_mode():
    # Guards the test above against passing because drop path never fired.
    fast = _model("coat_test", drop_path_rate=0.5).train()
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(1)
    a = fast(x)
    torch.manual_seed(2)
    b = fast(x)
    assert _max_diff(a, b) > 1e-4


def test_grad_checkpointing_on_fast_path():
    torch.manual_seed(0)
    model = coatvit.create_model("coat_test")
    x = torch.randn(2, 3, *SIZE)
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        model(x).square().sum().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    for key in grads[0]:
        assert torch.allclose(grads[0][key], grads[1][key], atol=1e-6), key


def test_features_only_and_intermediates_on_fast_path():
    # Feature maps are O(1) activations (not logits): the bound is the 1e-4 of the fast path's contract.
    backbone = _model("coat_lite_mini", features_only=True, out_indices=(1, 2, 3)).eval()
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        maps_fast, maps_ref = _both(backbone, lambda m: m(x))
    assert [m.shape[1] for m in maps_fast] == backbone.feature_info.channels()
    assert _max_diff(maps_fast, maps_ref) < 1e-4
    model = _model("coat_tiny").eval()
    with torch.no_grad():
        (final_f, inter_f), (final_r, inter_r) = _both(model, lambda m: m.forward_intermediates(x, norm=True))
    assert _max_diff(inter_f, inter_r) < 1e-4 and _max_diff(final_f, final_r) < 1e-4
    assert all(t.is_contiguous() for t in inter_f)


@pytest.mark.parametrize("name", ["coat_lite_tiny", "coat_tiny"])
def test_an_empty_batch_gives_empty_outputs_on_every_path(name):
    # a pipeline's last, empty batch (no crops, no images left): shapes as for any batch, as torchvision's models do
    model, backbone = _model(name), _model(name, features_only=True)
    x = torch.randn(0, 3, *SIZE)
    grids = [(SIZE[0] // r, SIZE[1] // r) for r in (4, 8, 16, 32)]
    for fast in (True, False):
        model.set_fast_path(fast)
        backbone.set_fast_path(fast)
        for train, context in [(False, torch.no_grad), (False, torch.inference_mode), (True, torch.enable_grad)]:
            model.train(train)
            with context():
                assert model(x).shape == (0, model.num_classes)
                maps = model.forward_intermediates(x, intermediates_only=True)
                assert [tuple(m.shape) for m in maps] == [(0, c) + g for c, g in zip(model.feature_info.channels(),
                                                                                      grids)]
        with torch.no_grad():
            assert [tuple(m.shape) for m in backbone.eval()(x)] == [tuple(m.shape) for m in maps]


def test_switch_changes_no_weights_or_keys():
    torch.manual_seed(0)
    model = coatvit.create_model("coat_tiny")
    before = model.state_dict()
    model.set_fast_path(False)
    after = model.state_dict()
    assert list(before) == list(after)
    assert all(before[k] is after[k] or torch.equal(before[k], after[k]) for k in before)
    assert not any(getattr(m, "fast_path", False) for m in model.modules())
    model.set_fast_path(True)
    assert all(m.fast_path for m in model.modules() if hasattr(type(m), "fast_path"))


def test_merged_crpe_kernel_matches_the_three_convs():
    torch.manual_seed(0)
    crpe = model_module.ConvRelPosEnc(head_dim=4, windows=((3, 2), (5, 3), (7, 3)))
    weight, bias = crpe.merged_kernel()
    assert weight.shape == (32, 1, 7, 7) and bias.shape == (32,)
    # the 3x3 heads: their kernel sits in the centre, zeros around it
    assert torch.equal(weight[:8, :, 2:5, 2:5], crpe.conv_list[0].weight)
    assert weight[:8, :, :2].abs().sum() == 0 and weight[:8, :, 5:].abs().sum() == 0
    v = torch.randn(2, 32, 9, 11)
    ref = torch.cat([c(p) for c, p in zip(crpe.conv_list, torch.split(v, crpe.channel_splits, 1))], 1)
    merged = torch.nn.functional.conv2d(v, weight, bias, padding=3, groups=32)
    assert (merged - ref).abs().max().item() < 1e-5


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("name", ["coat_lite_tiny", "coat_tiny"])
def test_torch_jit_trace_serves_every_batch_and_image_size(monkeypatch, name):
    # torch.jit.trace records one pass; the chunked paths' Python loops over images and tokens stay out of the
    # recording, so the traced module serves other batch and image sizes, as the eager model does
    monkeypatch.setattr(model_module, "images_per_chunk", lambda tokens, dim: 1)  # as many chunks as images
    model = _model(name, num_classes=10).eval()
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.randn(2, 3, *SIZE), check_trace=False)
        for shape in [(1, 3, *SIZE), (5, 3, *SIZE), (3, 3, 96, 64)]:
            x = torch.randn(shape)
            torch.testing.assert_close(traced(x), model(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["coat_lite_tiny", "coat_tiny"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_fast_path_traces_as_one_graph_for_torch_compile(name, mode):
    # Dynamo traces the whole model (serial blocks; parallel blocks for coat_tiny) without a graph break, in
    # inference mode and under autograd, and the traced graph computes the eager logits.
    import torch._dynamo

    model = _model(name, num_classes=10)
    getattr(model, mode)()
    x = torch.randn(2, 3, *SIZE)
    torch._dynamo.reset()
    with torch.inference_mode() if mode == "eval" else torch.enable_grad():
        explained = torch._dynamo.explain(model)(x)
        assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
        assert explained.graph_count == 1
        if mode == "eval":
            compiled = torch.compile(model, backend="eager", fullgraph=True)
            torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=1e-6)
    torch._dynamo.reset()


def test_fast_path_compiles_once_for_every_input_size():
    # dynamic=True: one graph serves odd, non-square and transposed sizes (no recompile), same logits as eager.
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = _model("coat_test").eval()  # serial and parallel blocks (the resizes), traced in seconds
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager", dynamic=True, fullgraph=True)
    with torch.inference_mode():
        for size in [SIZE, SIZE[::-1], (96, 96)]:
            x = torch.randn(2, 3, *size)
            torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["recompiles"]
    torch._dynamo.reset()


def test_class_token_row_compiles_correctly_with_freezing_and_max_autotune():
    # Inductor's C++ GEMM template (mode="max-autotune" with freezing, torch 2.14) drops the storage offset of a
    # frozen weight slice such as qkv.weight[C:]; compiled, the class-token row therefore projects with the whole
    # qkv weight and slices the activations instead. A single attention module keeps the C++ build short.
    import torch._dynamo
    from torch._inductor import config as inductor_config

    class ClassTokenRow(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = model_module.FactorAttnConvRelPosEnc(64, 8)

        def forward(self, x):
            return self.attn.forward_class_token(x)

    torch.manual_seed(0)
    module = ClassTokenRow().eval()
    x = torch.randn(2, 50, 64)
    torch._dynamo.reset()
    with torch.inference_mode(), inductor_config.patch(freezing=True):
        expected = module(x)
        compiled = torch.compile(module, mode="max-autotune", fullgraph=True)(x)
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, expected, rtol=0, atol=1e-5)


def test_whole_model_compiled_by_inductor_with_freezing_matches_eager():
    # The deployment recipe of the README (torch.compile, inductor's freezing, inference mode) on the fast path:
    # serial and parallel blocks, the class-token shortcut, an odd non-square size (about a minute of C++ build).
    import torch._dynamo
    from torch._inductor import config as inductor_config

    model = _model("coat_test").eval()
    assert model.class_token_shortcut(torch.randn(1, 3, *SIZE))
    x = torch.randn(2, 3, *SIZE)
    torch._dynamo.reset()
    with torch.inference_mode(), inductor_config.patch(freezing=True):
        expected = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("features_only", [False, True])
@pytest.mark.parametrize("per_stage", [True, False])
def test_training_in_image_chunks_equals_the_whole_batch(monkeypatch, features_only, per_stage):
    # Under glibc's default allocator a CPU training forward runs the batch a few images at a time, each stage by
    # its own activations (per_stage, the default) or the whole pass by stage 1's; per sample that is the same
    # function, and the weight gradients are the sums over the chunks.
    from coatvit import runtime

    monkeypatch.setattr(runtime, "fresh_pages_for_large_blocks", lambda: True)
    model = _model("coat_test", **({"features_only": True} if features_only else {})).train()
    monkeypatch.setattr(model, "train_chunk_stages", per_stage)
    x = torch.randn(5, 3, *SIZE)
    # coat_test at 68 x 100: MLP hidden layers per image of 426 x 32 (stage 1), 97 x 64 (stage 2 and the parallel
    # blocks' largest scale), 25 x 64 and 7 x 64 floats
    monkeypatch.setattr(model, "train_chunk_bytes", 2 * 426 * 32 * 4)  # two images of stage 1 per chunk
    assert model.train_chunk_images(x) == 2
    calls = []
    if per_stage:
        serial, parallel = model.serial_stage, model.parallel_stage
        monkeypatch.setattr(model, "serial_stage", lambda i, t, c: calls.append((i, t.shape[0])) or serial(i, t, c))
        monkeypatch.setattr(model, "parallel_stage",
                            lambda t, sizes, c: calls.append(("parallel", t[0].shape[0])) or parallel(t, sizes, c))
    else:
        forward_batch = model.forward_batch
        monkeypatch.setattr(model, "forward_batch", lambda c: calls.append(c.shape[0]) or forward_batch(c))

    def run(chunks):
        monkeypatch.setattr(model, "train_in_chunks", chunks)
        model.zero_grad(set_to_none=True)
        out = model(x)
        outs = out if features_only else [out]
        sum(o.square().mean() for o in outs).backward()
        return [o.detach() for o in outs], [p.grad.clone() for p in model.parameters()]

    (chunked, chunked_grads), (whole, whole_grads) = run(True), run(False)
    if per_stage:  # as few chunks as each stage's limit allows, balanced (stage 2: 4 images allowed, so 3 + 2)
        assert calls == [(1, 2), (1, 2), (1, 1), (2, 3), (2, 2), (3, 5), (4, 5), ("parallel", 3), ("parallel", 2),
                         (1, 5), (2, 5), (3, 5), (4, 5), ("parallel", 5)]
    else:
        assert calls == [2, 2, 1, 5]
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    for a, b in zip(chunked_grads, whole_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_training_chunks_split_evenly():
    from coatvit.model import CoaT

    x = torch.arange(16.0)
    (out,), extra = CoaT.in_train_chunks(lambda t: ([t[0] * 2], len(t[0])), [x], 3)
    assert torch.equal(out, x * 2) and extra == 3  # chunks of 3, 3, 3, 3, 2, 2: the first has 3
    sizes = []
    CoaT.in_train_chunks(lambda t: sizes.append(len(t[0])) or ([t[0]], None), [x], 3)
    assert sizes == [3, 3, 3, 3, 2, 2]
    assert CoaT.in_train_chunks(lambda t: ([t[0]], "whole"), [x], 0)[1] == "whole"


def test_training_chunks_only_where_fresh_pages_cost_and_gradients_flow(monkeypatch):
    from coatvit import runtime

    model = _model("coat_lite_tiny", num_classes=10).train()
    x = torch.randn(4, 3, 224, 224)  # stage-1 hidden layer: 6.4 MB per image, so 3 images per 24 MiB chunk
    monkeypatch.setattr(runtime, "fresh_pages_for_large_blocks", lambda: True)
    assert model.train_chunk_images(x) == 3
    assert model.train_chunk_images(x[:3]) == 0  # fits in one chunk
    with torch.no_grad():
        assert model.train_chunk_images(x) == 0  # inference chunks inside the blocks instead
    model.set_fast_path(False)
    assert model.train_chunk_images(x) == 0  # the reference path runs the authors' batch as it is
    model.set_fast_path(True)
    monkeypatch.setattr(runtime, "fresh_pages_for_large_blocks", lambda: False)
    assert model.train_chunk_images(x) == 0  # a tuned allocator reuses freed memory: whole batches are faster


@pytest.mark.skipif(not coatvit.runtime.allocator_tunable(), reason="glibc's allocator only")
def test_fresh_pages_follow_the_allocator_settings(monkeypatch):
    from coatvit import runtime

    for name in [k for k in os.environ if k.startswith("MALLOC_") or k in ("LD_PRELOAD", "GLIBC_TUNABLES")]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(runtime, "_tuned", False)
    assert runtime.fresh_pages_for_large_blocks()
    for name, value in [("MALLOC_MMAP_THRESHOLD_", "1073741824"), ("LD_PRELOAD", "/usr/lib/libjemalloc.so.2"),
                        ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=1073741824")]:
        with monkeypatch.context() as m:
            m.setenv(name, value)
            assert not runtime.fresh_pages_for_large_blocks()
    monkeypatch.setattr(runtime, "_tuned", True)
    assert not runtime.fresh_pages_for_large_blocks()


@pytest.mark.parametrize("frozen", [(), ("fc1",), ("fc2",), ("fc1", "fc2", "input")], ids=str)
def test_chunked_mlp_training_equals_the_layers(monkeypatch, frozen):
    # CPU training runs the MLP as ChunkedMlp: several chunks here (rows floor 256, 700 tokens), values and the
    # gradients of whatever is trainable equal the layers'; frozen parts get none
    monkeypatch.setattr(model_module.Mlp, "chunk_elements", 1)
    torch.manual_seed(0)
    mlp, norm = model_module.Mlp(24, 96), model_module.LayerNorm(24, eps=1e-6)
    for name in ("fc1", "fc2"):
        getattr(mlp, name).requires_grad_(name not in frozen)
    x = torch.randn(2, 350, 24, requires_grad="input" not in frozen)
    results = []
    for chunked in (True, False):
        monkeypatch.setattr(model_module.Mlp, "train_chunks", chunked)
        assert mlp.train_chunks_ok(norm(x)) == chunked
        mlp.zero_grad()
        norm.zero_grad()
        x.grad = None
        out = mlp.residual(x, norm, model_module.DropPath(), fast=True)
        out.square().sum().backward()
        tensors = [x, norm.weight, *mlp.parameters()]
        results.append((out.detach(), [None if t.grad is None else t.grad.clone() for t in tensors]))
    (out_c, grads_c), (out_l, grads_l) = results
    assert _max_diff(out_c, out_l) < 1e-5
    for g_c, g_l in zip(grads_c, grads_l):
        assert (g_c is None) == (g_l is None)
        if g_l is not None:
            assert _max_diff(g_c, g_l) < 1e-5 * max(1.0, g_l.abs().max().item())


def test_chunked_mlp_keeps_no_gelu_output_for_backward(monkeypatch):
    # what training saves falls by exactly the GELU outputs the layers keep for fc2's weight gradient
    from coatvit.memory import saved_activation_bytes

    model = _model("coat_lite_mini").train()
    x = torch.randn(2, 3, *SIZE)
    gelu_bytes = []

    def count(module, inputs, output):
        gelu_bytes.append(output.numel() * output.element_size())

    monkeypatch.setattr(model_module.Mlp, "train_chunks", False)
    hooks = [m.act.register_forward_hook(count) for m in model.modules() if isinstance(m, model_module.Mlp)]
    layers = saved_activation_bytes(model, x)
    for hook in hooks:
        hook.remove()
    monkeypatch.setattr(model_module.Mlp, "train_chunks", True)
    chunked = saved_activation_bytes(model, x)
    assert len(gelu_bytes) == sum(model.config.serial_depths)
    assert layers - chunked == sum(gelu_bytes)


def test_chunked_mlp_is_not_used_where_it_cannot_run():
    mlp = model_module.Mlp(8, 32)
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert not mlp.train_chunks_ok(x)  # inference: residual_in_chunks or the layers
    assert not mlp.train_chunks_ok(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not mlp.train_chunks_ok(x)
    mlp.requires_grad_(False)
    assert not mlp.train_chunks_ok(x)  # nothing to record
    assert mlp.train_chunks_ok(x.requires_grad_())


class LowRankUpdate(nn.Module):
    """A LoRA-style replacement of a Linear, as fine-tuning libraries install: the base layer plus a low-rank term."""

    def __init__(self, base: nn.Linear, rank: int = 2):
        super().__init__()
        self.base = base
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.up.weight, std=0.5)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


@pytest.mark.parametrize("name", ["coat_lite_mini", "coat_mini"])
def test_replaced_and_hooked_layers_are_called_on_the_fast_path(monkeypatch, name):
    # fast paths that read fc1/fc2/qkv/CRPE weights directly must call the layers instead once they are replaced
    # or hooked: same values and gradients as the reference path, chunks forced small
    monkeypatch.setattr(model_module.Mlp, "chunk_elements", 1)
    monkeypatch.setattr(model_module, "images_per_chunk", lambda tokens, dim: 1)
    model = _model(name)
    for m in list(model.modules()):
        if isinstance(m, model_module.Mlp):
            m.fc1, m.act = LowRankUpdate(m.fc1), nn.ReLU()
            m.fc2.register_forward_hook(lambda mod, inp, out: out * 0.5)
            m.fc2.bias = None
        elif isinstance(m, model_module.FactorAttnConvRelPosEnc):
            m.qkv = LowRankUpdate(m.qkv)
        elif isinstance(m, model_module.ConvRelPosEnc):
            m.conv_list[0].register_forward_hook(lambda mod, inp, out: out * 2)
    x = torch.randn(3, 3, *SIZE)
    with torch.no_grad():
        plain = _model(name).eval()(x)
        fast, ref = _both(model.eval(), lambda m: m(x))
    assert _max_diff(fast, ref) < 1e-4 < _max_diff(ref, plain)  # the changes matter, and the fast path sees them

    target = torch.tensor([0, 1, 2])

    def step(m):
        m.zero_grad()
        torch.nn.functional.cross_entropy(m(x), target).backward()
        return {k: p.grad.clone() for k, p in m.named_parameters()}

    grads_fast, grads_ref = _both(model.train(), step)
    for key, g in grads_ref.items():
        assert _max_diff(grads_fast[key], g) < 1e-4 * max(1.0, g.abs().max().item()), key


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_dynamic_int8_quantization_runs_on_the_fast_path():
    # torch's dynamic quantization swaps every nn.Linear for a quantized module (its weight is a method): the fast
    # path calls those and is as close to the float model as the quantized reference path
    model = _model("coat_lite_mini").eval()
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    x = torch.randn(3, 3, *SIZE)
    with torch.no_grad():
        exact = model(x)
        fast, ref = _both(quantized, lambda m: m(x))
    err_fast, err_ref = _max_diff(fast, exact), _max_diff(ref, exact)
    assert 0 < err_fast < 2 * err_ref


def test_mlp_without_biases_runs_as_its_layers():
    # a plain Linear whose bias was removed: the chunked paths (written for fc1 and fc2 with biases) step aside
    torch.manual_seed(0)
    mlp, norm = model_module.Mlp(16, 64), model_module.LayerNorm(16, eps=1e-6)
    mlp.fc1.bias = None
    x = torch.randn(2, 300, 16)
    assert not mlp.layers_as_built()
    with torch.no_grad():
        assert _max_diff(mlp.residual_in_chunks(x, norm), x + mlp(norm(x))) < 1e-6
    out = mlp.residual(x.requires_grad_(), norm, model_module.DropPath(), fast=True)
    assert _max_diff(out, x + mlp(norm(x))) < 1e-6


def test_gradient_penalty_through_the_chunked_mlp():
    # create_graph=True (an input-gradient penalty): the chunked MLP's gradients are differentiable again and the
    # second-order gradients equal the reference path's
    model = _model("coat_lite_mini").train()
    x = torch.randn(2, 3, *SIZE)

    def penalty(m):
        m.zero_grad()
        xi = x.clone().requires_grad_()
        (grad,) = torch.autograd.grad(m(xi).logsumexp(-1).sum(), xi, create_graph=True)
        grad.square().sum().backward()
        return {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}

    fast, ref = _both(model, penalty)
    assert fast.keys() == ref.keys() and any("mlp.fc1" in k for k in ref)
    for key, g in ref.items():
        assert _max_diff(fast[key], g) < 1e-4 * max(1.0, g.abs().max().item()), key


@pytest.mark.parametrize("name", ["coat_test", "coat_lite_tiny", "coat_tiny"])
def test_torch_func_transforms_run_and_agree_with_autograd(name):
    """torch.func's grad, vmap and per-sample gradients (functional_call, the torch.func tutorial's recipe) run
    through the default model (their wrapped tensors take the plain ops) and agree with autograd and eager outputs."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    model = coatvit.create_model(name).eval()
    x = torch.randn(2, 3, 64, 64)
    params = {k: v.detach() for k, v in model.named_parameters()}
    model(x).sum().backward()  # autograd on the fast path (chunked MLP autograd Function included)
    func_grads = grad(lambda p: functional_call(model, p, (x,)).sum())(params)
    per_sample = vmap(grad(lambda p, xi: functional_call(model, p, (xi[None],)).sum()), in_dims=(None, 0))(params, x)
    for key, param in model.named_parameters():
        torch.testing.assert_close(func_grads[key], param.grad, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(per_sample[key].sum(0), param.grad, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(vmap(lambda xi: model(xi[None])[0])(x), model(x), atol=1e-5, rtol=1e-5)
