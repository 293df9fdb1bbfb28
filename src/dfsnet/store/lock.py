"""Serialising writers of one index folder, and removing what no manifest names."""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from dfsnet.store.manifest import OWNED, backup_file, referenced_files

__all__ = ["LOCK_FILE", "write_lock", "collect_garbage", "previous_manifest"]

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"


@contextlib.contextmanager
def write_lock(index_dir: Path) -> Iterator[None]:
    """Hold the folder's exclusive write lock (``fcntl.flock`` on ``.lock``, POSIX); waits for it."""
    import fcntl

    if not index_dir.is_dir():
        raise FileNotFoundError(f"index_dir: no such folder: {index_dir}")

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


def previous_manifest(index_dir: Path, manifest: dict) -> dict | None:
    """The newest readable manifest copy of a generation older than ``manifest``'s, if any."""
    from dfsnet.store.manifest import GENERATION_FILE, parse_manifest

    current = int(manifest["generation"])
    older = sorted((int(m.group(2)), m.group(0)) for m in map(GENERATION_FILE.match, os.listdir(index_dir))
                   if m and m.group(1) == "manifest" and int(m.group(2)) < current)
    for _, name in reversed(older):
        try:
            return parse_manifest((index_dir / name).read_bytes(), where=name)
        except (OSError, ValueError):
            continue
    return None


def collect_garbage(index_dir: Path, manifest: dict | None, *, keep_previous: bool = True) -> None:
    """Delete files of the store's naming scheme that ``manifest`` does not name. Call under the lock.

    Only generation files (codes, metadata, feature chunks, manifest copies) and temporary
    files match the scheme; the model and encoder copies are never touched here. With
    ``keep_previous``, the newest older generation whose manifest copy is readable is kept
    too, so that `dfsnet index repair` can fall back to it when the current one is damaged.
    """
    keep: set[str] = set()
    if manifest is not None:
        keep |= {*referenced_files(manifest), backup_file(int(manifest["generation"]))}
        previous = previous_manifest(index_dir, manifest) if keep_previous else None
        if previous is not None:
            keep |= {*referenced_files(previous), backup_file(int(previous["generation"]))}
    for entry in os.scandir(index_dir):
        if entry.is_file() and OWNED.match(entry.name) and entry.name not in keep:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
            logger.debug("removed unreferenced %s", entry.path)
