"""Registry-driven model tests: shapes at many input sizes, parameter counts, MACs, gradients, model API."""

from __future__ import annotations

import math

import pytest
import torch

import coatvit
from coatvit.config import PRETRAINED
from coatvit.flops import count_macs

ALL = coatvit.list_models()
PAPER = [n for n in ALL if n != "coat_test"]

# timm 1.0.31's parameter counts (coat-spec section 3).
TIMM_PARAMS = {
    "coat_lite_tiny": 5_721_960, "coat_lite_mini": 11_011_560, "coat_lite_small": 19_838_504,
    "coat_lite_medium": 44_571_048, "coat_lite_medium_384": 44_571_048, "coat_tiny": 5_498_540,
    "coat_mini": 10_337_004, "coat_small": 21_693_908,
}
SIZES = [(32, 32), (33, 47), (96, 64), (129, 131)]
SMALL = ["coat_test", "coat_lite_tiny", "coat_tiny"]


def grids(h: int, w: int) -> list[tuple[int, int]]:
    """Token grid of each scale: floor at every patch embedding (4, then 2, 2, 2)."""
    out = [(h // 4, w // 4)]
    for _ in range(3):
        out.append((out[-1][0] // 2, out[-1][1] // 2))
    return out


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(name, **kw):
        key = (name, tuple(sorted(kw.items())))
        if key not in cache:
            torch.manual_seed(0)
            cache[key] = coatvit.create_model(name, **kw).eval()
        return cache[key]

    return get


def test_registry_lists_every_variant():
    assert set(PAPER) == set(TIMM_PARAMS)
    assert "coat_test" in ALL
    assert coatvit.list_models("coat_lite*") == sorted(n for n in ALL if n.startswith("coat_lite"))
    assert set(coatvit.list_models(pretrained=True)) == set(PRETRAINED)


def test_duplicate_registration_raises():
    from coatvit.registry import register_model

    with pytest.raises(ValueError, match="already registered"):
        register_model("coat_tiny", coatvit.get_config("coat_tiny"))


def test_unknown_model_suggests_close_names():
    with pytest.raises(coatvit.UnknownModelError, match="did you mean coat_lite_tiny"):
        coatvit.create_model("coat_lite_tnyi")


@pytest.mark.parametrize("name", PAPER)
def test_param_count_equals_timm(name):
    with torch.device("meta"):
        model = coatvit.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == TIMM_PARAMS[name]


@pytest.mark.parametrize("name", PAPER)
def test_macs_within_2_percent_of_paper(name):
    entry = PRETRAINED[name]
    with torch.device("meta"):
        model = coatvit.create_model(name)
    gmacs = count_macs(model, entry.input_size[1:]) / 1e9
    assert abs(gmacs / entry.paper_gmacs - 1) < 0.02, (gmacs, entry.paper_gmacs)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_logits_shape_any_size(models, name, size):
    model = models(name)
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, model.num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL)
def test_forward_intermediates_shapes(models, name):
    size = (67, 93)
    x = torch.randn(1, 3, *size)
    cfg = coatvit.get_config(name)
    expected = [(1, c, *g) for c, g in zip(cfg.embed_dims, grids(*size))]
    model = models(name)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        only = model.forward_intermediates(x, indices=2, intermediates_only=True)
    assert [tuple(t.shape) for t in inter] == expected
    assert [tuple(t.shape) for t in only] == expected[2:]
    # forward() computes only the class-token rows of the last block (CoaT.class_token_shortcut): the same
    # logits up to float rounding
    torch.testing.assert_close(model.forward_head(final), model(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", SMALL)
def test_features_only_backbone(models, name):
    size = (67, 93)
    x = torch.randn(1, 3, *size)
    cfg = coatvit.get_config(name)
    expected = [(1, c, *g) for c, g in zip(cfg.embed_dims, grids(*size))]
    model = models(name)
    backbone = coatvit.create_model(name, features_only=True, out_indices=(1, 3)).eval()
    coatvit.load_weights(backbone, model.state_dict())  # the classifier's weights, head and final norms dropped
    with torch.no_grad():
        inter = model.forward_intermediates(x, intermediates_only=True)
        feats = backbone(x)
    assert [tuple(t.shape) for t in feats] == [expected[1], expected[3]]
    assert backbone.feature_info.channels() == [cfg.embed_dims[1], cfg.embed_dims[3]]
    assert backbone.feature_info.reduction() == [8, 32]
    # The backbone's maps are the classifier's unnormed intermediates.
    torch.testing.assert_close(feats[0], inter[1], rtol=0, atol=0)
    torch.testing.assert_close(feats[1], inter[3], rtol=0, atol=0)


@pytest.mark.parametrize("name,size", [("coat_test", (1024, 1024)), ("coat_test", (40, 1100)),
                                       ("coat_lite_tiny", (40, 1100)), ("coat_tiny", (1056, 36))])
def test_large_and_wide_inputs(models, name, size):
    model = models(name)
    with torch.no_grad():
        out = model.forward_intermediates(torch.randn(1, 3, *size), intermediates_only=True)
    assert [tuple(t.shape[-2:]) for t in out] == grids(*size)


def test_forward_head_and_features_api(models):
    model = models("coat_tiny")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert isinstance(feats, list) and len(feats) == 3  # normed tokens of scales 2-4
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, model.num_features)
        torch.testing.assert_close(model.forward_head(feats), model(x))
    lite = models("coat_lite_tiny")
    with torch.no_grad():
        f = lite.forward_features(x)
    assert f.shape == (2, 1 + 2 * 2, 320)


def test_too_small_input_is_a_clear_error(models):
    with pytest.raises(ValueError, match="at least 32x32"):
        models("coat_test")(torch.randn(1, 3, 31, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        models("coat_test")(torch.randn(1, 1, 64, 64))


def test_reset_classifier_and_no_weight_decay():
    model = coatvit.create_model("coat_test")
    model.reset_classifier(7, global_pool="avg")
    assert model.get_classifier().out_features == 7 and model.config.num_classes == 7
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, model.num_features)
    assert model.no_weight_decay() == {"cls_token1", "cls_token2", "cls_token3", "cls_token4"}
    groups = model.group_matcher()
    assert "serial_blocks1" in groups and "parallel_blocks" in groups


def test_negative_class_count_or_unknown_pool_is_refused_and_changes_nothing():
    with pytest.raises(ValueError, match="num_classes must be >= 0"):
        coatvit.create_model("coat_test", num_classes=-1)  # made a model without a head before
    model = coatvit.create_model("coat_test")
    for args in [(-3,), (3, "max")]:
        with pytest.raises(ValueError, match="num_classes must be >= 0|global_pool must be 'token' or 'avg'"):
            model.reset_classifier(*args)
    assert model.num_classes == model.config.num_classes == 10 and model.config.global_pool == "token"
    assert model.get_classifier().out_features == 10


@pytest.mark.parametrize("name", ALL)
def test_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = coatvit.create_model(name).train()
    model(torch.randn(2, 3, 32, 32)).logsumexp(-1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{pname} has an all-zero gradient"


@pytest.mark.parametrize("name", SMALL)
def test_grad_checkpointing_gives_same_gradients(name):
    def grads(checkpointing: bool):
        torch.manual_seed(0)
        model = coatvit.create_model(name, drop_path_rate=0.2).train()
        model.set_grad_checkpointing(checkpointing)
        x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
        torch.manual_seed(2)  # same drop-path masks in both runs; checkpointing replays the RNG state
        model(x).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-7, msg=n)


def test_grad_checkpointing_saves_activation_memory():
    """Bytes saved for backward drop with checkpointing (the benchmark reports the figure per model)."""
    from coatvit.memory import saved_activation_bytes

    model = coatvit.create_model("coat_lite_tiny").train()
    x = torch.randn(2, 3, 96, 96)
    plain = saved_activation_bytes(model, x)
    model.set_grad_checkpointing(True)
    ckpt = saved_activation_bytes(model, x)
    assert ckpt < 0.5 * plain


def test_ablation_switches():
    x = torch.randn(1, 3, 64, 64)
    base = coatvit.create_model("coat_test")
    no_crpe = coatvit.create_model("coat_test", use_crpe=False)
    no_cpe = coatvit.create_model("coat_test", use_cpe=False)
    assert not any(k.startswith("crpe") for k in no_crpe.state_dict())
    assert not any(k.startswith("cpe") for k in no_cpe.state_dict())
    deeper = coatvit.create_model("coat_test", parallel_depth=3)
    assert len(deeper.parallel_blocks) == 3
    lite = coatvit.create_model("coat_test", parallel_depth=0)
    assert lite.parallel_blocks is None and lite.aggregate is None
    windows = coatvit.create_model("coat_test", crpe_window=((3, 8),))
    assert [c.kernel_size for c in windows.crpe2.conv_list] == [(3, 3)]
    for m in (base, no_crpe, no_cpe, deeper, lite, windows):
        assert m(x).shape == (1, 10)
    n_base = sum(p.numel() for p in base.parameters())
    assert sum(p.numel() for p in no_crpe.parameters()) < n_base
    with pytest.raises(ValueError, match="add up to num_heads"):
        coatvit.create_model("coat_test", crpe_window=((3, 2),))


def test_config_roundtrip_and_validation():
    cfg = coatvit.get_config("coat_mini")
    again = coatvit.CoaTConfig.from_dict(cfg.to_dict())
    assert again == cfg
    with pytest.raises(ValueError, match="unknown CoaTConfig keys"):
        coatvit.CoaTConfig.from_dict({**cfg.to_dict(), "depth": 3})
    with pytest.raises(ValueError, match="equal embed dims"):
        coatvit.CoaTConfig(embed_dims=(8, 16, 24, 32), serial_depths=(1, 1, 1, 1), parallel_depth=1)
    with pytest.raises(TypeError, match="unknown options"):
        coatvit.create_model("coat_test", widths=3)


def test_drop_path_is_constant_rate():
    model = coatvit.create_model("coat_tiny", drop_path_rate=0.3)
    rates = {m.rate for n, m in model.named_modules() if type(m).__name__ == "DropPath"}
    assert rates == {0.3}


def test_init_follows_the_authors():
    model = coatvit.create_model("coat_lite_tiny")
    w = model.serial_blocks2[0].mlp.fc1.weight
    assert abs(w.std().item() - 0.02) < 0.002 and w.abs().max() <= 2.0
    assert model.serial_blocks2[0].mlp.fc1.bias.abs().sum() == 0
    assert math.isclose(model.cls_token3.std().item(), 0.02, rel_tol=0.2)
