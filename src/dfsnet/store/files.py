"""Checks of an index's files that are cheap enough for every load, and feature row access.

On load every file the manifest names must exist; the codes file is read whole and checked
against its own SHA-256 by :meth:`dfsnet.index.HammingIndex.load`; the metadata database is
checked by size, SQLite header and SHA-256 (it is read whole in well under a second for a
million images); feature chunks, which can be gigabytes, by size and ``.npy`` header only.
:func:`dfsnet.store.verify_index` checks everything fully.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np

from dfsnet._io import sha256_file
from dfsnet.store.manifest import ONNX_FILE, IndexDamagedError, referenced_files
from dfsnet.store.metadata import sqlite_header_problem

__all__ = ["NpyLayout", "npy_layout", "check_present", "check_on_load", "checksum_problem", "is_regular_file"]

_HINT = "run `dfsnet index verify`, then `dfsnet index repair`"


class NpyLayout:
    """Where the rows of a 2-D float32 ``.npy`` file lie: ``offset`` bytes in, ``shape`` rows x width."""

    def __init__(self, offset: int, shape: tuple[int, ...], dtype: np.dtype, fortran: bool):
        self.offset, self.shape, self.dtype, self.fortran = offset, shape, dtype, fortran


def npy_layout(path: Path) -> NpyLayout:
    """Parse the header of a ``.npy`` file without reading its data (no pickle is ever allowed).

    Raises
    ------
    ValueError
        Not a ``.npy`` file, or an unreadable header (an empty or truncated file included).
    """
    with open(path, "rb") as fh:
        try:
            version = np.lib.format.read_magic(fh)
            read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read:
                raise ValueError(f".npy format version {version} is not one this dfsnet writes")
            shape, fortran, dtype = read[version](fh)
        except (ValueError, EOFError, SyntaxError, TypeError) as exc:
            raise ValueError(f"not a readable .npy file ({type(exc).__name__}: {exc})") from None
        return NpyLayout(fh.tell(), shape, dtype, fortran)


def is_regular_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a regular file (not a FIFO, device or folder), following symlinks."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def check_present(index_dir: Path, manifest: dict) -> None:
    """Raise :class:`IndexDamagedError` naming the files the manifest names that are missing.

    The ONNX graph is not required here: torch serves an index without it (a query in ONNX
    Runtime checks it when it loads it)."""
    missing = [n for n in referenced_files(manifest) if n != ONNX_FILE and not is_regular_file(index_dir / n)]
    if missing:
        raise IndexDamagedError(f"index_dir: files named by the manifest of {index_dir} are missing: "
                                f"{', '.join(missing)}; {_HINT}")


def checksum_problem(index_dir: Path, manifest: dict, name: str, *, full: bool) -> str | None:
    """How ``name`` differs from the size (and, with ``full``, the SHA-256) the manifest records."""
    expected = (manifest.get("checksums") or {}).get(name)
    if not isinstance(expected, dict):
        return None
    size = (index_dir / name).stat().st_size
    if size != expected.get("size"):
        return f"{name} is damaged: {size} bytes, the manifest records {expected.get('size')}"
    if full and sha256_file(index_dir / name) != expected.get("sha256"):
        return f"{name} is damaged: its SHA-256 differs from the one the manifest records"
    return None


def feature_problem(index_dir: Path, manifest: dict, chunk: dict) -> str | None:
    """What is wrong with a feature chunk's header and size, or None."""
    name, dim = chunk["file"], int(manifest["model"]["feature_dim"])
    path = index_dir / name
    try:
        layout = npy_layout(path)
    except ValueError as exc:
        return f"{name} is damaged: {exc}"
    expected = (int(chunk["rows"]), dim)
    if layout.dtype != np.dtype("<f4") or layout.shape != expected or layout.fortran:
        return f"{name} is damaged: expected float32 {expected}, its header says {layout.dtype} {layout.shape}"
    size = path.stat().st_size
    if size != layout.offset + 4 * expected[0] * expected[1]:
        return (f"{name} is damaged: {size} bytes, its header needs {layout.offset + 4 * expected[0] * expected[1]}")
    return None


def check_on_load(index_dir: Path, manifest: dict) -> None:
    """The checks of every load: presence, sizes, headers, the metadata's SHA-256.

    Raises
    ------
    IndexDamagedError
        Naming the first damaged or missing file.
    """
    check_present(index_dir, manifest)
    files = manifest["files"]
    if files["metadata"] is not None:
        name = files["metadata"]
        problem = checksum_problem(index_dir, manifest, name, full=True)
        if problem is None:
            header = sqlite_header_problem(index_dir / name)
            problem = header and f"{name} is damaged: {header}"
        if problem:
            raise IndexDamagedError(f"index_dir: {problem}; {_HINT}")
    for chunk in files["features"] or []:
        problem = checksum_problem(index_dir, manifest, chunk["file"], full=False) or \
            feature_problem(index_dir, manifest, chunk)
        if problem:
            raise IndexDamagedError(f"index_dir: {problem}; {_HINT}")
