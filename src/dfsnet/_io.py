"""Crash-safe file writes and content hashing."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _read_umask() -> int:
    # /proc tells without changing anything; os.umask can only be read by setting it, which
    # would briefly apply umask 0 to files other threads create.
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The permission bits ``open()`` would give a new file: ``0o666`` less the process umask."""
    return 0o666 & ~_read_umask()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temporary file beside ``path``; on success fsync it and rename it over ``path``.

    A crash or exception at any point leaves the previous ``path`` untouched, because
    ``os.replace`` is atomic on POSIX and Windows within one filesystem. The file gets the
    permissions of any new file (``0o666`` less the umask, 0644 usually), not the temporary
    file's 0600, so an index or checkpoint can be shared as other files are.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"path: expected a file to write, but {path} is a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a file stands where a parent folder should be
        raise NotADirectoryError(f"path: cannot write {path}: a file is in the way of its folder") from None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            if hasattr(os, "fchmod"):
                os.fchmod(fh.fileno(), new_file_mode())
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def commit_file(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Make ``tmp`` (complete, written by another writer, e.g. SQLite) durable and rename it over
    ``path``: the same guarantee as :func:`atomic_write` for files it cannot write itself."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w") as fh:
        fh.write(text)


def fsync_dir(directory: str | os.PathLike) -> None:
    # Makes the rename itself durable; not supported on every platform.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def json_digest(obj, *, length: int = 20) -> str:
    """Hex SHA-256 prefix of ``obj``'s canonical JSON (sorted keys, no spaces): a cache key or
    fingerprint that is the same in every process and on every machine."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:length]


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_size), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_hash(path: str | os.PathLike) -> str:
    """Short content hash of a checkpoint file: the first 16 hex digits of its SHA-256.

    :func:`save_checkpoint` writes identical bytes for identical weights, meta and extra, so
    equal hashes mean equal models (the key of feature caches).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no such checkpoint file: {path}")
    return sha256_file(path)[:16]
