"""Bad invocations of the real CLI: each gives exit code 2 and one line on stderr, never a traceback (`--debug`
shows it). Most cases call `coatvit.cli.main` in-process (fast); a few go through the installed entry point."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import coatvit
from coatvit.cli import main

COATVIT = shutil.which("coatvit", path=str(Path(sys.executable).parent)) or "coatvit"
# The smallest real training run: built-in data, 32 px, one short epoch on the CPU.
TINY = ["train", "--model", "coat_test", "--img-size", "32", "--epochs", "1", "-b", "8", "--builtin-train-size", "16",
        "--builtin-val-size", "8", "-j", "0", "--device", "cpu", "--no-model-ema"]


def run_cli(capsys, args: list[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> str:
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("coatvit ") and ": error: " in lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A real `last.pth` from a one-epoch coat_test run on the built-in data (5 classes)."""
    out = tmp_path_factory.mktemp("runs")
    assert main([*TINY, "--output", str(out), "--experiment", "ref"]) == 0
    return out / "ref" / "last.pth"


def _image_folder(root: Path, classes: int, per_class: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root


# ------------------------------------------------------------------------------------------------------------
# model names and sizes


@pytest.mark.parametrize("args, suggestion", [
    (["info", "coat_tinny"], "did you mean coat_tiny"),
    (["info", "coat-lite-mini"], "did you mean coat_lite_mini"),
    (["train", "--model", "coat_lite_smal"], "did you mean coat_lite_small"),
])
def test_unknown_model_suggests_closest(capsys, args, suggestion):
    code, _, err = run_cli(capsys, args)
    assert_one_line_error(code, err, "unknown model", suggestion, "coatvit list")


@pytest.mark.parametrize("args", [
    ["info", "coat_test", "--img-size", "16"],
    ["info", "coat_test", "--img-size", "31", "64"],
    [*TINY, "--img-size", "16"],
    [*TINY, "--img-size", "64", "24"],
])
def test_input_smaller_than_model_takes(capsys, tmp_path, args):
    code, _, err = run_cli(capsys, args + ["--output", str(tmp_path)] if args[0] == "train" else args)
    assert_one_line_error(code, err, "too small", "32")


# ------------------------------------------------------------------------------------------------------------
# data folders


def test_missing_data_folder(capsys, tmp_path):
    code, _, err = run_cli(capsys, [*TINY, "--data", str(tmp_path / "nope"), "--output", str(tmp_path / "runs")])
    assert_one_line_error(code, err, "does not exist", str(tmp_path / "nope"))


def test_empty_data_folder(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, [*TINY, "--data", str(tmp_path / "empty"), "--val-split", "0.2",
                                    "--output", str(tmp_path / "runs")])
    assert_one_line_error(code, err, "no class subfolders")


def test_data_folder_without_images(capsys, tmp_path):
    (tmp_path / "data" / "cat").mkdir(parents=True)
    (tmp_path / "data" / "cat" / "notes.txt").write_text("not an image")
    code, _, err = run_cli(capsys, [*TINY, "--data", str(tmp_path / "data"), "--val-split", "0.2",
                                    "--output", str(tmp_path / "runs")])
    assert_one_line_error(code, err, "holds no images")


# ------------------------------------------------------------------------------------------------------------
# numbers


@pytest.mark.parametrize("flag, value, name", [
    ("-b", "0", "batch_size"), ("-b", "-4", "batch_size"), ("--batch-size", "-1", "batch_size"),
    ("--lr", "0", "lr"), ("--lr", "-0.001", "lr"), ("--epochs", "0", "epochs"), ("--grad-accum", "0", "grad_accum"),
])
def test_non_positive_numbers(capsys, tmp_path, flag, value, name):
    code, _, err = run_cli(capsys, [*TINY, flag, value, "--output", str(tmp_path / "runs")])
    assert_one_line_error(code, err, name, value.lstrip("-") if value != "0" else "0")
    assert not (tmp_path / "runs").exists()


def _benchmark(tmp_path):
    return ["benchmark", "--model", "coat_test", "--modes", "latency", "--repeats", "1", "--no-memory"]


def _predict(tmp_path):
    weights = tmp_path / "w.safetensors"
    torch.manual_seed(0)
    coatvit.save_weights(coatvit.create_model("coat_test"), weights)
    images = _image_folder(tmp_path / "images", classes=1, per_class=1)
    return ["predict", str(images / "class0"), "--weights", str(weights)]


def _train(tmp_path):
    return [*TINY[:-3], "--no-model-ema", "--output", str(tmp_path / "runs")]


# `cuda` is the GPU of a machine that has none (CI); the other names no machine has
@pytest.mark.parametrize("device, needle", [
    ("gpu", "must be auto, cpu, cuda or cuda:N"), ("xla:1", "must be auto, cpu, cuda or cuda:N"),
    ("cuda:7", "cuda:7 was asked for"),
])
@pytest.mark.parametrize("command", [_benchmark, _predict, _train], ids=["benchmark", "predict", "train"])
def test_unusable_device(capsys, tmp_path, command, device, needle):
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    code, _, err = run_cli(capsys, [*command(tmp_path), "--device", device])
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", [_benchmark, _predict, _train], ids=["benchmark", "predict", "train"])
def test_non_positive_threads(capsys, tmp_path, command):
    code, _, err = run_cli(capsys, [*command(tmp_path), "--threads", "0"])
    assert_one_line_error(code, err, "threads must be", "0")


def _eval(tmp_path):
    predict = _predict(tmp_path)  # the weight file
    return ["eval", "--data", str(_image_folder(tmp_path / "data", classes=2, per_class=1)), *predict[2:]]


@pytest.mark.parametrize("args, needle", [
    (["-b", "0"], "--batch-size must be positive, got 0"), (["--std", "0", "1", "1"], "three non-zero numbers"),
])
@pytest.mark.parametrize("command", [_predict, _eval], ids=["predict", "eval"])
def test_bad_inference_numbers(capsys, tmp_path, command, args, needle):
    code, _, err = run_cli(capsys, [*command(tmp_path), *args])
    assert_one_line_error(code, err, needle)


# ------------------------------------------------------------------------------------------------------------
# output folder


@pytest.mark.parametrize("where", ["under-a-file", "in-proc"])
def test_unwritable_output_is_checked_before_anything_else(capsys, tmp_path, where):
    if where == "under-a-file":
        (tmp_path / "afile").write_text("")
        output = tmp_path / "afile" / "runs"
    else:
        output = Path("/proc/coatvit-test-runs")  # not writable even for root
    # The data folder does not exist either: the output check must come first (before data, model or training).
    code, out, err = run_cli(capsys, [*TINY, "--data", str(tmp_path / "no-data"), "--output", str(output)])
    assert_one_line_error(code, err, "not writable", str(output), "--output")
    assert "epoch" not in out


def test_a_run_rejected_by_its_checks_leaves_no_empty_run_directory(capsys, tmp_path):
    output = tmp_path / "runs"
    code, _, err = run_cli(capsys, [*TINY, "--img-size", "8", "--output", str(output)])
    assert_one_line_error(code, err, "too small")
    assert not output.exists() and list(tmp_path.iterdir()) == []  # not even the write probe is left


# ------------------------------------------------------------------------------------------------------------
# checkpoints for another architecture or class count


def test_resume_checkpoint_of_another_architecture(capsys, checkpoint):
    code, _, err = run_cli(capsys, ["train", "--model", "coat_lite_tiny", "--resume", str(checkpoint)])
    assert_one_line_error(code, err, "cannot resume", "coat_test")


def test_finetune_weights_of_another_architecture(capsys, tmp_path):
    coatvit.save_weights(coatvit.create_model("coat_lite_tiny", num_classes=8), tmp_path / "lite.safetensors")
    code, _, err = run_cli(capsys, [*TINY, "--finetune", str(tmp_path / "lite.safetensors"),
                                    "--output", str(tmp_path / "runs")])
    assert_one_line_error(code, err, "do not fit", "they are coat_lite_tiny weights", "--model coat_lite_tiny")


def test_resume_with_another_class_count(capsys, tmp_path, checkpoint):
    """The checkpoint's head has 5 classes; the data has 3."""
    data = _image_folder(tmp_path / "data", classes=3, per_class=6)
    code, _, err = run_cli(capsys, ["train", "--resume", str(checkpoint), "--epochs", "2", "--data", str(data),
                                    "--val-split", "0.3", "-j", "0", "--output", str(tmp_path / "runs"),
                                    "--experiment", "x"])
    assert_one_line_error(code, err, "head.weight")


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 cut short", b"not a checkpoint at all, just text"])
def test_resume_from_broken_checkpoint(capsys, tmp_path, content):
    path = tmp_path / "last.pth"
    path.write_bytes(content)
    code, _, err = run_cli(capsys, ["train", "--resume", str(path)])
    assert_one_line_error(code, err, str(path))


# ------------------------------------------------------------------------------------------------------------
# out of memory


def test_out_of_memory_gives_batch_size_hint(capsys, tmp_path, monkeypatch):
    def oom(self, x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(coatvit.model.CoaT, "forward", oom)
    code, _, err = run_cli(capsys, [*TINY, "--output", str(tmp_path / "runs")])
    assert_one_line_error(code, err, "out of memory", "batch size 8", "--batch-size")


def test_out_of_memory_during_eval_gives_batch_size_hint(capsys, tmp_path, monkeypatch):
    """Outside the training step no library code names the batch size; the CLI's mapping still gives the hint."""
    coatvit.save_weights(coatvit.create_model("coat_test", num_classes=2), tmp_path / "w.safetensors")
    data = _image_folder(tmp_path / "val", classes=2, per_class=2)

    def oom(self, x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(coatvit.model.CoaT, "forward", oom)
    code, _, err = run_cli(capsys, ["eval", "--weights", str(tmp_path / "w.safetensors"), "--model", "coat_test",
                                    "--data", str(data), "-b", "64", "-j", "0", "--device", "cpu"])
    assert_one_line_error(code, err, "out of memory at batch size 64", "--batch-size")


# ------------------------------------------------------------------------------------------------------------
# the installed entry point, and --debug


def _entry(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([COATVIT, *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def test_entry_point_error_is_one_line(tmp_path):
    proc = _entry("train", "--model", "coat_tset", "--output", str(tmp_path), cwd=tmp_path)
    assert_one_line_error(proc.returncode, proc.stderr, "did you mean coat_test")


def test_debug_shows_the_traceback(tmp_path):
    proc = _entry("--debug", "info", "coat_tset", cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "UnknownModelError" in proc.stderr
