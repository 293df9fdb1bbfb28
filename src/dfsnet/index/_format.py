"""The single-file container that index ``save``/``load`` use.

Layout (all integers little-endian)::

    b"DFSNETIX"                 8 bytes, magic
    version                     uint32, FORMAT_VERSION
    header length               uint32
    header                      UTF-8 JSON: class name, parameters, count and the
                                name, dtype and shape of every section
    sections                    raw C-order array bytes, in header order
    SHA-256                     32 bytes, over every byte before it

No pickle is involved: sections are plain numeric arrays read into preallocated buffers,
and only dtypes from a short allow-list are accepted.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path

import numpy as np

from dfsnet._io import atomic_write

MAGIC = b"DFSNETIX"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sII")
_DIGEST_SIZE = 32
_MAX_HEADER = 1 << 20
_DTYPES = {"<i8", "<f4", "|u1"}


def write_container(path: str | os.PathLike, header: dict, sections: dict[str, np.ndarray]) -> None:
    """Write ``header`` and the arrays in ``sections`` to ``path`` atomically."""
    arrays = {name: np.ascontiguousarray(a) for name, a in sections.items()}
    # Flat byte views (no copy): memoryview cannot cast arrays with a zero-length axis.
    header = dict(header)
    header["sections"] = [
        {"name": name, "dtype": a.dtype.str, "shape": list(a.shape)} for name, a in arrays.items()
    ]
    blob = json.dumps(header, sort_keys=True).encode("utf-8")
    digest = hashlib.sha256()
    with atomic_write(path, "wb") as fh:
        for chunk in (_PREFIX.pack(MAGIC, FORMAT_VERSION, len(blob)), blob,
                      *(a.reshape(-1).view(np.uint8) for a in arrays.values())):
            digest.update(chunk)
            fh.write(chunk)
        fh.write(digest.digest())


def read_container(path: str | os.PathLike, *, expected_class: str) -> tuple[dict, dict[str, np.ndarray]]:
    """Read and verify a container written by :func:`write_container`.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        Wrong magic, unsupported format version, truncated or corrupt file (checksum
        mismatch), or a file holding another index class than ``expected_class``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: index file not found: {str(path)!r}")
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        prefix = fh.read(_PREFIX.size)
        if len(prefix) < _PREFIX.size or not prefix.startswith(MAGIC):
            raise ValueError(f"path: {str(path)!r} is not a dfsnet index file (expected magic {MAGIC!r})")
        _, version, header_len = _PREFIX.unpack(prefix)
        if version != FORMAT_VERSION:
            raise ValueError(
                f"path: {str(path)!r} has index format version {version}; this dfsnet reads "
                f"version {FORMAT_VERSION}"
            )
        if header_len > min(_MAX_HEADER, size - _PREFIX.size - _DIGEST_SIZE):
            raise ValueError(f"path: {str(path)!r} is truncated or corrupt (header length {header_len} "
                             f"does not fit in a {size}-byte file)")
        blob = fh.read(header_len)
        digest.update(prefix)
        digest.update(blob)
        try:
            header = json.loads(blob.decode("utf-8"))
            specs = [(s["name"], np.dtype(s["dtype"]), tuple(int(n) for n in s["shape"]))
                     for s in header["sections"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"path: {str(path)!r} is corrupt (unreadable header: {exc})") from None
        if any(dtype.str not in _DTYPES or min(shape, default=0) < 0 for _, dtype, shape in specs):
            raise ValueError(f"path: {str(path)!r} is corrupt (invalid section description)")
        expected_size = (_PREFIX.size + header_len + _DIGEST_SIZE
                         + sum(dtype.itemsize * math.prod(shape) for _, dtype, shape in specs))
        if size != expected_size:
            kind = "truncated" if size < expected_size else "corrupt"
            raise ValueError(f"path: {str(path)!r} is {kind}: expected {expected_size} bytes, found {size}")
        sections = {}
        for name, dtype, shape in specs:
            arr = np.empty(shape, dtype=dtype)
            view = arr.reshape(-1).view(np.uint8)
            if fh.readinto(view) != view.size:
                raise ValueError(f"path: {str(path)!r} is truncated (section {name!r} incomplete)")
            digest.update(view)
            sections[name] = arr
        if fh.read(_DIGEST_SIZE) != digest.digest():
            raise ValueError(f"path: {str(path)!r} is corrupt (SHA-256 checksum mismatch)")
    if header.get("class") != expected_class:
        raise ValueError(f"path: {str(path)!r} holds a {header.get('class')}, not a {expected_class}")
    return header, sections
