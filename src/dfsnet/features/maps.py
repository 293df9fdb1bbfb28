"""Backbone feature maps of a dataset, computed once and cached on disk as float16.

Head-only training runs the frozen backbone once per image and then trains the part after
it (DFS module, pooling, classifier) on the stored maps, epoch after epoch. The maps are
streamed to a ``.npy`` file (so a dataset larger than memory never sits in RAM), which is
read back memory-mapped with ``allow_pickle=False``. Size: ``n * C * h * w * 2`` bytes, e.g.
about 200 MB for 5,000 images through EfficientNet-Lite0 at 128 px (1280 x 4 x 4).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dfsnet._io import atomic_write
from dfsnet.errors import InputError
from dfsnet.features._loader import (
    HashingWriter,
    check_cache_dir,
    check_dataset,
    exported_graph,
    inference_on,
    iter_batches,
    onnx_wanted,
    read_cache_entry,
    resolve_device,
    write_cache_meta,
)
from dfsnet.features.fingerprint import combine_keys, dataset_fingerprint, module_fingerprint
from dfsnet.precision import DEFAULT_PRECISION, resolve_precision
from dfsnet.runtime import DEFAULT_RUNTIME

__all__ = ["FeatureMaps", "cached_feature_maps", "feature_maps_key", "maps_runtime"]

logger = logging.getLogger(__name__)

_CACHE_VERSION = 2
_FP16_MAX = float(torch.finfo(torch.float16).max)


@dataclass(frozen=True)
class FeatureMaps:
    """Cached backbone output for a dataset.

    Attributes
    ----------
    maps : ndarray of float16, shape (n, C, h, w)
        Memory-mapped, read-only; rows of items that failed to load are zero.
    labels : ndarray of int64, shape (n,)
        Labels as the dataset yielded them; -1 for items that failed to load.
    ok : ndarray of bool, shape (n,)
        ``True`` where the item loaded.
    path : Path
        The ``.npy`` file holding ``maps``.
    seconds : float
        Time spent computing the maps in this call (0.0 on a cache hit).
    """

    maps: np.ndarray
    labels: np.ndarray
    ok: np.ndarray
    path: Path
    seconds: float = 0.0

    def __len__(self) -> int:
        return int(self.maps.shape[0])


def feature_maps_key(backbone: torch.nn.Module, dataset, *, precision: str = "fp32") -> str:
    """Cache key: backbone identity and weights + dataset fingerprint (incl. its transform,
    hence the image size) + the precision the maps were computed in (a resolved name)."""
    data = dataset_fingerprint(dataset)
    if data is None:
        raise InputError(
            f"dataset: a {type(dataset).__name__} cannot be fingerprinted for the feature-map cache; "
            "give it a `fingerprint` string attribute, or use an ImageFolder, Subset or TensorDataset"
        )
    meta = getattr(backbone, "meta", None)
    return combine_keys(
        v=_CACHE_VERSION,
        backbone=getattr(meta, "timm_name", type(backbone).__qualname__),
        input_size=list(getattr(meta, "input_size", ()) or ()),
        weights=module_fingerprint(backbone),
        data=data,
        n=len(dataset),
        precision=precision,
    )


def maps_runtime(n_items: int, *, device=None, precision: str = DEFAULT_PRECISION,
                 runtime: str = DEFAULT_RUNTIME) -> str:
    """``"onnx"`` or ``"torch"``: the runtime for the maps of every part of one head-only setting.

    Chosen once, for the ``n_items`` of all its parts together: left to each
    :func:`cached_feature_maps` call, ``"auto"`` would compute a small part (the validation
    images, the queries) in torch's precision and a large one (the database) in ONNX Runtime's
    fp32, and one head's codes of the two would disagree.
    """
    return "onnx" if onnx_wanted(runtime, int(n_items), resolve_device(device).type, precision) else "torch"


def cached_feature_maps(backbone: torch.nn.Module, dataset, *, cache_dir, batch_size: int = 64,
                        num_workers: int | None = None, device=None, precision: str = DEFAULT_PRECISION,
                        runtime: str = DEFAULT_RUNTIME, pixel_cache_dir=None, progress: bool = False) -> FeatureMaps:
    """Return the backbone's feature maps for every item of ``dataset``, computing them once.

    Parameters
    ----------
    backbone : torch.nn.Module
        ``forward(x float (N, 3, H, W)) -> float (N, C, h, w)``; run in eval mode under
        ``torch.inference_mode`` (its mode and device are restored afterwards).
    dataset : torch Dataset
        Items ``(image float (3, H, W), label)``; an item that is ``None`` (unreadable image)
        is marked in ``ok``. Read in order, without augmentation being meaningful: the maps
        are computed once, so a random train transform would be frozen into the cache.
    cache_dir : path
        Directory of ``maps-<key>.npy`` (the maps) and ``maps-<key>.meta.npz`` (labels, mask,
        the maps file's SHA-256, checked once per process on a hit: a damaged entry is
        computed again); the second is written last and marks the entry complete. Both are atomic.
    batch_size : int
    num_workers : int, optional
        Image-decoding workers; default: auto (see :func:`dfsnet.features.extract_features`).
    device : str or torch.device, optional
    precision : {"auto", "fp32", "bf16"}
        See :func:`dfsnet.precision.resolve_precision`; part of the cache key.
    runtime : {"auto", "torch", "onnx"}
        As in :func:`dfsnet.features.extract_features`: ONNX Runtime (fp32, so the cache key's
        precision is "fp32") for the backbone exported once, under "auto" for at least 2,000 items.
    pixel_cache_dir : path, optional
        As in :func:`dfsnet.features.extract_features`.
    progress : bool

    Returns
    -------
    FeatureMaps
    """
    n = check_dataset(dataset)
    cache_dir = check_cache_dir(cache_dir)
    dev = resolve_device(device)
    use_onnx = onnx_wanted(runtime, n, dev.type, precision)
    prec = resolve_precision("fp32" if use_onnx else precision, dev)
    key = feature_maps_key(backbone, dataset, precision=prec.name)
    maps_path = cache_dir / f"maps-{key}.npy"
    meta_path = cache_dir / f"maps-{key}.meta.npz"
    cached = _load(maps_path, meta_path, n)
    if cached is not None:
        logger.info("feature maps: cache hit %s", maps_path)
        return cached
    start = time.perf_counter()
    labels = np.full(n, -1, dtype=np.int64)
    ok = np.zeros(n, dtype=bool)
    shape = None
    pending = 0  # rows of unreadable items seen before the map shape is known
    graph = None
    with atomic_write(maps_path) as raw, inference_on(backbone, dev, prec):
        fh = HashingWriter(raw)
        for batch in iter_batches(dataset, batch_size=batch_size, num_workers=num_workers, device=dev,
                                  progress=progress, desc="feature maps", pixel_cache_dir=pixel_cache_dir):
            out = None
            if batch.images is not None:
                if use_onnx and graph is None:
                    graph = exported_graph(backbone, tuple(batch.images.shape[1:]), runtime, maps=True)
                    use_onnx = graph is not None
                if graph is not None:
                    out = torch.from_numpy(graph(batch.images.numpy()))
                else:
                    with prec.autocast():
                        out = backbone(prec.prepare_input(batch.images))
                if out.ndim != 4:
                    raise InputError(f"backbone: expected a (N, C, h, w) feature map, got shape {tuple(out.shape)}")
                if shape is None:
                    shape = tuple(out.shape[1:])
                    np.lib.format.write_array_header_1_0(fh, {
                        "descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)),
                        "fortran_order": False, "shape": (n, *shape),
                    })
                    fh.write(np.zeros((pending, *shape), dtype=np.float16).tobytes())
            if shape is None:
                pending += len(batch.indices)
                continue
            block = np.zeros((len(batch.indices), *shape), dtype=np.float16)
            if out is not None:
                # Saturate instead of overflowing to inf in float16.
                block[batch.ok] = out.float().clamp_(-_FP16_MAX, _FP16_MAX).half().cpu().numpy()
                labels[batch.indices[batch.ok]] = batch.labels
                ok[batch.indices[batch.ok]] = True
            fh.write(block.tobytes())
        if shape is None:
            raise InputError(f"dataset: none of its {n} items could be loaded")
    write_cache_meta(meta_path, labels=labels, ok=ok, version=_CACHE_VERSION, sha256=fh.hexdigest())
    seconds = time.perf_counter() - start
    if not ok.all():
        logger.warning("feature maps: %d of %d items could not be loaded and were skipped", int((~ok).sum()), n)
    logger.info("feature maps: %d items %s cached in %.1f s at %s", n, shape, seconds, maps_path)
    loaded = _load(maps_path, meta_path, n)
    return FeatureMaps(loaded.maps, loaded.labels, loaded.ok, maps_path, seconds)


def _load(maps_path: Path, meta_path: Path, n: int) -> FeatureMaps | None:
    entry = read_cache_entry(maps_path, meta_path, _CACHE_VERSION, what="feature maps")
    if entry is None:
        return None
    maps, labels, ok = entry
    if maps.ndim != 4 or maps.shape[0] != n or maps.dtype != np.float16 or labels.shape != (n,) or ok.shape != (n,):
        logger.warning("feature maps: ignoring cache %s with shape %s for %d items", maps_path, maps.shape, n)
        return None
    return FeatureMaps(maps, labels, ok, maps_path)
