"""Named dataset sources: image folders, CIFAR-10, Caltech-256 and scikit-learn's digits.

``split`` per source:

``folder``
    ``"train"``: ``ROOT/train`` if it exists, else ``ROOT`` itself; ``"test"``: ``ROOT/test``
    (an error if absent, so a flat folder is never used twice); ``"all"``: both as a
    :class:`ConcatPool`, or the single folder. ``ROOT/train`` and ``ROOT/test`` share one label
    mapping (the sorted union of their class folders).
``cifar10``
    ``"train"`` (50,000) / ``"test"`` (10,000) / ``"all"``. Reads the image-folder layout
    ``ROOT/{train,test}/<class>/<image>`` when ``ROOT/train`` exists, else torchvision's
    ``CIFAR10`` (``ROOT/cifar-10-batches-py``, fetched with ``download=True``). torchvision
    checks the MD5 of every batch file against the official release before unpickling it.
``caltech256``
    There is no official train/test split: only ``"all"`` (the 256 object classes; the
    ``257.clutter`` class is dropped, as the paper does). Draw train/query/database with the
    ``per-class`` split protocol. Reads ``ROOT/caltech256/256_ObjectCategories`` (torchvision's
    download location), ``ROOT/256_ObjectCategories`` or ``ROOT`` itself.
``digits``
    scikit-learn's 1,797 8x8 digits (values 0-16 scaled to 0-255, grey replicated to RGB; the
    transform upsamples them). ``"train"`` / ``"test"`` are a fixed stratified 80/20 split
    (seed 0: 1,438 / 359); ``"all"`` is every image. ``root`` and ``download`` are ignored.

Every dataset has ``.targets`` (int64 (n,)), ``.classes``, ``.samples``, ``fingerprint()`` and
yields ``(float32 tensor (3, H, W), int)`` or ``None`` for an unreadable image.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dfsnet._validation import check_choice
from dfsnet.data.datasets import (
    ArrayImageDataset,
    ConcatPool,
    ImageFolder,
    list_subfolders,
)
from dfsnet.data.splits import stratified_holdout
from dfsnet.errors import InputError

__all__ = ["SPLITS", "list_sources", "load_pool", "load_source"]

logger = logging.getLogger(__name__)

SPLITS = ("train", "test", "all")
DIGITS_TEST_FRACTION = 0.2
_CIFAR_BATCHES = "cifar-10-batches-py"
_CALTECH_DIR = "256_ObjectCategories"
_CALTECH_CLUTTER = "257.clutter"


def _root(name: str, root, how: str) -> Path:
    if root is None:
        raise InputError(f"root: source {name!r} needs a dataset folder; {how}")
    return Path(root).expanduser()


def _class_union(dirs: list[Path]) -> list[str]:
    return sorted(set().union(*(list_subfolders(d) for d in dirs)))


# Each source maps (root, download, transform) to zero-argument factories of its parts,
# (train-or-all, test-or-None), so that only the requested split is opened.

def _folder_parts(root, download, transform):
    how = "expected ROOT/<class>/<image>, or ROOT/train/<class>/<image> and ROOT/test/<class>/<image>"
    root = _root("folder", root, how)
    if download:
        raise InputError("download: the 'folder' source reads local files only")
    if not root.is_dir():
        raise FileNotFoundError(f"root: image folder {root} not found; {how}")
    train_dir, test_dir = root / "train", root / "test"
    split_dirs = [d for d in (train_dir, test_dir) if d.is_dir()]
    if not split_dirs:
        return lambda: ImageFolder(root, transform=transform), None
    classes = _class_union(split_dirs)
    if not train_dir.is_dir():
        raise FileNotFoundError(f"root: found {test_dir} but no {train_dir}; {how}")
    make_test = (lambda: ImageFolder(test_dir, transform=transform, classes=classes)) if test_dir.is_dir() else None
    return lambda: ImageFolder(train_dir, transform=transform, classes=classes), make_test


def _cifar10_parts(root, download, transform):
    how = (f"pass download=True (--download) to fetch it into ROOT/{_CIFAR_BATCHES}, or point root at "
           f"a folder holding {_CIFAR_BATCHES}, or at image folders ROOT/train/<class>/<image> and "
           f"ROOT/test/<class>/<image>")
    root = _root("cifar10", root, how)
    if (root / "train").is_dir():
        if download:
            logger.info("cifar10: using the image folders under %s; nothing to download", root)
        train, test = _folder_parts(root, False, transform)
        if test is None:
            raise FileNotFoundError(f"root: found {root / 'train'} but no {root / 'test'}; {how}")
        return train, test
    tv_root = root.parent if root.name == _CIFAR_BATCHES else root
    if not download and not (tv_root / _CIFAR_BATCHES / "data_batch_1").is_file():
        raise FileNotFoundError(f"root: CIFAR-10 not found at {root}; {how}")

    def make(train: bool):
        from torchvision.datasets import CIFAR10

        try:
            ds = CIFAR10(str(tv_root), train=train, download=download)
        except RuntimeError as exc:  # torchvision's "Dataset not found or corrupted"
            raise FileNotFoundError(f"root: CIFAR-10 batches under {tv_root} are missing or corrupt "
                                    f"({exc}); {how}") from None
        except OSError as exc:  # no network, disk full, ...
            raise FileNotFoundError(f"root: could not download CIFAR-10 into {tv_root} ({exc}); {how}") from None
        return ArrayImageDataset(ds.data, ds.targets, ds.classes, transform=transform,
                                 name=f"cifar10/{'train' if train else 'test'}")

    return (lambda: make(True)), (lambda: make(False))


def _caltech_dir(root: Path) -> Path | None:
    for candidate in (root / "caltech256" / _CALTECH_DIR, root / _CALTECH_DIR):
        if candidate.is_dir():
            return candidate
    if root.is_dir() and (root.name == _CALTECH_DIR or (root / "001.ak47").is_dir()):
        return root
    return None


def _caltech256_parts(root, download, transform):
    how = (f"pass download=True (--download) to fetch it into ROOT/caltech256/{_CALTECH_DIR}, or point "
           f"root at the extracted {_CALTECH_DIR} folder (001.ak47/, 002.american-flag/, ...)")
    root = _root("caltech256", root, how)
    folder = _caltech_dir(root)
    if folder is None and download:
        from torchvision.datasets import Caltech256

        try:
            Caltech256(str(root), download=True)
        except OSError as exc:
            raise FileNotFoundError(f"root: could not download Caltech-256 into {root} ({exc}); {how}") from None
        folder = _caltech_dir(root)
    if folder is None:
        raise FileNotFoundError(f"root: Caltech-256 not found at {root}; {how}")
    classes = [name for name in list_subfolders(folder) if name != _CALTECH_CLUTTER]
    return (lambda: ImageFolder(folder, transform=transform, classes=classes)), None


def _digits_parts(root, download, transform):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    grey = np.clip(np.round(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    images = np.repeat(grey[..., None], 3, axis=-1)
    targets = bunch.target.astype(np.int64)
    classes = [str(c) for c in range(10)]
    train_idx, test_idx = stratified_holdout(targets, DIGITS_TEST_FRACTION, seed=0)

    def make(idx, part):
        return ArrayImageDataset(images[idx], targets[idx], classes, transform=transform, name=f"digits/{part}")

    return (lambda: make(train_idx, "train")), (lambda: make(test_idx, "test"))


_SOURCES: dict[str, Callable] = {
    "folder": _folder_parts,
    "cifar10": _cifar10_parts,
    "caltech256": _caltech256_parts,
    "digits": _digits_parts,
}


def list_sources() -> list[str]:
    """Names accepted by :func:`load_source`."""
    return list(_SOURCES)


def load_source(name: str, *, root=None, split: str = "train", download: bool = False,
                transform: Callable | None = None):
    """Open one split of a named source (see the module docstring for ``split`` per source).

    Parameters
    ----------
    name : {"folder", "cifar10", "caltech256", "digits"}
    root : str or os.PathLike, optional
        Dataset folder (not needed for ``digits``).
    split : {"train", "test", "all"}
    download : bool
        Fetch CIFAR-10 / Caltech-256 through torchvision when not found under ``root``.
    transform : callable, optional
        PIL image -> tensor, e.g. :func:`dfsnet.data.transforms.build_transforms`; default
        ``to_tensor``.

    Returns
    -------
    dataset
        With ``.targets`` int64 (n,), ``.classes``, ``.samples``, ``fingerprint()``; for
        ``split="all"`` of a source with a test split, a :class:`ConcatPool`.

    Raises
    ------
    ValueError
        Unknown source or split (the message lists the valid ones).
    FileNotFoundError
        Dataset not found; the message says how to get it.
    """
    check_choice(name, list_sources(), name="source")
    check_choice(split, SPLITS, name="split")
    make_train, make_test = _SOURCES[name](root, download, transform)
    if split == "all":
        return make_train() if make_test is None else ConcatPool(make_train(), make_test())
    if name == "caltech256":
        raise InputError(f"split: caltech256 has no official train/test split, got {split!r}; use "
                         f"split='all' and the 'per-class' split protocol")
    if split == "train":
        return make_train()
    if make_test is None:
        raise FileNotFoundError(f"split: source {name!r} at {root} has no test split (no ROOT/test folder); "
                                f"use split='all' and the 'per-class' split protocol")
    return make_test()


def load_pool(name: str, *, root=None, download: bool = False, transform: Callable | None = None) -> ConcatPool:
    """The pool that split protocols index: the train source followed by the test source.

    For sources without a test split (``caltech256``, a flat ``folder``) the pool is the single
    source and ``pool.sources`` is all zeros (``paper`` then refuses it; use ``per-class``).

    Returns
    -------
    ConcatPool
        ``.targets`` int64 (n,), ``.sources`` int64 (n,) 0/1.
    """
    check_choice(name, list_sources(), name="source")
    make_train, make_test = _SOURCES[name](root, download, transform)
    return ConcatPool(make_train(), None if make_test is None else make_test())
