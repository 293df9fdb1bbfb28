"""Index maintenance: removing images, pruning entries whose file is gone, repairing a folder,
giving an index an ONNX graph.

Each writes at most one new generation under the write lock, like an add, so a killed
process leaves the previous generation intact. Ids are never renumbered: the kept images
keep theirs and removed ids are not given out again.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from dfsnet._io import atomic_write_text
from dfsnet.errors import InputError, InputTypeError, NotFoundError
from dfsnet.store.builder import _gone_or_changed, display_path, write_generation
from dfsnet.store.files import check_on_load, is_regular_file
from dfsnet.store.lock import collect_garbage, write_lock
from dfsnet.store.manifest import (
    ENCODER_FILE,
    GENERATION_FILE,
    MANIFEST,
    MODEL_FILE,
    ONNX_FILE,
    parse_manifest,
    read_manifest,
    referenced_files,
)
from dfsnet.store.metadata import ImageRecord, MetadataReader

__all__ = ["RemoveReport", "PruneReport", "RepairReport", "OnnxReport", "remove_images", "prune_index",
           "repair_index", "add_onnx_graph", "find_remains"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RemoveReport:
    """What :func:`remove_images` did: the removed records, and the index after it."""

    removed: list[ImageRecord]
    generation: int
    count: int


@dataclasses.dataclass
class PruneReport:
    """What :func:`prune_index` found (and, unless ``dry_run``, removed).

    Attributes
    ----------
    gone : list of ImageRecord
        Images whose file is missing (or no longer a regular file).
    changed : list of ImageRecord
        Images whose file now holds other content.
    dry_run : bool
    generation, count : int
        The index after the call.
    """

    gone: list[ImageRecord]
    changed: list[ImageRecord]
    dry_run: bool
    generation: int
    count: int

    @property
    def n_stale(self) -> int:
        return len(self.gone) + len(self.changed)


@dataclasses.dataclass
class RepairReport:
    """What :func:`repair_index` did.

    Attributes
    ----------
    status : {"ok", "repaired", "failed"}
        "ok": the committed generation was complete, nothing changed; "repaired": the
        manifest now names the newest complete generation; "failed": none is complete.
    generation, count : int or None
        The committed generation after the call, and its image count.
    lost : list of str
        Each newer generation that was not complete, what was wrong with it, and how many
        images it held beyond the recovered one.
    problems : list of str
        With "failed": why each candidate generation was refused.
    kept : list of str
        Files of lost generations, renamed with a ``.lost`` suffix rather than deleted.
    """

    status: str
    generation: int | None
    count: int | None
    lost: list[str]
    problems: list[str]
    kept: list[str]

    @property
    def ok(self) -> bool:
        return self.status != "failed"


def find_remains(index_dir: Path) -> list[tuple[str, int]]:
    """The files of an index in ``index_dir`` as ``(name, generation)`` (0 for the model, encoder and ONNX graph)."""
    if not index_dir.is_dir():
        return []
    found = []
    for name in os.listdir(index_dir):
        match = GENERATION_FILE.match(name)
        if match:
            found.append((name, int(match.group(2))))
        elif name in (MODEL_FILE, ENCODER_FILE, ONNX_FILE):
            found.append((name, 0))
        elif name == MANIFEST:
            try:
                generation = int(parse_manifest((index_dir / name).read_bytes(), where=name)["generation"])
            except (OSError, ValueError):
                generation = 0
            found.append((name, generation))
    return sorted(found)


def _check_ids(ids) -> list[int]:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise InputTypeError(f"ids: expected a list of ints, got {type(ids).__name__}")
    out = []
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise InputTypeError(f"ids: expected ints, got {i!r} ({type(i).__name__})")
        out.append(int(i))
    return out


def _open_current(index_dir: Path) -> tuple[dict, MetadataReader]:
    manifest = read_manifest(index_dir)
    check_on_load(index_dir, manifest)  # never derive a generation from a damaged one
    return manifest, MetadataReader(index_dir / manifest["files"]["metadata"])


def _remove(index_dir: Path, manifest: dict, records: list[ImageRecord]) -> dict:
    """Commit a generation of ``manifest`` without ``records``; returns its manifest."""
    from dfsnet.index import HammingIndex
    from dfsnet.index._format import read_container

    drop = np.array(sorted(r.id for r in records), dtype=np.int64)
    _, sections = read_container(index_dir / manifest["files"]["codes"], expected_class="HammingIndex")
    keep = ~np.isin(sections["ids"], drop)
    codes = HammingIndex(int(manifest["bits"]))
    codes.add(sections["codes"][keep], ids=sections["ids"][keep])
    stats = {**manifest["stats"], "n_removed": int(manifest["stats"].get("n_removed", 0)) + len(drop)}
    return write_generation(index_dir, manifest, codes=codes, removed=drop.tolist(), stats=stats)


def remove_images(index_dir, ids: Iterable[int] = (), *, paths: Iterable = ()) -> RemoveReport:
    """Drop images from the index at ``index_dir`` by id or by indexed path, as one new generation.

    Parameters
    ----------
    index_dir : path-like
    ids : iterable of int
        Ids of indexed images.
    paths : iterable of path-like
        Paths of indexed image files (as indexed; made absolute here).

    Returns
    -------
    RemoveReport

    Raises
    ------
    InputError
        Neither ids nor paths given.
    NotFoundError
        An id or path that is not in the index (nothing is removed then).
    """
    index_dir = Path(index_dir).expanduser().resolve()
    ids = _check_ids(ids)
    wanted_paths = [os.path.abspath(os.path.expanduser(os.fspath(p))) for p in paths]
    if not ids and not wanted_paths:
        raise InputError("ids: expected at least one id or path to remove, got none")
    read_manifest(index_dir)  # before the lock: a folder that is no index gets no .lock file
    with write_lock(index_dir):
        manifest, metadata = _open_current(index_dir)
        try:
            found = metadata.records(ids)
            by_path = metadata.by_path(wanted_paths)
        finally:
            metadata.close()
        unknown = [str(i) for i in ids if i not in found] + \
            [display_path(p) for p in wanted_paths if p not in by_path]
        if unknown:
            raise NotFoundError(f"ids: not in the index {index_dir}: {', '.join(unknown[:10])}"
                                f"{' ...' if len(unknown) > 10 else ''}; nothing was removed")
        records = list({r.id: r for r in [*found.values(), *by_path.values()]}.values())
        manifest = _remove(index_dir, manifest, records)
    logger.info("removed %d images from %s; %d remain", len(records), index_dir, manifest["count"])
    return RemoveReport(sorted(records, key=lambda r: r.id), int(manifest["generation"]), int(manifest["count"]))


def prune_index(index_dir, *, dry_run: bool = False) -> PruneReport:
    """Drop the images whose file is gone or now holds other content, as one new generation.

    A file counts as changed when its size differs from the indexed one, or its mtime does
    and its content hash too (a file touched but unchanged stays).

    Parameters
    ----------
    index_dir : path-like
    dry_run : bool
        Only report what would be dropped.

    Returns
    -------
    PruneReport
    """
    index_dir = Path(index_dir).expanduser().resolve()
    read_manifest(index_dir)  # before the lock: a folder that is no index gets no .lock file
    with write_lock(index_dir):
        manifest, metadata = _open_current(index_dir)
        try:
            records = metadata.all_records()
        finally:
            metadata.close()
        gone = [r for r in records if not is_regular_file(r.path)]
        changed = [r for r in records if r not in gone and _gone_or_changed(r)]
        if (gone or changed) and not dry_run:
            manifest = _remove(index_dir, manifest, gone + changed)
    logger.info("%s %d stale images of %s (%d gone, %d changed)", "found" if dry_run else "removed",
                len(gone) + len(changed), index_dir, len(gone), len(changed))
    return PruneReport(gone, changed, bool(dry_run), int(manifest["generation"]), int(manifest["count"]))


@dataclasses.dataclass
class OnnxReport:
    """What :func:`add_onnx_graph` did.

    Attributes
    ----------
    status : {"added", "replaced", "present"}
        A graph was written for an index without one, written over a damaged or missing one, or
        the index already had a sound graph (nothing written).
    generation : int
        The index after the call.
    sha256 : str
        The graph's SHA-256, as the manifest records it.
    codes_precision : str
        What computed the index's codes ("fp32" or "bf16"): queries in ONNX Runtime run in fp32.
    """

    status: str
    generation: int
    sha256: str
    codes_precision: str


def add_onnx_graph(index_dir) -> OnnxReport:
    """Export the model of the index at ``index_dir`` as ``model.onnx``, as a new generation.

    An index built with ``runtime="torch"``, without the exporter installed, or by a dfsnet
    older than its ONNX graphs has none, so its queries import and run torch. This writes the
    graph :meth:`ImageIndex.build` would have written and commits a generation whose manifest
    names it (the codes and metadata are unchanged); from then on ``runtime="auto"`` runs queries
    in ONNX Runtime on the CPU. A damaged or missing graph the manifest names is written again.

    Parameters
    ----------
    index_dir : path-like

    Returns
    -------
    OnnxReport

    Raises
    ------
    InputError
        ``onnxscript`` or ``onnxruntime`` is not installed, or the model cannot be exported.
    IndexDamagedError
        Another file of the index is damaged (``dfsnet index repair`` first).
    """
    from dfsnet._io import sha256_file
    from dfsnet.runtime import onnx_available
    from dfsnet.store.builder import Builder, export_onnx_graph

    index_dir = Path(index_dir).expanduser().resolve()
    if not onnx_available(export=True):
        raise InputError("runtime: exporting an ONNX graph needs onnxscript and onnxruntime; "
                         "install them with `pip install onnxscript onnxruntime`")
    read_manifest(index_dir)  # before the lock: a folder that is no index gets no .lock file
    with write_lock(index_dir):
        manifest = read_manifest(index_dir)
        onnx = manifest.get("onnx")
        precision = str(manifest.get("precision", "fp32"))
        graph = index_dir / ONNX_FILE
        if onnx and is_regular_file(graph) and sha256_file(graph) == onnx["sha256"]:
            check_on_load(index_dir, manifest)
            return OnnxReport("present", int(manifest["generation"]), onnx["sha256"], precision)
        check_on_load(index_dir, {**manifest, "onnx": None})  # every other file sound
        builder = Builder.from_checkpoint(index_dir, int(manifest["image_size"]), "cpu")
        entry, _ = export_onnx_graph(builder.model, index_dir, int(manifest["image_size"]), runtime="onnx",
                                     device_type="cpu", precision="fp32")
        new = write_generation(index_dir, {**manifest, "onnx": entry})
    logger.info("%s: wrote %s (generation %d)", index_dir, ONNX_FILE, new["generation"])
    return OnnxReport("replaced" if onnx else "added", int(new["generation"]), entry["sha256"], precision)


def repair_index(index_dir) -> RepairReport:
    """Make ``manifest.json`` name the newest complete generation of ``index_dir``.

    Candidates are the committed manifest and the manifest copies kept beside it (the
    current and the previous generation's); each is checked fully (every file's presence,
    size and SHA-256, the model and encoder hashes, the codes, SQLite's integrity check), and
    the newest that passes is committed. Files only the newer, broken generations name are
    renamed ``<name>.lost`` (kept, not deleted); the report says what they held.

    Parameters
    ----------
    index_dir : path-like

    Returns
    -------
    RepairReport
        ``status`` "failed" when no generation is complete (then nothing was changed).

    Raises
    ------
    FileNotFoundError
        No such folder.
    """
    from dfsnet.store.verify import verify_generation

    index_dir = Path(index_dir).expanduser().resolve()
    if not index_dir.is_dir():
        raise FileNotFoundError(f"index_dir: no such folder: {index_dir}")
    if not find_remains(index_dir):  # checked before the lock: a folder that is no index gets no .lock file
        return RepairReport("failed", None, None, [], [_no_manifest(index_dir)], [])
    with write_lock(index_dir):
        candidates: list[tuple[int, str, dict | None, str | None]] = []
        for name, generation in find_remains(index_dir):
            match = GENERATION_FILE.match(name)
            if name == MANIFEST or (match and match.group(1) == "manifest"):
                try:
                    manifest = parse_manifest((index_dir / name).read_bytes(), where=name)
                    candidates.append((int(manifest["generation"]), name, manifest, None))
                except (OSError, ValueError) as exc:
                    candidates.append((generation, name, None, str(exc)))
        # Newest first; the committed manifest before its own copy.
        candidates.sort(key=lambda c: (-c[0], c[1] != MANIFEST))
        if not candidates:
            return RepairReport("failed", None, None, [], [_no_manifest(index_dir)], [])
        problems: list[str] = []
        broken: list[tuple[int, dict | None, list[str]]] = []
        for generation, name, manifest, error in candidates:
            errors = [error] if manifest is None else verify_generation(index_dir, manifest).errors
            if errors:
                problems.append(f"{name} (generation {generation}): {'; '.join(errors[:3])}")
                broken.append((generation, manifest, errors))
                continue
            committed = name == MANIFEST
            if committed and not broken:
                return RepairReport("ok", generation, int(manifest["count"]), [], [], [])
            return _recover(index_dir, manifest, name, broken)
        return RepairReport("failed", None, None, [], problems, [])


def _no_manifest(index_dir: Path) -> str:
    return (f"{index_dir} holds no manifest and no manifest copy (indexes written before dfsnet kept copies "
            "cannot be recovered without one)")


def _recover(index_dir: Path, manifest: dict, source: str, broken: list) -> RepairReport:
    keep = set(referenced_files(manifest))
    lost, kept, seen = [], [], set()
    for generation, newer, errors in broken:
        if generation <= int(manifest["generation"]) or generation in seen:
            continue
        seen.add(generation)
        extra = f", {int(newer['count']) - int(manifest['count']):+d} images against the recovered one" \
            if newer is not None else ""
        lost.append(f"generation {generation}{extra}: {'; '.join(errors[:3])}")
        for name in referenced_files(newer) if newer is not None else []:
            if name not in keep and (index_dir / name).is_file() and GENERATION_FILE.match(name):
                os.replace(index_dir / name, index_dir / f"{name}.lost")
                kept.append(f"{name}.lost")
    if source != MANIFEST:
        atomic_write_text(index_dir / MANIFEST, (index_dir / source).read_text(encoding="utf-8"))
    collect_garbage(index_dir, manifest)
    logger.warning("recovered generation %s of %s (%d images) from %s", manifest["generation"], index_dir,
                   manifest["count"], source)
    return RepairReport("repaired", int(manifest["generation"]), int(manifest["count"]), lost, [], sorted(kept))

