"""eval and predict (coatvit.evaluate and the CLI): they must agree with the model's own forward."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import coatvit
from coatvit import cli
from coatvit.data import DataConfig, eval_transform
from coatvit.evaluate import evaluate, load_inference_model, predict
from coatvit.images import open_image

CLASSES = ["cat", "dog", "eel"]


@pytest.fixture
def weights(tmp_path):
    torch.manual_seed(0)
    model = coatvit.create_model("coat_test", num_classes=3).eval()
    path = coatvit.save_weights(model, tmp_path / "w.safetensors", class_names=CLASSES)
    return model, path


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    modes = ["RGB", "L", "RGBA", "P"]
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(4):
            arr = rng.integers(0, 255, (20 + 7 * i, 30 + 5 * c, 3), dtype=np.uint8)
            Image.fromarray(arr).convert(modes[i]).save(root / name / f"{i}.{'webp' if i == 3 else 'png'}")
    return root


def forward_probs(model, paths, size):
    tf = eval_transform(DataConfig(input_size=size, crop_pct=0.9))
    x = torch.stack([tf(open_image(p)) for p in paths])
    with torch.no_grad():
        return model(x).softmax(1)


def test_predict_agrees_with_forward(weights, folder):
    model, path = weights
    inf = load_inference_model(weights=str(path), img_size=(32, 32))
    assert inf.model_name == "coat_test" and inf.class_names == CLASSES
    paths = sorted(folder.rglob("*.*"))
    records, skipped = predict(inf, [folder], topk=2)
    assert not skipped and [r["path"] for r in records] == [str(p) for p in paths]
    probs = forward_probs(model, paths, (32, 32))
    for r, p in zip(records, probs):
        top = p.topk(2)
        assert [t["index"] for t in r["topk"]] == top.indices.tolist()
        assert [t["class"] for t in r["topk"]] == [CLASSES[i] for i in top.indices.tolist()]
        assert np.allclose([t["prob"] for t in r["topk"]], top.values.tolist(), atol=1e-6)


def test_eval_agrees_with_forward_and_writes_reports(weights, folder, tmp_path):
    model, path = weights
    inf = load_inference_model(weights=str(path), img_size=(32, 32))
    result = evaluate(inf, folder, batch_size=5, workers=0, per_class_csv=tmp_path / "pc.csv",
                      confusion_png=tmp_path / "cm.png", progress_enabled=False)
    paths = sorted(folder.rglob("*.*"))
    targets = torch.tensor([CLASSES.index(p.parent.name) for p in paths])
    tf = eval_transform(DataConfig(input_size=(32, 32), crop_pct=0.9))
    with torch.no_grad():
        logits = model(torch.stack([tf(open_image(p)) for p in paths]))
    assert result["images"] == 12 and result["skipped"] == 0
    assert result["top1"] == pytest.approx(100 * (logits.argmax(1) == targets).float().mean().item())
    assert result["top5"] == 100.0  # three classes
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-5)
    rows = list(csv.DictReader(open(tmp_path / "pc.csv")))
    assert [r["class"] for r in rows] == CLASSES and sum(int(r["correct"]) for r in rows) == round(
        result["top1"] * 12 / 100)
    assert (tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_eval_and_predict_formats(weights, folder, tmp_path, capsys):
    _, path = weights
    assert cli.main(["eval", "--data", str(folder), "--weights", str(path), "--img-size", "32", "--format",
                     "json", "-j", "0", "--crop-pct", "0.875"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"top1", "top5", "loss", "images"} <= set(out) and out["crop_pct"] == 0.875 and out["images"] == 12
    assert cli.main(["predict", str(folder / "cat"), "--weights", str(path), "--img-size", "32", "--format", "json",
                     "--topk", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(len(json.loads(line)["topk"]) == 3 for line in lines)
    assert cli.main(["predict", str(folder / "cat" / "0.png"), "--weights", str(path), "--img-size", "32",
                     "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "path,rank,class,index,prob"


def test_predict_skips_broken_files_and_handles_tiny_images(weights, tmp_path, capsys):
    _, path = weights
    Image.new("RGB", (1, 1), "white").save(tmp_path / "dot.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    assert cli.main(["predict", str(tmp_path / "dot.png"), str(tmp_path / "broken.jpg"), "--weights", str(path),
                     "--img-size", "32", "--format", "json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["path"].endswith("dot.png")
    assert "broken.jpg" in captured.err and "1 unreadable" in captured.err
    assert cli.main(["predict", str(tmp_path / "missing.png"), "--weights", str(path)]) == 2


def test_imagenet_names_and_architecture_checks(tmp_path, capsys):
    model = coatvit.create_model("coat_test", num_classes=1000)
    path = coatvit.save_weights(model, tmp_path / "in1k.safetensors")
    inf = load_inference_model(weights=str(path))
    assert len(inf.class_names) == 1000 and inf.class_names[0] == "tench"
    assert inf.data_config.input_size == (64, 64)  # coat_test's native size when the file carries none
    assert cli.main(["eval", "--data", str(tmp_path), "--weights", str(path), "--model", "coat_lite_tiny"]) == 2
    assert "holds a coat_test model" in capsys.readouterr().err


def test_training_checkpoint_carries_names_and_preprocessing(tmp_path):
    from coatvit.train import TrainConfig, train

    torch.set_num_threads(1)
    cfg = TrainConfig(model="coat_test", img_size=(40, 40), batch_size=16, epochs=1, builtin_train_size=32,
                      builtin_val_size=16, workers=0, threads=1, output=str(tmp_path), experiment="run",
                      model_ema=True, curves=False, log_interval=1000)
    result = train(cfg, argv=["test"])
    inf = load_inference_model(weights=f"{result['run_dir']}/last.pth")
    assert inf.class_names[:2] == ["disk", "ring"] and inf.data_config.input_size == (40, 40)
    assert inf.data_config.crop_pct == 1.0
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(inf.model(x), result["model"].eval()(x))
        ema = load_inference_model(weights=f"{result['run_dir']}/last.pth", use_ema=True)
        assert torch.equal(ema.model(x), result["ema"](x))
