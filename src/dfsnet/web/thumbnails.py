"""JPEG thumbnails of indexed images, made on first request and kept in a bounded LRU cache."""
from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict

from dfsnet.images import QUERY_FORMATS
from dfsnet.pipeline import ImageRecord

_EXIF_ORIENTATION = 0x0112


class ThumbnailError(Exception):
    """The indexed file can no longer be turned into its thumbnail (moved, changed, unreadable)."""


class ThumbnailCache:
    """Thumbnails keyed by (id, content hash), at most ``capacity`` of them in memory.

    Parameters
    ----------
    size : int
        Longest side of a thumbnail, in pixels.
    capacity : int
        Thumbnails kept; the least recently used one is dropped first.
    max_pixels : int
        Indexed files with more pixels are not decoded (decompression-bomb guard).
    """

    def __init__(self, *, size: int = 256, capacity: int = 1024, max_pixels: int):
        self.size = size
        self.capacity = capacity
        self.max_pixels = max_pixels
        self._items: OrderedDict[tuple[int, str], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, record: ImageRecord) -> bytes:
        """The JPEG bytes of ``record``'s thumbnail.

        Raises
        ------
        ThumbnailError
            The file is missing, unreadable, or its content changed since it was indexed (so
            the page never shows something other than what was indexed).
        """
        key = (record.id, record.sha256)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        jpeg = self._make(record)
        with self._lock:
            self._items[key] = jpeg
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return jpeg

    def _make(self, record: ImageRecord) -> bytes:
        from PIL import Image, ImageOps

        try:
            with open(record.path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise ThumbnailError(f"image {record.id} cannot be read from where it was indexed "
                                 f"({exc.strerror or type(exc).__name__})") from None
        if hashlib.sha256(data).hexdigest() != record.sha256:
            raise ThumbnailError(f"image {record.id} changed on disk since it was indexed; "
                                 "re-index it with `dfsnet index add`")
        try:
            with Image.open(io.BytesIO(data), formats=QUERY_FORMATS) as img:
                if img.width * img.height > self.max_pixels:
                    raise ThumbnailError(f"image {record.id} has too many pixels to decode safely")
                # JPEG: decode at a reduced scale straight away, much faster for large photos.
                img.draft("RGB", (2 * self.size, 2 * self.size))
                img.load()
                if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                    img = ImageOps.exif_transpose(img)
                img = img.convert("RGB")
                img.thumbnail((self.size, self.size), Image.Resampling.LANCZOS)
                out = io.BytesIO()
                img.save(out, format="JPEG", quality=85, optimize=True)
                return out.getvalue()
        except ThumbnailError:
            raise
        # PIL reports malformed data with many exception types.
        except Exception as exc:  # noqa: BLE001
            raise ThumbnailError(f"image {record.id} cannot be decoded ({type(exc).__name__})") from None
