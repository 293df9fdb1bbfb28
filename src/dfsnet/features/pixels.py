"""Preprocessed images of a dataset, decoded once and cached on disk as uint8.

An experiment runs the same image files through one network after another: the frozen
backbone for its maps, then every fine-tuned network for its features. Decoding and resizing
cost about a quarter of EfficientNet-Lite0's forward at 128 px on a 2-core CPU and share its
cores, so every pass after the first reads the images from this cache instead: each image as
the evaluation preprocessing leaves it before normalisation (:meth:`EvalPreprocess.pixels`),
``3 * H * W`` bytes (49 KB at 128 px, 2.9 GB for CIFAR-10's 60,000 images), read back
memory-mapped with ``allow_pickle=False`` once its SHA-256 matches the one recorded beside it
(a damaged entry is decoded again). Normalising a batch is element-wise, so the images
coming out of the cache equal those decoded from the files bit for bit.

Only a dataset whose transform is the deterministic evaluation preprocessing (what
:func:`dfsnet.data.build_transforms` builds with ``train=False``) and whose content can be
fingerprinted is cached; any other is read as before.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dfsnet._io import atomic_write
from dfsnet.features._loader import Batch, HashingWriter, read_cache_entry, write_cache_meta
from dfsnet.features.fingerprint import combine_keys, dataset_fingerprint
from dfsnet.preprocess import EvalPreprocess

__all__ = ["pixel_preprocess", "pixel_cache_paths", "cached_pixel_batches"]

logger = logging.getLogger(__name__)

_CACHE_VERSION = 2


def pixel_preprocess(dataset) -> EvalPreprocess | None:
    """The evaluation preprocessing ``dataset`` applies to every image, or None.

    Understood: dfsnet's image datasets (``load_image`` and ``targets``) whose ``transform`` is
    an :class:`~dfsnet.preprocess.EvalPreprocess`, or the ``[EvalPreprocess, FromNumpy]``
    pipeline of :func:`dfsnet.data.build_transforms`; a ``Subset`` or pool without a transform
    of its own applies its parts' (which must then all be the same).
    """
    if not (callable(getattr(dataset, "load_image", None)) and hasattr(dataset, "targets")):
        return None
    return _preprocess_of(dataset)


def _preprocess_of(ds) -> EvalPreprocess | None:
    from dfsnet.data.transforms import FromNumpy

    transform = getattr(ds, "transform", None)
    if transform is None:
        if hasattr(ds, "indices") and hasattr(ds, "dataset"):  # a Subset: its parent's
            return _preprocess_of(ds.dataset)
        parts = [_preprocess_of(d) for d in getattr(ds, "datasets", ())]  # a pool: its sources'
        if parts and all(p is not None and repr(p) == repr(parts[0]) for p in parts):
            return parts[0]
        return None
    if isinstance(transform, EvalPreprocess):
        return transform
    steps = getattr(transform, "transforms", None)
    if (isinstance(steps, list) and len(steps) == 2 and isinstance(steps[0], EvalPreprocess)
            and isinstance(steps[1], FromNumpy)):
        return steps[0]
    return None


def pixel_cache_paths(dataset, cache_dir) -> tuple[Path, Path] | None:
    """``(pixels .npy, meta .npz)`` of ``dataset``'s entry in ``cache_dir``; None when the dataset
    cannot be cached (another transform, or no fingerprint). The key hashes the dataset's
    fingerprint, which covers its files, labels, subset indices and transform."""
    if pixel_preprocess(dataset) is None:
        return None
    data = dataset_fingerprint(dataset)
    if data is None:
        return None
    key = combine_keys(v=_CACHE_VERSION, data=data, n=len(dataset))
    cache_dir = Path(cache_dir)
    return cache_dir / f"pixels-{key}.npy", cache_dir / f"pixels-{key}.meta.npz"


class _PixelView(Dataset):
    """Items ``(uint8 tensor (3, H, W), label)`` of a dataset's images, or None where unreadable."""

    def __init__(self, dataset, preprocess: EvalPreprocess):
        self.dataset, self.preprocess = dataset, preprocess

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        image = self.dataset.load_image(i)
        if image is None:
            return None
        return torch.from_numpy(self.preprocess.pixels(image)), int(self.dataset.targets[i])

    @property
    def reads_files(self) -> bool:
        return bool(getattr(self.dataset, "reads_files", False))


def cached_pixel_batches(dataset, cache_dir, *, batch_size: int, loader) -> Iterator | None:
    """The batches of :func:`dfsnet.features._loader.iter_batches` (on the CPU) through the pixel
    cache, or None when ``dataset`` cannot be cached.

    On a hit the images come from the memory-mapped file; on a miss ``loader(view)`` (the
    DataLoader iteration) decodes them once, and the file is written as they pass (atomically,
    the meta file last, which marks the entry complete).

    Parameters
    ----------
    dataset : dfsnet image dataset
    cache_dir : path
    batch_size : int
    loader : callable ``(dataset) -> iterator of Batch``
        The ordered, uncached iteration.
    """
    paths = pixel_cache_paths(dataset, cache_dir)
    if paths is None:
        logger.debug("pixel cache: %s is not cached (not the evaluation preprocessing, or no fingerprint)",
                     type(dataset).__name__)
        return None
    preprocess = pixel_preprocess(dataset)
    cached = _load(*paths, len(dataset), preprocess.size)
    if cached is not None:
        logger.info("pixel cache: hit %s", paths[0])
        return _from_cache(*cached, preprocess, batch_size)
    return _filling(dataset, preprocess, paths, loader)


def _from_cache(pixels: np.ndarray, labels: np.ndarray, ok: np.ndarray, preprocess: EvalPreprocess,
                batch_size: int) -> Iterator:
    for start in range(0, pixels.shape[0], batch_size):
        rows = slice(start, min(start + batch_size, pixels.shape[0]))
        indices = np.arange(rows.start, rows.stop, dtype=np.int64)
        good = ok[rows]
        if not good.any():
            yield Batch(indices, good, None, np.empty(0, dtype=np.int64))
            continue
        block = pixels[rows] if good.all() else pixels[rows][good]
        yield Batch(indices, good, torch.from_numpy(preprocess.normalize(block)), labels[rows][good])


def _filling(dataset, preprocess: EvalPreprocess, paths: tuple[Path, Path], loader) -> Iterator:
    pixels_path, meta_path = paths
    n = len(dataset)
    shape = (3, *preprocess.size)
    labels = np.full(n, -1, dtype=np.int64)
    ok = np.zeros(n, dtype=bool)
    start = time.perf_counter()
    with atomic_write(pixels_path) as raw:
        fh = HashingWriter(raw)
        np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                                                  "fortran_order": False, "shape": (n, *shape)})
        for batch in loader(_PixelView(dataset, preprocess)):
            block = np.zeros((len(batch.indices), *shape), dtype=np.uint8)
            if batch.images is not None:
                u8 = batch.images.numpy()
                block[batch.ok] = u8
                labels[batch.indices[batch.ok]] = batch.labels
                ok[batch.indices[batch.ok]] = True
                batch = batch._replace(images=torch.from_numpy(preprocess.normalize(u8)))
            fh.write(block.tobytes())
            yield batch
    write_cache_meta(meta_path, labels=labels, ok=ok, version=_CACHE_VERSION, sha256=fh.hexdigest())
    logger.info("pixel cache: %d images %s stored in %.1f s at %s", n, shape, time.perf_counter() - start,
                pixels_path)


def _load(pixels_path: Path, meta_path: Path, n: int, size: tuple[int, int]):
    entry = read_cache_entry(pixels_path, meta_path, _CACHE_VERSION, what="pixel cache")
    if entry is None:
        return None
    pixels, labels, ok = entry
    if (pixels.shape != (n, 3, *size) or pixels.dtype != np.uint8 or labels.shape != (n,) or ok.shape != (n,)
            or ok.dtype != np.bool_):
        logger.warning("pixel cache: ignoring entry %s of shape %s for %d images of %s px", pixels_path,
                       pixels.shape, n, size)
        return None
    return entry
