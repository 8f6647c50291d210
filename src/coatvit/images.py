"""Opening image files: every image the package reads (training, eval, predict) goes through `open_image`.

One place decides how odd files are treated: EXIF rotation is applied (a corrupt EXIF block only costs the
rotation), grayscale / palette / CMYK images become RGB, 16-bit / 32-bit / float images are scaled (not clipped) to
8 bits, transparent images are composited onto white, and anything unusable (truncated, empty, not an image, a
decompression bomb, a sliver beyond `MAX_ASPECT_RATIO`) raises `DataError` naming the file, so callers can skip it
and count it. Size checks read the header only, before any pixel is decoded.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

from PIL import Image, ImageOps

from .errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


def is_image_file(path: str | os.PathLike) -> bool:
    """True when the file name has one of `IMAGE_EXTENSIONS` (case-insensitive); the content is not checked."""
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


# Panoramas reach about 10:1. Far beyond that, resizing the short side to the model's input would make the long
# side explode (a 1 x 10^6 image becomes 224 x 2.2*10^8): such files are refused like decompression bombs.
MAX_ASPECT_RATIO = 100


def _high_bit_depth_to_l(im: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float grayscale -> 8-bit 'L' by scaling, not by clipping everything to white."""
    lo, hi = im.getextrema()
    if im.mode == "F":
        # Float images hold [0, 1] (scale up) or already 0-255 values.
        scale = 255.0 if 0 <= lo and hi <= 1 else 1.0
    elif im.mode.startswith("I;16") or hi <= 65535:
        scale = 1 / 256  # 16-bit data (older Pillow opens 16-bit PNGs as 'I')
    else:
        scale = 255 / hi
    return im.convert("F").point(lambda v: v * scale).convert("L")


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        im = _high_bit_depth_to_l(im)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def _upright(im: Image.Image, path: Path) -> Image.Image:
    """Applies the EXIF orientation; a corrupt EXIF block costs the rotation, not the image."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception as e:  # noqa: BLE001 - PIL's EXIF parser fails in many ways on hostile files
        print(f"warning: {path}: ignoring unreadable EXIF orientation ({type(e).__name__})", file=sys.stderr)
        return im


def open_image(path: str | os.PathLike) -> Image.Image:
    """Reads an image file fully into memory as an upright RGB `PIL.Image.Image`.

    Raises:
        DataError: the file is missing, empty, truncated, not an image, or larger than PIL's decompression-bomb
            limit (`PIL.Image.MAX_IMAGE_PIXELS`), or more than `MAX_ASPECT_RATIO` times longer than wide.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; treat every bomb warning as an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size  # from the header, before any pixel is decoded
                if min(w, h) < 1 or max(w, h) > MAX_ASPECT_RATIO * min(w, h):
                    raise DataError(f"image {path} is {w}x{h} pixels: an aspect ratio beyond {MAX_ASPECT_RATIO}:1 "
                                    f"cannot be resized safely")
                im.load()
                return _to_rgb(_upright(im, path))
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"image {path} is too large to decode safely ({e})") from None
    except Exception as e:  # noqa: BLE001 - bytes from outside: any decoder failure is the file's, not ours
        # PIL raises UnidentifiedImageError (an OSError) for non-images, OSError for truncated files, and
        # ValueError, SyntaxError, struct.error, ... from its format plugins on malformed ones.
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        size = path.stat().st_size if path.is_file() else 0
        what = "is empty (0 bytes)" if size == 0 else f"cannot be decoded ({reason[:200]})"
        raise DataError(f"image {path} {what}") from None
