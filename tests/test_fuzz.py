"""Shape fuzzing: random batch sizes and (odd) image sizes through every variant's forward, forward_intermediates
and features_only backbone. Each call gives the right shapes and finite values, or, for inputs the model cannot
take, the documented ValueError ("too small" / "expected images of shape" / "expected floating-point images")."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import coatvit
from coatvit.registry import get_config

VARIANTS = coatvit.list_models()
FAST = "coat_test"
# Every variant runs; the big ones only at small sizes and few examples (CPU CI). The two medium variants share one
# architecture, so fuzzing both would repeat the same work.
BIG_SAME_AS = {"coat_lite_medium_384": "coat_lite_medium"}
FAST_EXAMPLES, BIG_EXAMPLES = 20, 2  # drawn inputs per architecture (coat_test / the others)


@functools.lru_cache(maxsize=None)
def _model(name: str, features_only: bool = False, out_indices: tuple[int, ...] = (0, 1, 2, 3)) -> torch.nn.Module:
    """The variant with small random weights. Built on the meta device and filled directly: the shapes under test
    do not depend on the init, and the real init of the 45M-parameter variants costs seconds on a CI core."""
    with torch.device("meta"):
        model = coatvit.create_model(name, features_only=features_only, out_indices=out_indices)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim > 1 or pname.startswith("cls_token"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            elif pname.endswith("weight"):
                p.fill_(1.0)  # LayerNorm scales, the aggregate conv
            else:
                p.zero_()
    return model.eval()


def _grids(h: int, w: int, patch: int) -> list[tuple[int, int]]:
    """Token grid of each scale: a patch_size stride, then three stride-2 merges, all floored."""
    grids = [(h // patch, w // patch)]
    for _ in range(3):
        grids.append((grids[-1][0] // 2, grids[-1][1] // 2))
    return grids


def _input(batch: int, h: int, w: int) -> torch.Tensor:
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(h * 1000 + w))


FUZZED = [v for v in VARIANTS if v not in BIG_SAME_AS]


def test_every_variant_is_fuzzed():
    """Variants registered later join the fuzzing automatically; an architecture twin is fuzzed through its twin."""
    for name, twin in BIG_SAME_AS.items():
        assert get_config(name) == get_config(twin)
    assert set(FUZZED) | set(BIG_SAME_AS) == set(VARIANTS)


@pytest.mark.parametrize("name", FUZZED)
def test_shapes_fuzz(name):
    """One drawn input goes through forward, forward_intermediates (drawn options) and a features_only backbone
    (drawn out_indices); every output has the computed shape and finite values."""
    cfg = get_config(name)
    fast = name == FAST
    size = st.integers(min_value=32, max_value=97 if fast else 44)
    subset = st.lists(st.integers(0, 3), min_size=1, max_size=4, unique=True)

    @settings(max_examples=FAST_EXAMPLES if fast else BIG_EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(batch=st.integers(0 if fast else 1, 3 if fast else 2), h=size, w=size, indices=subset,  # 0: empty
           fmt=st.sampled_from(["NCHW", "NLC"]), norm=st.booleans(), stop_early=st.booleans(),
           out_indices=subset.map(lambda v: tuple(sorted(v))))
    def check(batch, h, w, indices, fmt, norm, stop_early, out_indices):
        x = _input(batch, h, w)
        grids = _grids(h, w, cfg.patch_size)
        model = _model(name)
        with torch.no_grad():
            logits = model(x)
            final, feats = model.forward_intermediates(x, indices=indices, norm=norm, stop_early=stop_early,
                                                       output_fmt=fmt)
        assert logits.shape == (batch, cfg.num_classes) and torch.isfinite(logits).all()

        assert len(feats) == len(indices)
        for i, f in zip(sorted(indices), feats):
            gh, gw = grids[i]
            expected = (batch, cfg.embed_dims[i], gh, gw) if fmt == "NCHW" else (batch, gh * gw, cfg.embed_dims[i])
            assert tuple(f.shape) == expected, (i, fmt)
            assert torch.isfinite(f).all()
        finals = final if isinstance(final, list) else [final]
        assert all(torch.isfinite(t).all() for t in finals)

        backbone = _model(name, features_only=True, out_indices=out_indices)
        with torch.no_grad():
            maps = backbone(x)
        assert len(maps) == len(out_indices)
        assert backbone.feature_info.channels() == [cfg.embed_dims[i] for i in out_indices]
        assert backbone.feature_info.reduction() == [cfg.patch_size * 2**i for i in out_indices]
        for i, m in zip(out_indices, maps):
            assert tuple(m.shape) == (batch, cfg.embed_dims[i], *grids[i])
            assert torch.isfinite(m).all()
        if fmt == "NCHW" and not norm:
            # The backbone and forward_intermediates read the same scales (the weights are the same draw).
            for i, m in zip(out_indices, maps):
                if i in indices:
                    assert torch.allclose(m, feats[sorted(indices).index(i)], atol=1e-5)

    check()


# ------------------------------------------------------------------------------------------------------------
# inputs the model cannot take: the documented error, from every entry point


def _entry_points(name: str):
    classifier = _model(name)
    backbone = _model(name, features_only=True)
    return {
        "forward": classifier,
        "forward_features": classifier.forward_features,
        "forward_intermediates": classifier.forward_intermediates,
        "features_only": backbone,
    }


@pytest.mark.parametrize("entry", ["forward", "forward_features", "forward_intermediates", "features_only"])
@settings(max_examples=12, deadline=None, database=None)
@given(h=st.integers(1, 40), w=st.integers(1, 40), batch=st.integers(1, 2))
def test_too_small_input_gives_documented_error(entry, h, w, batch):
    call = _entry_points(FAST)[entry]
    minimum = get_config(FAST).min_input_size
    x = torch.randn(batch, 3, h, w)
    if min(h, w) >= minimum:
        with torch.no_grad():
            call(x)
        return
    with pytest.raises(ValueError, match=rf"input {h}x{w} is too small: CoaT needs at least {minimum}x{minimum}"):
        with torch.no_grad():
            call(x)


@pytest.mark.parametrize("name", FUZZED)
def test_min_input_size_is_exact(name):
    """31 px fails with the message on every variant, 32 px runs: the documented bound is the real one."""
    minimum = get_config(name).min_input_size
    model = _model(name)
    with pytest.raises(ValueError, match="too small"):
        model(torch.zeros(1, 3, minimum - 1, minimum + 7))
    with torch.no_grad():
        assert torch.isfinite(model(torch.zeros(1, 3, minimum, minimum))).all()


@pytest.mark.parametrize("shape", [(3, 64, 64), (1, 1, 64, 64), (1, 4, 64, 64), (1, 3, 64), (1, 1, 3, 64, 64)])
@pytest.mark.parametrize("entry", ["forward", "forward_intermediates", "features_only"])
def test_wrong_layout_gives_documented_error(shape, entry):
    call = _entry_points(FAST)[entry]
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, H, W\)"):
        call(torch.zeros(shape))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
@pytest.mark.parametrize("entry", ["forward", "forward_intermediates", "features_only"])
def test_integer_images_give_documented_error(dtype, entry):
    # decoded but not yet converted pixels (uint8 from torchvision.io.read_image): say how to convert them
    call = _entry_points(FAST)[entry]
    with pytest.raises(ValueError, match=rf"expected floating-point images, got {dtype}: scale them to \[0, 1\]"):
        call(torch.zeros(1, 3, 64, 64, dtype=dtype))
