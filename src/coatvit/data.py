"""Datasets and transforms: ImageFolder trees, the built-in shapes dataset, the recipe's augmentation, and the
evaluation transform derived from weights metadata.

Images that fail to load are skipped with a warning: a dataset returns None for them and `collate_skipping` drops
them from the batch and reports how many it dropped, so a run never dies on one bad file and can count them.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from .errors import DataError
from .images import IMAGE_EXTENSIONS, is_image_file, open_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VAL_FOLDER_NAMES = ("val", "validation", "test")


# ------------------------------------------------------------------------------------------------------------
# evaluation preprocessing


@dataclass(frozen=True)
class DataConfig:
    """How images are prepared for a model at evaluation: stored in checkpoints, read from pretrained entries.

    Attributes:
        input_size: (H, W) fed to the model.
        crop_pct: the center crop keeps this fraction of the resized image (resize side = size / crop_pct).
        crop_mode: 'center' (resize the short side, then crop) or 'squash' (resize both sides, then crop).
        interpolation: 'bicubic', 'bilinear' or 'nearest'.
        mean: per-channel mean subtracted after scaling to [0, 1].
        std: per-channel std divided by.
    """

    input_size: tuple[int, int]
    crop_pct: float = 0.9
    crop_mode: str = "center"
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_size", tuple(int(v) for v in self.input_size))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if not 0 < self.crop_pct <= 1:
            raise DataError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.crop_mode not in ("center", "squash"):
            raise DataError(f"crop_mode must be 'center' or 'squash', got {self.crop_mode!r}")
        if self.interpolation not in _INTERPOLATIONS:
            raise DataError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}, got {self.interpolation!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"input_size": list(self.input_size), "crop_pct": self.crop_pct, "crop_mode": self.crop_mode,
                "interpolation": self.interpolation, "mean": list(self.mean), "std": list(self.std)}


_INTERPOLATIONS = {"bicubic": "BICUBIC", "bilinear": "BILINEAR", "nearest": "NEAREST"}


def _interp(name: str):
    from torchvision.transforms import InterpolationMode

    return getattr(InterpolationMode, _INTERPOLATIONS[name])


def eval_transform(data_config: DataConfig) -> Callable[[Image.Image], torch.Tensor]:
    """Resize so that the crop keeps `crop_pct` of the image, center-crop to `input_size`, normalise."""
    from torchvision import transforms as T

    h, w = data_config.input_size
    scaled = (math.floor(h / data_config.crop_pct), math.floor(w / data_config.crop_pct))
    if data_config.crop_mode == "squash" or h != w:
        resize = T.Resize(scaled, interpolation=_interp(data_config.interpolation))
    else:
        resize = T.Resize(scaled[0], interpolation=_interp(data_config.interpolation))
    return T.Compose([resize, T.CenterCrop((h, w)), T.ToTensor(), T.Normalize(data_config.mean, data_config.std)])


def train_transform(*, input_size: tuple[int, int], no_aug: bool, scale: Sequence[float], ratio: Sequence[float],
                    hflip: float, color_jitter: float, aa: str | None, interpolation: str, reprob: float,
                    remode: str, recount: int, mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD) -> Callable[[Image.Image], torch.Tensor]:
    """The recipe's training augmentation (RandomResizedCrop, flip, RandAugment, random erasing).

    timm's data pipeline builds it (the authors trained with timm's DeiT pipeline); `no_aug` gives a plain resize.
    """
    from torchvision import transforms as T

    if no_aug:
        return T.Compose([T.Resize(tuple(input_size), interpolation=_interp(interpolation)), T.ToTensor(),
                          T.Normalize(mean, std)])
    from timm.data import create_transform

    _patch_posterize()
    return create_transform(
        input_size=(3, *input_size), is_training=True, scale=tuple(scale), ratio=tuple(ratio), hflip=hflip,
        vflip=0.0, color_jitter=color_jitter, auto_augment=None if aa in (None, "", "none") else aa,
        interpolation=interpolation, mean=tuple(mean), std=tuple(std), re_prob=reprob, re_mode=remode,
        re_count=recount)


def _posterize_keeping_zero_bits(img: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    # RandAugment's PosterizeIncreasing asks for 0 bits at magnitude 10 (reached through mstd noise). Pillow < 10
    # returned a black image for that; Pillow 13 raises. Keep the old result instead of crashing the loader.
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return _TIMM_POSTERIZE(img, bits_to_keep, **kwargs)


_TIMM_POSTERIZE = None


def _patch_posterize() -> None:
    global _TIMM_POSTERIZE
    from timm.data import auto_augment

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        op = auto_augment.NAME_TO_OP.get(name)
        if op is not None and op is not _posterize_keeping_zero_bits:
            _TIMM_POSTERIZE = op
            auto_augment.NAME_TO_OP[name] = _posterize_keeping_zero_bits


# ------------------------------------------------------------------------------------------------------------
# datasets


def _warn_skip(message: str) -> None:
    print(f"warning: skipping {message}", file=sys.stderr, flush=True)


class ImageFolder(torch.utils.data.Dataset):
    """`root/<class>/<image>` files; classes are the sorted folder names. Unreadable images yield None.

    Args:
        root: the folder holding one subfolder per class.
        transform: PIL image -> tensor.
        classes: the class names to use (a val/ folder must use train/'s list); default: the subfolders of root.
    """

    def __init__(self, root: str | Path, transform: Callable | None = None, classes: Sequence[str] | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"data folder {self.root} does not exist; pass --data pointing at an ImageFolder root")
        found = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        self.classes = list(classes) if classes is not None else found
        if not self.classes:
            raise DataError(f"data folder {self.root} has no class subfolders; expected {self.root}/<class>/<image>")
        index = {c: i for i, c in enumerate(self.classes)}
        unknown = sorted(set(found) - set(index))
        if unknown:
            raise DataError(f"{self.root} has classes {unknown[:5]} that the training set does not have")
        self.samples: list[tuple[str, int]] = []
        for name in found:
            for path in sorted((self.root / name).rglob("*")):
                if path.is_file() and is_image_file(path):
                    self.samples.append((str(path), index[name]))
        if not self.samples:
            raise DataError(f"data folder {self.root} holds no images ({', '.join(IMAGE_EXTENSIONS[:4])}, ...)")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, target = self.samples[i]
        try:
            image = open_image(path)
        except DataError as e:
            _warn_skip(str(e))
            return None
        return (self.transform(image) if self.transform else image), target


class Subset(torch.utils.data.Dataset):
    """A view on some indices of a dataset, with its own transform (for --val-split)."""

    def __init__(self, base: ImageFolder, indices: Sequence[int], transform: Callable | None):
        self.base, self.indices, self.transform = base, list(indices), transform
        self.classes = base.classes

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        path, target = self.base.samples[self.indices[i]]
        try:
            image = open_image(path)
        except DataError as e:
            _warn_skip(str(e))
            return None
        return (self.transform(image) if self.transform else image), target


# The built-in dataset: light shapes on dark, noisy backgrounds, each at a random position, rotation and size. Sizes
# are log-uniform between 30% and 90% of the image side (as many small objects as large ones), so the same shape has
# to be recognised at 3x different scales: a 32 px input puts a small object on 2-3 patches of the first stage and a
# large one across the whole map, the multi-scale problem CoaT's co-scale design addresses. The classes are chosen to
# differ in shape rather than in a few pixels (filled vs hollow, round vs straight, 3 vs 4 corners, convex vs not),
# so a small transformer trained from scratch learns them in a few minutes on a CPU (see BENCHMARKS.md).
BUILTIN_CLASSES = ("disk", "ring", "square", "triangle", "plus")
BUILTIN_SPLITS = {"train": (0, 20000), "val": (1, 1000)}
BUILTIN_IMAGE_SIZE = 64
BUILTIN_SIZE_RANGE = (0.3, 0.9)  # object diameter as a fraction of the image side


def _polygon(cx: float, cy: float, r: float, n: int, angle: float) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(angle + 2 * math.pi * k / n), cy + r * math.sin(angle + 2 * math.pi * k / n))
            for k in range(n)]


def _rotated_rect(cx, cy, half_len, half_w, angle) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    pts = [(-half_len, -half_w), (half_len, -half_w), (half_len, half_w), (-half_len, half_w)]
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def render_shape(label: int, rng: np.random.Generator, size: int = BUILTIN_IMAGE_SIZE) -> Image.Image:
    """Draws one built-in image of class `label` with the randomness of `rng` (deterministic for a seed)."""
    ss = 4  # supersampling for smooth edges
    big = size * ss
    background = int(rng.integers(0, 60))
    color = (int(rng.integers(190, 256)),) * 3
    im = Image.new("RGB", (big, big), (background,) * 3)
    draw = ImageDraw.Draw(im)
    lo, hi = BUILTIN_SIZE_RANGE
    r = math.exp(rng.uniform(math.log(lo), math.log(hi))) * big / 2  # log-uniform: as many small as large
    cx, cy = rng.uniform(r, big - r, 2)
    angle = rng.uniform(0, 2 * math.pi)
    width = max(r * 0.3, ss * 1.5)  # stroke of rings and arms of plus signs
    name = BUILTIN_CLASSES[label]
    if name == "disk":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif name == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=color, width=int(width))
    elif name == "square":
        draw.polygon(_polygon(cx, cy, r, 4, angle), fill=color)
    elif name == "triangle":
        draw.polygon(_polygon(cx, cy, r, 3, angle), fill=color)
    elif name == "plus":
        for a in (angle, angle + math.pi / 2):
            draw.polygon(_rotated_rect(cx, cy, r, width / 2, a), fill=color)
    im = im.resize((size, size), Image.Resampling.BOX)
    noise = rng.normal(0, 8, (size, size, 3))
    arr = np.clip(np.asarray(im, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


class BuiltinShapes(torch.utils.data.Dataset):
    """The built-in dataset: nothing to download; image i of a split is the same on every machine.

    Args:
        split: 'train' (20000 images) or 'val' (1000 images, drawn from another seed).
        transform: PIL image -> tensor.
        length: number of images (default: the split's size).
    """

    classes = list(BUILTIN_CLASSES)

    def __init__(self, split: str = "train", transform: Callable | None = None, length: int | None = None):
        if split not in BUILTIN_SPLITS:
            raise DataError(f"built-in split must be one of {sorted(BUILTIN_SPLITS)}, got {split!r}")
        self.split_id, default_len = BUILTIN_SPLITS[split]
        self.length = default_len if length is None else int(length)
        self.transform = transform

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        label = i % len(BUILTIN_CLASSES)
        image = render_shape(label, np.random.default_rng([20210414, self.split_id, i]))
        return (self.transform(image) if self.transform else image), label


def build_datasets(data: str | None, *, val_split: float, seed: int, train_tf: Callable, eval_tf: Callable,
                   builtin_size: tuple[int, int] | None = None):
    """The train and val datasets and the class names.

    `data` None gives the built-in dataset; a folder with train/ and val/ (or validation/, test/) gives two
    ImageFolders; a folder of class subfolders with `val_split` > 0 is split at random (seeded).
    """
    if data is None:
        n_train, n_val = builtin_size or (None, None)
        return (BuiltinShapes("train", train_tf, n_train), BuiltinShapes("val", eval_tf, n_val),
                list(BUILTIN_CLASSES))
    root = Path(data)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist; pass --data pointing at an ImageFolder root, or omit "
                        f"--data to use the built-in dataset")
    if (root / "train").is_dir():
        train = ImageFolder(root / "train", train_tf)
        for name in VAL_FOLDER_NAMES:
            if (root / name).is_dir():
                return train, ImageFolder(root / name, eval_tf, classes=train.classes), train.classes
        if val_split <= 0:
            raise DataError(f"{root} has train/ but no {'/, '.join(VAL_FOLDER_NAMES)}/ folder; pass --val-split 0.1")
        root, base = root / "train", train
    else:
        if val_split <= 0:
            raise DataError(f"{root} has no train/ and val/ subfolders; for a single folder of class subfolders "
                            f"pass --val-split 0.1")
        base = ImageFolder(root)
    if not 0 < val_split < 1:
        raise DataError(f"--val-split must be in (0, 1), got {val_split}")
    order = torch.randperm(len(base), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(len(base) * val_split))
    return Subset(base, order[n_val:], train_tf), Subset(base, order[:n_val], eval_tf), base.classes


# ------------------------------------------------------------------------------------------------------------
# sampling and batching


class RepeatSampler(torch.utils.data.Sampler):
    """Seeded shuffling with repeated augmentation and a rank's share of the indices.

    Each epoch draws one permutation (from `seed + epoch`, the same on every rank), repeats every index `repeats`
    times in a row (repeated augmentation: the copies land on different ranks and get different augmentations),
    keeps the first `len(dataset)` entries so an epoch stays as long as the dataset, pads to a multiple of
    `world_size`, and gives rank r the entries r, r + world_size, ...
    """

    def __init__(self, length: int, *, repeats: int = 1, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True):
        self.length, self.repeats, self.rank, self.world = length, max(1, repeats), rank, world_size
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0
        self.per_rank = math.ceil(length / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.length, generator=g)
        else:
            order = torch.arange(self.length)
        order = order.repeat_interleave(self.repeats)[: self.length].tolist()
        order += order[: self.per_rank * self.world - len(order)]
        return iter(order[self.rank::self.world])

    def __len__(self) -> int:
        return self.per_rank


class ShardSampler(torch.utils.data.Sampler):
    """In-order indices rank, rank + world_size, ... (evaluation: no padding, so no image counts twice)."""

    def __init__(self, length: int, *, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def collate_skipping(batch: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stacks (image, target) pairs, dropping the None entries of unreadable images; returns (x, y, skipped)."""
    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    x = torch.stack([b[0] for b in good])
    y = torch.as_tensor([b[1] for b in good], dtype=torch.long)
    return x, y, skipped
