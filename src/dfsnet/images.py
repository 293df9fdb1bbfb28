"""The one image decoder: every image dfsnet reads (datasets, index builds, queries, uploads,
thumbnails) goes through :func:`open_image`."""
from __future__ import annotations

import io
import os
from pathlib import Path

__all__ = ["InvalidImageError", "ImageTooLargeError", "QUERY_FORMATS", "open_image"]

# Formats a query image may have; PIL's other plugins (EPS runs Ghostscript, for one) are
# never tried on untrusted bytes.
QUERY_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM")
_EXIF_ORIENTATION = 0x0112


class InvalidImageError(ValueError):
    """A query that is not a decodable image of a supported format."""


class ImageTooLargeError(InvalidImageError):
    """A query image with more pixels than allowed (a decompression bomb guard)."""


def open_image(source, *, max_pixels: int | None = None, name: str | None = None):
    """Decode a query image into an RGB PIL image, refusing anything that is not one.

    The type is decided by the content (PIL's format detection, restricted to
    :data:`QUERY_FORMATS`), never by a file name. The image is fully decoded here, so a
    truncated file fails now.

    Parameters
    ----------
    source : str, os.PathLike, bytes or PIL.Image.Image
    max_pixels : int, optional
        Largest ``width * height`` accepted; default ``PIL.Image.MAX_IMAGE_PIXELS``
        (PIL's decompression-bomb threshold), checked from the header before decoding.
    name : str, optional
        How error messages call the image; default: its path, or "the image".

    Returns
    -------
    PIL.Image.Image
        Mode ``"RGB"``, EXIF orientation applied.

    Raises
    ------
    ImageTooLargeError
        More than ``max_pixels`` pixels.
    InvalidImageError
        Not an image of a supported format, or corrupt.
    FileNotFoundError, TypeError
    """
    from PIL import Image, ImageOps

    if isinstance(source, Image.Image):
        return source if source.mode == "RGB" else source.convert("RGB")
    if isinstance(source, (bytes, bytearray, memoryview)):
        fp, default_name = io.BytesIO(bytes(source)), "the image"
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"image: no such file: {path}")
        fp, default_name = path, str(path)
    else:
        raise TypeError(f"image: expected a path, bytes or a PIL image, got {type(source).__name__}")
    name = name or default_name
    limit = max_pixels if max_pixels is not None else (Image.MAX_IMAGE_PIXELS or 2**31)
    try:
        with Image.open(fp, formats=QUERY_FORMATS) as img:
            if img.width * img.height > limit:
                raise ImageTooLargeError(
                    f"image: {name} has {img.width}x{img.height} = {img.width * img.height} pixels, "
                    f"more than the limit of {limit} (decompression-bomb guard)")
            img.load()
            if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                img = ImageOps.exif_transpose(img)
            return img.convert("RGB")
    except ImageTooLargeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image: {name} is too large to decode safely ({exc})") from None
    except Image.UnidentifiedImageError:
        raise InvalidImageError(
            f"image: {name} is not an image of a supported type (by content: one of "
            f"{', '.join(QUERY_FORMATS)})") from None
    # PIL reports malformed data with many exception types (OSError, SyntaxError, ValueError...).
    except Exception as exc:  # noqa: BLE001
        raise InvalidImageError(f"image: {name} is corrupt or truncated ({type(exc).__name__}: {exc})") from None
