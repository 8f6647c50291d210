"""Non-finite loss or gradient: the run stops with a message naming the step and the likely cause and keeps the
last good checkpoint (never one with NaN weights); with --skip-nonfinite the bad updates are skipped and counted."""

from __future__ import annotations

import math

import pytest
import torch

import coatvit.registry as registry
from coatvit.cli import main
from coatvit.train import load_checkpoint, read_csv

STEPS = 4  # updates per epoch: 32 built-in images in batches of 8


def _poison(kind: str):
    """A forward hook that spoils the classifier output (loss) or its gradient (finite loss) in place."""

    def hook(module, inputs, output):
        if kind == "loss-nan":
            return output * float("nan")
        if kind == "loss-inf":
            return output * 1e30 * 1e30  # overflows to +-inf, as a float16 logit would
        scale = float("nan") if kind == "grad-nan" else float("inf")
        output.register_hook(lambda g: g * scale)
        return output

    return hook


@pytest.fixture
def poisoned_updates(monkeypatch):
    """`poisoned_updates({update_number: kind})` makes those training updates go bad (1-based)."""
    import coatvit.train as train_mod

    monkeypatch.setattr(train_mod, "plot_curves", lambda rows, path: None)  # not under test
    torch_threads = torch.get_num_threads()
    plan: dict[int, str] = {}
    real_create = registry.create_model

    def create(*args, **kwargs):
        model = real_create(*args, **kwargs)
        count = {"n": 0}

        def hook(module, inputs, output):
            if not module.training:
                return output
            count["n"] += 1
            kind = plan.get(count["n"])
            return _poison(kind)(module, inputs, output) if kind else output

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(registry, "create_model", create)
    yield plan.update
    torch.set_num_threads(torch_threads)


def _args(tmp_path, epochs: int, *extra: str) -> list[str]:
    return ["train", "--model", "coat_test", "--img-size", "32", "--epochs", str(epochs), "-b", "8",
            "--builtin-train-size", "32", "--builtin-val-size", "16", "-j", "0", "--threads", "1", "--device", "cpu",
            "--no-model-ema", "--lr", "1e-3", "--output", str(tmp_path), "--experiment", "run", *extra]


def _finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state.values())


@pytest.mark.parametrize("kind, update", [
    ("loss-nan", 6),  # mid epoch 1
    ("loss-inf", 8),  # last update of epoch 1, just before its checkpoint
    ("grad-nan", 8),  # finite loss, NaN gradient: would poison the weights and then the checkpoint
    ("grad-inf", 6),
    ("loss-nan", 1),  # the very first update: no checkpoint exists yet
])
def test_nonfinite_update_stops_and_keeps_last_good_checkpoint(tmp_path, capsys, poisoned_updates, kind, update):
    poisoned_updates({update: kind})
    assert main(_args(tmp_path, 2)) == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("coatvit train: error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr  # progress lines share stderr
    err = errors[0]
    epoch, step = (update - 1) // STEPS, update - 1
    assert f"non-finite loss or gradient at epoch {epoch}, step {step} (update {update})" in err
    assert "learning rate" in err and "--skip-nonfinite" in err
    last = tmp_path / "run" / "last.pth"
    if epoch == 0:
        assert "no checkpoint was written yet" in err and not last.exists()
        return
    assert f"the last good checkpoint is {last}" in err
    state = load_checkpoint(last)
    assert state["epoch"] == epoch - 1 and state["step"] == epoch * STEPS
    assert _finite(state["model"]) and _finite(dict(enumerate(
        t for s in state["optimizer"]["state"].values() for t in s.values() if isinstance(t, torch.Tensor))))


def test_skip_nonfinite_skips_and_counts(tmp_path, capsys, poisoned_updates):
    bad = {2: "loss-nan", 6: "grad-nan", 7: "loss-inf", 8: "grad-inf"}
    poisoned_updates(bad)
    assert main(_args(tmp_path, 3, "--skip-nonfinite")) == 0
    out = capsys.readouterr().out
    rows = read_csv(tmp_path / "run" / "summary.csv")
    assert [int(r["nonfinite_steps"]) for r in rows] == [1, 3, 0]
    assert f"{len(bad)} non-finite steps skipped" in out
    state = load_checkpoint(tmp_path / "run" / "last.pth")
    assert state["step"] == 3 * STEPS - len(bad) and state["nonfinite_steps"] == len(bad)
    assert _finite(state["model"])
    assert all(math.isfinite(float(r["train_loss"])) and math.isfinite(float(r["eval_loss"])) for r in rows)
