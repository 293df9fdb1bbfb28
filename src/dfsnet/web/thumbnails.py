"""JPEG thumbnails of indexed images, made on first request and kept in a bounded LRU cache."""
from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict

from dfsnet.images import ImageGeometryError, ImageTooLargeError, InvalidImageError, open_thumbnail
from dfsnet.store import ImageRecord


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
        Indexed files with more pixels are not decoded (decompression-bomb guard); decoding
        follows :func:`dfsnet.images.open_thumbnail` (formats by content, size rules).
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
        try:
            with open(record.path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise ThumbnailError(f"image {record.id} cannot be read from where it was indexed "
                                 f"({exc.strerror or type(exc).__name__})") from None
        if hashlib.sha256(data).hexdigest() != record.sha256:
            raise ThumbnailError(f"image {record.id} changed on disk since it was indexed; "
                                 "re-index it with `dfsnet index add`")
        # The bytes already read (and hashed) are decoded, not the file again: it may change between.
        try:
            img = open_thumbnail(data, self.size, max_pixels=self.max_pixels)
        except ImageTooLargeError:
            raise ThumbnailError(f"image {record.id} has too many pixels to decode safely") from None
        except ImageGeometryError:
            raise ThumbnailError(f"image {record.id} has a side or aspect ratio too large to decode safely") from None
        except InvalidImageError:
            raise ThumbnailError(f"image {record.id} cannot be decoded (not a supported image, or corrupt)") from None
        out = io.BytesIO()
        img.save(out, format="JPEG", quality=85, optimize=True)
        return out.getvalue()
