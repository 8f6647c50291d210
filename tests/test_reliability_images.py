"""Hostile or broken image files: each odd-but-valid image is converted to upright 8-bit RGB, each unusable file is
refused with a `DataError` naming it, and the data pipeline skips (and counts) the refused ones."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from coatvit.data import DataConfig, ImageFolder, collate_skipping, eval_transform, train_transform
from coatvit.errors import DataError
from coatvit.images import MAX_ASPECT_RATIO, open_image

RNG = np.random.default_rng(0)
BASE = Image.fromarray(RNG.integers(0, 256, (40, 48, 3), dtype=np.uint8))  # 48 wide, 40 high


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` with almost no pixel data: the shape of a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(
        b"IEND", b"")


def _save(path: Path, image: Image.Image, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


# ------------------------------------------------------------------------------------------------------------
# valid but unusual images: converted


def _gray16(path: Path) -> Path:
    a = np.full((40, 48), 65535, np.uint16)
    a[0, 0], a[0, 1] = 0, 32768
    return _save(path, Image.fromarray(a))


def _float_tiff(path: Path) -> Path:
    a = np.full((40, 48), 1.0, np.float32)
    a[0, 0], a[0, 1] = 0.0, 0.5
    return _save(path, Image.fromarray(a))


def _palette_transparent(path: Path) -> Path:
    p = BASE.convert("P")
    return _save(path, p, transparency=int(np.asarray(p)[0, 0]))


def _animated_gif(path: Path) -> Path:
    frames = [BASE.convert("P"), BASE.transpose(Image.Transpose.FLIP_LEFT_RIGHT).convert("P")]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


def _corrupt_exif(path: Path) -> Path:
    return _save(path, BASE, exif=b"Exif\x00\x00II*\x00\xff\xff\xff\x7f" + b"\x00" * 10)


CONVERTED = {
    "grayscale.png": lambda p: _save(p, BASE.convert("L")),
    "gray-alpha.png": lambda p: _save(p, BASE.convert("LA")),
    "cmyk.jpg": lambda p: _save(p, BASE.convert("CMYK")),
    "rgba.png": lambda p: _save(p, BASE.convert("RGBA")),
    "palette.png": lambda p: _save(p, BASE.convert("P")),
    "palette-transparent.png": _palette_transparent,
    "bilevel.png": lambda p: _save(p, BASE.convert("1")),
    "gray16.png": _gray16,
    "float.tiff": _float_tiff,
    "int32.tiff": lambda p: _save(p, Image.fromarray(np.full((40, 48), 7_000_000, np.int32))),
    "animated.gif": _animated_gif,
    "corrupt-exif.jpg": _corrupt_exif,
    "uppercase.JPG": lambda p: _save(p, BASE, format="JPEG"),
    "image.webp": lambda p: _save(p, BASE),
    "image.bmp": lambda p: _save(p, BASE),
}


@pytest.mark.parametrize("name", list(CONVERTED))
def test_unusual_image_is_converted_to_rgb(tmp_path, name):
    path = CONVERTED[name](tmp_path / name)
    image = open_image(path)
    assert image.mode == "RGB" and image.size == (48, 40)
    assert np.asarray(image).dtype == np.uint8


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    row = np.asarray(open_image(_gray16(tmp_path / "g16.png")))[0, :3, 0].tolist()
    assert row == [0, 128, 255]  # 0, 32768, 65535: clipping would give [0, 255, 255]


def test_float_image_in_unit_range_is_scaled(tmp_path):
    row = np.asarray(open_image(_float_tiff(tmp_path / "f.tiff")))[0, :3, 0].tolist()
    assert row == [0, 127, 255]


def test_transparent_pixels_become_white(tmp_path):
    rgba = np.zeros((40, 48, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:20, :, 3] = 255  # top half opaque red, bottom half fully transparent
    image = np.asarray(open_image(_save(tmp_path / "t.png", Image.fromarray(rgba))))
    assert image[0, 0].tolist() == [200, 0, 0]
    assert image[-1, -1].tolist() == [255, 255, 255]


def test_cmyk_colours_survive(tmp_path):
    red = Image.new("RGB", (48, 40), (220, 20, 20))
    image = np.asarray(open_image(_save(tmp_path / "c.jpg", red.convert("CMYK"), quality=95))).astype(int)
    assert abs(image[20, 24] - np.array([220, 20, 20])).max() < 30


# Stored pixels S for each EXIF orientation, given the upright picture D (EXIF 2.3: the transform a viewer
# applies to S to show D): 2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate 90 CW, 7 transverse, 8 rotate 90 CCW.
_STORED = {
    1: lambda d: d,
    2: lambda d: d[:, ::-1],
    3: lambda d: d[::-1, ::-1],
    4: lambda d: d[::-1],
    5: lambda d: d.transpose(1, 0, 2),
    6: lambda d: np.rot90(d, 1),
    7: lambda d: np.rot90(d, 2).transpose(1, 0, 2),
    8: lambda d: np.rot90(d, -1),
}


@pytest.mark.parametrize("orientation", list(_STORED))
def test_exif_orientation_is_applied(tmp_path, orientation):
    upright = np.zeros((40, 48, 3), np.uint8)
    upright[:10, :12] = (255, 0, 0)  # red top-left corner
    upright[-10:, :12] = (0, 0, 255)  # blue bottom-left corner: tells a mirror from a rotation
    stored = Image.fromarray(np.ascontiguousarray(_STORED[orientation](upright)))
    exif = stored.getexif()
    exif[0x0112] = orientation
    path = _save(tmp_path / f"o{orientation}.png", stored, exif=exif)
    assert np.array_equal(np.asarray(open_image(path)), upright)


def test_exif_rotated_jpeg_photo(tmp_path):
    upright = np.zeros((40, 48, 3), np.uint8)
    upright[:20, :24] = (255, 255, 255)
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1)))
    exif = stored.getexif()
    exif[0x0112] = 6
    image = np.asarray(open_image(_save(tmp_path / "photo.jpg", stored, exif=exif, quality=95))).astype(int)
    assert image.shape == (40, 48, 3)
    assert image[5, 5].min() > 200 and image[35, 43].max() < 50


def test_one_pixel_image(tmp_path):
    image = open_image(_save(tmp_path / "one.png", Image.new("RGB", (1, 1), (3, 4, 5))))
    assert image.size == (1, 1) and np.asarray(image)[0, 0].tolist() == [3, 4, 5]


# ------------------------------------------------------------------------------------------------------------
# unusable files: refused with a DataError naming the file


def _truncated(source: Path, fraction: float, path: Path) -> Path:
    data = source.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def _text_chunk_bomb(path: Path) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "a" * (8 << 20), zip=True)  # compresses to ~8 KB, inflates past PIL's 1 MB limit
    return _save(path, BASE, pnginfo=info)


REFUSED = {
    "truncated-half.jpg": lambda p: _truncated(_save(p.with_suffix(".src.jpg"), BASE), 0.5, p),
    "truncated-header.jpg": lambda p: _truncated(_save(p.with_suffix(".src.jpg"), BASE), 0.02, p),
    "truncated.png": lambda p: _truncated(_save(p.with_suffix(".src.png"), BASE), 0.5, p),
    "empty.jpg": lambda p: (p.write_bytes(b""), p)[1],
    "empty.png": lambda p: (p.write_bytes(b""), p)[1],
    "text.png": lambda p: (p.write_text("just some text\n"), p)[1],
    "html-error-page.jpg": lambda p: (p.write_text("<html><body>403 Forbidden</body></html>"), p)[1],
    "random-bytes.jpg": lambda p: (p.write_bytes(RNG.integers(0, 256, 4096, dtype=np.uint8).tobytes()), p)[1],
    "jpeg-magic-then-garbage.jpg": lambda p: (p.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00\x10JFIF" + b"\x13" * 500),
                                              p)[1],
    "bomb-50000x50000.png": lambda p: (p.write_bytes(_png_header_only(50_000, 50_000)), p)[1],
    "bomb-12000x12000.png": lambda p: (p.write_bytes(_png_header_only(12_000, 12_000)), p)[1],
    "sliver-1x20000.png": lambda p: (p.write_bytes(_png_header_only(1, 20_000)), p)[1],
    "text-chunk-bomb.png": _text_chunk_bomb,
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_unusable_file_raises_data_error(tmp_path, name):
    path = REFUSED[name](tmp_path / name)
    with pytest.raises(DataError) as err:
        open_image(path)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg


def test_bomb_guard_follows_pil_limit(tmp_path, monkeypatch):
    """A real (decodable) image just over a lowered pixel limit is refused before decoding; under it, it loads."""
    path = _save(tmp_path / "big.png", Image.new("RGB", (300, 200)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 200 - 1)
    with pytest.raises(DataError, match="too large"):
        open_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 200)
    assert open_image(path).size == (300, 200)


def test_aspect_ratio_limit(tmp_path):
    ok = _save(tmp_path / "pano.png", Image.new("RGB", (MAX_ASPECT_RATIO, 1)))
    assert open_image(ok).size == (MAX_ASPECT_RATIO, 1)
    bad = _save(tmp_path / "sliver.png", Image.new("RGB", (MAX_ASPECT_RATIO + 1, 1)))
    with pytest.raises(DataError, match="aspect ratio"):
        open_image(bad)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_image(tmp_path / "gone.jpg")


# ------------------------------------------------------------------------------------------------------------
# the data pipeline: a folder mixing all of the above trains and evaluates, skipping and counting the bad files


def build_hostile_folder(root: Path, good_per_class: int = 4) -> tuple[int, int]:
    """root/<class>/ holding good JPEGs, every converted case and every refused case; returns (usable, refused)."""
    usable = refused = 0
    for c, cls in enumerate(("a", "b")):
        folder = root / cls
        folder.mkdir(parents=True)
        for i in range(good_per_class):
            _save(folder / f"good{i}.jpg", Image.fromarray(RNG.integers(0, 256, (40, 48, 3), dtype=np.uint8)))
            usable += 1
        cases = CONVERTED if c == 0 else REFUSED
        for name, make in cases.items():
            make(folder / name)
            if c == 0:
                usable += 1
            else:
                refused += 1
        for src in folder.glob("*.src.*"):
            src.unlink()  # the intact sources of the truncated files
    return usable, refused


@pytest.mark.parametrize("augment", [False, True])
def test_loader_skips_and_counts_bad_files(tmp_path, augment, capfd):
    usable, refused = build_hostile_folder(tmp_path / "data")
    if augment:
        tf = train_transform(input_size=(32, 32), no_aug=False, scale=(0.08, 1.0), ratio=(0.75, 4 / 3), hflip=0.5,
                             color_jitter=0.4, aa="rand-m9-mstd0.5-inc1", interpolation="bicubic", reprob=0.25,
                             remode="pixel", recount=1)
    else:
        tf = eval_transform(DataConfig(input_size=(32, 32)))
    dataset = ImageFolder(tmp_path / "data", tf)
    assert len(dataset) == usable + refused
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, collate_fn=collate_skipping)
    seen = skipped = 0
    for x, y, bad in loader:
        skipped += bad
        seen += len(y)
        if len(y):
            assert x.shape[1:] == (3, 32, 32) and torch.isfinite(x).all()
    assert (seen, skipped) == (usable, refused)
    warnings = [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning: skipping")]
    assert len(warnings) == refused


def test_train_eval_predict_survive_a_hostile_folder(tmp_path, capsys, monkeypatch):
    """The real CLI on train/ and val/ folders that mix good, odd and unusable files: every command finishes, and
    the number of skipped files is reported (summary.csv for training, stderr for eval and predict)."""
    import coatvit.train as train_mod
    from coatvit.cli import main
    from coatvit.train import read_csv

    monkeypatch.setattr(train_mod, "plot_curves", lambda rows, path: None)  # not under test
    threads = torch.get_num_threads()
    usable, refused = build_hostile_folder(tmp_path / "data" / "train")
    build_hostile_folder(tmp_path / "data" / "val")
    capsys.readouterr()
    # --aug-repeats 1 and a batch dividing the set size: every file is read exactly once per epoch.
    assert (usable + refused) % 4 == 0
    code = main(["train", "--model", "coat_test", "--data", str(tmp_path / "data"), "--img-size", "32", "--epochs",
                 "1", "-b", "4", "--aug-repeats", "1", "-j", "0", "--threads", "1", "--device", "cpu",
                 "--output", str(tmp_path / "runs"), "--experiment", "run"])
    torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    rows = read_csv(tmp_path / "runs" / "run" / "summary.csv")
    assert int(rows[-1]["skipped_images"]) == 2 * refused  # train/ and val/ each hold `refused` bad files
    assert f"{2 * refused} unreadable images skipped" in out

    last = str(tmp_path / "runs" / "run" / "last.pth")
    assert main(["eval", "--weights", last, "--data", str(tmp_path / "data" / "val"), "-j", "0", "-b", "8",
                 "--device", "cpu"]) == 0
    assert f"{refused} unreadable images were skipped" in capsys.readouterr().err

    assert main(["predict", "--weights", last, str(tmp_path / "data" / "val" / "b"), "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert f"{refused} unreadable images were skipped" in err
    assert len([line for line in out.splitlines() if line.strip()]) == 4  # the good JPEGs of class b
