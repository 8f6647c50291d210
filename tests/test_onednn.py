"""CPU inference's linear layers through oneDNN (coatvit.onednn): the layer calls against nn.Linear, the models'
use of them (which products take them, same logits with them off), a weight changed in place, copies of a model
that ran them, training and small products left to PyTorch, the switch, and a failing call."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import coatvit
from coatvit import onednn

needs_onednn = pytest.mark.skipif(not onednn.available(), reason="PyTorch has no oneDNN linear ops here")


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    """The switch follows the environment again and no failure is remembered, before and after each test."""
    monkeypatch.delenv(onednn.ENV, raising=False)
    monkeypatch.setattr(onednn, "_failure", None)
    onednn.set_enabled(None)
    yield
    onednn.set_enabled(None)


def count_calls(monkeypatch) -> list[tuple[int, int, int]]:
    """Records (rows, in, out) of every oneDNN product the model runs."""
    calls, real = [], onednn.linear

    def spy(x, layer, gelu=None, add=None):
        calls.append((x.numel() // x.shape[-1], layer.in_features, layer.out_features))
        return real(x, layer, gelu, add)

    monkeypatch.setattr(onednn, "linear", spy)
    return calls


def both(model, x):
    """The model's output with oneDNN on and off."""
    outs = []
    for on in (True, False):
        onednn.set_enabled(on)
        with torch.inference_mode():
            outs.append(model(x))
    onednn.set_enabled(None)
    return outs


@needs_onednn
@pytest.mark.parametrize("rows", [1, 7, 300])
@pytest.mark.parametrize("gelu, residual", [(None, False), ("none", False), ("tanh", False), (None, True)])
def test_linear_equals_nn_linear(rows, gelu, residual):
    torch.manual_seed(0)
    layer = nn.Linear(96, 160)
    x = torch.randn(2, rows, 96)
    add = torch.randn(2, rows, 160) if residual else None
    with torch.no_grad():
        got = onednn.linear(x, layer, gelu, add)
        want = layer(x)
        want = F.gelu(want, approximate=gelu) if gelu else want
        want = want + add if residual else want
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_linear_takes_a_gelu_or_a_residual_not_both():
    layer = nn.Linear(8, 8)
    with pytest.raises(ValueError, match="not both"):
        onednn.linear(torch.randn(4, 8), layer, "none", torch.randn(4, 8))


@needs_onednn
@pytest.mark.parametrize("name, batch, size", [("coat_lite_tiny", 1, 224), ("coat_lite_tiny", 2, 97),
                                               ("coat_tiny", 1, 96), ("coat_lite_small", 1, 64)])
def test_models_run_their_big_products_through_onednn_with_the_same_logits(monkeypatch, name, batch, size):
    torch.manual_seed(0)
    model = coatvit.create_model(name).eval()
    x = torch.randn(batch, 3, size, size)
    calls = count_calls(monkeypatch)
    on, off = both(model, x)
    assert calls, "no product went through oneDNN"
    assert all(r * i * o >= onednn.MIN_MACS for r, i, o in calls)
    torch.testing.assert_close(on, off, atol=1e-5, rtol=1e-5)
    model.set_fast_path(False)  # the reference path: the paper's ops only
    calls.clear()
    with torch.inference_mode():
        ref = model(x)
    assert not calls
    torch.testing.assert_close(on, ref, atol=1e-5, rtol=1e-5)


@needs_onednn
def test_coat_lite_tiny_at_224_px_takes_every_qkv_projection_mlp_and_output_projection(monkeypatch):
    """Batch 1: each block's qkv and output projections and its MLP's two layers per chunk (stage 1's 3137 tokens
    in two chunks), but not the last block's class-token rows (below `MIN_MACS`)."""
    model = coatvit.create_model("coat_lite_tiny").eval()
    calls = count_calls(monkeypatch)
    with torch.inference_mode():
        model(torch.randn(1, 3, 224, 224))
    per_block = {64: 2 + 2 * 2, 128: 2 + 2, 256: 2 + 2, 320: 2 + 2}
    assert len(calls) == 2 * sum(per_block.values()) - per_block[320]
    assert {(r, i, o) for r, i, o in calls if 64 in (i, o)} == {(3137, 64, 192), (3137, 64, 64), (2048, 64, 512),
                                                            (2048, 512, 64), (1089, 64, 512), (1089, 512, 64)}


@needs_onednn
def test_training_and_small_products_stay_with_pytorch(monkeypatch):
    torch.manual_seed(0)
    model = coatvit.create_model("coat_lite_tiny")
    calls = count_calls(monkeypatch)
    model(torch.randn(2, 3, 64, 64)).sum().backward()  # autograd records: PyTorch's layers
    assert not calls
    with torch.inference_mode():
        coatvit.create_model("coat_test").eval()(torch.randn(1, 3, 32, 32))  # every product below MIN_MACS
    assert not calls


@needs_onednn
def test_a_weight_changed_in_place_is_reordered_again():
    torch.manual_seed(0)
    model = coatvit.create_model("coat_lite_tiny").eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.inference_mode():
        model(x)
    with torch.no_grad():
        for block in model.serial_blocks1:
            block.mlp.fc1.weight.mul_(1.5)
            block.factoratt_crpe.qkv.weight.add_(0.01)
    on, off = both(model, x)
    torch.testing.assert_close(on, off, atol=1e-5, rtol=1e-5)


@needs_onednn
def test_a_model_that_ran_onednn_can_still_be_copied_and_pickled():
    model = coatvit.create_model("coat_lite_tiny").eval()
    with torch.inference_mode():
        model(torch.randn(1, 3, 96, 96))
    twin = copy.deepcopy(model)
    pickle.dumps(model)
    torch.save(model, io.BytesIO())
    x = torch.randn(1, 3, 96, 96)
    with torch.inference_mode():
        torch.testing.assert_close(twin(x), model(x))


@needs_onednn
def test_the_switch_turns_onednn_off(monkeypatch):
    model = coatvit.create_model("coat_lite_tiny").eval()
    x = torch.randn(1, 3, 96, 96)
    calls = count_calls(monkeypatch)
    monkeypatch.setenv(onednn.ENV, "0")
    with torch.inference_mode():
        model(x)
    assert not calls and not onednn.available()
    monkeypatch.setenv(onednn.ENV, "1")
    with torch.inference_mode():
        model(x)
    assert calls


@needs_onednn
def test_a_failing_onednn_call_warns_once_and_pytorch_layers_take_over(monkeypatch):
    torch.manual_seed(0)
    model = coatvit.create_model("coat_lite_tiny").eval()
    x = torch.randn(1, 3, 96, 96)
    onednn.set_enabled(False)
    with torch.inference_mode():
        want = model(x)
    onednn.set_enabled(None)
    monkeypatch.setattr(onednn, "packed_weight", lambda layer: torch.zeros(3, 5))  # any call now raises
    with pytest.warns(RuntimeWarning, match="oneDNN's linear layer failed.*COATVIT_ONEDNN=0"):
        with torch.inference_mode():
            got = model(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not onednn.available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.inference_mode():
            model(x)  # the decision holds for the process: no second warning


@needs_onednn
def test_the_benchmark_script_times_both_settings_and_leaves_the_switch_alone(monkeypatch):
    import pathlib

    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).parents[1] / "benchmarks"))
    import onednn_linear

    calls = count_calls(monkeypatch)
    times = onednn_linear.time_both("coat_lite_tiny", "infer", 1, 64, repeats=1)
    assert set(times) == {True, False} and all(t > 0 for ts in times.values() for t in ts)
    assert calls and onednn.enabled()  # it ran oneDNN in its "on" steps, and set the switch back


def test_a_hook_on_the_attention_sees_its_own_output_not_the_residual_sum():
    """CPU inference adds a serial block's residual inside the attention's output projection; a forward hook on the
    attention module still gets the attention's output alone, as on the reference path."""
    torch.manual_seed(0)
    model = coatvit.create_model("coat_lite_tiny").eval()
    seen = []
    model.serial_blocks1[0].factoratt_crpe.register_forward_hook(lambda m, args, out: seen.append(out))
    x = torch.randn(1, 3, 96, 96)
    with torch.inference_mode():
        logits = model(x)
        model.set_fast_path(False)
        ref = model(x)
    torch.testing.assert_close(seen[0], seen[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
