"""Detection / instance segmentation on the CoaT + FPN backbone: model wiring, data, COCO metrics, run directory."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import coatvit
from coatvit import detection
from coatvit.cli import main

TINY_HEADS = dict(detection.SMALL_IMAGE_HEADS, box_batch_size_per_image=32, rpn_post_nms_top_n_train=100)


def tiny_detector(kind: str = "mask_rcnn", weights=None):
    torch.manual_seed(0)
    model = detection.build_detector("coat_test", detector=kind, num_classes=3, weights=weights, min_size=64,
                                     max_size=64, heads=TINY_HEADS)
    detection.scale_anchors(model, 64 / 512)
    return model


def test_backbone_from_classification_checkpoint_keeps_its_weights(tmp_path):
    torch.manual_seed(1)
    classifier = coatvit.create_model("coat_test")
    path = coatvit.save_weights(classifier, tmp_path / "cls.safetensors")
    backbone = detection.build_backbone("coat_test", weights=str(path))
    body = backbone.body.state_dict()
    reference = classifier.state_dict()
    assert body, "the backbone has no parameters"
    for key, value in body.items():
        assert torch.equal(value, reference[key]), key
    assert not any(k.startswith(("head.", "norm", "aggregate")) for k in body)
    assert backbone.fpn.inner_blocks[0][0].in_channels == classifier.config.embed_dims[0]
    pyramid = backbone(torch.randn(1, 3, 64, 96))
    assert list(pyramid) == ["0", "1", "2", "3", "pool"]
    assert [tuple(p.shape[1:]) for p in pyramid.values()] == [(256, 16, 24), (256, 8, 12), (256, 4, 6), (256, 2, 3),
                                                               (256, 1, 2)]


def test_mask_rcnn_training_step_gives_finite_losses_and_backbone_gradients():
    model = tiny_detector("mask_rcnn").train()
    data = detection.SyntheticShapes("train", length=2, size=64)
    images, targets = detection.collate([data[0], data[1]])
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    body = model.backbone.body
    for name in ("patch_embed1.proj.weight", "serial_blocks1.0.factoratt_crpe.qkv.weight",
                 "parallel_blocks.0.factoratt_crpe2.qkv.weight"):
        grad = body.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_synthetic_shapes_are_deterministic_and_cover_three_object_sizes():
    data = detection.SyntheticShapes("val", length=24, size=128)
    image, target = data[3]
    again, target2 = data[3]
    assert torch.equal(image, again) and torch.equal(target["boxes"], target2["boxes"])
    areas = []
    for i in range(len(data)):
        image, t = data[i]
        assert image.shape == (3, 128, 128) and 0 <= image.min() and image.max() <= 1
        assert len(t["boxes"]) == len(t["labels"]) == len(t["masks"]) >= 1
        for box, mask in zip(t["boxes"], t["masks"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
            areas.append(int(mask.sum()))
        assert set(t["labels"].tolist()) <= {1, 2, 3}
    # COCO's area ranges: small < 32^2 <= medium < 96^2 <= large (at 128 px: small and medium, large is rare)
    assert min(areas) < 32**2 and any(32**2 <= a < 96**2 for a in areas)
    train_image = detection.SyntheticShapes("train", 1, 64)[0][0]
    assert not torch.equal(train_image, detection.SyntheticShapes("val", 1, 64)[0][0])


def _perfect_results(dataset):
    out_boxes, out_segm = [], []
    for i in range(len(dataset)):
        _, t = dataset[i]
        o = {"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"])),
             "masks": t["masks"][:, None].float()}
        b, s = detection.coco_results([(i, o)], dataset, with_masks=True)
        out_boxes += b
        out_segm += s
    return out_boxes, out_segm


def test_coco_eval_scores_ground_truth_100_and_shifted_boxes_lower():
    data = detection.SyntheticShapes("val", length=6, size=64)
    gt = data.coco_ground_truth()
    boxes, segms = _perfect_results(data)
    assert detection.coco_eval(gt, boxes, "bbox", range(6))["ap"] == pytest.approx(100.0)
    assert detection.coco_eval(gt, segms, "segm", range(6))["ap"] == pytest.approx(100.0)
    shifted = [{**b, "bbox": [b["bbox"][0] + b["bbox"][2] * 0.4, *b["bbox"][1:]]} for b in boxes]
    assert detection.coco_eval(gt, shifted, "bbox", range(6))["ap"] < 60.0
    assert detection.coco_eval(gt, [], "bbox", range(6))["ap"] == 0.0


def test_evaluate_detector_returns_coco_box_and_mask_metrics():
    model = tiny_detector("mask_rcnn").eval()
    metrics = detection.evaluate_detector(model, detection.SyntheticShapes("val", length=2, size=64),
                                          device=torch.device("cpu"), batch_size=2)
    for key in ("bbox_ap", "bbox_ap50", "bbox_ap75", "segm_ap", "segm_ap50"):
        assert 0.0 <= metrics[key] <= 100.0, key
    assert metrics["images"] == 2


def _write_coco(root, dataset, split, category_ids):
    folder = root / split
    folder.mkdir(parents=True)
    images, annotations = [], []
    for i in range(len(dataset)):
        image, objects = detection.render_synthetic(i, split=dataset.split, size=dataset.size)
        image.save(folder / f"{i:04d}.png")
        images.append({"id": 100 + i, "file_name": f"{i:04d}.png", "width": dataset.size, "height": dataset.size})
        for o in objects:
            x0, y0, x1, y1 = o["box"]
            annotations.append({"id": len(annotations) + 1, "image_id": 100 + i,
                                "category_id": category_ids[o["label"] - 1], "bbox": [x0, y0, x1 - x0, y1 - y0],
                                "area": float(o["mask"].sum()), "iscrowd": 0,
                                "segmentation": detection._rle(o["mask"])})
    cats = [{"id": c, "name": n} for c, n in zip(category_ids, detection.SYNTHETIC_CLASSES)]
    (root / f"{split}.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                    "categories": cats}))


def test_coco_folder_matches_the_synthetic_source_with_non_contiguous_category_ids(tmp_path):
    source = detection.SyntheticShapes("val", length=3, size=64)
    _write_coco(tmp_path, source, "val", [5, 9, 11])
    ann, folder = detection.find_coco_split(tmp_path, "val")
    coco = detection.CocoDetection(ann, folder)
    assert coco.class_names == list(detection.SYNTHETIC_CLASSES)
    for i in range(3):
        image, target = coco[i]
        ref_image, ref = source[i]
        assert torch.equal(image, ref_image)
        assert torch.equal(target["labels"], ref["labels"]) and torch.equal(target["masks"], ref["masks"])
        assert torch.allclose(target["boxes"], ref["boxes"])
        assert int(target["image_id"]) == 100 + i
    assert [coco.label_to_category(k) for k in (1, 2, 3)] == [5, 9, 11]
    with pytest.raises(coatvit.DataError, match="no train split"):
        detection.find_coco_split(tmp_path, "train")


def test_step_schedule_warms_up_then_drops_tenfold_at_each_milestone():
    lr = lambda s: detection.step_lr_at(s, base_lr=1e-4, milestones=[80, 110], warmup_steps=10)  # noqa: E731
    assert lr(0) == pytest.approx(1e-7)
    assert lr(5) < lr(10) == pytest.approx(1e-4)
    assert lr(79) == pytest.approx(1e-4) and lr(80) == pytest.approx(1e-5) and lr(110) == pytest.approx(1e-6)


def test_train_eval_predict_run_directory(tmp_path, capsys):
    cfg = detection.DetectionConfig(model="coat_test", output=str(tmp_path / "run"), synthetic_train=2,
                                    synthetic_val=2, synthetic_size=64, epochs=1, batch_size=2, warmup_steps=0,
                                    device="cpu")
    result = detection.train_detector(cfg, argv=["test"], show_progress=False)
    run = tmp_path / "run"
    with open(run / "summary.csv") as f:
        row = next(csv.DictReader(f))
    assert float(row["bbox_ap"]) == pytest.approx(result["bbox_ap"]) and "segm_ap" in row
    assert not math.isnan(float(row["segm_ap"]))
    for name in ("config.yaml", "command.txt", "env.json", "log.csv", "last.pth", "model.pth"):
        assert (run / name).is_file(), name
    model = detection.load_detector(run / "model.pth")
    assert model.class_names == list(detection.SYNTHETIC_CLASSES) and model.transform.min_size == (64,)
    assert main(["detect", "eval", str(run / "model.pth"), "--synthetic-val", "2", "--synthetic-size", "64",
                 "--format", "json", "--device", "cpu"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["bbox_ap"] == pytest.approx(result["bbox_ap"], abs=1e-3) and "segm_ap" in evaluated

    image = detection.write_synthetic_examples(tmp_path / "in", 1, size=64)[0]
    code = main(["detect", "predict", str(run / "model.pth"), str(image), "--output", str(tmp_path / "out"),
                 "--threshold", "0", "--format", "json", "--device", "cpu"])
    assert code == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    drawn = Image.open(record["png"])
    assert drawn.size == (64, 64) and drawn.format == "PNG"
    if record["detections"]:  # something was drawn over the input
        assert not np.array_equal(np.asarray(drawn.convert("RGB")), np.asarray(Image.open(image).convert("RGB")))


def test_cli_bad_data_folder_is_one_line_and_exit_2(tmp_path, capsys):
    code = main(["detect", "train", "--data", str(tmp_path / "missing"), "--model", "coat_test",
                 "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "is not a folder" in err
    code = main(["detect", "eval", str(tmp_path / "nothing.pth")])
    assert code == 2 and "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--train-sizes", "64", "16"], "train_sizes must be at least 32 px"),
    (["--test-size", "10"], "test_size must be at least 32 px"),
    (["--max-size", "0"], "max_size must be at least 32 px"),
    (["--synthetic-size", "8"], "synthetic_size must be at least 64 px"),
    (["--clip-grad", "-1"], "clip_grad must be >= 0"),
])
def test_cli_impossible_sizes_are_one_line_and_exit_2(tmp_path, capsys, args, message):
    # each of these ran into a traceback (a resize to 0 px) or ran silently with a meaningless setting
    code = main(["detect", "train", "--model", "coat_test", "--output", str(tmp_path / "run"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "run").exists()
