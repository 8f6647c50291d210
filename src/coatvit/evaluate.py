"""Evaluation (top-1/top-5/loss over an ImageFolder) and prediction (top-k classes of image files).

The preprocessing comes from the weights: a training checkpoint stores its `data_config` (input size, crop_pct,
interpolation, mean/std), released weights carry theirs in `PretrainedEntry`; every field can be overridden.
Class names come from the checkpoint, or are the ImageNet-1k names for 1000-class weights.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .data import DataConfig, ImageFolder, ShardSampler, collate_skipping, eval_transform
from .errors import DataError, WeightsError
from .images import is_image_file, open_image


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names, in class-index order (torchvision's list)."""
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return list(_IMAGENET_CATEGORIES)


@dataclass
class InferenceModel:
    """A model ready for inference with everything needed to feed it and name its outputs."""

    model: nn.Module
    model_name: str
    class_names: list[str]
    data_config: DataConfig


def _is_torch_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"PK"


def load_inference_model(*, model_name: str | None = None, weights: str | None = None, pretrained: bool = False,
                         use_ema: bool = False, img_size: tuple[int, int] | None = None,
                         crop_pct: float | None = None, crop_mode: str | None = None,
                         interpolation: str | None = None, mean: Sequence[float] | None = None,
                         std: Sequence[float] | None = None, device: str | torch.device = "cpu") -> InferenceModel:
    """Builds a model from weights (a file of any supported format, or the released ones) for eval / predict.

    Args:
        model_name: the architecture; may be omitted when the file names it (our checkpoints and weight files).
        weights: path of a weight file or training checkpoint (`run/best.pth`).
        pretrained: use the released ImageNet-1k weights of `model_name`.
        use_ema: take the EMA weights of a training checkpoint.
        img_size, crop_pct, crop_mode, interpolation, mean, std: override the preprocessing the weights carry.

    Raises:
        WeightsError for files that are unreadable or made for another architecture; ValueError for bad options.
    """
    from .config import DEFAULT_INPUT_SIZE, PRETRAINED
    from .registry import create_model, get_config
    from .weights import head_classes, load_weights, read_weights, unwrap_state_dict

    if (weights is None) == (not pretrained):
        raise ValueError("pass exactly one of --weights PATH and --pretrained")
    meta: dict[str, Any] = {}
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise WeightsError(f"weight file {path} does not exist; check the path")
        state = None
        if path.stat().st_size > 0 and _is_torch_zip(path):
            from .train import load_checkpoint

            ckpt = load_checkpoint(path)
            if "train_config" in ckpt:  # a coatvit training checkpoint: model, EMA and metadata
                if use_ema and ckpt.get("ema") is None:
                    raise WeightsError(f"{path} holds no EMA weights (the run had --no-model-ema)")
                state = unwrap_state_dict({"model": ckpt["ema" if use_ema else "model"]}, str(path))
                meta = {k: ckpt.get(k) for k in ("model_name", "class_names", "data_config", "config")}
        if state is None:
            if use_ema:
                raise WeightsError(f"--use-ema needs a coatvit training checkpoint; {path} is a plain weight file")
            state, meta = read_weights(path)
        file_name = meta.get("model_name")
        if model_name is None:
            if not file_name:
                raise ValueError(f"{path} does not name its architecture; pass --model NAME")
            model_name = file_name
        elif file_name and file_name != model_name:
            raise WeightsError(f"{path} holds a {file_name} model, not {model_name}; drop --model or pass "
                               f"--model {file_name}")
        get_config(model_name)
        model = create_model(model_name, num_classes=head_classes(state) or 0)
        load_weights(model, state)
        entry = PRETRAINED.get(model_name) if model.num_classes == 1000 else None
    else:
        if model_name is None:
            raise ValueError("--pretrained needs --model NAME")
        model = create_model(model_name, pretrained=True)
        entry = PRETRAINED[model_name]
    num_classes = model.num_classes

    if meta.get("data_config"):
        base = DataConfig(**{k: v for k, v in meta["data_config"].items()})
    elif entry is not None:
        base = DataConfig(input_size=entry.input_size[1:], crop_pct=entry.crop_pct, crop_mode=entry.crop_mode,
                          interpolation=entry.interpolation, mean=entry.mean, std=entry.std)
    else:
        base = DataConfig(input_size=DEFAULT_INPUT_SIZE.get(model_name, (224, 224)))
    changes = {k: v for k, v in dict(input_size=img_size, crop_pct=crop_pct, crop_mode=crop_mode,
                                      interpolation=interpolation, mean=mean, std=std).items() if v is not None}
    for key in ("mean", "std"):
        if key in changes and len(changes[key]) != 3:
            raise ValueError(f"--{key} takes 3 numbers (R G B), got {list(changes[key])}")
    data_config = dataclasses.replace(base, **changes)
    min_size = model.config.min_input_size
    if min(data_config.input_size) < min_size:
        raise ValueError(f"input size {data_config.input_size} is too small: {model_name} needs at least "
                         f"{min_size} px per side")

    names = meta.get("class_names")
    if names is not None and len(names) != num_classes:
        raise WeightsError(f"the file lists {len(names)} class names but its classifier has {num_classes} outputs")
    if names is None:
        names = imagenet_class_names() if num_classes == 1000 else [f"class_{i}" for i in range(num_classes)]
    model.to(device).eval()
    return InferenceModel(model, model_name, list(names), data_config)


# ------------------------------------------------------------------------------------------------------------
# eval


def _eval_folder(data: str | Path) -> Path:
    root = Path(data)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    for name in ("val", "validation", "test"):
        if (root / name).is_dir():
            return root / name
    return root


def _folder_classes(root: Path, class_names: list[str]) -> list[str]:
    """The class list to read `root` with: the model's names when the folders use them, else index order."""
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"data folder {root} has no class subfolders; expected {root}/<class>/<image>")
    if set(folders) <= set(class_names):
        return class_names
    if len(folders) == len(class_names):
        return folders  # e.g. ImageNet's wnid folders: sorted folder i is class i
    raise DataError(f"{root} has {len(folders)} class folders that match neither the model's {len(class_names)} "
                    f"class names nor its class count")


@torch.no_grad()
def evaluate(inf: InferenceModel, data: str | Path, *, batch_size: int = 64, workers: int = 2,
             device: str | torch.device = "cpu", per_class_csv: str | Path | None = None,
             confusion_png: str | Path | None = None, progress_enabled: bool = True) -> dict[str, Any]:
    """Top-1, top-5, mean loss and throughput of a model over an ImageFolder.

    Returns a dict with top1, top5 (percent), loss, images, images_per_s, skipped (unreadable images).
    """
    from .train import progress

    if batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {batch_size}")
    root = _eval_folder(data)
    classes = _folder_classes(root, inf.class_names)
    dataset = ImageFolder(root, eval_transform(inf.data_config), classes=classes)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         collate_fn=collate_skipping, sampler=ShardSampler(len(dataset)))
    n = len(inf.class_names)
    confusion = torch.zeros(n, n, dtype=torch.long)
    loss_sum = correct5 = 0.0
    skipped = 0
    inf.model.eval()
    start = time.perf_counter()
    for x, y, bad in progress(loader, total=len(loader), desc="eval", enabled=progress_enabled, unit="batch"):
        skipped += bad
        if len(y) == 0:
            continue
        logits = inf.model(x.to(device)).float().cpu()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(min(5, n), dim=1).indices
        correct5 += (top == y[:, None]).any(dim=1).sum().item()
        confusion.index_put_((y, top[:, 0]), torch.ones_like(y), accumulate=True)
    elapsed = time.perf_counter() - start
    count = int(confusion.sum())
    if count == 0:
        raise DataError(f"no image of {root} could be read ({skipped} skipped)")
    correct1 = int(confusion.diag().sum())
    result = {"model": inf.model_name, "top1": 100 * correct1 / count, "top5": 100 * correct5 / count,
              "loss": loss_sum / count, "images": count, "images_per_s": count / elapsed, "skipped": skipped,
              "input_size": list(inf.data_config.input_size), "crop_pct": inf.data_config.crop_pct,
              "interpolation": inf.data_config.interpolation}
    if per_class_csv:
        write_per_class_csv(per_class_csv, confusion, inf.class_names)
    if confusion_png:
        plot_confusion(confusion_png, confusion, inf.class_names)
    return result


def write_per_class_csv(path: str | Path, confusion: torch.Tensor, class_names: list[str]) -> None:
    """class, images, correct, top1 (percent) and the class most often predicted instead, one row per class."""
    from .atomic import atomic_write_text

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["class", "images", "correct", "top1", "most_confused_with"])
    for i, name in enumerate(class_names):
        row = confusion[i]
        total = int(row.sum())
        if total == 0:
            continue
        others = row.clone()
        others[i] = -1
        worst = int(others.argmax())
        w.writerow([name, total, int(row[i]), f"{100 * int(row[i]) / total:.2f}",
                    class_names[worst] if others[worst] > 0 else ""])
    atomic_write_text(path, buf.getvalue())


def plot_confusion(path: str | Path, confusion: torch.Tensor, class_names: list[str]) -> None:
    """A row-normalised confusion matrix (true class down, predicted across) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .atomic import atomic_write

    n = len(class_names)
    rows = confusion.sum(1, keepdim=True).clamp(min=1)
    frac = (confusion / rows).numpy()
    size = min(24, max(4, n * 0.45))
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    if n <= 50:
        ax.set_xticks(range(n), class_names, rotation=90, fontsize=8)
        ax.set_yticks(range(n), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------------
# predict


def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files named directly or found (recursively, sorted) under folders."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and is_image_file(q))
            if not found:
                raise DataError(f"folder {p} holds no images")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p} does not exist")
    return out


@torch.no_grad()
def predict(inf: InferenceModel, inputs: Sequence[str | Path], *, topk: int = 5, batch_size: int = 32,
            device: str | torch.device = "cpu") -> tuple[list[dict[str, Any]], list[str]]:
    """Top-k classes with probabilities for each image.

    Returns:
        (records, skipped): one record {path, topk: [{class, index, prob}]} per readable image, in input order,
        and the messages of the images that could not be read.
    """
    if topk <= 0:
        raise ValueError(f"--topk must be positive, got {topk}")
    k = min(topk, len(inf.class_names))
    tf = eval_transform(inf.data_config)
    paths = collect_images(inputs)
    records: list[dict[str, Any]] = []
    skipped: list[str] = []
    for start in range(0, len(paths), batch_size):
        batch, names = [], []
        for p in paths[start:start + batch_size]:
            try:
                batch.append(tf(open_image(p)))
                names.append(p)
            except DataError as e:
                print(f"warning: skipping {e}", file=sys.stderr, flush=True)
                skipped.append(str(e))
        if not batch:
            continue
        probs = inf.model(torch.stack(batch).to(device)).float().softmax(dim=1).cpu()
        values, indices = probs.topk(k, dim=1)
        for p, v, i in zip(names, values.tolist(), indices.tolist()):
            records.append({"path": str(p), "topk": [{"class": inf.class_names[c], "index": c, "prob": pv}
                                                     for pv, c in zip(v, i)]})
    return records, skipped
