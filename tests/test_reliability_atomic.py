"""Atomic writes: a failing writer leaves the previous file untouched and no temporary file behind; a finished
file gets the permissions a plain `open()` would give it (mkstemp's 0600 would hide checkpoints from colleagues)."""

from __future__ import annotations

import errno
import os
import stat

import pytest
import torch

from coatvit.atomic import atomic_write, atomic_write_text
from coatvit.cli import main


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt(),
                                     RuntimeError("writer crashed")])
def test_failed_write_keeps_the_old_file(tmp_path, failure):
    target = tmp_path / "last.pth"
    atomic_write_text(target, "epoch 0")

    def half_then_fail(tmp):
        with open(tmp, "w") as f:
            f.write("epoch 1, half of it")
        raise failure

    with pytest.raises(type(failure)):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "epoch 0"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "a.txt", "x")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        os.umask(0o077)
        path = atomic_write_text(tmp_path / "b.txt", "x")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_disk_full_during_checkpoint_write(tmp_path, capsys, monkeypatch):
    """ENOSPC while writing epoch 1's checkpoint: exit 2 with one line, epoch 0's last.pth intact, no temp left."""
    import coatvit.train as train_mod

    monkeypatch.setattr(train_mod, "plot_curves", lambda rows, path: None)
    real_save, calls = torch.save, {"n": 0}

    def full_disk(obj, f, *args, **kwargs):
        if ".last.pth." in str(f):
            calls["n"] += 1
            if calls["n"] == 2:
                with open(f, "wb") as out:
                    out.write(b"PK\x03\x04 partial")
                raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    threads = torch.get_num_threads()
    code = main(["train", "--model", "coat_test", "--img-size", "32", "--epochs", "2", "-b", "8",
                 "--builtin-train-size", "16", "--builtin-val-size", "8", "-j", "0", "--threads", "1",
                 "--no-model-ema", "--output", str(tmp_path), "--experiment", "run"])
    torch.set_num_threads(threads)
    assert code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("coatvit train: error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert "No space left on device" in lines[0] and "previous checkpoint is intact" in lines[0]
    assert train_mod.load_checkpoint(tmp_path / "run" / "last.pth")["epoch"] == 0
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]
