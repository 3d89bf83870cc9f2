"""Turning stored bytes into RGB pixels safely, and the per-image facts the load-time check gathers.

Every image a run uses goes through `decode`, both in the check before training and when the
DataLoader reads it, so an image that passed the check decodes to the same pixels later.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import imagehash
import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from vlfit.errors import first_line

# 16-bit and 32-bit greyscale modes: Pillow's convert("RGB") clips them to 255 instead of scaling.
_WIDE_GREY = ("I", "I;16", "I;16B", "I;16L", "I;16N")


class BadImage(Exception):
    """An image that cannot be used; the message is the reason, in words a user can act on."""


@dataclass(frozen=True)
class Limits:
    """What counts as usable: the shorter side at least `min_side`, at most `max_pixels` pixels."""

    min_side: int = 16
    max_pixels: int = Image.MAX_IMAGE_PIXELS or 89_478_485


@dataclass(frozen=True)
class ImageFacts:
    """What the check learns about one stored image. `reason` is None when it is usable."""

    reason: str | None
    width: int = 0  # after EXIF orientation
    height: int = 0
    mode: str = ""  # as stored, before conversion to RGB
    rotated: bool = False  # an EXIF orientation was applied
    pixel_digest: bytes = b""  # equal for images with equal decoded pixels
    phash: int = 0  # 64-bit perceptual hashes, for near duplicates
    dhash: int = 0


def decode(blob: bytes | np.ndarray, limits: Limits) -> np.ndarray:
    """RGB uint8 pixels (H, W, 3) of an encoded image or an array, EXIF orientation applied.

    Raises BadImage, never another error, for anything that is not a usable image.
    """
    return _decode(blob, limits)[0]


def examine(blob: bytes | np.ndarray, limits: Limits) -> ImageFacts:
    """Decode `blob` as `decode` does and return what the data check records about it."""
    try:
        pixels, mode, rotated = _decode(blob, limits)
    except BadImage as err:
        return ImageFacts(reason=str(err))
    image = Image.fromarray(pixels)
    digest = hashlib.sha256(np.asarray(pixels.shape, np.int64).tobytes() + pixels.tobytes()).digest()
    return ImageFacts(reason=None, width=pixels.shape[1], height=pixels.shape[0], mode=mode, rotated=rotated,
                      pixel_digest=digest, phash=_as_int(imagehash.phash(image)), dhash=_as_int(imagehash.dhash(image)))


def _decode(blob: bytes | np.ndarray, limits: Limits) -> tuple[np.ndarray, str, bool]:
    if isinstance(blob, np.ndarray):
        if blob.dtype != np.uint8 or blob.ndim != 3 or blob.shape[2] != 3:
            raise BadImage(f"array of shape {blob.shape} and type {blob.dtype} is not RGB uint8 (H, W, 3)")
        _check_size(blob.shape[1], blob.shape[0], limits)
        return blob, "RGB", False
    if not blob:
        raise BadImage("empty file")
    try:
        with warnings.catch_warnings():
            # vlfit applies its own pixel limit below, before any pixel is decoded.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(blob))
    except Image.DecompressionBombError as err:
        raise BadImage(f"too large: a possible decompression bomb ({first_line(err)})") from None
    except UnidentifiedImageError:
        raise BadImage("not an image (no image format recognised)") from None
    except Exception as err:  # Pillow's format plugins raise a wide range of errors on damaged headers
        raise BadImage(f"corrupt or truncated image ({first_line(err)})") from None
    _check_size(*image.size, limits)  # from the header alone: a decompression bomb is never decoded
    mode = image.mode
    try:
        image.load()
    except Exception as err:
        raise BadImage(f"corrupt or truncated image ({first_line(err)})") from None
    try:
        orientation = _orientation(image)
        oriented = ImageOps.exif_transpose(image)
    except Exception as err:
        raise BadImage(f"unreadable EXIF orientation ({first_line(err)})") from None
    try:
        rgb = _to_rgb(oriented)
    except Exception as err:
        raise BadImage(f"cannot convert mode {mode} to RGB ({first_line(err)})") from None
    return rgb, mode, orientation in range(2, 9)


def unreadable(err: OSError) -> str:
    """The reason recorded for a file that could not be read at all (missing, permissions, I/O)."""
    return f"cannot read file ({err.strerror or err})"


def _check_size(width: int, height: int, limits: Limits) -> None:
    if min(width, height) < limits.min_side:
        raise BadImage(f"too small: {width}x{height} is under data.min_image_size ({limits.min_side})")
    if width * height > limits.max_pixels:
        raise BadImage(f"too large: {width}x{height} is over data.max_image_pixels ({limits.max_pixels:,}), "
                       "a possible decompression bomb")


def _to_rgb(image: Image.Image) -> np.ndarray:
    """RGB pixels of any Pillow mode: transparency over white, as a viewer shows it; wide greys scaled."""
    if image.mode in _WIDE_GREY:
        grey = np.asarray(image, dtype=np.float64)
        grey = np.clip(np.rint(grey / 257.0), 0, 255).astype(np.uint8)  # 16-bit range onto 8 bits
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return np.array(image.convert("RGB"), dtype=np.uint8)  # a writable copy, as torch.from_numpy wants


def _orientation(image: Image.Image) -> int:
    return int(image.getexif().get(ExifTags.Base.Orientation, 1))


def _as_int(h: imagehash.ImageHash) -> int:
    return int.from_bytes(np.packbits(h.hash.flatten()).tobytes(), "big")
