"""Image metadata of one generation: an SQLite database, written once and then read-only."""
from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path

from dfsnet._io import commit_file
from dfsnet.store.manifest import IndexDamagedError

__all__ = ["ImageRecord", "MetadataReader", "write_metadata", "sqlite_uri", "sqlite_header_problem"]

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
# Files whose content is indexed under another path (exact duplicates, skipped when added),
# for `dfsnet dedup`. Databases written before it existed lack it; a copy gains it.
DUPLICATES_SCHEMA = "CREATE TABLE IF NOT EXISTS duplicates (path TEXT PRIMARY KEY, sha256 TEXT NOT NULL)"
_COLUMNS = "id, path, sha256, size, mtime, label"
_SQLITE_MAGIC = b"SQLite format 3\x00"
# SQLite binds integers as signed 64-bit; a larger one raises OverflowError, not "no such row".
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


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


def sqlite_header_problem(path: Path) -> str | None:
    """What is wrong with the SQLite file header of ``path`` (magic, page size, file size), or None."""
    with open(path, "rb") as fh:
        head = fh.read(100)
    size = path.stat().st_size
    if len(head) < 100 or not head.startswith(_SQLITE_MAGIC):
        return f"not an SQLite database (the {size}-byte file lacks the SQLite header)"
    page = int.from_bytes(head[16:18], "big")
    page = 65536 if page == 1 else page
    if page < 512 or page & (page - 1) or size % page:
        return f"damaged SQLite header (page size {page} does not divide the file size {size})"
    pages, valid_for, changes = (int.from_bytes(head[i:i + 4], "big") for i in (28, 92, 24))
    if valid_for == changes and pages * page != size:
        return f"truncated or extended: the header counts {pages} pages of {page} bytes, the file has {size} bytes"
    return None


def write_metadata(src: Path | None, dst: Path, rows: list[tuple], generation: int, *,
                   moved: Iterable[tuple] = (), removed: Iterable[int] = (),
                   duplicates: Iterable[tuple[str, str]] = ()) -> None:
    """Write ``dst`` as a copy of ``src`` (or a new database) with changes, crash-safely.

    Parameters
    ----------
    src : pathlib.Path or None
        The previous generation's database.
    dst : pathlib.Path
    rows : list of tuple
        ``(id, path, sha256, size, mtime, label)`` per new image.
    generation : int
        Recorded in the ``info`` table, so a database can be matched to its manifest.
    moved : iterable of tuple
        ``(id, path, size, mtime, label)`` of images whose file moved (same content).
    removed : iterable of int
        Ids whose rows are dropped.
    duplicates : iterable of (path, sha256)
        Files found with the content of an indexed image under another path. Entries whose
        content is no longer indexed, or whose path became an indexed one, are dropped.
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
            conn.execute(DUPLICATES_SCHEMA)
            conn.executemany("DELETE FROM images WHERE id = ?", [(int(i),) for i in removed])
            conn.executemany("UPDATE images SET path = ?, size = ?, mtime = ?, label = ? WHERE id = ?",
                             [(p, s, t, lab, int(i)) for i, p, s, t, lab in moved])
            conn.executemany(f"INSERT INTO images ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)", rows)
            conn.executemany("INSERT OR REPLACE INTO duplicates (path, sha256) VALUES (?, ?)", list(duplicates))
            conn.execute("DELETE FROM duplicates WHERE sha256 NOT IN (SELECT sha256 FROM images) "
                         "OR path IN (SELECT path FROM images)")
            conn.execute("INSERT OR REPLACE INTO info (key, value) VALUES ('generation', ?)", (str(generation),))
        if removed:
            conn.execute("VACUUM")
    finally:
        conn.close()
    commit_file(tmp, dst)


class MetadataReader:
    """A read-only connection to one generation's database, shareable between threads.

    Any SQLite error while reading (a file damaged after it was opened) is raised as
    :class:`~dfsnet.store.manifest.IndexDamagedError` naming the file.
    """

    def __init__(self, path: Path):
        self.path = path
        self._db = sqlite3.connect(sqlite_uri(path, read_only=True), uri=True, check_same_thread=False)
        self._lock = threading.Lock()

    def _query(self, sql: str, params: Iterable = ()) -> list[tuple]:
        try:
            with self._lock:
                return self._db.execute(sql, tuple(params)).fetchall()
        except sqlite3.DatabaseError as exc:
            raise IndexDamagedError(f"index_dir: {self.path.name} cannot be read ({exc}); run "
                                    "`dfsnet index verify`, then `dfsnet index repair`") from None

    def generation(self) -> int | None:
        """The generation recorded in the ``info`` table."""
        row = self._query("SELECT value FROM info WHERE key = 'generation'")
        return int(row[0][0]) if row and str(row[0][0]).isdigit() else None

    def count(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM images")[0][0])

    def records(self, ids) -> dict[int, ImageRecord]:
        """The records of ``ids`` (ids with none, or outside int64, are absent from the result)."""
        ids = [int(i) for i in ids if INT64_MIN <= int(i) <= INT64_MAX]
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self._query(f"SELECT {_COLUMNS} FROM images WHERE id IN ({marks})", ids)
        return {row[0]: ImageRecord(*row) for row in rows}

    def all_records(self) -> list[ImageRecord]:
        """Every record, by ascending id."""
        return [ImageRecord(*row) for row in self._query(f"SELECT {_COLUMNS} FROM images ORDER BY id")]

    def page(self, offset: int, limit: int) -> list[ImageRecord]:
        """Records ``offset`` to ``offset + limit - 1`` in ascending id order."""
        return [ImageRecord(*row) for row in self._query(
            f"SELECT {_COLUMNS} FROM images ORDER BY id LIMIT ? OFFSET ?", (int(limit), int(offset)))]

    def by_path(self, paths: Iterable[str]) -> dict[str, ImageRecord]:
        """The records whose path is one of ``paths`` (exact match), keyed by path."""
        paths = list(dict.fromkeys(paths))
        out: dict[str, ImageRecord] = {}
        for start in range(0, len(paths), 500):  # SQLite caps the number of bound parameters
            part = paths[start:start + 500]
            rows = self._query(f"SELECT {_COLUMNS} FROM images WHERE path IN ({','.join('?' * len(part))})", part)
            out.update({row[1]: ImageRecord(*row) for row in rows})
        return out

    def by_hash(self) -> dict[str, ImageRecord]:
        """Every record keyed by its content hash."""
        return {r.sha256: r for r in self.all_records()}

    def duplicates(self) -> dict[str, list[str]]:
        """Paths of exact duplicates recorded when they were skipped, by content hash ({} for a
        database written before they were recorded)."""
        if not self._query("SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'duplicates'"):
            return {}
        out: dict[str, list[str]] = {}
        for path, digest in self._query("SELECT path, sha256 FROM duplicates ORDER BY path"):
            out.setdefault(digest, []).append(path)
        return out

    def label_counts(self) -> dict[str | None, int]:
        """Images per label, sorted by label (unlabelled images under None)."""
        counts = dict(self._query("SELECT COALESCE(label, ''), COUNT(*) FROM images GROUP BY label"))
        return {(k or None): v for k, v in sorted(counts.items())}

    def close(self) -> None:
        self._db.close()
