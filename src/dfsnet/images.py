"""The one image decoder: every image dfsnet reads (datasets, index builds, queries, uploads,
thumbnails) goes through :func:`open_image` (or :func:`open_thumbnail`).

The rules, the same for every caller:

* The format is decided by the content, never by the file name, and only
  :data:`IMAGE_FORMATS` are tried (``Image.open(..., formats=...)``): JPEG (and its MPO
  variant), PNG, WebP, GIF and TIFF (first frame), BMP, PPM/PGM/PBM. PIL's other plugins are
  never asked, so EPS/PS/PDF (which run Ghostscript) and the like cannot be reached.
* The size is checked from the header, before any pixel is decoded: at most ``max_pixels``
  pixels (a decompression-bomb guard, :class:`ImageTooLargeError`), a longer side of at most
  ``max_side`` and an aspect ratio of at most ``max_aspect`` (:class:`ImageGeometryError`). A
  tiny file can declare a 1 x 8000 image: resizing its shorter side to 224 px, as every
  transform does, would allocate gigabytes; a 20000000 x 1 one makes PIL's resize overflow.
  The defaults, :data:`DEFAULT_MAX_ASPECT` (32:1) and :data:`DEFAULT_MAX_SIDE` (32768 px),
  pass photos, phone panoramas (at most about 10:1) and 8 px or 32 px thumbnails alike; after
  resizing the shorter side to ``s``, an accepted image has at most ``32 * s**2`` pixels.
* The image is fully decoded inside the call (a truncated file fails there), its EXIF
  orientation is applied and it is converted to RGB with ``Image.convert("RGB")``. The one
  exception is 16-bit grey (modes ``I;16*``, and ``I`` from PNG or PPM/PGM files): PIL's
  conversion clips those to 255 (white), so they are scaled to 8 bits first.
"""
from __future__ import annotations

import io
import numbers
import os
from pathlib import Path

from dfsnet._validation import check_positive_int
from dfsnet.errors import InputError

__all__ = [
    "DEFAULT_MAX_ASPECT",
    "DEFAULT_MAX_SIDE",
    "IMAGE_FORMATS",
    "ImageGeometryError",
    "ImageTooLargeError",
    "InvalidImageError",
    "open_image",
    "open_thumbnail",
]

# PIL format names tried on any image; "PPM" is PIL's plugin for PPM, PGM, PBM and PNM. No
# plugin here calls an external program.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM")
DEFAULT_MAX_ASPECT = 32.0
DEFAULT_MAX_SIDE = 32768
_EXIF_ORIENTATION = 0x0112
# Formats whose plugins use mode "I" only for 16-bit grey (values 0..65535); TIFF also uses it
# for 32-bit integers, which have no one right scaling and keep PIL's conversion.
_SIXTEEN_BIT_I_FORMATS = ("PNG", "PPM")


class InvalidImageError(InputError):
    """An image that is not a decodable image of a supported format, or that breaks a size rule."""


class ImageTooLargeError(InvalidImageError):
    """An image with more pixels than allowed (a decompression bomb guard)."""


class ImageGeometryError(InvalidImageError):
    """An image whose longer side or aspect ratio is above the limits (unsafe to resize)."""


def open_image(source, *, max_pixels: int | None = None, max_aspect: float = DEFAULT_MAX_ASPECT,
               max_side: int = DEFAULT_MAX_SIDE, name: str | None = None):
    """Decode an image into an RGB PIL image, refusing anything that is not one.

    The type is decided by the content (PIL's format detection, restricted to
    :data:`IMAGE_FORMATS`), never by a file name. The size rules are checked from the header
    before decoding; the image is then fully decoded here, so a truncated file fails now.

    Parameters
    ----------
    source : str, os.PathLike, bytes, bytearray, memoryview or PIL.Image.Image
        A file path, the file's bytes, or an image already in memory. An in-memory image is
        only checked against ``max_aspect`` and ``max_side`` (it is already decoded, so the
        pixel cap has nothing left to guard) and converted to RGB; its EXIF is not applied.
    max_pixels : int, optional
        Largest ``width * height`` accepted; default ``PIL.Image.MAX_IMAGE_PIXELS``
        (PIL's decompression-bomb threshold).
    max_aspect : float
        Largest ratio of the longer side to the shorter one (``math.inf``: no limit).
    max_side : int
        Largest width or height, in pixels.
    name : str, optional
        How error messages call the image; default: its path, or "the image".

    Returns
    -------
    PIL.Image.Image
        Mode ``"RGB"``, EXIF orientation applied; a new image, not ``source`` itself unless
        ``source`` is an RGB PIL image.

    Raises
    ------
    ImageTooLargeError
        More than ``max_pixels`` pixels.
    ImageGeometryError
        A side longer than ``max_side``, or an aspect ratio above ``max_aspect``.
    InvalidImageError
        Not an image of a supported format, or corrupt or truncated.
    FileNotFoundError
        ``source`` is a path to no file.
    OSError
        The file exists but cannot be read (permissions, I/O error).
    TypeError
        ``source`` is of another type.
    ValueError
        A limit that is not positive (``max_aspect`` below 1).
    """
    return _decode(source, max_pixels=max_pixels, max_aspect=max_aspect, max_side=max_side, name=name)


def open_thumbnail(source, size: int, *, max_pixels: int | None = None, max_aspect: float = DEFAULT_MAX_ASPECT,
                   max_side: int = DEFAULT_MAX_SIDE, name: str | None = None):
    """Decode an image, under the rules of :func:`open_image`, into an RGB thumbnail.

    JPEGs are decoded at a reduced scale straight away (PIL's ``draft``, to no less than
    ``2 * size`` px a side), much faster for large photos; the result is then shrunk to fit a
    ``size`` x ``size`` box (aspect ratio kept, Lanczos). Smaller images are not enlarged.

    Parameters
    ----------
    source : str, os.PathLike, bytes, bytearray, memoryview or PIL.Image.Image
        As for :func:`open_image`.
    size : int
        Longest side of the thumbnail, in pixels.
    max_pixels, max_aspect, max_side, name
        As for :func:`open_image`; checked against the full-size header.

    Returns
    -------
    PIL.Image.Image
        Mode ``"RGB"``, longest side at most ``size``.

    Raises
    ------
    ImageTooLargeError, ImageGeometryError, InvalidImageError, FileNotFoundError, OSError, TypeError, ValueError
        As for :func:`open_image` (``ValueError`` also for a ``size`` below 1).
    """
    from PIL import Image

    size = check_positive_int(size, name="size")
    image = _decode(source, max_pixels=max_pixels, max_aspect=max_aspect, max_side=max_side, name=name,
                    draft=(2 * size, 2 * size))
    if image is source:  # an RGB PIL image given by the caller: leave theirs untouched
        image = image.copy()
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    return image


def _decode(source, *, max_pixels, max_aspect, max_side, name, draft=None):
    from PIL import Image, ImageOps

    max_side = check_positive_int(max_side, name="max_side")
    if isinstance(max_aspect, bool) or not isinstance(max_aspect, numbers.Real) or not max_aspect >= 1:
        raise ValueError(f"max_aspect: expected a number >= 1 (or math.inf), got {max_aspect!r}")
    if isinstance(source, Image.Image):
        _check_geometry(source.width, source.height, max_aspect=max_aspect, max_side=max_side,
                        name=name or "the image")
        return source if source.mode == "RGB" else _to_rgb(source, source.format)
    if max_pixels is None:
        max_pixels = Image.MAX_IMAGE_PIXELS or 2**31
    max_pixels = check_positive_int(max_pixels, name="max_pixels")
    if isinstance(source, (bytes, bytearray, memoryview)):
        fp, default_name = io.BytesIO(bytes(source)), "the image"
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"image: no such file: {path}")
        # Opened here, outside the handler below, so that a permission or I/O error stays an
        # OSError rather than being reported as a corrupt image.
        fp, default_name = open(path, "rb"), str(path)  # closed by the with below
    else:
        raise TypeError(f"image: expected a path, bytes or a PIL image, got {type(source).__name__}")
    name = name or default_name
    try:
        with fp, Image.open(fp, formats=IMAGE_FORMATS) as img:
            # Everything up to here read the header only; no pixel is decoded before these checks.
            if img.width * img.height > max_pixels:
                raise ImageTooLargeError(
                    f"image: {name} has {img.width}x{img.height} = {img.width * img.height} pixels, "
                    f"more than the limit of {max_pixels} (decompression-bomb guard)")
            _check_geometry(img.width, img.height, max_aspect=max_aspect, max_side=max_side, name=name)
            if draft is not None:
                img.draft("RGB", draft)
            img.load()
            fmt = img.format
            if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                img = ImageOps.exif_transpose(img)
            return _to_rgb(img, fmt)
    except InvalidImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image: {name} is too large to decode safely ({exc})") from None
    except Image.UnidentifiedImageError:
        raise InvalidImageError(
            f"image: {name} is not an image of a supported type (by content: one of "
            f"{', '.join(IMAGE_FORMATS)})") from None
    # PIL reports malformed data with many exception types (OSError, SyntaxError, ValueError...).
    except Exception as exc:  # noqa: BLE001
        raise InvalidImageError(f"image: {name} is corrupt or truncated ({type(exc).__name__}: {exc})") from None


def _check_geometry(width: int, height: int, *, max_aspect: float, max_side: int, name: str) -> None:
    short, long = min(width, height), max(width, height)
    if short < 1:
        raise InvalidImageError(f"image: {name} has an empty size, {width}x{height}")
    if long > max_side:
        raise ImageGeometryError(
            f"image: {name} is {width}x{height}, a side longer than the limit of {max_side} px")
    if long > max_aspect * short:
        raise ImageGeometryError(
            f"image: {name} is {width}x{height}, an aspect ratio of {long / short:.1f}:1, more than the "
            f"limit of {max_aspect:g}:1 (resizing its shorter side would need a huge buffer)")


def _to_rgb(img, fmt: str | None):
    """``img`` as a new RGB image; ``fmt`` is the file's format (``img.format`` is lost on transposing)."""
    if img.mode.startswith("I;16") or (img.mode == "I" and fmt in _SIXTEEN_BIT_I_FORMATS):
        import numpy as np
        from PIL import Image

        # Round to nearest: 0 -> 0, 65535 -> 255; PIL's own conversion would clip at 255.
        wide = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")

