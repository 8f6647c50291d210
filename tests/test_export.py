"""Export: ONNX (dynamic batch / height / width) and .pt2 round trips against eager PyTorch, `predict --onnx`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import coatvit
from coatvit import export
from coatvit.cli import main

CLASSES = [f"class_{k}" for k in range(10)]


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    torch.manual_seed(0)
    model = coatvit.create_model("coat_test")
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    return coatvit.save_weights(model, path, class_names=CLASSES)


@pytest.fixture(scope="module")
def onnx_export(tiny_weights, tmp_path_factory):
    """One export through the CLI (the slow part: torch.export + ONNX translation), shared by the tests below."""
    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["export", "--weights", str(tiny_weights), "--output", str(out), "--img-size", "64",
                     "--output-format", "json"])
    assert code == 0
    return out, json.loads(buf.getvalue().strip().splitlines()[-1])


def test_onnx_round_trip_matches_eager_at_two_batches_and_two_sizes(onnx_export, tiny_weights):
    path, report = onnx_export
    sizes = {(c["height"], c["width"]) for c in report["checks"]}
    batches = {c["batch"] for c in report["checks"]}
    assert len(sizes) == 2 and len(batches) == 2 and report["max_abs_diff"] <= 1e-4
    # Independently of the exporter's own check: a third size and batch it was not traced at.
    model = coatvit.create_model("coat_test", weights=str(tiny_weights)).eval()
    checks = export.check_onnx(model, path, sizes=[(96, 64)], batches=(2,))
    assert checks[0].max_abs_diff <= 1e-4
    meta = export.read_onnx_metadata(path)
    assert meta["class_names"] == CLASSES and meta["input_size"] == [64, 64] and meta["features"] is False


def test_onnx_check_fails_for_a_model_that_differs(onnx_export):
    path, _ = onnx_export
    torch.manual_seed(123)
    other = coatvit.create_model("coat_test").eval()
    with pytest.raises(export.ExportError, match="does not reproduce the eager model"):
        export.check_onnx(other, path, sizes=[(64, 64)], batches=(1,))


def test_predict_onnx_matches_pytorch_predict(onnx_export, tiny_weights, tmp_path, capsys):
    path, _ = onnx_export
    rng = np.random.default_rng(0)
    for i, size in enumerate([(80, 64), (50, 120), (64, 64)]):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    assert main(["predict", str(tmp_path), "--onnx", str(path), "--topk", "3", "--format", "json"]) == 0
    onnx_records = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert main(["predict", str(tmp_path), "--weights", str(tiny_weights), "--topk", "3", "--format", "json"]) == 0
    torch_records = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(onnx_records) == len(torch_records) == 3
    for a, b in zip(onnx_records, torch_records):
        assert a["path"] == b["path"]
        assert [t["class"] for t in a["topk"]] == [t["class"] for t in b["topk"]]
        assert np.allclose([t["prob"] for t in a["topk"]], [t["prob"] for t in b["topk"]], atol=1e-4)


def test_export_refuses_bad_requests_with_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # argparse: --weights or --pretrained is required
        main(["export", "--model", "coat_test", "--output", str(tmp_path / "x.onnx")])
    assert e.value.code == 2
    capsys.readouterr()
    code = main(["export", "--model", "coat_test", "--pretrained", "--img-size", "32",
                 "--output", str(tmp_path / "x.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.slow
def test_pt2_round_trip_matches_eager(tiny_weights, tmp_path):
    report = export.export_model(model_name=None, output=tmp_path / "tiny.pt2", fmt="pt2",
                                 weights=str(tiny_weights), img_size=(64, 64))
    assert report["max_abs_diff"] <= 1e-5 and len(report["checks"]) == 4
    program = torch.export.load(str(tmp_path / "tiny.pt2")).module()
    model = coatvit.create_model("coat_test", weights=str(tiny_weights)).eval()
    x = torch.randn(2, 3, 96, 160)
    with torch.no_grad():
        assert torch.allclose(program(x), model(x), atol=1e-5)


def _litert_environment():
    try:
        return export.litert_python()
    except export.ExportError as e:
        pytest.skip(f"LiteRT environment absent ({str(e).split(':')[0]}); it needs its own venv with torch 2.13.0 "
                    f"and litert-torch, see src/coatvit/litert.py")


@pytest.mark.slow
def test_tflite_export_matches_eager_in_the_litert_interpreter(tiny_weights, tmp_path):
    _litert_environment()
    report = export.export_model(model_name="coat_test", output=tmp_path / "tiny.tflite", fmt="tflite",
                                 weights=str(tiny_weights), img_size=(64, 64))
    assert (tmp_path / "tiny.tflite").stat().st_size > 10_000
    assert report["checks"][0]["height"] == 64 and report["max_abs_diff"] <= 1e-4


def test_tflite_without_its_environment_says_how_to_make_it(monkeypatch, tmp_path):
    monkeypatch.setenv(export.LITERT_PYTHON_ENV, str(tmp_path / "none" / "python"))
    with pytest.raises(export.ExportError, match="litert-torch needs torch < 2.14"):
        export.litert_python()
