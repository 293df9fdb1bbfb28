"""Checking an index on disk: every file the manifest names, and the indexed images themselves."""
from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
from pathlib import Path

import numpy as np

from dfsnet._io import checkpoint_hash, sha256_file
from dfsnet._validation import check_choice, check_positive_int
from dfsnet.store.files import checksum_problem, feature_problem, is_regular_file
from dfsnet.store.manifest import ENCODER_FILE, MODEL_FILE, ONNX_FILE, next_id, read_manifest, referenced_files
from dfsnet.store.metadata import sqlite_header_problem, sqlite_uri

__all__ = ["VerifyReport", "verify_index", "verify_generation"]

FILE_CHECKS = ("sample", "all", "none")


@dataclasses.dataclass
class VerifyReport:
    """Result of :func:`verify_index`: ``ok`` when ``errors`` is empty.

    Attributes
    ----------
    errors : list of str
        Each problem, naming the file (of the index, or an indexed image) it is in.
    n_files_checked : int
        Indexed image files re-hashed.
    count, generation : int
        From the manifest.
    notes : list of str
        What could not be checked, e.g. checksums absent from a manifest written by an
        older dfsnet.
    """

    errors: list[str]
    n_files_checked: int
    count: int
    generation: int
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def verify_index(index_dir, *, model=None, files: str = "sample", sample_size: int = 200,
                 seed: int = 0) -> VerifyReport:
    """Check the committed index at ``index_dir`` for damage and consistency, without loading its model.

    Checks every codes, metadata and feature file against the size and SHA-256 the manifest
    records; SQLite's ``integrity_check`` on the metadata; the manifest against the codes
    (count, bit width, ids, the file's own checksum), the metadata (generation, count, the
    same ids) and the feature chunks (rows, width); the model copy and encoder against their
    recorded hashes; optionally a checkpoint against the one the index was built with; and
    the indexed image files against their recorded content hashes.

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

    Raises
    ------
    FileNotFoundError, InputError
        No index at ``index_dir``, or a manifest that cannot be read (as :func:`read_manifest`).
    """
    check_choice(files, FILE_CHECKS, name="files")
    sample_size = check_positive_int(sample_size, name="sample_size")
    index_dir = Path(index_dir).expanduser().resolve()
    return verify_generation(index_dir, read_manifest(index_dir), model=model, files=files,
                             sample_size=sample_size, seed=seed)


def verify_generation(index_dir: Path, manifest: dict, *, model=None, files: str = "none", sample_size: int = 200,
                      seed: int = 0) -> VerifyReport:
    """:func:`verify_index` of the generation ``manifest`` describes (e.g. a manifest copy), not
    necessarily the committed one."""
    from dfsnet.hashing import Encoder
    from dfsnet.index import HammingIndex
    errors: list[str] = []
    notes: list[str] = []
    generation, count, bits = int(manifest["generation"]), int(manifest["count"]), int(manifest["bits"])
    fl = manifest["files"]
    names = referenced_files(manifest)
    missing = [n for n in names if not is_regular_file(index_dir / n)]
    if missing:
        errors.append(f"files named by the manifest are missing: {', '.join(missing)}")
        return VerifyReport(errors, 0, count, generation)

    recorded = manifest.get("checksums") or {}
    unsummed = [n for n in names if n not in (MODEL_FILE, ENCODER_FILE, ONNX_FILE) and n not in recorded]
    if unsummed:
        notes.append(f"the manifest records no checksum of {', '.join(unsummed)} (written by an older dfsnet); "
                     "those files were checked by their structure only")
    damaged = set()
    for name in names:
        problem = checksum_problem(index_dir, manifest, name, full=True)
        if problem:
            errors.append(problem)
            damaged.add(name)

    built = manifest["checkpoint"]["hash"]
    found = checkpoint_hash(index_dir / MODEL_FILE)
    if found != built:
        errors.append(f"{MODEL_FILE} is damaged or replaced: hash {found}, but the index was built with "
                      f"checkpoint hash {built}")
    if model is not None:
        given = checkpoint_hash(model)
        if given != built:
            errors.append(f"the index was built with checkpoint {manifest['checkpoint'].get('source')} (hash {built}), "
                          f"not with {Path(model).resolve()} (hash {given})")
    onnx = manifest.get("onnx")
    if onnx and sha256_file(index_dir / ONNX_FILE) != onnx["sha256"]:
        errors.append(f"{ONNX_FILE} is damaged or replaced: it does not match the sha256 recorded in the manifest")
    if sha256_file(index_dir / ENCODER_FILE) != manifest["encoder"]["sha256"]:
        errors.append(f"{ENCODER_FILE} is damaged or replaced: it does not match the sha256 recorded in the manifest")
    else:
        try:
            encoder = Encoder.load(index_dir / ENCODER_FILE)
        except (ValueError, OSError, KeyError) as exc:
            errors.append(f"{ENCODER_FILE} cannot be read ({exc})")
        else:
            if encoder.n_bits_ != bits:
                errors.append(f"{ENCODER_FILE} makes {encoder.n_bits_}-bit codes, the manifest says {bits}")

    code_ids = None
    try:
        index = HammingIndex.load(index_dir / fl["codes"])
    except ValueError as exc:
        errors.append(f"{fl['codes']} is damaged: {exc}")
    else:
        code_ids = np.sort(np.asarray(index.ids))
        if index.n_bits != bits:
            errors.append(f"{fl['codes']} holds {index.n_bits}-bit codes, the manifest says {bits}")
        if len(index) != count:
            errors.append(f"{fl['codes']} holds {len(index)} codes, the manifest counts {count}")
        elif code_ids.size and (code_ids[0] < 0 or code_ids[-1] >= next_id(manifest)):
            errors.append(f"{fl['codes']}: ids outside 0..{next_id(manifest) - 1}")

    rows = []
    meta = fl["metadata"]
    header = sqlite_header_problem(index_dir / meta)
    if header is not None:
        if meta not in damaged:
            errors.append(f"{meta} is damaged: {header}")
    else:
        try:
            with contextlib.closing(sqlite3.connect(sqlite_uri(index_dir / meta, read_only=True), uri=True)) as db:
                integrity = [r[0] for r in db.execute("PRAGMA integrity_check").fetchall()]
                if integrity != ["ok"]:
                    errors.append(f"{meta} is damaged: SQLite integrity_check: {'; '.join(integrity[:3])}")
                meta_gen = db.execute("SELECT value FROM info WHERE key = 'generation'").fetchone()
                rows = db.execute("SELECT id, path, sha256 FROM images ORDER BY id").fetchall()
        except sqlite3.DatabaseError as exc:
            errors.append(f"{meta} is damaged: not a readable metadata database ({exc})")
        else:
            ids = np.array([r[0] for r in rows], dtype=np.int64)
            if meta_gen is None or str(meta_gen[0]) != str(generation):
                errors.append(f"{meta} belongs to generation {meta_gen and meta_gen[0]}, the manifest is at "
                              f"{generation}")
            if ids.size != count:
                errors.append(f"{meta} holds {ids.size} images, the manifest counts {count}")
            elif code_ids is not None and code_ids.size == count and not np.array_equal(ids, code_ids):
                errors.append(f"{meta} and {fl['codes']} hold different ids")

    if fl["features"] is not None:
        rows_total = 0
        for chunk in fl["features"]:
            problem = feature_problem(index_dir, manifest, chunk)
            if problem is not None:
                if chunk["file"] not in damaged:
                    errors.append(problem)
                continue
            rows_total += int(chunk["rows"])
        if rows_total != next_id(manifest) and not damaged & {c["file"] for c in fl["features"]}:
            errors.append(f"feature chunks hold {rows_total} rows, the manifest has given out "
                          f"{next_id(manifest)} ids")

    checked = 0
    if files != "none" and rows:
        picks = range(len(rows))
        if files == "sample" and len(rows) > sample_size:
            picks = np.sort(np.random.default_rng(seed).choice(len(rows), sample_size, replace=False))
        for i in picks:
            image_id, path, digest = rows[int(i)]
            checked += 1
            if not is_regular_file(path):  # hashing a FIFO would block forever
                errors.append(f"image {image_id}: {path} cannot be read (missing, or not a regular file)")
                continue
            try:
                now = sha256_file(path)
            except OSError as exc:
                errors.append(f"image {image_id}: {path} cannot be read ({exc.strerror or exc})")
                continue
            if now != digest:
                errors.append(f"image {image_id}: {path} changed since it was indexed (content hash differs)")
    return VerifyReport(errors, checked, count, generation, notes)
