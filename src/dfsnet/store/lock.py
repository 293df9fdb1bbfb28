"""Serialising writers of one index folder, and removing what no manifest names."""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from dfsnet.store.manifest import OWNED, referenced_files

__all__ = ["LOCK_FILE", "write_lock", "collect_garbage"]

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"


@contextlib.contextmanager
def write_lock(index_dir: Path) -> Iterator[None]:
    """Hold the folder's exclusive write lock (``fcntl.flock`` on ``.lock``, POSIX); waits for it."""
    import fcntl

    with open(index_dir / LOCK_FILE, "a+b") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process writing %s", index_dir)
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def collect_garbage(index_dir: Path, manifest: dict | None) -> None:
    """Delete files of the store's naming scheme that ``manifest`` does not name. Call under the lock.

    Only generation files (codes, metadata, feature chunks) and temporary files match the
    scheme; the model and encoder copies are never touched here.
    """
    keep = set(referenced_files(manifest)) if manifest is not None else set()
    for entry in os.scandir(index_dir):
        if entry.is_file() and OWNED.match(entry.name) and entry.name not in keep:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
            logger.debug("removed unreferenced %s", entry.path)
