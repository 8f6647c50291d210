"""Object detection and instance segmentation with a CoaT backbone: torchvision's Faster R-CNN / Mask R-CNN on a
CoaT + FPN pyramid (strides 4-32 into a 256-channel FPN, P2-P6), COCO-format data or a built-in synthetic set,
training with the authors' recipe (AdamW 1e-4, wd 0.05, 1x/3x step schedules, multi-scale short side 480-800),
COCO box/mask AP through pycocotools, and predictions drawn on PNGs.

The training loop reuses the classification engine's pieces from `train.py`: parameter groups, checkpoints,
run directory, CSV log and progress lines.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from .errors import ConfigError, DataError
from .registry import get_config

DETECTORS = ("faster_rcnn", "mask_rcnn")
# The authors' schedules (coat-spec section 6): epochs and the epochs after which the lr drops 10x.
SCHEDULES = {"1x": (12, (8, 11)), "3x": (36, (27, 33))}
COCO_TRAIN_SIZES = tuple(range(480, 801, 32))  # multi-scale short side, the long side capped at 1333
COCO_MAX_SIZE = 1333
COCO_TEST_SIZE = 800
FPN_CHANNELS = 256
# Proposal and RoI budgets for small images with few objects (the synthetic set, tests): torchvision's COCO
# defaults (2000 proposals, 512 sampled RoIs, 100 detections per image) cost most of a CPU step at 128 px.
SMALL_IMAGE_HEADS = dict(rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300, rpn_pre_nms_top_n_test=300,
                         rpn_post_nms_top_n_test=150, box_batch_size_per_image=64, box_detections_per_img=30)


# ------------------------------------------------------------------------------------------------------------
# the model: CoaT pyramid -> FPN -> torchvision detector


class CoaTFPN(nn.Module):
    """A features_only CoaT and an FPN over its four maps (strides 4-32), plus a max-pooled P6.

    Returns an ordered dict '0'..'3' (P2-P5) and 'pool' (P6), each with `out_channels` channels, which is the
    interface torchvision's detectors expect of a backbone.
    """

    def __init__(self, body: nn.Module, out_channels: int = FPN_CHANNELS):
        super().__init__()
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

        if not getattr(body, "features_only", False) or len(body.feature_info) != 4:
            raise ValueError("CoaTFPN needs a CoaT built with features_only=True and out_indices=(0, 1, 2, 3)")
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.feature_info.channels(), out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = self.body(x)  # 4 x (B, C_i, H / 2^(i+2), W / 2^(i+2))
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))


def build_backbone(model_name: str, *, weights: str | None = None, pretrained: bool = False,
                   drop_path_rate: float | None = None) -> CoaTFPN:
    """CoaT + FPN; `weights` may be any classification checkpoint `load_weights` accepts (its head is dropped)."""
    from .registry import create_model

    body = create_model(model_name, weights=weights, pretrained=pretrained, features_only=True,
                        out_indices=(0, 1, 2, 3), drop_path_rate=drop_path_rate)
    return CoaTFPN(body)


def build_detector(model_name: str, *, detector: str = "mask_rcnn", num_classes: int, weights: str | None = None,
                   pretrained: bool = False, min_size: int | Sequence[int] = COCO_TEST_SIZE,
                   max_size: int = COCO_MAX_SIZE, drop_path_rate: float | None = None,
                   mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
                   heads: Mapping[str, int] | None = None) -> nn.Module:
    """A torchvision Faster R-CNN or Mask R-CNN on a CoaT + FPN backbone.

    Args:
        model_name: any CoaT variant.
        detector: 'faster_rcnn' or 'mask_rcnn'.
        num_classes: object classes, background excluded.
        weights: a classification checkpoint for the backbone (head and final norms dropped), or None.
        pretrained: start the backbone from the released ImageNet weights.
        min_size: the short side images are resized to (a tuple: one drawn per training batch).
        max_size: the cap on the long side.
        mean: normalisation mean of the backbone's pretraining; std likewise.
        heads: torchvision detector options for proposal / RoI budgets (e.g. `SMALL_IMAGE_HEADS`).
    """
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    if detector not in DETECTORS:
        raise ConfigError(f"detector must be one of {', '.join(DETECTORS)}, got {detector!r}")
    if num_classes < 1:
        raise ConfigError(f"num_classes must be at least 1 (background excluded), got {num_classes}")
    backbone = build_backbone(model_name, weights=weights, pretrained=pretrained, drop_path_rate=drop_path_rate)
    # One anchor size per level P2-P6 (32-512 px at COCO scale), three aspect ratios: the FPN paper's setting.
    anchors = AnchorGenerator(sizes=((32,), (64,), (128,), (256,), (512,)), aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    box_roi = MultiScaleRoIAlign(featmap_names=["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
    common = dict(num_classes=num_classes + 1, min_size=min_size, max_size=max_size, image_mean=list(mean),
                  image_std=list(std), rpn_anchor_generator=anchors, box_roi_pool=box_roi, **dict(heads or {}))
    if detector == "faster_rcnn":
        model = FasterRCNN(backbone, **common)
    else:
        mask_roi = MultiScaleRoIAlign(featmap_names=["0", "1", "2", "3"], output_size=14, sampling_ratio=2)
        model = MaskRCNN(backbone, mask_roi_pool=mask_roi, **common)
    model.model_name = model_name
    model.detector = detector
    return model


def scale_anchors(model: nn.Module, scale: float) -> None:
    """Scales the anchor sizes (COCO's 32-512 px) for images much smaller than COCO's, e.g. the synthetic set."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    sizes = tuple((max(4, int(round(32 * 2**i * scale))),) for i in range(5))
    model.rpn.anchor_generator = AnchorGenerator(sizes=sizes, aspect_ratios=((0.5, 1.0, 2.0),) * 5)


# ------------------------------------------------------------------------------------------------------------
# data: a target is {'boxes' (N, 4) xyxy, 'labels' (N,) 1..K, 'masks' (N, H, W) uint8, 'image_id' int}


SYNTHETIC_CLASSES = ("circle", "square", "triangle")
SYNTHETIC_IMAGE_SIZE = 128
MIN_SYNTHETIC_SIDE = 64  # the built-in set's training sizes start at 3/4 of its side, rounded down to 16
# Object sizes (px of the bounding square at 128 px; they scale with the image): small / medium / large.
SYNTHETIC_OBJECT_SIZES = ((10, 18), (20, 40), (44, 72))


def _draw_shape(draw: ImageDraw.ImageDraw, kind: int, cx: float, cy: float, r: float, angle: float, fill) -> None:
    if kind == 0:
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        n = 4 if kind == 1 else 3
        pts = [(cx + r * math.cos(angle + 2 * math.pi * k / n), cy + r * math.sin(angle + 2 * math.pi * k / n))
               for k in range(n)]
        draw.polygon(pts, fill=fill)


def render_synthetic(index: int, *, split: str, size: int = SYNTHETIC_IMAGE_SIZE, seed: int = 0
                     ) -> tuple[Image.Image, list[dict[str, Any]]]:
    """One synthetic image (deterministic in split, index and seed) and its objects.

    Circles, squares and triangles of random colour, rotation and size (small, medium and large) on a noisy
    background; later shapes occlude earlier ones, and masks and boxes are of the visible part.

    Returns:
        (RGB image, [{'label': 1..3, 'mask': (size, size) bool array, 'box': [x0, y0, x1, y1]}, ...]).
    """
    rng = np.random.default_rng([seed, {"train": 0, "val": 1}.get(split, 2), index])
    bg = rng.integers(0, 256, 3)
    pixels = np.clip(bg + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    masks: list[np.ndarray] = []
    labels: list[int] = []
    for _ in range(int(rng.integers(1, 5))):
        kind = int(rng.integers(0, 3))
        lo, hi = SYNTHETIC_OBJECT_SIZES[int(rng.integers(0, 3))]
        r = float(rng.uniform(lo, hi)) / 2 * size / SYNTHETIC_IMAGE_SIZE
        cx, cy = rng.uniform(r, size - r, 2)
        angle = float(rng.uniform(0, 2 * math.pi))
        colour = rng.integers(0, 256, 3)
        while np.abs(colour - bg).sum() < 120:  # keep every shape visible against the background
            colour = rng.integers(0, 256, 3)
        _draw_shape(draw, kind, cx, cy, r, angle, tuple(int(c) for c in colour))
        layer = Image.new("L", (size, size), 0)
        _draw_shape(ImageDraw.Draw(layer), kind, cx, cy, r, angle, 255)
        mask = np.asarray(layer) > 0
        masks = [m & ~mask for m in masks]
        masks.append(mask)
        labels.append(kind + 1)
    objects = []
    for mask, label in zip(masks, labels):
        if mask.sum() < 12:  # hidden (almost) entirely behind later shapes
            continue
        ys, xs = np.nonzero(mask)
        objects.append({"label": label, "mask": mask,
                        "box": [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]})
    return image, objects


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0


def _target(objects: list[dict[str, Any]], image_id: int, hw: tuple[int, int]) -> dict[str, torch.Tensor]:
    h, w = hw
    if objects:
        boxes = torch.tensor([o["box"] for o in objects], dtype=torch.float32)
        masks = torch.from_numpy(np.stack([o["mask"] for o in objects]).astype(np.uint8))
    else:
        boxes, masks = torch.zeros(0, 4), torch.zeros(0, h, w, dtype=torch.uint8)
    return {"boxes": boxes, "labels": torch.tensor([o["label"] for o in objects], dtype=torch.int64),
            "masks": masks, "image_id": torch.tensor(image_id)}


class SyntheticShapes(torch.utils.data.Dataset):
    """The built-in detection set: `length` synthetic images of one split (see `render_synthetic`)."""

    def __init__(self, split: str = "train", length: int = 512, size: int = SYNTHETIC_IMAGE_SIZE, seed: int = 0):
        self.split, self.length, self.size, self.seed = split, length, size, seed
        self.class_names = list(SYNTHETIC_CLASSES)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image, objects = render_synthetic(i, split=self.split, size=self.size, seed=self.seed)
        return _to_tensor(image), _target(objects, i, (self.size, self.size))

    def coco_categories(self) -> list[dict[str, Any]]:
        return [{"id": k + 1, "name": n} for k, n in enumerate(self.class_names)]

    def label_to_category(self, label: int) -> int:
        return int(label)

    def coco_ground_truth(self):
        """The split as an in-memory pycocotools COCO object (areas and RLE masks of the visible parts)."""
        from pycocotools import mask as mask_utils

        images, annotations = [], []
        for i in range(self.length):
            _, objects = render_synthetic(i, split=self.split, size=self.size, seed=self.seed)
            images.append({"id": i, "width": self.size, "height": self.size})
            for o in objects:
                rle = mask_utils.encode(np.asfortranarray(o["mask"].astype(np.uint8)))
                rle["counts"] = rle["counts"].decode("ascii")
                x0, y0, x1, y1 = o["box"]
                annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": o["label"],
                                    "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(o["mask"].sum()),
                                    "segmentation": rle, "iscrowd": 0})
        return _coco_from_dict({"images": images, "annotations": annotations, "categories": self.coco_categories()})


def _coco_from_dict(data: Mapping[str, Any]):
    import contextlib
    import io

    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dict(data)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    return coco


def find_coco_split(root: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """(annotation JSON, image folder) of a split in a COCO-format folder.

    Accepted layouts: `annotations/instances_<split>*.json` with images in `<split>*/` (COCO's own, e.g.
    instances_val2017.json and val2017/), or `<split>.json` with images in `<split>/`.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--data {root} is not a folder; expected a COCO-format folder (annotations + images)")
    for ann in sorted((root / "annotations").glob(f"instances_{split}*.json")):
        folder = root / ann.stem.removeprefix("instances_")
        if folder.is_dir():
            return ann, folder
    ann, folder = root / f"{split}.json", root / split
    if ann.is_file() and folder.is_dir():
        return ann, folder
    raise DataError(f"{root} has no {split} split: expected annotations/instances_{split}*.json with a matching "
                    f"{split}*/ image folder, or {split}.json with a {split}/ folder")


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format split: images plus boxes, labels and masks (polygons, RLE) from the annotation JSON.

    Category ids map to contiguous labels 1..K in the order of the JSON's `categories`; crowd annotations are
    left out of training targets (COCOeval still reads them from the JSON).
    """

    def __init__(self, annotation_file: str | os.PathLike, image_folder: str | os.PathLike, *,
                 with_masks: bool = True, categories: Sequence[Mapping[str, Any]] | None = None):
        import contextlib
        import io

        from pycocotools.coco import COCO

        self.annotation_file, self.image_folder, self.with_masks = Path(annotation_file), Path(image_folder), with_masks
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                self.coco = COCO(str(annotation_file))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AssertionError) as e:
            raise DataError(f"{annotation_file} is not a COCO annotation file ({type(e).__name__}: {e}); "
                            f"expected 'images', 'annotations' and 'categories'") from None
        cats = list(categories) if categories is not None else sorted(self.coco.loadCats(self.coco.getCatIds()),
                                                                      key=lambda c: c["id"])
        if not cats:
            raise DataError(f"{annotation_file} has no categories")
        self.categories = [{"id": int(c["id"]), "name": str(c["name"])} for c in cats]
        self.class_names = [c["name"] for c in self.categories]
        self._cat_to_label = {c["id"]: k + 1 for k, c in enumerate(self.categories)}
        self.ids = sorted(self.coco.getImgIds())
        if not self.ids:
            raise DataError(f"{annotation_file} lists no images")

    def __len__(self) -> int:
        return len(self.ids)

    def coco_categories(self) -> list[dict[str, Any]]:
        return list(self.categories)

    def label_to_category(self, label: int) -> int:
        return self.categories[int(label) - 1]["id"]

    def coco_ground_truth(self):
        return self.coco

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from .images import open_image

        image_id = self.ids[i]
        info = self.coco.loadImgs(image_id)[0]
        image = open_image(self.image_folder / info["file_name"])
        w, h = image.size
        objects = []
        for ann in self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id, iscrowd=False)):
            x, y, bw, bh = ann["bbox"]
            if bw < 1 or bh < 1 or ann["category_id"] not in self._cat_to_label:
                continue
            obj = {"label": self._cat_to_label[ann["category_id"]], "box": [x, y, x + bw, y + bh]}
            if self.with_masks:
                obj["mask"] = self.coco.annToMask(ann).astype(bool) if ann.get("segmentation") else \
                    _box_mask((h, w), obj["box"])
            else:
                obj["mask"] = np.zeros((0, 0), bool)
            objects.append(obj)
        target = _target(objects, image_id, (h, w)) if self.with_masks else _target_no_masks(objects, image_id)
        return _to_tensor(image), target


def _box_mask(hw: tuple[int, int], box: Sequence[float]) -> np.ndarray:
    mask = np.zeros(hw, bool)
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    mask[y0:y1, x0:x1] = True
    return mask


def _target_no_masks(objects: list[dict[str, Any]], image_id: int) -> dict[str, torch.Tensor]:
    boxes = torch.tensor([o["box"] for o in objects], dtype=torch.float32) if objects else torch.zeros(0, 4)
    return {"boxes": boxes, "labels": torch.tensor([o["label"] for o in objects], dtype=torch.int64),
            "image_id": torch.tensor(image_id)}


def collate(batch: list) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Detection batches are lists: images differ in size (the detector resizes and pads them itself)."""
    return [b[0] for b in batch], [b[1] for b in batch]


class HorizontalFlip(torch.utils.data.Dataset):
    """Random horizontal flip of image, boxes and masks (p = 0.5), the detection recipe's only photometric-free
    augmentation besides multi-scale resizing."""

    def __init__(self, base: torch.utils.data.Dataset, seed: int = 0):
        self.base, self.seed, self.epoch = base, seed, 0

    def __len__(self) -> int:
        return len(self.base)

    def __getattr__(self, name: str):
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def __getitem__(self, i: int):
        image, target = self.base[i]
        if np.random.default_rng([self.seed, self.epoch, i]).random() < 0.5:
            w = image.shape[-1]
            image = image.flip(-1)
            target = dict(target)
            boxes = target["boxes"].clone()
            boxes[:, [0, 2]] = w - target["boxes"][:, [2, 0]]
            target["boxes"] = boxes
            if "masks" in target and target["masks"].numel():
                target["masks"] = target["masks"].flip(-1)
        return image, target


# ------------------------------------------------------------------------------------------------------------
# evaluation: COCO AP through pycocotools


def _rle(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


@torch.no_grad()
def predict_batches(model: nn.Module, loader: Iterable, *, device: torch.device, show_progress: bool = False
                    ) -> list[tuple[int, dict[str, torch.Tensor]]]:
    """(image_id, output) pairs of a detector over a loader (outputs moved to the CPU)."""
    from .train import progress

    model.eval()
    out = []
    total = len(loader) if hasattr(loader, "__len__") else None
    for images, targets in progress(loader, total=total, desc="eval", enabled=show_progress, every=20):
        outputs = model([im.to(device) for im in images])
        for t, o in zip(targets, outputs):
            out.append((int(t["image_id"]), {k: v.cpu() for k, v in o.items()}))
    return out


def coco_results(predictions: list[tuple[int, dict[str, torch.Tensor]]], dataset, *, with_masks: bool
                 ) -> tuple[list[dict], list[dict]]:
    """Detector outputs as COCO result lists (boxes xywh; masks thresholded at 0.5, as RLE)."""
    boxes_out, segm_out = [], []
    for image_id, o in predictions:
        for k in range(len(o["scores"])):
            x0, y0, x1, y1 = (float(v) for v in o["boxes"][k])
            rec = {"image_id": image_id, "category_id": dataset.label_to_category(int(o["labels"][k])),
                   "score": float(o["scores"][k])}
            boxes_out.append({**rec, "bbox": [x0, y0, x1 - x0, y1 - y0]})
            if with_masks and "masks" in o:
                segm_out.append({**rec, "segmentation": _rle(o["masks"][k, 0].numpy() > 0.5)})
    return boxes_out, segm_out


COCO_STAT_NAMES = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")


def coco_eval(ground_truth, results: list[dict], iou_type: str, image_ids: Sequence[int]) -> dict[str, float]:
    """COCO AP of `results` (percentages): ap, ap50, ap75, ap_small/medium/large. No detections give zeros."""
    import contextlib
    import io

    from pycocotools.cocoeval import COCOeval

    if not results:
        return {name: 0.0 for name in COCO_STAT_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):
        dt = ground_truth.loadRes(results)
        ev = COCOeval(ground_truth, dt, iou_type)
        ev.params.imgIds = list(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # COCOeval reports -1 for an area range without ground truth; keep that visible as NaN, not as a score.
    return {name: (float(v) * 100 if v >= 0 else float("nan")) for name, v in zip(COCO_STAT_NAMES, ev.stats[:6])}


def evaluate_detector(model: nn.Module, dataset, *, device: torch.device, batch_size: int = 4, num_workers: int = 0,
                      show_progress: bool = False) -> dict[str, float]:
    """COCO box AP (and mask AP for Mask R-CNN) of `model` on `dataset`, as percentages.

    Returns:
        {'bbox_ap', 'bbox_ap50', 'bbox_ap75', 'bbox_ap_small', ..., and 'segm_*' for Mask R-CNN, 'images'}.
    """
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         collate_fn=collate)
    predictions = predict_batches(model, loader, device=device, show_progress=show_progress)
    with_masks = getattr(model, "detector", "") == "mask_rcnn"
    boxes, segms = coco_results(predictions, dataset, with_masks=with_masks)
    gt = dataset.coco_ground_truth()
    ids = [i for i, _ in predictions]
    metrics = {f"bbox_{k}": v for k, v in coco_eval(gt, boxes, "bbox", ids).items()}
    if with_masks:
        metrics.update({f"segm_{k}": v for k, v in coco_eval(gt, segms, "segm", ids).items()})
    metrics["images"] = len(ids)
    return metrics


# ------------------------------------------------------------------------------------------------------------
# training


@dataclass(frozen=True)
class DetectionConfig:
    """A detection training run. `None` sizes are derived: COCO's recipe for real data, the synthetic image size
    (multi-scale +-25%) for the built-in set.

    Attributes:
        model: CoaT variant of the backbone.
        detector: 'mask_rcnn' or 'faster_rcnn'.
        data: COCO-format folder (see `find_coco_split`); None uses the built-in synthetic shapes.
        output: run directory.
        weights: classification checkpoint for the backbone; pretrained: the released ImageNet weights instead.
        schedule: '1x' (12 epochs, lr x0.1 after 8 and 11) or '3x' (36; 27, 33).
        epochs: overrides the schedule's length; the lr steps keep their relative positions.
        max_steps: stop after this many optimizer steps (short runs and tests); 0 = no limit.
        lr, weight_decay, warmup_steps: AdamW settings (the authors': 1e-4, 0.05, 500 linear warmup steps).
        train_sizes: short sides drawn per batch; max_size: long side cap; test_size: evaluation short side.
        synthetic_train, synthetic_val, synthetic_size: the built-in set's images per split and image side.
    """

    model: str = "coat_lite_tiny"
    detector: str = "mask_rcnn"
    data: str | None = None
    output: str = "runs/detect"
    weights: str | None = None
    pretrained: bool = False
    schedule: str = "1x"
    epochs: int | None = None
    max_steps: int = 0
    batch_size: int = 2
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_steps: int = 500
    clip_grad: float = 0.0
    drop_path_rate: float = 0.1
    train_sizes: tuple[int, ...] | None = None
    max_size: int | None = None
    test_size: int | None = None
    synthetic_train: int = 512
    synthetic_val: int = 64
    synthetic_size: int = SYNTHETIC_IMAGE_SIZE
    eval_every: int = 1
    num_workers: int = 0
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.detector not in DETECTORS:
            raise ConfigError(f"detector must be one of {', '.join(DETECTORS)}, got {self.detector!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.weights is not None and self.pretrained:
            raise ConfigError("pass either --weights or --pretrained for the backbone, not both")
        for name in ("batch_size", "synthetic_train", "synthetic_val", "synthetic_size", "eval_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"epochs must be at least 1, got {self.epochs}")
        if self.lr <= 0 or self.weight_decay < 0 or self.max_steps < 0 or self.warmup_steps < 0:
            raise ConfigError("lr must be positive; weight_decay, max_steps and warmup_steps non-negative")
        if self.clip_grad < 0:
            raise ConfigError(f"clip_grad must be >= 0 (0: no clipping), got {self.clip_grad}")
        if self.train_sizes is not None:
            object.__setattr__(self, "train_sizes", tuple(int(s) for s in self.train_sizes))
        smallest = get_config(self.model).min_input_size  # the backbone's total stride
        sizes = {"train_sizes": min(self.train_sizes or [smallest]), "max_size": self.max_size,
                 "test_size": self.test_size}
        for name, size in sizes.items():
            if size is not None and size < smallest:
                raise ConfigError(f"{name} must be at least {smallest} px (the backbone's stride), got {size}")
        if self.synthetic_size < MIN_SYNTHETIC_SIDE:
            raise ConfigError(f"synthetic_size must be at least {MIN_SYNTHETIC_SIDE} px (its training sizes reach "
                              f"down to 3/4 of it), got {self.synthetic_size}")

    def resolved(self) -> "DetectionConfig":
        """The config with every derived size filled in (what the run directory records)."""
        if self.data is not None:
            sizes = self.train_sizes or COCO_TRAIN_SIZES
            return dataclasses.replace(self, train_sizes=sizes, max_size=self.max_size or COCO_MAX_SIZE,
                                       test_size=self.test_size or COCO_TEST_SIZE)
        s = self.synthetic_size
        sizes = self.train_sizes or tuple(range(int(s * 0.75) // 16 * 16, int(s * 1.25) + 1, 16))
        return dataclasses.replace(self, train_sizes=sizes, max_size=self.max_size or 2 * max(sizes),
                                   test_size=self.test_size or s)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["train_sizes"] = list(self.train_sizes) if self.train_sizes else None
        return out


def step_lr_at(step: int, *, base_lr: float, milestones: Sequence[int], warmup_steps: int = 0,
               warmup_ratio: float = 0.001, gamma: float = 0.1) -> float:
    """Learning rate after `step` updates: linear warmup from base_lr * warmup_ratio, then x gamma at each
    milestone (steps). The detection recipe's schedule, a pure function like `train.lr_at`."""
    lr = base_lr * gamma ** sum(step >= m for m in milestones)
    if step < warmup_steps:
        lr *= warmup_ratio + (1 - warmup_ratio) * step / warmup_steps
    return lr


def detection_datasets(cfg: DetectionConfig):
    """(train, val) datasets of a run."""
    if cfg.data is None:
        return (SyntheticShapes("train", cfg.synthetic_train, cfg.synthetic_size, cfg.seed),
                SyntheticShapes("val", cfg.synthetic_val, cfg.synthetic_size, cfg.seed))
    with_masks = cfg.detector == "mask_rcnn"
    train_ann, train_dir = find_coco_split(cfg.data, "train")
    val_ann, val_dir = find_coco_split(cfg.data, "val")
    train = CocoDetection(train_ann, train_dir, with_masks=with_masks)
    val = CocoDetection(val_ann, val_dir, with_masks=with_masks, categories=train.categories)
    return train, val


def _synthetic_anchor_scale(cfg: DetectionConfig) -> float | None:
    # COCO's anchors (32-512 px) at the synthetic set's scale: its largest objects are ~72 px in 128.
    return cfg.synthetic_size / 512 if cfg.data is None else None


def make_detector(meta: Mapping[str, Any], *, weights: str | None = None, pretrained: bool = False) -> nn.Module:
    """Builds the detector a run (or a checkpoint's 'detection' metadata) describes."""
    model = build_detector(meta["model"], detector=meta["detector"], num_classes=len(meta["class_names"]),
                           weights=weights, pretrained=pretrained, min_size=tuple(meta["train_sizes"]),
                           max_size=meta["max_size"], drop_path_rate=meta.get("drop_path_rate"),
                           heads=meta.get("heads"))
    if meta.get("anchor_scale"):
        scale_anchors(model, meta["anchor_scale"])
    model.class_names = list(meta["class_names"])
    model.test_size = meta["test_size"]
    return model


def set_test_size(model: nn.Module, size: int) -> None:
    """Evaluation resizes the short side to one size (training draws from `train_sizes`)."""
    model.transform.min_size = (int(size),)


def train_detector(cfg: DetectionConfig, *, argv: Sequence[str] | None = None, show_progress: bool = True
                   ) -> dict[str, Any]:
    """Trains a detector, evaluating COCO AP after every `eval_every` epochs and at the end.

    The run directory gets config.yaml, command.txt, env.json (via `train.prepare_run_dir`), log.csv (one row per
    epoch), summary.csv (the final metrics: bbox_ap, and segm_ap for Mask R-CNN, as percentages), last.pth
    (model, optimizer, epoch) and model.pth (the detector alone, with its metadata).

    Returns:
        the final metrics plus 'run_dir', 'epochs', 'steps' and 'seconds'.
    """
    from .train import (append_csv, log, param_groups, prepare_run_dir, progress, resolve_device, save_checkpoint,
                        seed_everything)

    cfg = cfg.resolved()
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    train_set, val_set = detection_datasets(cfg)
    run_dir = prepare_run_dir(cfg.output, config=cfg.to_dict(), argv=argv)
    meta = {"model": cfg.model, "detector": cfg.detector, "class_names": list(train_set.class_names),
            "train_sizes": list(cfg.train_sizes), "max_size": cfg.max_size, "test_size": cfg.test_size,
            "drop_path_rate": cfg.drop_path_rate, "anchor_scale": _synthetic_anchor_scale(cfg),
            "heads": SMALL_IMAGE_HEADS if cfg.data is None else None,
            "categories": train_set.coco_categories()}
    model = make_detector(meta, weights=cfg.weights, pretrained=cfg.pretrained).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    flipped = HorizontalFlip(train_set, seed=cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    loader = torch.utils.data.DataLoader(flipped, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                         num_workers=cfg.num_workers, collate_fn=collate, generator=generator)
    if len(loader) == 0:
        raise DataError(f"the training set has {len(train_set)} images, fewer than one batch of {cfg.batch_size}")
    epochs, fractions = _schedule(cfg)
    steps_per_epoch = len(loader)
    total = epochs * steps_per_epoch if not cfg.max_steps else min(cfg.max_steps, epochs * steps_per_epoch)
    milestones = [int(round(f * epochs * steps_per_epoch)) for f in fractions]
    warmup = min(cfg.warmup_steps, max(1, total // 10)) if cfg.warmup_steps else 0
    log(f"detect: {cfg.detector} on {cfg.model}, {len(train_set)} train / {len(val_set)} val images, "
        f"{epochs} epochs x {steps_per_epoch} steps (stopping after {total}), lr steps at {milestones}")
    step, start, metrics, epoch = 0, time.perf_counter(), {}, 0
    for epoch in range(1, epochs + 1):
        flipped.epoch = epoch
        model.train()
        sums: dict[str, float] = {}
        bar = progress(loader, total=steps_per_epoch, desc=f"epoch {epoch}", enabled=show_progress, every=20)
        for images, targets in bar:
            lr = step_lr_at(step, base_lr=cfg.lr, milestones=milestones, warmup_steps=warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            losses = model([im.to(device) for im in images], [{k: v.to(device) for k, v in t.items()}
                                                               for t in targets])
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                from .train import NonFiniteLossError

                raise NonFiniteLossError(f"detection loss became {loss.item()} at step {step} "
                                         f"({ {k: round(v.item(), 4) for k, v in losses.items()} }); lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            optimizer.step()
            step += 1
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            sums["loss"] = sums.get("loss", 0.0) + loss.item()
            bar.set(loss=loss.item(), lr=lr)
            if step >= total:
                break
        n = max(1, min(steps_per_epoch, step - (epoch - 1) * steps_per_epoch))
        row: dict[str, Any] = {"epoch": epoch, "step": step, "lr": lr, **{k: v / n for k, v in sums.items()}}
        last = step >= total or epoch == epochs
        if last or epoch % cfg.eval_every == 0:
            set_test_size(model, cfg.test_size)
            metrics = evaluate_detector(model, val_set, device=device, batch_size=cfg.batch_size,
                                        num_workers=cfg.num_workers)
            set_train_sizes(model, cfg.train_sizes)
            row.update(metrics)
            log(f"epoch {epoch}: loss {row['loss']:.4f}, box AP {metrics['bbox_ap']:.1f}"
                + (f", mask AP {metrics['segm_ap']:.1f}" if "segm_ap" in metrics else ""))
        append_csv(run_dir / "log.csv", row)
        save_checkpoint(run_dir / "last.pth", {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                                "epoch": epoch, "step": step, "detection": meta,
                                                "config": cfg.to_dict()})
        if last:
            break
    save_detector(model, run_dir / "model.pth", meta)
    seconds = round(time.perf_counter() - start, 1)
    summary = {"model": cfg.model, "detector": cfg.detector, "epochs": epoch, "steps": step, "seconds": seconds,
               **{k: round(v, 3) if isinstance(v, float) else v for k, v in metrics.items()}}
    append_csv(run_dir / "summary.csv", summary)
    return {**summary, "run_dir": str(run_dir)}


def set_train_sizes(model: nn.Module, sizes: Sequence[int]) -> None:
    model.transform.min_size = tuple(int(s) for s in sizes)


def _schedule(cfg: DetectionConfig) -> tuple[int, list[float]]:
    epochs, steps = SCHEDULES[cfg.schedule]
    return (cfg.epochs or epochs), [s / epochs for s in steps]


# ------------------------------------------------------------------------------------------------------------
# saved detectors, evaluation and prediction


def save_detector(model: nn.Module, path: str | os.PathLike, meta: Mapping[str, Any]) -> Path:
    """The detector's weights and the metadata that rebuilds it (`load_detector`), written atomically."""
    from .train import save_checkpoint
    from .weights import unwrap_model

    state = {k: v.detach().cpu() for k, v in unwrap_model(model).state_dict().items()}
    return save_checkpoint(path, {"model": state, "detection": dict(meta)})


def load_detector(path: str | os.PathLike, *, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuilds a detector from `model.pth` / `last.pth` of a detection run (strict key and shape check)."""
    from .errors import WeightsError
    from .train import load_checkpoint

    ckpt = load_checkpoint(path)
    meta = ckpt.get("detection")
    if not isinstance(meta, dict) or "model" not in ckpt:
        raise WeightsError(f"{path} is not a detection checkpoint (no 'detection' metadata); pass the model.pth "
                           f"or last.pth of a `coatvit detect train` run")
    model = make_detector(meta)
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:
        raise WeightsError(f"{path} does not fit the detector it describes: {str(e).splitlines()[0][:300]}") from None
    model.categories = meta.get("categories")
    set_test_size(model, meta["test_size"])
    return model.to(device).eval()


def evaluate_checkpoint(checkpoint: str, *, data: str | None = None, synthetic_val: int = 64,
                        synthetic_size: int = SYNTHETIC_IMAGE_SIZE, seed: int = 0, batch_size: int = 2,
                        device: str = "auto") -> dict[str, Any]:
    """COCO AP of a saved detector on a COCO-format val split, or on the synthetic val set when data is None."""
    from .train import resolve_device

    dev = resolve_device(device)
    model = load_detector(checkpoint, device=dev)
    if data is None:
        dataset = SyntheticShapes("val", synthetic_val, synthetic_size, seed)
    else:
        ann, folder = find_coco_split(data, "val")
        dataset = CocoDetection(ann, folder, with_masks=model.detector == "mask_rcnn", categories=model.categories)
    return evaluate_detector(model, dataset, device=dev, batch_size=batch_size, show_progress=True)


_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]


def draw_detections(image: Image.Image, output: Mapping[str, torch.Tensor], class_names: Sequence[str], *,
                    threshold: float = 0.5) -> Image.Image:
    """The image with boxes, labels and scores (and translucent masks) of detections scoring >= threshold."""
    canvas = image.convert("RGB").copy()
    keep = [k for k in range(len(output["scores"])) if float(output["scores"][k]) >= threshold]
    if "masks" in output:
        pixels = np.asarray(canvas).astype(np.float32)
        for k in keep:
            mask = output["masks"][k, 0].numpy() > 0.5
            colour = np.asarray(_PALETTE[int(output["labels"][k]) % len(_PALETTE)], np.float32)
            pixels[mask] = 0.55 * pixels[mask] + 0.45 * colour
        canvas = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for k in keep:
        label = int(output["labels"][k])
        colour = _PALETTE[label % len(_PALETTE)]
        box = [float(v) for v in output["boxes"][k]]
        draw.rectangle(box, outline=colour, width=2)
        name = class_names[label - 1] if 0 < label <= len(class_names) else str(label)
        draw.text((box[0] + 2, box[1] + 1), f"{name} {float(output['scores'][k]):.2f}", fill=colour)
    return canvas


@torch.no_grad()
def predict_images(checkpoint: str, images: Sequence[str | os.PathLike], *, output: str | os.PathLike,
                   threshold: float = 0.5, device: str = "auto") -> list[dict[str, Any]]:
    """Runs a saved detector on image files; writes `<output>/<stem>.png` with the detections drawn.

    Returns:
        one record per image: {'image', 'png', 'detections': [{'label', 'score', 'box'}, ...]} (score >= threshold).
    """
    from .atomic import atomic_write
    from .images import open_image
    from .train import check_writable, resolve_device

    dev = resolve_device(device)
    model = load_detector(checkpoint, device=dev)
    out_dir = check_writable(output)
    records = []
    for path in images:
        image = open_image(path)
        result = {k: v.cpu() for k, v in model([_to_tensor(image).to(dev)])[0].items()}
        png = out_dir / f"{Path(path).stem}.png"
        drawn = draw_detections(image, result, model.class_names, threshold=threshold)
        atomic_write(png, lambda tmp: drawn.save(tmp, format="PNG"))
        keep = result["scores"] >= threshold
        records.append({"image": str(path), "png": str(png), "detections": [
            {"label": model.class_names[int(lab) - 1], "score": round(float(s), 4),
             "box": [round(float(v), 1) for v in box]}
            for lab, s, box in zip(result["labels"][keep], result["scores"][keep], result["boxes"][keep])]})
    return records


def write_synthetic_examples(folder: str | os.PathLike, count: int = 4, *, size: int = SYNTHETIC_IMAGE_SIZE,
                             seed: int = 0) -> list[Path]:
    """Writes `count` synthetic val images as PNGs (inputs for `predict` without any data at hand)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        image, _ = render_synthetic(i, split="val", size=size, seed=seed)
        path = folder / f"shapes_{i:03d}.png"
        image.save(path)
        paths.append(path)
    return paths
