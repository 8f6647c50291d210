"""Semantic segmentation: the Semantic-FPN head on CoaT, mIoU, data folders, run directory and mask PNGs."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import coatvit
from coatvit import segmentation
from coatvit.cli import main


def test_training_step_gives_finite_loss_and_backbone_gradients():
    torch.manual_seed(0)
    model = segmentation.build_segmenter("coat_test", num_classes=4).train()
    data = segmentation.SyntheticSegmentation("train", length=2, size=64)
    x = torch.stack([data[0][0], data[1][0]])
    y = torch.stack([data[0][1], data[1][1]])
    logits = model(x)
    assert logits.shape == (2, 4, 64, 64)
    loss = F.cross_entropy(logits, y, ignore_index=segmentation.IGNORE_INDEX)
    assert torch.isfinite(loss)
    loss.backward()
    for name in ("patch_embed1.proj.weight", "serial_blocks4.0.mlp.fc1.weight",
                 "parallel_blocks.0.factoratt_crpe3.qkv.weight"):
        grad = model.body.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_any_input_size_gives_logits_at_input_resolution():
    model = segmentation.build_segmenter("coat_test", num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 70, 97)).shape == (1, 3, 70, 97)


def test_backbone_from_classification_checkpoint_keeps_its_weights(tmp_path):
    torch.manual_seed(2)
    classifier = coatvit.create_model("coat_test")
    path = coatvit.save_weights(classifier, tmp_path / "cls.pth")
    model = segmentation.build_segmenter("coat_test", num_classes=4, weights=str(path))
    reference = classifier.state_dict()
    for key, value in model.body.state_dict().items():
        assert torch.equal(value, reference[key]), key


def test_miou_from_a_known_confusion_matrix():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    conf = segmentation.confusion_matrix(pred, target, 3)
    assert conf.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    m = segmentation.iou_metrics(conf, ["bg", "a", "b"])
    # IoU: bg 1/(2+2-1)=1/3, a 2/(3+2-2)=2/3, b 1/(1+2-1)=1/2; ignored pixels left out
    assert m["miou"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert m["pixel_acc"] == pytest.approx(100 * 4 / 6)
    assert m["iou"] == {"bg": pytest.approx(33.33, abs=0.01), "a": pytest.approx(66.67, abs=0.01), "b": 50.0}
    perfect = segmentation.iou_metrics(segmentation.confusion_matrix(target.clamp(max=2), target.clamp(max=2), 3))
    assert perfect["miou"] == 100.0


def _write_folder(root, split, n, size=40, num_classes=3, bad_label=None):
    (root / split / "images").mkdir(parents=True)
    (root / split / "masks").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)).save(root / split / "images" /
                                                                                        f"{i}.jpg")
        mask = rng.integers(0, num_classes, (size, size + 8)).astype(np.uint8)
        if bad_label is not None:
            mask[0, 0] = bad_label
        Image.fromarray(mask).save(root / split / "masks" / f"{i}.png")


def test_mask_folder_crops_pads_with_ignore_and_checks_labels(tmp_path):
    _write_folder(tmp_path, "train", 2)
    data = segmentation.MaskFolder(tmp_path, "train", size=64, num_classes=3, train=True)
    x, y = data[0]
    assert x.shape == (3, 64, 64) and y.shape == (64, 64)
    assert set(torch.unique(y).tolist()) <= {0, 1, 2, segmentation.IGNORE_INDEX}
    val = segmentation.MaskFolder(tmp_path, "train", size=32, num_classes=3, train=False)
    assert val[1][1].shape == (32, 38)  # short side to 32, aspect kept
    _write_folder(tmp_path / "bad", "val", 1, bad_label=7)
    with pytest.raises(coatvit.DataError, match="label 7"):
        segmentation.MaskFolder(tmp_path / "bad", "val", size=32, num_classes=3, train=False)[0]
    with pytest.raises(coatvit.DataError, match="images/ and masks/"):
        segmentation.MaskFolder(tmp_path, "val", size=32, num_classes=3, train=False)


def test_train_eval_predict_run_directory(tmp_path, capsys):
    cfg = segmentation.SegmentationConfig(model="coat_test", output=str(tmp_path / "run"), synthetic_train=4,
                                          synthetic_val=2, size=64, epochs=1, batch_size=2, device="cpu")
    result = segmentation.train_segmenter(cfg, argv=["test"], show_progress=False)
    run = tmp_path / "run"
    with open(run / "summary.csv") as f:
        row = next(csv.DictReader(f))
    assert float(row["miou"]) == pytest.approx(result["miou"]) and 0 <= result["miou"] <= 100
    assert main(["segment", "eval", str(run / "model.pth"), "--synthetic-val", "2", "--format", "json",
                 "--device", "cpu"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["miou"] == pytest.approx(result["miou"], abs=1e-3)

    assert main(["segment", "predict", str(run / "model.pth"), "--output", str(tmp_path / "out"),
                 "--format", "json", "--device", "cpu"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(records) == 4  # the synthetic examples written when no image is given
    mask = Image.open(records[0]["mask_png"])
    assert mask.mode == "P" and mask.size == Image.open(records[0]["image"]).size
    assert np.asarray(mask).max() < 4
    assert Image.open(records[0]["overlay_png"]).mode == "RGB"


def test_cli_data_without_num_classes_is_exit_2(tmp_path, capsys):
    code = main(["segment", "train", "--data", str(tmp_path), "--model", "coat_test"])
    assert code == 2 and "--num-classes is required" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--size", "8"], "size must be at least 32 px"), (["--num-classes", "0"], "num_classes must be at least 2"),
])
def test_cli_impossible_settings_are_one_line_and_exit_2(tmp_path, capsys, args, message):
    code = main(["segment", "train", "--model", "coat_test", "--output", str(tmp_path / "run"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "run").exists()
