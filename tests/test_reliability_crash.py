"""Crash-safe training: a run SIGKILLed at any moment (mid-epoch, mid checkpoint write, between the temp file and
its rename, between the summary row and the checkpoint, at a random wall-clock time) leaves a loadable `last.pth`,
and `--resume` from it ends with exactly the weights, optimizer state and summary of a run that was never killed."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coatvit.cli import main
from coatvit.train import TrainConfig, load_checkpoint, read_csv, train

EPOCHS, STEPS = 3, 4  # 32 built-in images in batches of 8: four updates per epoch, last.pth written three times
# The full recipe (RandAugment, random erasing, mixup/cutmix, repeated augmentation, drop path, EMA). CPU kernels
# are deterministic already; --deterministic would only add seconds of torch._dynamo imports per process.
CONFIG = dict(model="coat_test", img_size=[32, 32], batch_size=8, epochs=EPOCHS, builtin_train_size=32,
              builtin_val_size=16, workers=0, threads=1, log_interval=1000, device="cpu", lr=2e-3,
              warmup_epochs=0.5, model_ema=True, model_ema_decay=0.9)

# Runs `train` in a fresh process and SIGKILLs that process at the moment the spec names.
_VICTIM = r'''
import json, os, random, signal, sys, threading, time
import torch
import coatvit.train as T

T.plot_curves = lambda rows, path: None  # curves.png is not under test; matplotlib costs seconds per process
spec, cfg = sys.argv[1], json.loads(sys.argv[2])
kind, _, arg = spec.partition(":")
count = {"n": 0}


def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def nth(n):
    count["n"] += 1
    return count["n"] == n


if kind == "step":  # during an epoch: just before the n-th optimizer update
    real_lr_at = T.lr_at

    def lr_at(*a, **k):
        if nth(int(arg)):
            die()
        return real_lr_at(*a, **k)

    T.lr_at = lr_at
elif kind == "write":  # during the n-th write of last.pth: half of its bytes are in the temp file
    real_save = torch.save

    def save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        if ".last.pth." in str(f) and nth(int(arg)):
            os.truncate(f, os.path.getsize(f) // 2)
            die()

    torch.save = save
elif kind in ("rename", "csv"):  # the n-th last.pth is complete but not renamed / epoch n's CSV row is written
    real_replace = os.replace

    def replace(src, dst):
        if kind == "rename" and str(dst).endswith("last.pth") and nth(int(arg)):
            die()
        real_replace(src, dst)
        if kind == "csv" and str(dst).endswith("summary.csv") and nth(int(arg)):
            die()

    os.replace = replace
elif kind == "timer":  # a random wall-clock moment after the first checkpoint exists
    delay = random.Random(int(arg)).uniform(0.0, 0.6)
    last = os.path.join(cfg["output"], cfg["experiment"], "last.pth")
    real_lr_at = T.lr_at

    def lr_at(*a, **k):  # paced once the first checkpoint exists: the 8 updates left take over 0.8 s, so the run
        # cannot finish before the longest delay however fast the machine (epochs 1-2 alone took 0.4 s once)
        if os.path.exists(last):
            time.sleep(0.1)
        return real_lr_at(*a, **k)

    T.lr_at = lr_at

    def killer():
        while not os.path.exists(last):
            time.sleep(0.005)
        time.sleep(delay)
        die()

    threading.Thread(target=killer, daemon=True).start()
T.train(T.TrainConfig(**cfg), argv=["crash-test"])
print("FINISHED")
'''

_rng = random.Random(20240501)
# (spec, epoch that last.pth must hold after the kill; None: any)
KILLS = [
    (f"step:{_rng.randint(STEPS + 1, 2 * STEPS)}", 0),  # a random update of epoch 1
    (f"step:{_rng.randint(2 * STEPS + 1, 3 * STEPS)}", 1),  # a random update of epoch 2
    ("write:2", 0),  # half-written checkpoint of epoch 1
    ("rename:2", 0),  # epoch 1's checkpoint complete in its temp file, not yet renamed
    ("csv:2", 0),  # epoch 1's summary row on disk, its checkpoint not yet written
    (f"timer:{_rng.randint(0, 10**6)}", None),
]


EARLY_KILL = "write:1"  # half-written first checkpoint: no complete checkpoint exists yet


@pytest.fixture(autouse=True, scope="module")
def fast_in_process_runs():
    """One thread, as in the victims (the same kernels, so the same floats); no curves.png (not under test)."""
    import coatvit.train as train_mod

    before, real_plot = torch.get_num_threads(), train_mod.plot_curves
    torch.set_num_threads(1)
    train_mod.plot_curves = lambda rows, path: None
    yield
    torch.set_num_threads(before)
    train_mod.plot_curves = real_plot


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("reference")
    train(TrainConfig(**{**CONFIG, "img_size": (32, 32), "output": str(out), "experiment": "run"}), argv=["ref"])
    torch.set_num_threads(1)
    return out / "run"


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory) -> dict[str, tuple[Path, int, str]]:
    """Every victim process, started together (they spend most of their time importing) and SIGKILLed."""
    root = tmp_path_factory.mktemp("killed")
    procs = {}
    for i, (spec, _) in enumerate([*KILLS, (EARLY_KILL, None)]):
        cfg = {**CONFIG, "output": str(root), "experiment": f"run{i}"}
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs[spec] = (root / f"run{i}", subprocess.Popen(
            [sys.executable, "-c", _VICTIM, spec, json.dumps(cfg)], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True))
    out = {}
    try:
        for spec, (run_dir, proc) in procs.items():
            log, _ = proc.communicate(timeout=300)
            out[spec] = (run_dir, proc.returncode, log)
    finally:
        for _, proc in procs.values():
            if proc.poll() is None:  # only after a timeout: leave no victim running
                proc.kill()
                proc.communicate()
    return out


def _tensors(obj):
    """Every tensor of a nested checkpoint entry, by path."""
    if isinstance(obj, torch.Tensor):
        yield "", obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            for path, t in _tensors(v):
                yield f"{k}.{path}", t
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            for path, t in _tensors(v):
                yield f"{i}.{path}", t


def assert_same_training_state(a: dict, b: dict) -> None:
    for key in ("model", "ema", "optimizer"):
        ta, tb = dict(_tensors(a[key])), dict(_tensors(b[key]))
        assert ta.keys() == tb.keys(), key
        for name in ta:
            assert torch.equal(ta[name], tb[name]), f"{key}.{name}"
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"]


RESULT_COLUMNS = ("epoch", "lr", "train_loss", "eval_loss", "eval_top1", "eval_top5", "ema_top1", "skipped_images",
                  "nonfinite_steps")


@pytest.mark.parametrize("spec, expected_epoch", KILLS, ids=[k for k, _ in KILLS])
def test_sigkill_then_resume_equals_uninterrupted_run(killed_runs, reference, spec, expected_epoch):
    run_dir, returncode, log = killed_runs[spec]
    assert returncode == -signal.SIGKILL, f"the victim was not killed (rc {returncode}):\n{log[-2000:]}"
    assert "FINISHED" not in log

    # What the crash left: a loadable last.pth of a finished epoch; never a half file under the real name.
    last = run_dir / "last.pth"
    state = load_checkpoint(last)
    if expected_epoch is not None:
        assert state["epoch"] == expected_epoch
    assert state["step"] == (state["epoch"] + 1) * STEPS
    if (run_dir / "best.pth").exists():
        load_checkpoint(run_dir / "best.pth")

    assert main(["train", "--resume", str(last)]) == 0
    torch.set_num_threads(1)
    assert not list(run_dir.glob(".*.tmp"))  # partial writes of the killed process are cleaned up on resume
    final, ref = load_checkpoint(last), load_checkpoint(reference / "last.pth")
    assert final["epoch"] == EPOCHS - 1
    assert_same_training_state(final, ref)
    rows, ref_rows = read_csv(run_dir / "summary.csv"), read_csv(reference / "summary.csv")
    assert [{c: r[c] for c in RESULT_COLUMNS} for r in rows] == [{c: r[c] for c in RESULT_COLUMNS} for r in ref_rows]


def test_a_kill_before_the_first_checkpoint_leaves_no_checkpoint(killed_runs):
    """Killed while writing epoch 0's checkpoint: no last.pth at all (never a partial one under the real name);
    --resume says so in one line."""
    run_dir, returncode, log = killed_runs[EARLY_KILL]
    assert returncode == -signal.SIGKILL, log[-2000:]
    assert not (run_dir / "last.pth").exists()
    assert [p for p in run_dir.iterdir() if p.name.startswith(".last.pth.")]  # the abandoned temp file
    assert main(["train", "--resume", str(run_dir / "last.pth")]) == 2
