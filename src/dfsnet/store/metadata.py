"""Image metadata of one generation: an SQLite database, written once and then read-only."""
from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
import threading
from pathlib import Path

from dfsnet._io import commit_file

__all__ = ["ImageRecord", "MetadataReader", "write_metadata", "sqlite_uri"]

SCHEMA = """
CREATE TABLE images (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    mtime REAL NOT NULL,
    label TEXT
);
CREATE TABLE info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_COLUMNS = "id, path, sha256, size, mtime, label"


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """Metadata of one indexed image (a row of ``metadata.<gen>.sqlite``)."""

    id: int
    path: str
    sha256: str
    size: int
    mtime: float
    label: str | None


def sqlite_uri(path: Path, *, read_only: bool) -> str:
    # immutable=1: generations are never modified after their commit, so SQLite needs no locks.
    return path.resolve().as_uri() + ("?mode=ro&immutable=1" if read_only else "")


def write_metadata(src: Path | None, dst: Path, rows: list[tuple], generation: int) -> None:
    """Write ``dst`` as a copy of ``src`` (or a new database) plus ``rows``, crash-safely.

    Parameters
    ----------
    src : pathlib.Path or None
        The previous generation's database.
    dst : pathlib.Path
    rows : list of tuple
        ``(id, path, sha256, size, mtime, label)`` per new image.
    generation : int
        Recorded in the ``info`` table, so a database can be matched to its manifest.
    """
    tmp = dst.with_name(f".{dst.name}.tmp")
    for leftover in (tmp, tmp.with_name(tmp.name + "-journal")):
        leftover.unlink(missing_ok=True)
    conn = sqlite3.connect(tmp)
    try:
        if src is None:
            conn.executescript(SCHEMA)
        else:
            with contextlib.closing(sqlite3.connect(sqlite_uri(src, read_only=True), uri=True)) as source:
                source.backup(conn)
        with conn:
            conn.executemany(f"INSERT INTO images ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)", rows)
            conn.execute("INSERT OR REPLACE INTO info (key, value) VALUES ('generation', ?)", (str(generation),))
    finally:
        conn.close()
    commit_file(tmp, dst)


class MetadataReader:
    """A read-only connection to one generation's database, shareable between threads."""

    def __init__(self, path: Path):
        self._db = sqlite3.connect(sqlite_uri(path, read_only=True), uri=True, check_same_thread=False)
        self._lock = threading.Lock()

    def records(self, ids) -> dict[int, ImageRecord]:
        """The records of ``ids`` (ids with none are absent from the result)."""
        ids = [int(i) for i in ids]
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM images WHERE id IN ({marks})", ids).fetchall()
        return {row[0]: ImageRecord(*row) for row in rows}

    def hashes(self) -> set[str]:
        """Content hashes of every indexed image."""
        with self._lock:
            return {row[0] for row in self._db.execute("SELECT sha256 FROM images")}

    def label_counts(self) -> dict[str | None, int]:
        """Images per label, sorted by label (unlabelled images under None)."""
        with self._lock:
            counts = dict(self._db.execute("SELECT COALESCE(label, ''), COUNT(*) FROM images GROUP BY label"))
        return {(k or None): v for k, v in sorted(counts.items())}

    def close(self) -> None:
        self._db.close()
