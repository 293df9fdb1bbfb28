"""Exact and near-duplicate images, from an index or straight from a folder.

Exact duplicates share a content hash (SHA-256 of the file). Near-duplicates (re-encoded,
resized, slightly cropped, rotated or brightened copies) are found by a *perceptual
fingerprint*: the image in grey, box-averaged down to 12 x 12 and standardised (zero mean,
unit length), 144 floats. Each image's nearest fingerprints are found exactly (faiss inner
product); a pair is a near-duplicate when its cosine similarity is at least ``1 - max_distance``
*and* stands out from both images' neighbourhoods: it beats each image's 4th-nearest
neighbour by ``margin``. The relative test is what keeps precision: distinct images of
plain scenes (sky, sea) have similar fingerprints too, but many of them, not one. Groups are
the connected components of the pairs; a pair at cosine >= 0.97 joins even inside a burst of
more than four copies.

Why not the index's deep codes: on planted CIFAR-10 copies (benchmarks/bench_dedup.py) the
original was the nearest neighbour of its copy in EfficientNet-Lite0's pooled features for
48 % of the copies, against 99.9 % with 8 x 8 fingerprints; deep features describe content,
not the picture.

>>> from dfsnet.dedup import find_duplicates
>>> report = find_duplicates("photos.idx")            # or find_duplicates(images="photos/")
>>> [(g.kind, g.paths) for g in report.groups]
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from dfsnet.errors import InputError, InputTypeError

__all__ = ["DuplicateGroup", "DedupReport", "find_duplicates", "fingerprint", "fingerprints",
           "near_duplicate_pairs", "connected_groups", "DEFAULT_MAX_DISTANCE", "DEFAULT_MARGIN"]

logger = logging.getLogger(__name__)

FINGERPRINT_SIDE = 12
# Calibrated on CIFAR-10 *training* images with planted copies (benchmarks/bench_dedup.py
# --calibrate), never on the benchmark's test images: of the grid, the setting whose smaller
# lead over the targets (pair precision 0.98, recall 0.95) is largest (there 0.994 / 0.963).
DEFAULT_MAX_DISTANCE = 0.20  # 1 - cosine
DEFAULT_MARGIN = 0.12
_REFERENCE_RANK = 3  # 0-based: the 4th-nearest other image is the neighbourhood's level
_SURE = 0.97  # a pair this close joins whatever the neighbourhood
_NEIGHBOURS = 16
_BLOCK = 4096


def fingerprint(image) -> np.ndarray:
    """The perceptual fingerprint of one image.

    Parameters
    ----------
    image : path, bytes or PIL.Image.Image
        Decoded with :func:`dfsnet.images.open_image`.

    Returns
    -------
    ndarray of float32, shape (144,)
        12 x 12 grey box averages, minus their mean, scaled to unit length (all zeros for a
        flat image).
    """
    from PIL import Image

    from dfsnet.images import open_image

    grey = open_image(image).convert("L").resize((FINGERPRINT_SIDE, FINGERPRINT_SIDE), Image.BOX)
    v = np.asarray(grey, dtype=np.float32).ravel()
    v = v - v.mean()
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 1e-3 else np.zeros_like(v)


def fingerprints(paths: list[str], *, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """float32 (n, 144) fingerprints of ``paths`` and a bool (n,) mask of the readable ones."""
    from tqdm.auto import tqdm

    out = np.zeros((len(paths), FINGERPRINT_SIDE ** 2), dtype=np.float32)
    ok = np.zeros(len(paths), dtype=bool)
    for i, path in enumerate(tqdm(paths, desc="fingerprints", unit="image", disable=not progress)):
        try:
            out[i] = fingerprint(path)
            ok[i] = True
        except (InputError, OSError) as exc:
            logger.warning("skipping %s: %s", path, exc)
    return out, ok


@dataclasses.dataclass(frozen=True)
class DuplicateGroup:
    """Images that are copies of each other.

    Attributes
    ----------
    kind : {"exact", "near"}
        "exact": identical files (one content hash); "near": transformed copies (re-encoded,
        resized, cropped...) found by code distance, possibly with exact copies among them.
    ids : tuple of int
        Index ids of the members (-1 for an exact copy that was not indexed because its
        content is, and for every image when no index is involved).
    paths : tuple of str
        The members' files.
    max_distance : float
        Largest fingerprint distance (1 - cosine) of a pair that joined the group (0 for "exact").
    """

    kind: str
    ids: tuple[int, ...]
    paths: tuple[str, ...]
    max_distance: float

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "ids": list(self.ids), "paths": list(self.paths),
                "max_distance": self.max_distance}


@dataclasses.dataclass
class DedupReport:
    """What :func:`find_duplicates` found.

    Attributes
    ----------
    groups : list of DuplicateGroup
        Exact groups first, then near groups, each by its first path.
    n_images : int
        Images compared (distinct contents that could be read).
    max_distance, margin : float
        The settings used.
    n_pairs : int
        Near-duplicate pairs found.
    n_unreadable : int
        Files that could not be decoded (left out).
    seconds : float
        Grouping time (reading the images excluded).
    """

    groups: list[DuplicateGroup]
    n_images: int
    max_distance: float
    margin: float
    n_pairs: int
    n_unreadable: int
    seconds: float

    def pairs(self) -> set[tuple[str, str]]:
        """Every unordered pair of paths in one group, as sorted tuples."""
        out = set()
        for group in self.groups:
            paths = sorted(group.paths)
            out.update((a, b) for i, a in enumerate(paths) for b in paths[i + 1:])
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "groups"},
                "groups": [g.to_dict() for g in self.groups]}


def near_duplicate_pairs(features: np.ndarray, *, max_distance: float = DEFAULT_MAX_DISTANCE,
                         margin: float = DEFAULT_MARGIN) -> tuple[np.ndarray, np.ndarray]:
    """Near-duplicate pairs among rows of unit-length fingerprints (see the module docstring).

    Parameters
    ----------
    features : ndarray of float32, shape (n, d)
        Unit-length rows (e.g. :func:`fingerprints`); zero rows never pair.
    max_distance : float
        Largest ``1 - cosine`` of a pair, in [0, 2].
    margin : float
        How much a pair's cosine must exceed each image's 4th-nearest neighbour's, >= 0.

    Returns
    -------
    pairs : ndarray of int64, shape (m, 2)
        Row pairs ``i < j``, sorted.
    similarities : ndarray of float32, shape (m,)
        Their cosine similarities.
    """
    import faiss

    features = np.ascontiguousarray(features, dtype=np.float32)
    if features.ndim != 2:
        raise InputError(f"features: expected shape (n, d), got {features.shape}")
    for name, value, high in (("max_distance", max_distance, 2.0), ("margin", margin, 2.0)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= high:
            raise InputError(f"{name}: expected a number in [0, {high:g}], got {value!r}")
    n = features.shape[0]
    k = min(_NEIGHBOURS + 1, n)
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.float32)
    index = faiss.IndexFlatIP(features.shape[1])
    index.add(features)
    sims = np.empty((n, k), dtype=np.float32)
    ids = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, _BLOCK):
        sims[start:start + _BLOCK], ids[start:start + _BLOCK] = index.search(features[start:start + _BLOCK], k)
    rows = np.arange(n)[:, None]
    others = (ids != rows) & (ids >= 0)
    sims = np.where(others, sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")  # ties of equal images: faiss order, then stable
    sims, ids = np.take_along_axis(sims, order, 1)[:, :-1], np.take_along_axis(ids, order, 1)[:, :-1]
    level = sims[:, _REFERENCE_RANK] if sims.shape[1] > _REFERENCE_RANK else np.full(n, -np.inf, np.float32)
    level = np.where(np.isfinite(level), level, -1.0)
    nonzero = np.linalg.norm(features, axis=1) > 0.5
    j = np.maximum(ids, 0)
    keep = (np.isfinite(sims) & (sims >= 1.0 - max_distance) & nonzero[:, None] & nonzero[j]
            & (((sims >= level[:, None] + margin) & (sims >= level[j] + margin)) | (sims >= _SURE)))
    i, col = np.nonzero(keep)
    a, b = np.minimum(i, ids[i, col]), np.maximum(i, ids[i, col])
    pairs, first = np.unique(np.stack([a, b], axis=1), axis=0, return_index=True)
    return pairs.astype(np.int64), sims[i, col][first].astype(np.float32)


def connected_groups(n: int, pairs: np.ndarray) -> list[np.ndarray]:
    """Connected components of size >= 2 of the graph on ``n`` nodes with edges ``pairs``.

    Returns
    -------
    list of ndarray of int64
        Each component's nodes, ascending; components ordered by their smallest node.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not len(pairs):
        return []
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    groups = [g for g in np.split(order, bounds) if len(g) > 1]
    return sorted(groups, key=lambda g: int(g[0]))


def _report(ids: np.ndarray, paths: list[str], features: np.ndarray, exact: dict[int, list[str]], *,
            max_distance, margin, n_unreadable: int) -> DedupReport:
    started = time.perf_counter()
    max_distance = DEFAULT_MAX_DISTANCE if max_distance is None else max_distance
    margin = DEFAULT_MARGIN if margin is None else margin
    pairs, sims = near_duplicate_pairs(features, max_distance=max_distance, margin=margin)
    exact = {k: list(v) for k, v in exact.items()}
    near = []
    for members in connected_groups(len(ids), pairs):
        inside = np.isin(pairs[:, 0], members)
        member_ids, member_paths = [], []
        for m in members:  # exact copies of a member belong to its group too
            copies = exact.pop(int(m), [])
            member_ids += [int(ids[m])] + [-1] * len(copies)
            member_paths += [paths[m], *copies]
        near.append(DuplicateGroup(kind="near", ids=tuple(member_ids), paths=tuple(member_paths),
                                   max_distance=round(1.0 - float(sims[inside].min()), 4)))
    exact_groups = [DuplicateGroup(kind="exact", ids=(int(ids[row]),) + (-1,) * len(copies),
                                   paths=(paths[row], *copies), max_distance=0.0)
                    for row, copies in sorted(exact.items())]
    groups = sorted(exact_groups, key=lambda g: g.paths[0]) + sorted(near, key=lambda g: g.paths[0])
    return DedupReport(groups=groups, n_images=len(ids), max_distance=float(max_distance), margin=float(margin),
                       n_pairs=int(len(pairs)), n_unreadable=n_unreadable, seconds=time.perf_counter() - started)


def find_duplicates(index=None, *, images=None, max_distance: float | None = None, margin: float | None = None,
                    progress: bool = False) -> DedupReport:
    """Groups of exact and near-duplicate images of an index, or of a folder without an index.

    Parameters
    ----------
    index : ImageIndex or path-like, optional
        An index (folder): its images are the indexed files (read again for their
        fingerprints; no model is loaded). Exact copies skipped when the images were added
        are reported from the metadata (indexes written by this version or later).
    images : path-like, optional
        Instead of an index: a folder or a paths file (as ``dfsnet index build --images``).
        Nothing is written.
    max_distance : float, optional
        Largest fingerprint distance (1 - cosine) of a near pair; default
        :data:`DEFAULT_MAX_DISTANCE`.
    margin : float, optional
        How far a pair must stand out from its neighbourhood; default :data:`DEFAULT_MARGIN`.
    progress : bool

    Returns
    -------
    DedupReport
    """
    if (index is None) == (images is None):
        raise InputError("index, images: expected exactly one of an index and an image folder")
    if index is not None:
        ids, paths, exact = _index_images(index)
        n_bad = 0
    else:
        ids, paths, exact, n_bad = _folder_images(images, progress=progress)
    features, ok = fingerprints(paths, progress=progress)
    keep = np.flatnonzero(ok)
    row_of = {int(old): new for new, old in enumerate(keep)}
    exact = {row_of[r]: copies for r, copies in exact.items() if r in row_of}
    return _report(ids[keep], [paths[i] for i in keep], features[keep], exact, max_distance=max_distance,
                   margin=margin, n_unreadable=n_bad + int((~ok).sum()))


def _index_images(index) -> tuple[np.ndarray, list[str], dict[int, list[str]]]:
    """Ids, paths and recorded exact copies (by row) of an index's images."""
    from dfsnet.store import ImageIndex
    from dfsnet.store.files import check_on_load
    from dfsnet.store.manifest import read_manifest
    from dfsnet.store.metadata import MetadataReader

    if isinstance(index, ImageIndex):
        reader, own = index._state.metadata, False
    elif isinstance(index, (str, Path)):
        index_dir = Path(index).expanduser().resolve()
        manifest = read_manifest(index_dir)
        if manifest.get("backend", {}).get("kind") == "milvus":  # the metadata is in the collection
            reader, own = ImageIndex.load(index_dir, device="cpu")._state.metadata, False
        else:
            check_on_load(index_dir, manifest)  # no model needed: only the metadata is read
            reader, own = MetadataReader(index_dir / manifest["files"]["metadata"]), True
    else:
        raise InputTypeError(f"index: expected an ImageIndex or its folder, got {type(index).__name__}")
    try:
        records = reader.all_records()
        row_of_hash = {r.sha256: row for row, r in enumerate(records)}
        # copies recorded when they were skipped; one deleted since is no longer a duplicate
        exact = {row_of_hash[h]: kept for h, paths in reader.duplicates().items() if h in row_of_hash
                 and (kept := [p for p in paths if os.path.isfile(p)])}
    finally:
        if own:
            reader.close()
    return np.array([r.id for r in records], dtype=np.int64), [r.path for r in records], exact


def _folder_images(images, *, progress: bool) -> tuple[np.ndarray, list[str], dict[int, list[str]], int]:
    """Paths of the distinct contents under ``images`` and their exact copies (by row)."""
    from dfsnet.store.builder import plan_files, scan_images

    files = scan_images(images)
    if not files:
        raise InputError(f"images: no image files found under {Path(images).resolve()}")
    plan = plan_files({}, files, progress=progress)  # hashing only
    row_of_hash = {c[2]: row for row, c in enumerate(plan.candidates)}
    exact: dict[int, list[str]] = {}
    for path, digest in plan.duplicates:
        exact.setdefault(row_of_hash[digest], []).append(path)
    return np.full(len(plan.candidates), -1, dtype=np.int64), [c[0] for c in plan.candidates], exact, \
        len(plan.bad_paths)
