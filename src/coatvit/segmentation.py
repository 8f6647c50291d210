"""Semantic segmentation with a CoaT backbone: a Semantic-FPN head (Kirillov et al., "Panoptic Feature Pyramid
Networks", 2019) on the CoaT pyramid, trained with AdamW; mIoU evaluation and colour-mask PNG output.

Data: a folder with `train/images`, `train/masks`, `val/images`, `val/masks` (a mask is a single-channel PNG of
the same stem whose pixel values are class indices, 255 = ignore), or the built-in synthetic shapes when no
folder is given. The loop reuses `train.py`'s pieces (parameter groups, `lr_at`, checkpoints, run directory).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .detection import FPN_CHANNELS, SYNTHETIC_CLASSES, SYNTHETIC_IMAGE_SIZE, render_synthetic
from .errors import ConfigError, DataError, WeightsError
from .registry import get_config

IGNORE_INDEX = 255
HEAD_CHANNELS = 128
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------------------------------
# the model


class SemanticFPNHead(nn.Module):
    """Brings every FPN level to stride 4 (level i: i x [3x3 conv, GroupNorm, ReLU, 2x upsample]; level 0 one
    conv), sums them and predicts per-pixel class logits at stride 4."""

    def __init__(self, num_classes: int, in_channels: int = FPN_CHANNELS, channels: int = HEAD_CHANNELS,
                 levels: int = 4):
        super().__init__()

        def stage(cin: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, channels, 3, padding=1, bias=False), nn.GroupNorm(32, channels),
                                 nn.ReLU(inplace=True))

        self.scale_heads = nn.ModuleList(
            nn.ModuleList(stage(in_channels if k == 0 else channels) for k in range(max(1, i)))
            for i in range(levels))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        out = None
        for i, (x, convs) in enumerate(zip(features, self.scale_heads)):
            for conv in convs:
                x = conv(x)
                if i > 0:
                    x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            # Odd input sizes leave maps a pixel off after upsampling; align to level 0's grid.
            if out is not None and x.shape[-2:] != out.shape[-2:]:
                x = F.interpolate(x, size=out.shape[-2:], mode="bilinear", align_corners=False)
            out = x if out is None else out + x
        return self.classifier(out)  # (B, K, H/4, W/4)


class SemanticFPN(nn.Module):
    """CoaT (features_only) -> FPN (256 ch, P2-P5) -> Semantic-FPN head -> logits at the input resolution."""

    def __init__(self, body: nn.Module, num_classes: int):
        super().__init__()
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork

        self.body = body
        self.fpn = FeaturePyramidNetwork(body.feature_info.channels(), FPN_CHANNELS)
        self.head = SemanticFPNHead(num_classes)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.body(x)
        pyramid = self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))
        logits = self.head(list(pyramid.values()))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)  # (B, K, H, W)


def build_segmenter(model_name: str, *, num_classes: int, weights: str | None = None, pretrained: bool = False,
                    drop_path_rate: float | None = None) -> SemanticFPN:
    """Semantic FPN on a CoaT backbone; `weights` is any classification checkpoint (its head is dropped)."""
    from .registry import create_model

    if num_classes < 2:
        raise ConfigError(f"num_classes must be at least 2 (background included), got {num_classes}")
    body = create_model(model_name, weights=weights, pretrained=pretrained, features_only=True,
                        out_indices=(0, 1, 2, 3), drop_path_rate=drop_path_rate)
    model = SemanticFPN(body, num_classes)
    model.model_name = model_name
    return model


# ------------------------------------------------------------------------------------------------------------
# data


def _normalise(image: Image.Image) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def synthetic_semantic(index: int, *, split: str, size: int, seed: int = 0) -> tuple[Image.Image, np.ndarray]:
    """A synthetic shapes image and its semantic mask (0 background, 1..3 circle/square/triangle)."""
    image, objects = render_synthetic(index, split=split, size=size, seed=seed)
    mask = np.zeros((size, size), np.uint8)
    for o in objects:  # visible parts only, so the order does not matter
        mask[o["mask"]] = o["label"]
    return image, mask


class SyntheticSegmentation(torch.utils.data.Dataset):
    """The built-in set: synthetic shapes with per-pixel labels (4 classes with the background)."""

    def __init__(self, split: str = "train", length: int = 256, size: int = SYNTHETIC_IMAGE_SIZE, seed: int = 0):
        self.split, self.length, self.size, self.seed = split, length, size, seed
        self.class_names = ["background", *SYNTHETIC_CLASSES]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = synthetic_semantic(i, split=self.split, size=self.size, seed=self.seed)
        if self.split == "train" and np.random.default_rng([self.seed, 7, i]).random() < 0.5:
            image, mask = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), mask[:, ::-1]
        return _normalise(image), torch.from_numpy(mask.astype(np.int64))


class MaskFolder(torch.utils.data.Dataset):
    """`<root>/<split>/images/*` with `<root>/<split>/masks/<stem>.png` (class indices, 255 ignore).

    Training samples are resized so the short side is `size` x U(0.75, 1.25), randomly cropped to size x size
    (padding with the ignore label) and flipped; evaluation samples are resized so the short side is `size`.
    """

    def __init__(self, root: str | os.PathLike, split: str, *, size: int, num_classes: int, train: bool,
                 seed: int = 0):
        from .images import is_image_file

        folder = Path(root) / split
        images_dir, masks_dir = folder / "images", folder / "masks"
        if not images_dir.is_dir() or not masks_dir.is_dir():
            raise DataError(f"{folder} needs images/ and masks/ folders (masks: single-channel PNGs of class "
                            f"indices with the image's file stem)")
        self.pairs = []
        for path in sorted(p for p in images_dir.iterdir() if is_image_file(p)):
            mask = masks_dir / f"{path.stem}.png"
            if not mask.is_file():
                raise DataError(f"image {path} has no mask {mask}")
            self.pairs.append((path, mask))
        if not self.pairs:
            raise DataError(f"{images_dir} holds no images")
        self.size, self.num_classes, self.train, self.seed, self.epoch = size, num_classes, train, seed, 0
        self.class_names = [str(k) for k in range(num_classes)]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from .images import open_image

        image_path, mask_path = self.pairs[i]
        image = open_image(image_path)
        with Image.open(mask_path) as m:
            if m.mode not in ("L", "P"):
                raise DataError(f"mask {mask_path} is {m.mode}; expected a single-channel PNG of class indices")
            mask = m.copy()
        if mask.size != image.size:
            raise DataError(f"mask {mask_path} is {mask.size}, its image {image.size}; they must match")
        rng = np.random.default_rng([self.seed, self.epoch, i])
        scale = rng.uniform(0.75, 1.25) if self.train else 1.0
        w, h = image.size
        ratio = self.size * scale / min(w, h)
        new = (max(1, round(w * ratio)), max(1, round(h * ratio)))
        image = image.resize(new, Image.Resampling.BILINEAR)
        mask = mask.resize(new, Image.Resampling.NEAREST)
        labels = np.asarray(mask, dtype=np.int64)
        if labels.max(initial=0) >= self.num_classes and (labels[labels != IGNORE_INDEX] >= self.num_classes).any():
            raise DataError(f"mask {mask_path} has label {int(labels[labels != IGNORE_INDEX].max())} but "
                            f"--num-classes is {self.num_classes}")
        x = _normalise(image)
        y = torch.from_numpy(labels)
        if self.train:
            x, y = _random_crop(x, y, self.size, rng)
            if rng.random() < 0.5:
                x, y = x.flip(-1), y.flip(-1)
        return x, y


def _random_crop(x: torch.Tensor, y: torch.Tensor, size: int, rng: np.random.Generator):
    h, w = y.shape
    ph, pw = max(0, size - h), max(0, size - w)
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
        y = F.pad(y, (0, pw, 0, ph), value=IGNORE_INDEX)
        h, w = y.shape
    top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    return x[:, top:top + size, left:left + size], y[top:top + size, left:left + size]


# ------------------------------------------------------------------------------------------------------------
# evaluation


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) counts, rows = ground truth, columns = prediction; ignored pixels are left out."""
    valid = target != IGNORE_INDEX
    idx = target[valid] * num_classes + pred[valid]
    return torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_metrics(confusion: torch.Tensor, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """mIoU (over classes that occur in the ground truth or the prediction), pixel accuracy and per-class IoU,
    as percentages."""
    conf = confusion.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    names = class_names or [str(k) for k in range(len(tp))]
    return {"miou": float(iou[present].mean() * 100) if present.any() else 0.0,
            "pixel_acc": float(tp.sum() / conf.sum().clamp(min=1) * 100),
            "iou": {n: (round(float(v) * 100, 2) if present[k] else None) for k, (n, v) in enumerate(zip(names, iou))}}


@torch.no_grad()
def evaluate_segmenter(model: nn.Module, dataset, *, device: torch.device, batch_size: int = 4,
                       class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """mIoU and pixel accuracy of `model` on `dataset` (evaluated one image at a time when sizes differ)."""
    model.eval()
    k = model.num_classes
    confusion = torch.zeros(k, k, dtype=torch.int64)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size if _fixed_size(dataset) else 1)
    for x, y in loader:
        pred = model(x.to(device)).argmax(1).cpu()
        confusion += confusion_matrix(pred, y, k)
    return {**iou_metrics(confusion, class_names or getattr(dataset, "class_names", None)), "images": len(dataset)}


def _fixed_size(dataset) -> bool:
    return isinstance(dataset, SyntheticSegmentation)


# ------------------------------------------------------------------------------------------------------------
# training


@dataclass(frozen=True)
class SegmentationConfig:
    """A semantic segmentation run.

    Attributes:
        model: CoaT variant of the backbone.
        data: a folder with train/ and val/ (images/ + masks/); None uses the built-in synthetic shapes.
        num_classes: classes including the background (required with --data; 4 for the synthetic set).
        weights / pretrained: the backbone's classification checkpoint or the released ImageNet weights.
        epochs, max_steps: length of the run (max_steps > 0 stops early).
        lr, weight_decay, warmup_steps: AdamW with warmup then cosine decay (`train.lr_at`).
        size: training crop / evaluation short side (the synthetic set's image side when data is None).
    """

    model: str = "coat_lite_tiny"
    data: str | None = None
    output: str = "runs/segment"
    num_classes: int | None = None
    weights: str | None = None
    pretrained: bool = False
    epochs: int = 10
    max_steps: int = 0
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_steps: int = 100
    drop_path_rate: float = 0.1
    size: int = SYNTHETIC_IMAGE_SIZE
    synthetic_train: int = 256
    synthetic_val: int = 64
    num_workers: int = 0
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.weights is not None and self.pretrained:
            raise ConfigError("pass either --weights or --pretrained for the backbone, not both")
        if self.data is not None and self.num_classes is None:
            raise ConfigError("--num-classes is required with --data (classes including the background)")
        for name in ("epochs", "batch_size", "synthetic_train", "synthetic_val"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        smallest = get_config(self.model).min_input_size  # the backbone's total stride
        if self.size < smallest:
            raise ConfigError(f"size must be at least {smallest} px (the backbone's stride), got {self.size}")
        if self.num_classes is not None and self.num_classes < 2:
            raise ConfigError(f"num_classes must be at least 2 (background included), got {self.num_classes}")
        if self.lr <= 0 or self.weight_decay < 0 or self.max_steps < 0 or self.warmup_steps < 0:
            raise ConfigError("lr must be positive; weight_decay, max_steps and warmup_steps non-negative")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def segmentation_datasets(cfg: SegmentationConfig):
    if cfg.data is None:
        return (SyntheticSegmentation("train", cfg.synthetic_train, cfg.size, cfg.seed),
                SyntheticSegmentation("val", cfg.synthetic_val, cfg.size, cfg.seed))
    k = int(cfg.num_classes)
    return (MaskFolder(cfg.data, "train", size=cfg.size, num_classes=k, train=True, seed=cfg.seed),
            MaskFolder(cfg.data, "val", size=cfg.size, num_classes=k, train=False, seed=cfg.seed))


def train_segmenter(cfg: SegmentationConfig, *, argv: Sequence[str] | None = None, show_progress: bool = True
                    ) -> dict[str, Any]:
    """Trains a Semantic FPN; writes the run directory (config.yaml, command.txt, env.json, log.csv, summary.csv
    with miou and pixel_acc as percentages, last.pth, model.pth) and returns the final metrics."""
    from .train import (append_csv, log, lr_at, param_groups, prepare_run_dir, progress, resolve_device,
                        save_checkpoint, seed_everything)

    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    train_set, val_set = segmentation_datasets(cfg)
    num_classes = cfg.num_classes or len(train_set.class_names)
    run_dir = prepare_run_dir(cfg.output, config=cfg.to_dict(), argv=argv)
    model = build_segmenter(cfg.model, num_classes=num_classes, weights=cfg.weights, pretrained=cfg.pretrained,
                            drop_path_rate=cfg.drop_path_rate).to(device)
    meta = {"model": cfg.model, "num_classes": num_classes, "class_names": list(train_set.class_names),
            "size": cfg.size}
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                         num_workers=cfg.num_workers,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    if len(loader) == 0:
        raise DataError(f"the training set has {len(train_set)} images, fewer than one batch of {cfg.batch_size}")
    total = cfg.epochs * len(loader)
    total = min(total, cfg.max_steps) if cfg.max_steps else total
    warmup = min(cfg.warmup_steps, total // 10)
    log(f"segment: Semantic FPN on {cfg.model}, {len(train_set)} train / {len(val_set)} val images, "
        f"{num_classes} classes, {total} steps")
    step, start, metrics, epoch = 0, time.perf_counter(), {}, 0
    for epoch in range(1, cfg.epochs + 1):
        if hasattr(train_set, "epoch"):
            train_set.epoch = epoch
        model.train()
        loss_sum, n = 0.0, 0
        bar = progress(loader, total=len(loader), desc=f"epoch {epoch}", enabled=show_progress, every=20)
        for x, y in bar:
            lr = lr_at(step, base_lr=cfg.lr, total_steps=total, warmup_steps=warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = F.cross_entropy(model(x.to(device)), y.to(device), ignore_index=IGNORE_INDEX)
            if not torch.isfinite(loss):
                from .train import NonFiniteLossError

                raise NonFiniteLossError(f"segmentation loss became {loss.item()} at step {step}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step, loss_sum, n = step + 1, loss_sum + loss.item(), n + 1
            bar.set(loss=loss.item(), lr=lr)
            if step >= total:
                break
        metrics = evaluate_segmenter(model, val_set, device=device, batch_size=cfg.batch_size,
                                     class_names=meta["class_names"])
        log(f"epoch {epoch}: loss {loss_sum / max(1, n):.4f}, mIoU {metrics['miou']:.1f}, "
            f"pixel acc {metrics['pixel_acc']:.1f}")
        append_csv(run_dir / "log.csv", {"epoch": epoch, "step": step, "lr": lr, "loss": loss_sum / max(1, n),
                                         "miou": metrics["miou"], "pixel_acc": metrics["pixel_acc"]})
        save_checkpoint(run_dir / "last.pth", {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                                "epoch": epoch, "step": step, "segmentation": meta,
                                                "config": cfg.to_dict()})
        if step >= total:
            break
    save_checkpoint(run_dir / "model.pth", {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                                            "segmentation": meta})
    summary = {"model": cfg.model, "epochs": epoch, "steps": step, "seconds": round(time.perf_counter() - start, 1),
               "miou": round(metrics["miou"], 3), "pixel_acc": round(metrics["pixel_acc"], 3)}
    append_csv(run_dir / "summary.csv", summary)
    return {**summary, "iou": metrics["iou"], "run_dir": str(run_dir)}


# ------------------------------------------------------------------------------------------------------------
# saved models, evaluation and prediction


def load_segmenter(path: str | os.PathLike, *, device: torch.device | str = "cpu") -> SemanticFPN:
    """Rebuilds a Semantic FPN from `model.pth` / `last.pth` of a segmentation run (strict)."""
    from .train import load_checkpoint

    ckpt = load_checkpoint(path)
    meta = ckpt.get("segmentation")
    if not isinstance(meta, dict) or "model" not in ckpt:
        raise WeightsError(f"{path} is not a segmentation checkpoint (no 'segmentation' metadata); pass the "
                           f"model.pth or last.pth of a `coatvit segment train` run")
    model = build_segmenter(meta["model"], num_classes=meta["num_classes"])
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:
        raise WeightsError(f"{path} does not fit the model it describes: {str(e).splitlines()[0][:300]}") from None
    model.class_names, model.size = list(meta["class_names"]), int(meta["size"])
    return model.to(device).eval()


def evaluate_checkpoint(checkpoint: str, *, data: str | None = None, synthetic_val: int = 64, seed: int = 0,
                        batch_size: int = 4, device: str = "auto") -> dict[str, Any]:
    """mIoU of a saved segmenter on a folder's val split, or on the synthetic val set when data is None."""
    from .train import resolve_device

    dev = resolve_device(device)
    model = load_segmenter(checkpoint, device=dev)
    if data is None:
        dataset = SyntheticSegmentation("val", synthetic_val, model.size, seed)
    else:
        dataset = MaskFolder(data, "val", size=model.size, num_classes=model.num_classes, train=False)
    return evaluate_segmenter(model, dataset, device=dev, batch_size=batch_size, class_names=model.class_names)


def palette() -> list[int]:
    """A flat 256-entry RGB palette: black background, then well-separated colours (PASCAL VOC's bit pattern)."""
    out = []
    for k in range(256):
        r = g = b = 0
        c = k
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out += [r, g, b]
    return out


@torch.no_grad()
def predict_masks(checkpoint: str, images: Sequence[str | os.PathLike], *, output: str | os.PathLike,
                  device: str = "auto") -> list[dict[str, Any]]:
    """Segments image files; writes `<stem>_mask.png` (palette PNG of class indices) and `<stem>_overlay.png`.

    Returns:
        one record per image: {'image', 'mask_png', 'overlay_png', 'classes': {name: pixel fraction}}.
    """
    from .atomic import atomic_write
    from .images import open_image
    from .train import check_writable, resolve_device

    dev = resolve_device(device)
    model = load_segmenter(checkpoint, device=dev)
    out_dir = check_writable(output)
    colours = palette()
    records = []
    for path in images:
        image = open_image(path)
        w, h = image.size
        ratio = model.size / min(w, h)
        resized = image.resize((max(32, round(w * ratio)), max(32, round(h * ratio))), Image.Resampling.BILINEAR)
        logits = model(_normalise(resized).unsqueeze(0).to(dev))
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        labels = logits.argmax(1)[0].cpu().numpy().astype(np.uint8)
        mask = Image.fromarray(labels)
        mask.putpalette(colours)  # L -> P: the PNG stores class indices, viewers show colours
        overlay = Image.blend(image, mask.convert("RGB"), 0.5)
        stem = Path(path).stem
        mask_png, overlay_png = out_dir / f"{stem}_mask.png", out_dir / f"{stem}_overlay.png"
        atomic_write(mask_png, lambda tmp: mask.save(tmp, format="PNG"))
        atomic_write(overlay_png, lambda tmp: overlay.save(tmp, format="PNG"))
        counts = np.bincount(labels.ravel(), minlength=model.num_classes) / labels.size
        records.append({"image": str(path), "mask_png": str(mask_png), "overlay_png": str(overlay_png),
                        "classes": {model.class_names[k]: round(float(c), 4) for k, c in enumerate(counts) if c > 0}})
    return records
