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
    file_checksum,
    generation_file,
    next_id,
    now,
    referenced_files,
    write_manifest,
)
from dfsnet.store.metadata import ImageRecord, write_metadata

__all__ = ["AddReport", "Builder", "scan_images", "write_generation", "display_path"]

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


def scan_images(images_dir) -> list[tuple[str, str | None]]:
    """``(absolute path, label)`` of the image files under ``images_dir``, sorted.

    The label is the name of the first sub-folder below ``images_dir`` (the class-per-folder
    convention); files directly in ``images_dir`` have none.
    """
    from dfsnet.data import iter_image_files

    root = Path(images_dir).expanduser().resolve()
    out = []
    for path in iter_image_files(root):
        rel = path.relative_to(root).parts
        out.append((str(path), rel[0] if len(rel) > 1 else None))
    return out


def write_generation(index_dir: Path, manifest: dict, *, codes=None, rows: list[tuple] = (),
                     moved: list[tuple] = (), removed: list[int] = (), features: np.ndarray | None = None,
                     stats: dict | None = None, keep_previous: bool = True) -> dict:
    """Write and commit generation ``manifest["generation"] + 1``; returns its manifest. Call under the lock.

    Parameters
    ----------
    index_dir : pathlib.Path
    manifest : dict
        The manifest of the generation to change.
    codes : dfsnet.index.HammingIndex, optional
        The new generation's codes; ``None`` keeps the current codes file.
    rows, moved, removed
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
    write_metadata(src, index_dir / files["metadata"], list(rows), generation, moved=moved, removed=removed)
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
    """

    def __init__(self, index_dir: Path, model, image_size: int, device, *, precision: str = "fp32",
                 model_lock: threading.Lock | None = None):
        from dfsnet.data import build_transforms

        self.index_dir = index_dir
        self.model = model
        self.model_lock = model_lock or threading.Lock()
        self.device = device
        self.precision = precision
        self.transform = build_transforms(model.meta, train=False, image_size=image_size)

    @classmethod
    def from_checkpoint(cls, index_dir: Path, image_size: int, device, *, precision: str = "fp32") -> Builder:
        """A builder on the model copy in ``index_dir``."""
        from dfsnet.models import load_checkpoint

        model = load_checkpoint(index_dir / MODEL_FILE, map_location=device)[0]
        return cls(index_dir, model, image_size, device, precision=precision)

    def extract(self, paths: list[str], *, batch_size: int, num_workers: int,
                progress: bool) -> tuple[np.ndarray, np.ndarray]:
        """float32 (n, D) features and bool (n,) ok mask of ``paths`` (bad images are not ok)."""
        from dfsnet.data import ImageList
        from dfsnet.features import extract_features_with_mask

        dataset = ImageList(paths, transform=self.transform)
        with self.model_lock:
            try:
                return extract_features_with_mask(self.model, dataset, batch_size=batch_size,
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
               *, batch_size: int, num_workers: int, progress: bool, keep_previous: bool = True) -> AddReport:
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

        Writes nothing when no file is new or moved. Call under the write lock.
        """
        from tqdm.auto import tqdm

        from dfsnet.index import HammingIndex

        known = dict(known)
        candidates: list[tuple[str, str | None, str, int, float]] = []
        moved: list[tuple] = []
        bad_paths: list[str] = []
        n_dup = 0
        for path, label in tqdm(files, desc="hash", unit="file", disable=not progress):
            try:
                path.encode("utf-8")
            except UnicodeEncodeError:
                logger.warning("skipping %s: its name is not valid UTF-8", display_path(path))
                bad_paths.append(display_path(path))
                continue
            if not is_regular_file(path):  # a FIFO or device would block the hashing forever
                logger.warning("skipping %s: not a regular file", path)
                bad_paths.append(path)
                continue
            try:
                st = os.stat(path)
                digest = sha256_file(path)
            except OSError as exc:
                logger.warning("skipping unreadable file %s: %s", path, exc)
                bad_paths.append(path)
                continue
            record = known.get(digest)
            if record is not None:
                if record.path != path and record.id >= 0 and _gone_or_changed(record):
                    moved.append((record.id, path, st.st_size, st.st_mtime, label))
                    known[digest] = dataclasses.replace(record, path=path, size=st.st_size, mtime=st.st_mtime)
                else:
                    n_dup += 1
                continue
            known[digest] = ImageRecord(-1, path, digest, st.st_size, st.st_mtime, label)
            candidates.append((path, label, digest, st.st_size, st.st_mtime))
        added, features = [], None
        if candidates:
            logger.info("extracting features of %d new images", len(candidates))
            features, ok = self.extract([c[0] for c in candidates], batch_size=batch_size,
                                        num_workers=num_workers, progress=progress)
            bad_paths += [candidates[j][0] for j in np.flatnonzero(~ok)]
            added = [c for c, good in zip(candidates, ok) if good]
            features = features[ok]
        report = AddReport(n_found=len(files), n_added=len(added), n_duplicates=n_dup, n_bad=len(bad_paths),
                           bad_paths=bad_paths, generation=int(manifest["generation"]),
                           count=int(manifest["count"]), seconds=0.0, n_moved=len(moved))
        if not added and not moved:
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
        stats["n_bad"] = int(stats.get("n_bad", 0)) + len(bad_paths)
        stats["n_duplicates"] = int(stats.get("n_duplicates", 0)) + n_dup
        new = write_generation(self.index_dir, manifest, codes=codes, rows=rows, moved=moved,
                               features=features if added else None, stats=stats, keep_previous=keep_previous)
        report.generation, report.count = int(new["generation"]), int(new["count"])
        return report


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
