"""JPEG thumbnails of indexed images, made on first request and kept in a bounded LRU cache."""
from __future__ import annotations

import hashlib
import io
import os
import stat
import threading
from collections import OrderedDict

from dfsnet.images import ImageGeometryError, ImageTooLargeError, InvalidImageError, open_thumbnail
from dfsnet.store import ImageRecord


class ThumbnailError(Exception):
    """The indexed file can no longer be turned into its thumbnail (moved, changed, unreadable)."""


class ThumbnailTimeout(ThumbnailError):
    """The indexed file could not be read in time (a hung network mount, say)."""


def _read_regular_file(path: str, expected_size: int) -> bytes:
    """The bytes of ``path`` if it is a regular file of ``expected_size`` bytes.

    Opened non-blocking, so a FIFO put in an image's place cannot block the open itself;
    anything but a regular file is refused before a byte is read, and so is a file of
    another size (changed content; and a huge file is never read into memory).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ThumbnailError("it is no longer a regular file")
        if st.st_size != expected_size:
            raise ThumbnailError("its size changed")
        return fh.read(expected_size + 1)


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
    read_timeout : float
        Seconds to wait for an indexed file to be read. Reads run on daemon threads, at most
        ``max_reads`` at a time: a read stuck in the kernel (a hung mount) then holds one of
        those, not a request thread, and never blocks shutdown.
    max_reads : int
    """

    def __init__(self, *, size: int = 256, capacity: int = 1024, max_pixels: int, read_timeout: float = 10.0,
                 max_reads: int = 8):
        self.size = size
        self.capacity = capacity
        self.max_pixels = max_pixels
        self.read_timeout = read_timeout
        self._items: OrderedDict[tuple[int, str], bytes] = OrderedDict()
        self._lock = threading.Lock()
        self._reads = threading.BoundedSemaphore(max_reads)

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

    def _read(self, record: ImageRecord) -> bytes:
        """The file's bytes, read on a daemon thread within ``read_timeout``."""
        late = ThumbnailTimeout(f"image {record.id} could not be read within {self.read_timeout:g} s")
        if not self._reads.acquire(timeout=self.read_timeout):
            raise late
        outcome: dict[str, object] = {}
        done = threading.Event()

        def work() -> None:
            try:
                outcome["data"] = _read_regular_file(record.path, record.size)
            except (OSError, ThumbnailError) as exc:
                outcome["error"] = exc
            finally:
                self._reads.release()
                done.set()

        threading.Thread(target=work, name="dfsnet-thumbnail-read", daemon=True).start()
        if not done.wait(self.read_timeout):
            raise late
        error = outcome.get("error")
        if isinstance(error, ThumbnailError):
            raise ThumbnailError(f"image {record.id} changed on disk since it was indexed ({error}); "
                                 "re-index it with `dfsnet index add`, or drop it with `dfsnet index prune`")
        if isinstance(error, OSError):
            raise ThumbnailError(f"image {record.id} cannot be read from where it was indexed "
                                 f"({error.strerror or type(error).__name__})")
        return outcome["data"]

    def _make(self, record: ImageRecord) -> bytes:
        data = self._read(record)
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
