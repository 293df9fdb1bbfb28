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
from dfsnet.store.lock import collect_garbage
from dfsnet.store.manifest import MODEL_FILE, generation_file, now, write_manifest
from dfsnet.store.metadata import write_metadata

__all__ = ["AddReport", "Builder", "scan_images", "DEFAULT_BITS"]

logger = logging.getLogger(__name__)

DEFAULT_BITS = 128


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
        Files skipped because they could not be decoded.
    bad_paths : list of str
    generation : int
        The index generation after the call.
    count : int
        Images in the index after the call.
    seconds : float
    """

    n_found: int
    n_added: int
    n_duplicates: int
    n_bad: int
    bad_paths: list[str]
    generation: int
    count: int
    seconds: float


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


class Builder:
    """Feature extraction, encoding and the commit of one new generation of ``index_dir``.

    Parameters
    ----------
    index_dir : pathlib.Path
    model : dfsnet.models.DFSNet
    image_size : int
        Network input side.
    device : str or torch.device
    model_lock : threading.Lock, optional
        Serialises use of ``model`` with a reader that shares it.
    """

    def __init__(self, index_dir: Path, model, image_size: int, device, *,
                 model_lock: threading.Lock | None = None):
        from dfsnet.data import build_transforms

        self.index_dir = index_dir
        self.model = model
        self.model_lock = model_lock or threading.Lock()
        self.device = device
        self.transform = build_transforms(model.meta, train=False, image_size=image_size)

    @classmethod
    def from_checkpoint(cls, index_dir: Path, image_size: int, device) -> Builder:
        """A builder on the model copy in ``index_dir``."""
        from dfsnet.models import load_checkpoint

        model = load_checkpoint(index_dir / MODEL_FILE, map_location=device)[0]
        return cls(index_dir, model, image_size, device)

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
                                                  progress=progress)
            except ValueError:
                if dataset.n_skipped == len(dataset):  # every image unreadable
                    return np.zeros((len(paths), 0), dtype=np.float32), np.zeros(len(paths), dtype=bool)
                raise

    def fit_encoder(self, fit_on, *, bits: int | None, selector: str | None, hasher: str, batch_size: int,
                    num_workers: int, progress: bool):
        """An encoder fitted on the features and labels of the labelled folder ``fit_on``."""
        from dfsnet.data import ImageFolder
        from dfsnet.hashing import make_encoder

        # A threshold hasher without a selector makes one bit per feature: no bit count to give.
        if selector is not None or hasher == "itq":
            bits = bits or DEFAULT_BITS
        encoder = make_encoder(selector=selector, hasher=hasher, n_bits=bits)
        folder = ImageFolder(fit_on)
        paths = [p for p, _ in folder.samples]
        features, ok = self.extract(paths, batch_size=batch_size, num_workers=num_workers, progress=progress)
        if ok.sum() < 2:
            raise InputError(f"fit_on: fewer than 2 readable images in {fit_on}")
        if selector is not None and bits > features.shape[1]:
            raise InputError(f"bits: {bits} bits select {bits} features, but the model's features have "
                             f"{features.shape[1]} dimensions; choose bits <= {features.shape[1]}")
        encoder.fit(features[ok], folder.targets[ok])
        logger.info("fitted a %d-bit %s/%s encoder on %d images of %s", encoder.n_bits_, selector, hasher,
                    int(ok.sum()), fit_on)
        return encoder

    def commit(self, manifest: dict, known: set[str], files: list[tuple[str, str | None]], encoder, *,
               batch_size: int, num_workers: int, progress: bool) -> AddReport:
        """Index the new ones among ``files`` as generation ``manifest["generation"] + 1``.

        Parameters
        ----------
        manifest : dict
            The manifest of the generation to extend (generation 0 for a new index).
        known : set of str
            Content hashes already indexed; files with one of them are skipped.
        files : list of (str, str or None)
            ``(path, label)`` as from :func:`scan_images`.
        encoder : dfsnet.hashing.Encoder

        Writes nothing when no file is new and readable. Call under the write lock.
        """
        from tqdm.auto import tqdm

        from dfsnet.index import HammingIndex

        known = set(known)
        candidates: list[tuple[str, str | None, str, int, float]] = []
        bad_paths: list[str] = []
        n_dup = 0
        for path, label in tqdm(files, desc="hash", unit="file", disable=not progress):
            try:
                st = os.stat(path)
                digest = sha256_file(path)
            except OSError as exc:
                logger.warning("skipping unreadable file %s: %s", path, exc)
                bad_paths.append(path)
                continue
            if digest in known:
                n_dup += 1
                continue
            known.add(digest)
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
                           count=int(manifest["count"]), seconds=0.0)
        if not added:
            return report

        previous = manifest["files"]
        generation = report.generation + 1
        ids = np.arange(report.count, report.count + len(added), dtype=np.int64)
        files_entry = dict(previous)
        if previous["codes"] is None:
            index = HammingIndex(int(manifest["bits"]))
        else:  # a fresh copy: the loaded generation stays intact for concurrent searches
            index = HammingIndex.load(self.index_dir / previous["codes"])
        index.add(encoder.transform(features), ids=ids)
        files_entry["codes"] = generation_file("codes", generation)
        index.save(self.index_dir / files_entry["codes"])
        if files_entry["features"] is not None:
            chunk = generation_file("features", generation)
            with atomic_write(self.index_dir / chunk) as fh:
                np.save(fh, np.ascontiguousarray(features, dtype=np.float32), allow_pickle=False)
            files_entry["features"] = [*files_entry["features"], {"file": chunk, "rows": len(added)}]
        files_entry["metadata"] = generation_file("metadata", generation)
        rows = [(int(i), path, digest, size, mtime, label)
                for i, (path, label, digest, size, mtime) in zip(ids, added)]
        src = self.index_dir / previous["metadata"] if previous["metadata"] is not None else None
        write_metadata(src, self.index_dir / files_entry["metadata"], rows, generation)
        stats = dict(manifest["stats"])
        stats["n_bad"] = int(stats.get("n_bad", 0)) + len(bad_paths)
        stats["n_duplicates"] = int(stats.get("n_duplicates", 0)) + n_dup
        manifest = {**manifest, "generation": generation, "count": report.count + len(added),
                    "updated": now(), "files": files_entry, "stats": stats}
        # The commit point: everything it names is complete and durable before this rename.
        write_manifest(self.index_dir, manifest)
        collect_garbage(self.index_dir, manifest)
        report.generation, report.count = generation, manifest["count"]
        return report
