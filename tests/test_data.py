"""Datasets, transforms, sampling and image loading (coatvit.data, coatvit.images)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from coatvit.data import (BUILTIN_CLASSES, BuiltinShapes, DataConfig, ImageFolder, RepeatSampler, ShardSampler,
                          build_datasets, collate_skipping, eval_transform, train_transform)
from coatvit.errors import DataError
from coatvit.images import open_image


def _save(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def test_builtin_is_deterministic_balanced_and_multiscale():
    ds = BuiltinShapes("train", length=60)
    a, la = ds[5]
    b, lb = BuiltinShapes("train", length=60)[5]
    assert la == lb and np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(ds[10][0]), np.asarray(a))  # same class (10 % 5 == 5 % 5), another image
    val_img, _ = BuiltinShapes("val", length=64)[5]
    assert not np.array_equal(np.asarray(val_img), np.asarray(a))  # the held-out split is drawn separately
    labels = [ds[i][1] for i in range(60)]
    assert np.bincount(labels).tolist() == [12] * len(BUILTIN_CLASSES)
    assert a.size == (64, 64) and a.mode == "RGB"
    # Objects come at many sizes: the fraction of pixels far from the background colour varies widely.
    fractions = []
    for i in range(0, 60, 5):  # disks only
        arr = np.asarray(ds[i][0]).astype(float)
        corner = np.median(arr[:4, :4].reshape(-1, 3), axis=0)
        fractions.append(float((np.abs(arr - corner).sum(-1) > 100).mean()))
    assert max(fractions) > 4 * min(fractions)


def test_imagefolder_skips_unreadable_images_and_counts_them(tmp_path):
    _save(tmp_path / "a" / "ok.png", Image.new("RGB", (40, 30), "red"))
    _save(tmp_path / "b" / "gray.png", Image.new("L", (33, 50), 128))
    _save(tmp_path / "b" / "rgba.png", Image.new("RGBA", (20, 20), (0, 0, 255, 0)))
    (tmp_path / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (tmp_path / "a" / "empty.png").write_bytes(b"")
    tf = eval_transform(DataConfig(input_size=(32, 32), crop_pct=1.0))
    ds = ImageFolder(tmp_path, tf)
    assert ds.classes == ["a", "b"] and len(ds) == 5
    x, y, skipped = collate_skipping([ds[i] for i in range(len(ds))])
    assert skipped == 2 and x.shape == (3, 3, 32, 32) and sorted(y.tolist()) == [0, 1, 1]
    # Transparent pixels are composited onto white.
    assert open_image(tmp_path / "b" / "rgba.png").getpixel((0, 0)) == (255, 255, 255)


def test_open_image_errors_name_the_file(tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"")
    with pytest.raises(DataError, match="x.png is empty"):
        open_image(bad)
    with pytest.raises(DataError, match="does not exist"):
        open_image(tmp_path / "missing.jpg")


def test_open_image_converts_16bit_and_palette(tmp_path):
    arr = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)
    p16 = _save(tmp_path / "deep.png", Image.fromarray(arr))
    im = open_image(p16)
    assert im.mode == "RGB" and 0 < np.asarray(im).mean() < 255  # scaled, not clipped to white
    pal = _save(tmp_path / "pal.png", Image.new("RGB", (8, 8), "green").convert("P"))
    assert open_image(pal).getpixel((0, 0))[1] > 100


def test_build_datasets_errors_and_val_split(tmp_path):
    tf = eval_transform(DataConfig(input_size=(32, 32), crop_pct=1.0))
    with pytest.raises(DataError, match="does not exist"):
        build_datasets(str(tmp_path / "nope"), val_split=0, seed=0, train_tf=tf, eval_tf=tf)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="pass --val-split"):
        build_datasets(str(tmp_path / "empty"), val_split=0, seed=0, train_tf=tf, eval_tf=tf)
    with pytest.raises(DataError, match="no class subfolders"):
        build_datasets(str(tmp_path / "empty"), val_split=0.2, seed=0, train_tf=tf, eval_tf=tf)
    (tmp_path / "empty" / "cls").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        build_datasets(str(tmp_path / "empty"), val_split=0.2, seed=0, train_tf=tf, eval_tf=tf)
    for i in range(10):
        _save(tmp_path / "one" / f"c{i % 2}" / f"{i}.png", Image.new("RGB", (8, 8), (i * 20, 0, 0)))
    train, val, classes = build_datasets(str(tmp_path / "one"), val_split=0.2, seed=0, train_tf=tf, eval_tf=tf)
    assert classes == ["c0", "c1"] and len(train) == 8 and len(val) == 2
    assert not set(train.indices) & set(val.indices)
    train2, val2, _ = build_datasets(str(tmp_path / "one"), val_split=0.2, seed=0, train_tf=tf, eval_tf=tf)
    assert val2.indices == val.indices  # seeded


def test_repeat_sampler_partitions_ranks_and_repeats():
    one = list(RepeatSampler(12, repeats=3, seed=1))
    assert len(one) == 12 and len(set(one)) == 4 and all(one.count(i) == 3 for i in set(one))
    shards = [list(RepeatSampler(12, repeats=3, rank=r, world_size=2, seed=1)) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == sorted(one)
    # Each copy of an image goes to a different rank at least once (repeated augmentation across processes).
    assert set(shards[0]) & set(shards[1])
    s = RepeatSampler(10, seed=1)
    s.set_epoch(1)
    assert list(s) != list(RepeatSampler(10, seed=1)) and sorted(s) == list(range(10))
    padded = [list(RepeatSampler(5, rank=r, world_size=2)) for r in range(2)]
    assert len(padded[0]) == len(padded[1]) == 3
    assert list(ShardSampler(5, rank=1, world_size=2)) == [1, 3]


def test_eval_transform_follows_crop_pct():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    x = eval_transform(DataConfig(input_size=(224, 224), crop_pct=0.875))(image)
    assert x.shape == (3, 224, 224)
    x2 = eval_transform(DataConfig(input_size=(64, 96), crop_pct=1.0, crop_mode="squash"))(image)
    assert x2.shape == (3, 64, 96)
    with pytest.raises(DataError):
        DataConfig(input_size=(32, 32), crop_pct=1.5)


def test_recipe_train_transform_survives_strong_randaugment():
    # mstd noise reaches magnitude 10, where PosterizeIncreasing keeps 0 bits (Pillow 13 would raise).
    torch.manual_seed(0)
    tf = train_transform(input_size=(32, 32), no_aug=False, scale=(0.08, 1), ratio=(0.75, 1.33), hflip=0.5,
                         color_jitter=0.4, aa="rand-m10-n4-mstd0-inc1", interpolation="bicubic", reprob=0.25,
                         remode="pixel", recount=1)
    image = BuiltinShapes("train", length=8)[0][0]
    for _ in range(40):
        assert tf(image).shape == (3, 32, 32)
