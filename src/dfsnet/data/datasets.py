"""Image datasets that skip unreadable files instead of crashing an epoch.

Every dataset here exposes ``.targets`` (int64 numpy, shape (n,)), ``.classes`` (list of str),
``.samples`` (list of ``(identifier, label)``), ``len()``, ``load_image(i)`` (an RGB PIL image or
``None``), ``__getitem__(i) -> (float32 tensor (3, H, W), int label)`` or ``None`` for an
unreadable image, and ``fingerprint()`` (a stable hash of the sample list, for feature caches
and split files; it does not cover the transform).

Unreadable images. ``load_image`` decodes with :func:`dfsnet.images.open_image`: the format by
content (JPEG, PNG, WebP, GIF, BMP, TIFF, PPM/PGM only), size limits checked from the header,
a full decode (PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left False, so a truncated file is an
error, never silently grey-padded). A file that fails, or breaks a size rule, is logged
once with its path and flagged in a per-sample byte array in shared memory: DataLoader workers
are separate processes, and a plain counter would be incremented in their copies only. The flags
make ``n_skipped`` and ``skipped_paths`` correct in the main process with any ``num_workers``
(fork or spawn). ``verify()`` decodes everything in the calling process, up front, instead.
Batch with :func:`collate_skip_none`, which drops the ``None`` items.
"""
from __future__ import annotations

import hashlib
import json
import logging
import operator
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate
from torchvision.transforms.functional import to_tensor

from dfsnet._io import json_digest
from dfsnet._validation import check_labels
from dfsnet.errors import InputError, InputTypeError
from dfsnet.images import InvalidImageError, open_image

__all__ = [
    "IMG_EXTENSIONS",
    "ArrayImageDataset",
    "ConcatPool",
    "ImageFolder",
    "ImageList",
    "Subset",
    "collate_skip_none",
    "iter_image_files",
]

logger = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
_FOLDER_LAYOUT = "ROOT/<class>/<image> (one sub-folder per class)"


def _normalise_extensions(extensions: Iterable[str]) -> tuple[str, ...]:
    if isinstance(extensions, str):
        extensions = (extensions,)
    exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    if not exts:
        raise InputError("extensions: expected at least one file extension, got none")
    return exts


def iter_image_files(root, recursive: bool = True, *, extensions: Iterable[str] = IMG_EXTENSIONS) -> Iterator[Path]:
    """Yield the image files under ``root`` in a deterministic (sorted) order.

    Entries are visited in sorted name order, depth first, so the output is sorted by path
    components and identical on every run and machine. Hidden files and folders (leading ``.``)
    are skipped; symlinked folders are followed once (loops are cut).

    Parameters
    ----------
    root : str or os.PathLike
        Folder to search.
    recursive : bool
        Descend into sub-folders.
    extensions : iterable of str
        File name endings that count as images (case-insensitive).

    Raises
    ------
    FileNotFoundError
        ``root`` does not exist.
    NotADirectoryError
        ``root`` is a file.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"root: folder {root} not found")
    if not root.is_dir():
        raise NotADirectoryError(f"root: expected a folder, got the file {root}")
    return _walk(root, bool(recursive), _normalise_extensions(extensions), {os.path.realpath(root)})


def _walk(directory: Path, recursive: bool, exts: tuple[str, ...], seen: set[str]) -> Iterator[Path]:
    try:
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        logger.warning("cannot list %s: %s", directory, exc)
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if recursive:
                real = os.path.realpath(entry.path)
                if real not in seen:
                    seen.add(real)
                    yield from _walk(Path(entry.path), recursive, exts, seen)
        elif entry.name.lower().endswith(exts) and entry.is_file():
            yield Path(entry.path)


def list_subfolders(path) -> list[str]:
    """Sorted names of the non-hidden sub-folders of ``path``."""
    with os.scandir(path) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def collate_skip_none(batch: Sequence):
    """``default_collate`` after dropping ``None`` items (unreadable images).

    Returns ``None`` when every item of the batch was unreadable; training and extraction loops
    skip such a batch.
    """
    items = [item for item in batch if item is not None]
    if not items:
        return None
    return default_collate(items)


def _check_index(index, n: int) -> int:
    i = operator.index(index)
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"index {index} out of range for a dataset of {n} items")
    return i


class _BaseImageDataset(Dataset):
    """Shared behaviour: ``__getitem__`` = ``load_image`` + transform + label."""

    transform: Callable | None
    targets: np.ndarray
    classes: list[str]
    samples: list[tuple[str, int]]

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def load_image(self, index) -> Image.Image | None:
        """The RGB PIL image at ``index``, or ``None`` if it cannot be decoded."""
        raise NotImplementedError

    def __getitem__(self, index):
        i = _check_index(index, len(self))
        image = self.load_image(i)
        if image is None:
            return None
        transform = self.transform if self.transform is not None else to_tensor
        return transform(image), int(self.targets[i])

    def skipped_mask(self) -> np.ndarray:
        """bool (n,): True where an image was found unreadable so far (in any process)."""
        return np.zeros(len(self), dtype=bool)

    @property
    def reads_files(self) -> bool:
        """Whether items are decoded from files (worth DataLoader workers), not held in memory."""
        return False

    @property
    def n_skipped(self) -> int:
        """Number of unreadable images found so far, by this process or its DataLoader workers."""
        return int(self.skipped_mask().sum())

    @property
    def skipped_paths(self) -> list[str]:
        """Identifiers (paths) of the unreadable images found so far, in dataset order."""
        return [self.samples[i][0] for i in np.flatnonzero(self.skipped_mask())]

    def verify(self, *, progress: bool = False) -> list[str]:
        """Decode every image in this process; return the identifiers of the unreadable ones.

        Bad images are flagged as during iteration, so later ``__getitem__`` calls return
        ``None`` for them without decoding again.
        """
        from tqdm.auto import tqdm

        for i in tqdm(range(len(self)), desc="verify", unit="img", disable=not progress):
            self.load_image(i)
        return self.skipped_paths

    def fingerprint(self) -> str:
        raise NotImplementedError


class _PathDataset(_BaseImageDataset):
    """Images read from files; unreadable ones are flagged in shared memory."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable | None):
        self.samples = samples
        self.targets = np.fromiter((label for _, label in samples), dtype=np.int64, count=len(samples))
        self.transform = transform
        # Shared memory, so flags set inside DataLoader worker processes reach the main process.
        self._bad = torch.zeros(len(samples), dtype=torch.uint8).share_memory_()
        self._fingerprint: str | None = None

    def load_image(self, index) -> Image.Image | None:
        i = _check_index(index, len(self))
        if self._bad[i]:
            return None
        path = self.samples[i][0]
        try:
            return open_image(path, name=os.path.basename(path))
        # open_image reports bad images as InvalidImageError; a missing or unreadable file (OSError)
        # and anything unexpected must not end an epoch either.
        except Exception as exc:  # noqa: BLE001
            if not self._bad[i]:
                self._bad[i] = 1
                detail = str(exc) if isinstance(exc, InvalidImageError) else f"{type(exc).__name__}: {exc}"
                logger.warning("skipping unreadable image %s: %s", path, detail)
            return None

    def skipped_mask(self) -> np.ndarray:
        return self._bad.numpy().astype(bool)

    @property
    def reads_files(self) -> bool:
        return True

    def _fingerprint_paths(self) -> list[str]:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Hash of (path, label, file size) for every sample, plus the class names (hex, 20 chars)."""
        if self._fingerprint is None:
            sizes = []
            for path, _ in self.samples:
                try:
                    sizes.append(os.stat(path).st_size)
                except OSError:
                    sizes.append(-1)
            self._fingerprint = json_digest({
                "kind": type(self).__name__,
                "classes": self.classes,
                "samples": list(zip(self._fingerprint_paths(), self.targets.tolist(), sizes)),
            })
        return self._fingerprint


class ImageFolder(_PathDataset):
    """A labelled image folder, ``ROOT/<class>/<image>``; class names are the sorted sub-folder names.

    Scanning lists files only (no decoding). Images may sit in nested folders below their class
    folder. Hidden files and folders are ignored. Without ``classes``, class folders that hold no
    image are left out with a warning.

    Parameters
    ----------
    root : str or os.PathLike
        The dataset folder.
    transform : callable, optional
        Applied to the RGB PIL image; default: ``to_tensor`` (float32 (3, H, W) in [0, 1]).
    extensions : iterable of str
        File endings that count as images (case-insensitive).
    classes : sequence of str, optional
        Class folder names in label order. Use it to give a train and a test folder the same
        label mapping; folders not listed are ignored and listed ones may be missing or empty.

    Attributes
    ----------
    samples : list of (str, int)
        Image path and label, sorted by class then path.
    targets : ndarray of int64, shape (n,)
    classes : list of str
    class_to_idx : dict of str to int

    Raises
    ------
    FileNotFoundError
        ``root`` does not exist (the message gives the expected layout).
    ValueError
        No images, or images of fewer than two classes.
    """

    def __init__(self, root, *, transform: Callable | None = None,
                 extensions: Iterable[str] = IMG_EXTENSIONS, classes: Sequence[str] | None = None):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"root: image folder {self.root} not found; expected the layout {_FOLDER_LAYOUT}")
        exts = _normalise_extensions(extensions)
        if classes is None:
            names = list_subfolders(self.root)
        else:
            names = [str(c) for c in classes]
            if len(set(names)) != len(names):
                raise InputError(f"classes: expected unique class names, got {names}")
        files = {name: list(iter_image_files(self.root / name, extensions=exts)) if (self.root / name).is_dir()
                 else [] for name in names}
        if classes is None:
            empty = [n for n in names if not files[n]]
            if empty:
                logger.warning("ignoring %d class folder(s) without images in %s: %s",
                               len(empty), self.root, ", ".join(empty[:10]))
            names = [n for n in names if files[n]]
        n_images = sum(len(f) for f in files.values())
        if n_images == 0:
            loose = sum(1 for _ in iter_image_files(self.root, False, extensions=exts))
            if loose:
                raise InputError(
                    f"root: {self.root} holds {loose} image(s) but no class sub-folders; expected "
                    f"{_FOLDER_LAYOUT}. For an unlabelled collection use ImageList(iter_image_files(root))")
            raise InputError(f"root: no images ({', '.join(exts)}) found under {self.root}; "
                             f"expected {_FOLDER_LAYOUT}")
        if len(names) < 2:
            raise InputError(f"root: {self.root} holds images of only one class ({names[0]!r}); a "
                             f"classification dataset needs at least 2 classes, as {_FOLDER_LAYOUT}")
        self.classes = names
        self.class_to_idx = {name: i for i, name in enumerate(names)}
        samples = [(str(p), label) for label, name in enumerate(names) for p in files[name]]
        super().__init__(samples, transform)

    def _fingerprint_paths(self) -> list[str]:
        # Relative paths, so a moved or copied dataset keeps its fingerprint (and its caches).
        return [Path(p).relative_to(self.root).as_posix() for p, _ in self.samples]

    def __repr__(self) -> str:
        return f"ImageFolder(root={str(self.root)!r}, n={len(self)}, classes={len(self.classes)})"


class ImageList(_PathDataset):
    """Images given as a list of paths, optionally labelled (e.g. a user's collection to index).

    Parameters
    ----------
    paths : iterable of str or os.PathLike
        Image files, in dataset order. Missing or unreadable files are skipped like bad images.
    labels : array-like of int, shape (n,), optional
        Non-negative class labels; without them every target is -1 and ``classes`` is empty.
    transform : callable, optional
        As for :class:`ImageFolder`.
    classes : sequence of str, optional
        Class names for the labels; default ``["0", "1", ...]`` up to the largest label.

    Attributes
    ----------
    samples : list of (str, int)
    targets : ndarray of int64, shape (n,)
    classes : list of str
    """

    def __init__(self, paths: Iterable, labels=None, *, transform: Callable | None = None,
                 classes: Sequence[str] | None = None):
        if isinstance(paths, (str, os.PathLike)):
            raise InputTypeError(f"paths: expected a list of image paths, got a single path {str(paths)!r}; "
                            f"use iter_image_files(folder) to list a folder")
        paths = [os.fspath(p) for p in paths]
        if not paths:
            raise InputError("paths: expected at least one image path, got none")
        if labels is None:
            targets = np.full(len(paths), -1, dtype=np.int64)
            if classes is not None:
                raise InputError("classes: given without labels")
            self.classes = []
        else:
            targets = check_labels(labels, len(paths), name="labels")
            if targets.ndim != 1 or targets.min() < 0:
                raise InputError("labels: expected a 1-D array of non-negative class indices")
            n_classes = int(targets.max()) + 1
            self.classes = [str(c) for c in range(n_classes)] if classes is None else [str(c) for c in classes]
            if len(self.classes) < n_classes:
                raise InputError(f"classes: expected at least {n_classes} names for labels up to "
                                 f"{n_classes - 1}, got {len(self.classes)}")
        super().__init__(list(zip(paths, targets.tolist())), transform)

    def _fingerprint_paths(self) -> list[str]:
        return [os.path.abspath(p) for p, _ in self.samples]

    def __repr__(self) -> str:
        return f"ImageList(n={len(self)}, classes={len(self.classes)})"


class ArrayImageDataset(_BaseImageDataset):
    """Images held in memory as a uint8 array (CIFAR-10 python batches, scikit-learn digits).

    Parameters
    ----------
    images : ndarray of uint8, shape (n, H, W, 3) or (n, H, W)
        RGB or grey images.
    targets : array-like of int, shape (n,)
    classes : sequence of str
    transform : callable, optional
        As for :class:`ImageFolder`.
    name : str
        Prefix of the sample identifiers ``f"{name}/{i:06d}"`` and part of the fingerprint.
    """

    def __init__(self, images, targets, classes: Sequence[str], *, transform: Callable | None = None,
                 name: str = "arrays"):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3):
            raise InputError(f"images: expected uint8 of shape (n, H, W) or (n, H, W, 3), "
                             f"got {images.dtype} {images.shape}")
        self.images = np.ascontiguousarray(images)
        self.targets = check_labels(targets, images.shape[0], name="targets")
        self.classes = [str(c) for c in classes]
        self.transform = transform
        self.name = name
        self.samples = [(f"{name}/{i:06d}", t) for i, t in enumerate(self.targets.tolist())]
        self._fingerprint: str | None = None

    def load_image(self, index) -> Image.Image:
        image = Image.fromarray(self.images[_check_index(index, len(self))])
        return image if image.mode == "RGB" else image.convert("RGB")

    def fingerprint(self) -> str:
        """Hash of the name, class names, pixel bytes and targets (hex, 20 chars)."""
        if self._fingerprint is None:
            h = hashlib.sha256(json.dumps([self.name, self.classes, list(self.images.shape)]).encode())
            h.update(self.images.tobytes())
            h.update(self.targets.tobytes())
            self._fingerprint = h.hexdigest()[:20]
        return self._fingerprint

    def __repr__(self) -> str:
        return f"ArrayImageDataset(name={self.name!r}, n={len(self)}, classes={len(self.classes)})"


class Subset(_BaseImageDataset):
    """A view of ``dataset`` at ``indices`` that keeps ``targets``, ``classes`` and ``samples``.

    Parameters
    ----------
    dataset : dataset from this module
    indices : array-like of int, shape (m,)
        Positions in ``dataset``, in view order.
    transform : callable, optional
        Overrides the parent's transform for this view (e.g. training augmentation on the train
        part of a pool whose other parts use the evaluation transform); ``None`` (default) keeps
        the parent's.

    Attributes
    ----------
    indices : ndarray of int64, shape (m,)
    targets : ndarray of int64, shape (m,)
    """

    def __init__(self, dataset, indices, *, transform: Callable | None = None):
        idx = np.asarray(indices)
        if idx.ndim != 1 or not (np.issubdtype(idx.dtype, np.integer) or idx.size == 0):
            raise InputError(f"indices: expected a 1-D integer array, got {idx.dtype} {idx.shape}")
        idx = idx.astype(np.int64)
        n = len(dataset)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise InputError(f"indices: expected values in [0, {n}), got min {idx.min()}, max {idx.max()}")
        self.dataset = dataset
        self.indices = idx
        self.targets = dataset.targets[idx]
        self.classes = dataset.classes
        self.samples = [dataset.samples[i] for i in idx.tolist()]
        self.transform = transform

    def load_image(self, index) -> Image.Image | None:
        return self.dataset.load_image(int(self.indices[_check_index(index, len(self))]))

    def __getitem__(self, index):
        if self.transform is not None:
            return super().__getitem__(index)
        return self.dataset[int(self.indices[_check_index(index, len(self))])]

    def skipped_mask(self) -> np.ndarray:
        return self.dataset.skipped_mask()[self.indices]

    @property
    def reads_files(self) -> bool:
        return self.dataset.reads_files

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.dataset.fingerprint().encode())
        h.update(self.indices.tobytes())
        return h.hexdigest()[:20]

    def __repr__(self) -> str:
        return f"Subset({self.dataset!r}, n={len(self)})"


class ConcatPool(_BaseImageDataset):
    """The pool that split protocols index: the train source followed by the test source.

    Parameters
    ----------
    train : dataset
        First part (pool positions ``0 .. len(train)-1``).
    test : dataset, optional
        Second part; must have the same ``classes``. Omitted for sources without a test split.
    transform : callable, optional
        Overrides the parts' transforms; default: each part's own.

    Attributes
    ----------
    targets : ndarray of int64, shape (n,)
    sources : ndarray of int64, shape (n,)
        0 for train-source items, 1 for test-source items (``pool_sources`` of ``make_split``).
    datasets : list of datasets
    """

    source_names = ("train", "test")

    def __init__(self, train, test=None, *, transform: Callable | None = None):
        parts = [train] if test is None else [train, test]
        if test is not None and list(test.classes) != list(train.classes):
            raise InputError(f"test: expected the train source's classes {list(train.classes)}, "
                             f"got {list(test.classes)}")
        self.datasets = parts
        self.classes = list(train.classes)
        self.targets = np.concatenate([np.asarray(d.targets, dtype=np.int64) for d in parts])
        self.sources = np.concatenate([np.full(len(d), k, dtype=np.int64) for k, d in enumerate(parts)])
        self.samples = [s for d in parts for s in d.samples]
        self.transform = transform
        self._offsets = np.cumsum([0] + [len(d) for d in parts])

    def _locate(self, index) -> tuple[int, int]:
        i = _check_index(index, len(self))
        k = int(np.searchsorted(self._offsets, i, side="right")) - 1
        return k, i - int(self._offsets[k])

    def source_of(self, index) -> str:
        """``"train"`` or ``"test"``: the source of pool item ``index``."""
        return self.source_names[self._locate(index)[0]]

    def load_image(self, index) -> Image.Image | None:
        k, j = self._locate(index)
        return self.datasets[k].load_image(j)

    def __getitem__(self, index):
        if self.transform is not None:
            return super().__getitem__(index)
        k, j = self._locate(index)
        return self.datasets[k][j]

    def skipped_mask(self) -> np.ndarray:
        return np.concatenate([d.skipped_mask() for d in self.datasets])

    @property
    def reads_files(self) -> bool:
        return any(d.reads_files for d in self.datasets)

    def fingerprint(self) -> str:
        """Hash of the parts' fingerprints, in order (hex, 20 chars)."""
        return json_digest({"kind": "ConcatPool", "parts": [d.fingerprint() for d in self.datasets]})

    def __repr__(self) -> str:
        return f"ConcatPool({', '.join(repr(d) for d in self.datasets)})"
