"""Writing an index: scan a folder, extract features, encode, and commit one new generation."""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
from pathlib import Path

import numpy as np

from dfsnet._io import atomic_write, sha256_file
from dfsnet.errors import InputError
from dfsnet.store.files import is_regular_file
from dfsnet.store.lock import collect_garbage
from dfsnet.store.manifest import (
    MODEL_FILE,
    ONNX_FILE,
    file_checksum,
    generation_file,
    next_id,
    now,
    referenced_files,
    write_manifest,
)
from dfsnet.store.metadata import ImageRecord, write_metadata

__all__ = ["AddReport", "Builder", "scan_images", "write_generation", "display_path", "Plan", "plan_files",
           "read_paths_file"]

logger = logging.getLogger(__name__)



@dataclasses.dataclass
class AddReport:
    """What one :meth:`ImageIndex.add` (or build) did.

    Attributes
    ----------
    n_found : int
        Image files found under the folder.
    n_added : int
        Images added to the index.
    n_duplicates : int
        Files skipped because their content is already indexed (or repeats in the folder).
    n_bad : int
        Files skipped because they could not be decoded, were no regular file, or have a name
        that is not valid UTF-8 (the metadata stores text).
    bad_paths : list of str
        Their paths, with undecodable bytes written as ``\\xNN``.
    generation : int
        The index generation after the call.
    count : int
        Images in the index after the call.
    seconds : float
    n_moved : int
        Indexed images found under a new path (their old file gone or changed), re-pointed
        to it; their ids stay.
    """

    n_found: int
    n_added: int
    n_duplicates: int
    n_bad: int
    bad_paths: list[str]
    generation: int
    count: int
    seconds: float
    n_moved: int = 0


def display_path(path: str) -> str:
    """``path`` with bytes that are not UTF-8 (``os.fsdecode``'s surrogates) shown as ``\\xNN``."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def scan_images(images) -> list[tuple[str, str | None]]:
    """``(absolute path, label)`` of the image files of a folder or a paths file, sorted.

    Parameters
    ----------
    images : path-like
        A folder, searched recursively: the label is the name of the first sub-folder below
        it (the class-per-folder convention); files directly in it have none. Or a text file
        of paths (:func:`read_paths_file`), so that a subset indexes without copying.
    """
    from dfsnet.data import iter_image_files

    root = Path(images).expanduser().resolve()
    if root.is_file():
        return read_paths_file(root)
    out = []
    for path in iter_image_files(root):
        rel = path.relative_to(root).parts
        out.append((str(path), rel[0] if len(rel) > 1 else None))
    return out


def read_paths_file(path) -> list[tuple[str, str | None]]:
    """``(absolute path, label)`` from a text file with one image path per line, sorted, each once.

    A line is ``PATH`` or ``PATH<TAB>LABEL``; relative paths are relative to the file's folder;
    blank lines and lines starting with ``#`` are ignored. Entries are not checked here: a
    missing or unreadable file is skipped and counted when indexed, like a bad file in a folder.

    Raises
    ------
    InputError
        The file is not UTF-8 text (e.g. an image given by mistake) or lists no path.
    """
    path = Path(path).expanduser().resolve()
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"images: {path} is neither a folder nor a UTF-8 text file of image paths") from None
    if "\x00" in text:
        raise InputError(f"images: {path} is neither a folder nor a text file of image paths (it holds NUL bytes)")
    out: dict[str, str | None] = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, label = line.rstrip("\r").partition("\t")
        full = os.path.abspath(path.parent / Path(name.strip()).expanduser())
        out.setdefault(full, label.strip() or None)
    if not out:
        raise InputError(f"images: the paths file {path} lists no image path")
    return sorted(out.items())


def write_generation(index_dir: Path, manifest: dict, *, codes=None, rows: list[tuple] = (),
                     moved: list[tuple] = (), removed: list[int] = (), features: np.ndarray | None = None,
                     stats: dict | None = None, keep_previous: bool = True,
                     duplicates: list[tuple[str, str]] = ()) -> dict:
    """Write and commit generation ``manifest["generation"] + 1``; returns its manifest. Call under the lock.

    Parameters
    ----------
    index_dir : pathlib.Path
    manifest : dict
        The manifest of the generation to change.
    codes : dfsnet.index.HammingIndex, optional
        The new generation's codes; ``None`` keeps the current codes file.
    rows, moved, removed, duplicates
        Metadata changes, as for :func:`dfsnet.store.metadata.write_metadata`; ``rows`` get
        ids from ``next_id`` on (the caller's codes must use the same).
    features : ndarray of float32, shape (len(rows), D), optional
        The new images' features, a new chunk (with ``store_features``).
    stats : dict, optional
        Replaces the manifest's ``stats``.
    keep_previous : bool
        Keep the generation before this one on disk for ``dfsnet index repair``.
    """
    previous = manifest["files"]
    generation = int(manifest["generation"]) + 1
    files = dict(previous)
    checksums = dict(manifest.get("checksums") or {})
    if codes is not None:
        files["codes"] = generation_file("codes", generation)
        codes.save(index_dir / files["codes"])
        checksums[files["codes"]] = file_checksum(index_dir / files["codes"])
    if files["features"] is not None and rows:
        chunk = generation_file("features", generation)
        with atomic_write(index_dir / chunk) as fh:
            np.save(fh, np.ascontiguousarray(features, dtype=np.float32), allow_pickle=False)
        files["features"] = [*files["features"], {"file": chunk, "rows": len(rows)}]
        checksums[chunk] = file_checksum(index_dir / chunk)
    files["metadata"] = generation_file("metadata", generation)
    src = index_dir / previous["metadata"] if previous["metadata"] is not None else None
    write_metadata(src, index_dir / files["metadata"], list(rows), generation, moved=moved, removed=removed,
                   duplicates=duplicates)
    checksums[files["metadata"]] = file_checksum(index_dir / files["metadata"])
    new = {**manifest, "generation": generation, "count": int(manifest["count"]) + len(rows) - len(removed),
           "next_id": next_id(manifest) + len(rows), "updated": now(), "files": files,
           "stats": stats if stats is not None else manifest["stats"]}
    names = set(referenced_files(new))
    new["checksums"] = {k: v for k, v in checksums.items() if k in names}
    # The commit point: everything it names is complete and durable before this rename.
    write_manifest(index_dir, new)
    collect_garbage(index_dir, new, keep_previous=keep_previous)
    return new


class Builder:
    """Feature extraction, encoding and the commit of one new generation of ``index_dir``.

    Parameters
    ----------
    index_dir : pathlib.Path
    model : dfsnet.models.DFSNet
    image_size : int
        Network input side.
    device : str or torch.device
    precision : str
        "fp32" or "bf16" (resolved, see :func:`dfsnet.precision.resolve_precision`).
    model_lock : threading.Lock, optional
        Serialises use of ``model`` with a reader that shares it.
    onnx : dfsnet.runtime.OnnxFeatures, optional
        ``model``'s graph in ONNX Runtime, which then extracts instead of torch; ``model`` may
        then be just the preprocessing meta (a mapping, as the manifest's ``onnx`` entry keeps it).
    """

    def __init__(self, index_dir: Path, model, image_size: int, device, *, precision: str = "fp32",
                 model_lock: threading.Lock | None = None, onnx=None):
        from dfsnet.data import build_transforms

        self.index_dir = index_dir
        self.model = model
        self.onnx = onnx
        self.model_lock = model_lock or threading.Lock()
        self.device = device
        self.precision = precision
        self.transform = build_transforms(getattr(model, "meta", model), train=False, image_size=image_size)

    @classmethod
    def from_checkpoint(cls, index_dir: Path, image_size: int, device, *, precision: str = "fp32") -> Builder:
        """A builder on the model copy in ``index_dir``."""
        from dfsnet.store.unsupervised import load_index_model

        model = load_index_model(index_dir / MODEL_FILE, map_location=device)[0]
        return cls(index_dir, model, image_size, device, precision=precision)

    def extract(self, paths: list[str], *, batch_size: int, num_workers: int,
                progress: bool) -> tuple[np.ndarray, np.ndarray]:
        """float32 (n, D) features and bool (n,) ok mask of ``paths`` (bad images are not ok)."""
        from dfsnet.data import ImageList
        from dfsnet.features import extract_features_with_mask

        dataset = ImageList(paths, transform=self.transform)
        with self.model_lock:
            try:
                return extract_features_with_mask(self.model if self.onnx is None else self.onnx, dataset,
                                                  batch_size=batch_size,
                                                  num_workers=num_workers, device=self.device,
                                                  precision=self.precision, progress=progress)
            except ValueError:
                if dataset.n_skipped == len(dataset):  # every image unreadable
                    return np.zeros((len(paths), 0), dtype=np.float32), np.zeros(len(paths), dtype=bool)
                raise

    def fit_encoder(self, fit_on, *, bits: int | None, selector: str | None, hasher: str, batch_size: int,
                    num_workers: int | None, progress: bool):
        """An encoder fitted on the features and labels of the labelled folder ``fit_on``, with the
        training workflow's :func:`dfsnet.train.workflow.fit_encoder` (``dfsnet train``'s defaults)."""
        from dfsnet.data import ImageFolder
        from dfsnet.train.workflow import fit_encoder

        folder = ImageFolder(fit_on)
        paths = [p for p, _ in folder.samples]
        features, ok = self.extract(paths, batch_size=batch_size, num_workers=num_workers, progress=progress)
        if ok.sum() < 2:
            raise InputError(f"fit_on: fewer than 2 readable images in {fit_on}")
        encoder = fit_encoder(features[ok], folder.targets[ok], selector=selector, hasher=hasher, n_bits=bits)
        logger.info("fitted a %d-bit %s/%s encoder on %d images of %s", encoder.n_bits_, selector, hasher,
                    int(ok.sum()), fit_on)
        return encoder

    def commit(self, manifest: dict, known: dict[str, ImageRecord], files: list[tuple[str, str | None]], encoder,
               *, batch_size: int, num_workers: int, progress: bool, keep_previous: bool = True,
               recorded_duplicates: frozenset[str] = frozenset()) -> AddReport:
        """Index the new ones among ``files`` as generation ``manifest["generation"] + 1``.

        Parameters
        ----------
        manifest : dict
            The manifest of the generation to extend (generation 0 for a new index).
        known : dict of str to ImageRecord
            The indexed images by content hash. A file with known content is skipped, unless
            the indexed file of that content is gone or changed: then the image is re-pointed
            to the new path (a moved file keeps its id).
        files : list of (str, str or None)
            ``(path, label)`` as from :func:`scan_images`.
        encoder : dfsnet.hashing.Encoder
        keep_previous : bool
            As for :func:`write_generation`.
        recorded_duplicates : frozenset of str
            Paths the metadata already records as exact duplicates.

        Writes nothing when no file is new, moved or a newly found duplicate. Call under the write lock.
        """
        plan = self.plan(known, files, progress=progress, recorded_duplicates=recorded_duplicates)
        features = self.extract_plan(plan, batch_size=batch_size, num_workers=num_workers, progress=progress)
        return self.finish(manifest, plan, features, encoder, keep_previous=keep_previous)

    def plan(self, known: dict[str, ImageRecord], files: list[tuple[str, str | None]], *,
             progress: bool, recorded_duplicates: frozenset[str] = frozenset()) -> Plan:
        """:func:`plan_files`, the first step of :meth:`commit`."""
        return plan_files(known, files, progress=progress, recorded_duplicates=recorded_duplicates)

    def extract_plan(self, plan: Plan, *, batch_size: int, num_workers: int, progress: bool) -> np.ndarray | None:
        """float32 (n_added, D) features of the plan's new images; drops the unreadable ones from it."""
        if not plan.candidates:
            return None
        logger.info("extracting features of %d new images", len(plan.candidates))
        features, ok = self.extract([c[0] for c in plan.candidates], batch_size=batch_size,
                                    num_workers=num_workers, progress=progress)
        plan.bad_paths += [plan.candidates[j][0] for j in np.flatnonzero(~ok)]
        plan.candidates = [c for c, good in zip(plan.candidates, ok) if good]
        return features[ok]

    def finish(self, manifest: dict, plan: Plan, features: np.ndarray | None, encoder, *,
               keep_previous: bool = True) -> AddReport:
        """Encode the plan's new images and commit the generation (the last step of :meth:`commit`)."""
        from dfsnet.index import HammingIndex

        added, moved = plan.candidates, plan.moved
        report = AddReport(n_found=plan.n_found, n_added=len(added),
                           n_duplicates=len(plan.duplicates) + plan.n_unchanged,
                           n_bad=len(plan.bad_paths), bad_paths=plan.bad_paths,
                           generation=int(manifest["generation"]), count=int(manifest["count"]), seconds=0.0,
                           n_moved=len(moved))
        if not added and not moved and not plan.duplicates:
            return report

        codes = None
        ids = np.arange(next_id(manifest), next_id(manifest) + len(added), dtype=np.int64)
        if added:
            if manifest["files"]["codes"] is None:
                codes = HammingIndex(int(manifest["bits"]))
            else:  # a fresh copy: the loaded generation stays intact for concurrent searches
                codes = HammingIndex.load(self.index_dir / manifest["files"]["codes"])
            codes.add(encoder.transform(features), ids=ids)
        rows = [(int(i), path, digest, size, mtime, label)
                for i, (path, label, digest, size, mtime) in zip(ids, added)]
        stats = dict(manifest["stats"])
        stats["n_bad"] = int(stats.get("n_bad", 0)) + len(plan.bad_paths)
        stats["n_duplicates"] = int(stats.get("n_duplicates", 0)) + len(plan.duplicates) + plan.n_unchanged
        new = write_generation(self.index_dir, manifest, codes=codes, rows=rows, moved=moved,
                               features=features if added else None, stats=stats, keep_previous=keep_previous,
                               duplicates=plan.duplicates)
        report.generation, report.count = int(new["generation"]), int(new["count"])
        return report


@dataclasses.dataclass
class Plan:
    """What :meth:`Builder.plan` found in a list of files, before any extraction.

    Attributes
    ----------
    n_found : int
    candidates : list of (path, label, sha256, size, mtime)
        New content, to extract and add.
    moved : list of (id, path, size, mtime, label)
        Indexed content under a new path.
    duplicates : list of (path, sha256)
        Content already indexed under another path (or repeated in the list), skipped.
    n_unchanged : int
        Files already indexed under their own path, skipped.
    bad_paths : list of str
    """

    n_found: int
    n_unchanged: int = 0
    candidates: list[tuple] = dataclasses.field(default_factory=list)
    moved: list[tuple] = dataclasses.field(default_factory=list)
    duplicates: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    bad_paths: list[str] = dataclasses.field(default_factory=list)


def plan_files(known: dict[str, ImageRecord], files: list[tuple[str, str | None]], *, progress: bool,
               recorded_duplicates: frozenset[str] = frozenset()) -> Plan:
    """Hash ``files`` and sort them into new, moved, duplicate and bad ones, before any extraction.

    Parameters
    ----------
    known : dict of str to ImageRecord
        The indexed images by content hash ({} for a new index).
    files : list of (str, str or None)
        ``(path, label)`` as from :func:`scan_images`.
    progress : bool
    recorded_duplicates : frozenset of str
        Paths already recorded as exact duplicates (not reported again).
    """
    from tqdm.auto import tqdm

    known = dict(known)
    plan = Plan(n_found=len(files))
    for path, label in tqdm(files, desc="hash", unit="file", disable=not progress):
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            logger.warning("skipping %s: its name is not valid UTF-8", display_path(path))
            plan.bad_paths.append(display_path(path))
            continue
        if not is_regular_file(path):  # a FIFO or device would block the hashing forever
            logger.warning("skipping %s: not a regular file", path)
            plan.bad_paths.append(path)
            continue
        try:
            st = os.stat(path)
            digest = sha256_file(path)
        except OSError as exc:
            logger.warning("skipping unreadable file %s: %s", path, exc)
            plan.bad_paths.append(path)
            continue
        record = known.get(digest)
        if record is not None:
            if record.path != path and record.id >= 0 and _gone_or_changed(record):
                plan.moved.append((record.id, path, st.st_size, st.st_mtime, label))
                known[digest] = dataclasses.replace(record, path=path, size=st.st_size, mtime=st.st_mtime)
            elif record.path != path and path not in recorded_duplicates:
                plan.duplicates.append((path, digest))
            else:
                plan.n_unchanged += 1
            continue
        known[digest] = ImageRecord(-1, path, digest, st.st_size, st.st_mtime, label)
        plan.candidates.append((path, label, digest, st.st_size, st.st_mtime))
    return plan


def _gone_or_changed(record: ImageRecord) -> bool:
    """Whether the file indexed as ``record`` no longer holds the content it was indexed with."""
    if not is_regular_file(record.path):
        return True
    try:
        st = os.stat(record.path)
        if st.st_size != record.size:
            return True
        return st.st_mtime != record.mtime and sha256_file(record.path) != record.sha256
    except OSError:
        return True


def export_onnx_graph(model, out_dir: Path, image_size: int, *, runtime: str, device_type: str,
                      precision: str) -> tuple[dict | None, object | None]:
    """Write ``model.features`` as ``out_dir/model.onnx`` unless ``runtime`` is "torch".

    Returns
    -------
    entry : dict or None
        The manifest's ``onnx`` entry (file, sha256, input shape, feature width and the
        preprocessing a query needs), or None when no graph was written (runtime "torch", the
        exporter not installed, or the export failed: a warning says so under "auto").
    runner : dfsnet.runtime.OnnxFeatures or None
        The graph in ONNX Runtime, when the build itself should extract with it (``runtime``
        resolves to "onnx" on ``device_type`` with ``precision``).

    Raises
    ------
    InputError
        ``runtime`` "onnx" and the graph cannot be made or run here.
    """
    import hashlib

    from dfsnet._io import atomic_write_bytes
    from dfsnet.runtime import OnnxFeatures, effective_runtime, export_features, onnx_available, resolve_runtime

    runtime = effective_runtime(runtime)
    path = out_dir / ONNX_FILE
    extract_with = resolve_runtime(runtime, device_type=device_type, precision=precision, export=True)
    if runtime == "torch" or not onnx_available(export=True):
        path.unlink(missing_ok=True)  # a replaced index's graph would not match this model
        return None, None
    shape = (3, int(image_size), int(image_size))
    try:
        data = export_features(model, shape)
    except RuntimeError as exc:
        if runtime == "onnx":
            raise InputError(f"runtime: {exc}") from None
        logger.warning("%s; the index gets no ONNX graph, and its queries run in torch", exc)
        path.unlink(missing_ok=True)
        return None, None
    atomic_write_bytes(path, data)
    meta = model.meta
    preprocess = {"input_size": list(shape), "mean": [float(v) for v in meta.mean],
                  "std": [float(v) for v in meta.std], "crop_pct": getattr(meta, "crop_pct", None),
                  "interpolation": getattr(meta, "interpolation", None)}
    entry = {"file": ONNX_FILE, "sha256": hashlib.sha256(data).hexdigest(), "input_shape": list(shape),
             "feature_dim": int(meta.feature_dim), "preprocess": preprocess}
    return entry, (OnnxFeatures(data) if extract_with == "onnx" else None)
