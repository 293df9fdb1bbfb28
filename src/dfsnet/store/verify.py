"""Checking an index on disk: every file the manifest names, and the indexed images themselves."""
from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
from pathlib import Path

import numpy as np

from dfsnet._io import sha256_file
from dfsnet._validation import check_choice, check_positive_int
from dfsnet.store.manifest import ENCODER_FILE, MODEL_FILE, read_manifest, referenced_files
from dfsnet.store.metadata import sqlite_uri

__all__ = ["VerifyReport", "verify_index"]

FILE_CHECKS = ("sample", "all", "none")


@dataclasses.dataclass
class VerifyReport:
    """Result of :func:`verify_index`: ``ok`` when ``errors`` is empty."""

    errors: list[str]
    n_files_checked: int
    count: int
    generation: int

    @property
    def ok(self) -> bool:
        return not self.errors


def verify_index(index_dir, *, model=None, files: str = "sample", sample_size: int = 200,
                 seed: int = 0) -> VerifyReport:
    """Check the committed index at ``index_dir`` for consistency, without loading its model.

    Checks the manifest against the codes (count, bit width, ids 0..n-1, checksum), the
    metadata (generation, count, ids) and the feature chunks (rows, width); the model copy
    and encoder against their recorded hashes; optionally a checkpoint against the one the
    index was built with; and the indexed image files against their recorded content hashes.

    Parameters
    ----------
    index_dir : path-like
    model : path-like, optional
        A checkpoint that must be the index's.
    files : {"sample", "all", "none"}
        Which indexed image files to re-hash.
    sample_size : int
        Files re-hashed with ``files="sample"``.
    seed : int
        Seed of the sample.

    Returns
    -------
    VerifyReport
    """
    from dfsnet.hashing import Encoder
    from dfsnet.index import HammingIndex
    from dfsnet.models import checkpoint_hash

    check_choice(files, FILE_CHECKS, name="files")
    sample_size = check_positive_int(sample_size, name="sample_size")
    index_dir = Path(index_dir).expanduser().resolve()
    errors: list[str] = []
    manifest = read_manifest(index_dir)
    generation, count, bits = int(manifest["generation"]), int(manifest["count"]), int(manifest["bits"])
    fl = manifest["files"]
    names = referenced_files(manifest)
    missing = [n for n in names if not (index_dir / n).is_file()]
    if missing:
        errors.append(f"files named by the manifest are missing: {', '.join(missing)}")
        return VerifyReport(errors, 0, count, generation)

    built = manifest["checkpoint"]["hash"]
    found = checkpoint_hash(index_dir / MODEL_FILE)
    if found != built:
        errors.append(f"{MODEL_FILE} has hash {found}, but the index was built with checkpoint hash {built}")
    if model is not None:
        given = checkpoint_hash(model)
        if given != built:
            errors.append(f"the index was built with checkpoint {manifest['checkpoint']['source']} (hash {built}), "
                          f"not with {Path(model).resolve()} (hash {given})")
    if sha256_file(index_dir / ENCODER_FILE) != manifest["encoder"]["sha256"]:
        errors.append(f"{ENCODER_FILE} does not match the sha256 recorded in the manifest")
    else:
        encoder = Encoder.load(index_dir / ENCODER_FILE)
        if encoder.n_bits_ != bits:
            errors.append(f"{ENCODER_FILE} makes {encoder.n_bits_}-bit codes, the manifest says {bits}")

    try:
        index = HammingIndex.load(index_dir / fl["codes"])
    except ValueError as exc:
        errors.append(f"{fl['codes']}: {exc}")
    else:
        if index.n_bits != bits:
            errors.append(f"{fl['codes']} holds {index.n_bits}-bit codes, the manifest says {bits}")
        if len(index) != count:
            errors.append(f"{fl['codes']} holds {len(index)} codes, the manifest counts {count}")
        elif not np.array_equal(np.sort(np.asarray(index.ids)), np.arange(count)):
            errors.append(f"{fl['codes']}: ids are not 0..{count - 1}")

    with contextlib.closing(sqlite3.connect(sqlite_uri(index_dir / fl["metadata"], read_only=True),
                                            uri=True)) as db:
        try:
            meta_gen = db.execute("SELECT value FROM info WHERE key = 'generation'").fetchone()
            rows = db.execute("SELECT id, path, sha256 FROM images ORDER BY id").fetchall()
        except sqlite3.DatabaseError as exc:
            errors.append(f"{fl['metadata']}: not a readable metadata database ({exc})")
            return VerifyReport(errors, 0, count, generation)
    ids = np.array([r[0] for r in rows], dtype=np.int64)
    if meta_gen is None or int(meta_gen[0]) != generation:
        errors.append(f"{fl['metadata']} belongs to generation {meta_gen and meta_gen[0]}, the manifest is at "
                      f"{generation}")
    if ids.size != count:
        errors.append(f"{fl['metadata']} holds {ids.size} images, the manifest counts {count}")
    elif not np.array_equal(ids, np.arange(count)):
        errors.append(f"{fl['metadata']}: ids are not 0..{count - 1}")

    if fl["features"] is not None:
        rows_total = 0
        for chunk in fl["features"]:
            try:
                arr = np.load(index_dir / chunk["file"], mmap_mode="r", allow_pickle=False)
            except ValueError as exc:
                errors.append(f"{chunk['file']}: unreadable ({exc})")
                continue
            expected = (chunk["rows"], manifest["model"]["feature_dim"])
            if arr.dtype != np.float32 or arr.shape != expected:
                errors.append(f"{chunk['file']}: expected float32 {expected}, found {arr.dtype} {arr.shape}")
            rows_total += arr.shape[0]
        if rows_total != count:
            errors.append(f"feature chunks hold {rows_total} rows, the manifest counts {count}")

    checked = 0
    if files != "none" and rows:
        picks = range(len(rows))
        if files == "sample" and len(rows) > sample_size:
            picks = np.sort(np.random.default_rng(seed).choice(len(rows), sample_size, replace=False))
        for i in picks:
            image_id, path, digest = rows[int(i)]
            checked += 1
            try:
                now = sha256_file(path)
            except OSError as exc:
                errors.append(f"image {image_id}: {path} cannot be read ({exc.strerror or exc})")
                continue
            if now != digest:
                errors.append(f"image {image_id}: {path} changed since it was indexed (content hash differs)")
    return VerifyReport(errors, checked, count, generation)
