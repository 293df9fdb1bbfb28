"""Pooled deep features of a dataset, with an on-disk cache."""
from __future__ import annotations

import contextlib
import logging
import zipfile
from pathlib import Path

import numpy as np
import torch

from dfsnet._io import atomic_write
from dfsnet._validation import check_positive_int
from dfsnet.errors import InputError, InputTypeError
from dfsnet.features._loader import (
    check_cache_dir,
    check_dataset,
    exported_graph,
    inference_on,
    iter_batches,
    onnx_wanted,
    resolve_device,
)
from dfsnet.features.fingerprint import combine_keys, dataset_fingerprint, module_fingerprint
from dfsnet.precision import DEFAULT_PRECISION, resolve_precision
from dfsnet.runtime import DEFAULT_RUNTIME, OnnxFeatures

__all__ = ["extract_features", "extract_features_with_mask", "extract_from_maps", "features_cache_path"]

logger = logging.getLogger(__name__)

_CACHE_VERSION = 1


def extract_features(model, dataset, *, batch_size: int = 64, num_workers: int | None = None, device=None,
                     precision: str = DEFAULT_PRECISION, runtime: str = DEFAULT_RUNTIME, cache_dir=None,
                     cache_key: str | None = None, pixel_cache_dir=None, progress: bool = False) -> np.ndarray:
    """Pooled features of every item of ``dataset`` through ``model.features``.

    The model runs in eval mode under ``torch.inference_mode`` on ``device`` (default: the
    first CUDA device when available, else the CPU), one process and one device; its mode
    and device are restored afterwards. Items are read in order, so row ``i`` is item ``i``.

    Parameters
    ----------
    model : torch.nn.Module or dfsnet.runtime.OnnxFeatures
        Anything with ``features(x float (N, 3, H, W)) -> float (N, D)``, e.g. a
        :class:`dfsnet.models.DFSNet`; or such a network's graph in ONNX Runtime.
    dataset : torch Dataset
        Map-style; items are ``(image float (3, H, W), label)`` or a bare image tensor.
    batch_size : int
    num_workers : int, optional
        Image-decoding DataLoader workers; default: chosen by
        :func:`dfsnet.features._loader.resolve_num_workers` (workers for files, none in memory).
    device : str or torch.device, optional
    precision : {"auto", "fp32", "bf16"}
        See :func:`dfsnet.precision.resolve_precision`; features are returned as
        float32 whatever the precision they were computed in.
    runtime : {"auto", "torch", "onnx"}
        ``"onnx"``: export ``model.features`` (about 10 s for EfficientNet-Lite0) and run it in
        ONNX Runtime, fp32 on the CPU (:mod:`dfsnet.runtime`). ``"auto"`` does so where
        :func:`dfsnet.runtime.resolve_runtime` allows it and the dataset has at least
        ``dfsnet.features._loader.ONNX_MIN_ITEMS`` (2,000) items, which repay the export; torch otherwise.
    cache_dir : path, optional
        When given, the result is stored as ``features-<key>.npz`` there and reused. The key
        hashes the model's weights, the dataset's fingerprint (see
        :func:`dfsnet.features.fingerprint.dataset_fingerprint`), the precision and
        ``cache_key``.
    cache_key : str, optional
        Names the split (e.g. ``"cifar10/test"``); required with ``cache_dir`` when the
        dataset cannot be fingerprinted, in which case it alone identifies the data.
    pixel_cache_dir : path, optional
        Keep the decoded, resized images there (uint8, ``3 * H * W`` bytes each) and read them
        from there on the next pass over the same images (:mod:`dfsnet.features.pixels`): for
        several networks run over one dataset. The features are the same.
    progress : bool
        Show a progress bar.

    Returns
    -------
    features : ndarray of float32, shape (n, D)

    Raises
    ------
    ValueError
        If any item could not be loaded (an unreadable image); use
        :func:`extract_features_with_mask` to keep the others.
    """
    features, ok = extract_features_with_mask(
        model, dataset, batch_size=batch_size, num_workers=num_workers, device=device, precision=precision,
        runtime=runtime, cache_dir=cache_dir, cache_key=cache_key, pixel_cache_dir=pixel_cache_dir,
        progress=progress,
    )
    if not ok.all():
        bad = np.flatnonzero(~ok)
        raise InputError(
            f"dataset: {bad.size} of {ok.size} items could not be loaded "
            f"(first: {_describe(dataset, int(bad[0]))}); use extract_features_with_mask() to get "
            "the features of the others with a mask of the loaded items"
        )
    return features


def extract_features_with_mask(model, dataset, *, batch_size: int = 64, num_workers: int | None = None,
                               device=None, precision: str = DEFAULT_PRECISION, runtime: str = DEFAULT_RUNTIME,
                               cache_dir=None, cache_key: str | None = None, pixel_cache_dir=None,
                               progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`extract_features`, but tolerant of unreadable items.

    Returns
    -------
    features : ndarray of float32, shape (n, D)
        Row ``i`` is item ``i``; rows of items that failed to load are zero.
    ok : ndarray of bool, shape (n,)
        ``True`` where the item loaded. Index pipelines keep ``features[ok]`` and the ids
        ``np.flatnonzero(ok)``.
    """
    onnx = model if isinstance(model, OnnxFeatures) else None
    if onnx is None and not callable(getattr(model, "features", None)):
        raise InputTypeError(f"model: expected a module with a features() method (a DFSNet) or an OnnxFeatures, "
                             f"got {type(model).__name__}")
    n = check_dataset(dataset)
    check_positive_int(batch_size, name="batch_size")
    dev = resolve_device("cpu" if onnx is not None else device)
    use_onnx = onnx is not None or onnx_wanted(runtime, n, dev.type, precision)
    prec = resolve_precision("fp32" if use_onnx else precision, dev)
    path = None
    if cache_dir is not None:
        if onnx is not None:
            raise InputError("cache_dir: features of an OnnxFeatures graph are not cached; pass the torch model")
        path = features_cache_path(model, dataset, cache_dir=cache_dir, cache_key=cache_key, precision=prec.name)
        cached = _load_cache(path, n)
        if cached is not None:
            logger.info("features: cache hit %s", path)
            return cached
    features = None
    ok = np.zeros(n, dtype=bool)
    with contextlib.nullcontext() if onnx is not None else inference_on(model, dev, prec):
        for batch in iter_batches(dataset, batch_size=batch_size, num_workers=num_workers, device=dev,
                                  progress=progress, desc="features", pixel_cache_dir=pixel_cache_dir):
            if batch.images is None:
                continue
            if use_onnx and onnx is None:
                onnx = exported_graph(model, tuple(batch.images.shape[1:]), runtime)
                use_onnx = onnx is not None
            if onnx is not None:
                out = onnx(batch.images.numpy())
            else:
                with prec.autocast():
                    out = model.features(prec.prepare_input(batch.images)).float().cpu().numpy()
            if features is None:
                features = np.zeros((n, out.shape[1]), dtype=np.float32)
            rows = batch.indices[batch.ok]
            features[rows] = out
            ok[rows] = True
    if features is None:
        raise InputError(f"dataset: none of its {n} items could be loaded (first: {_describe(dataset, 0)})")
    if not ok.all():
        logger.warning("features: %d of %d items could not be loaded and were skipped", int((~ok).sum()), n)
    if path is not None:
        with atomic_write(path) as fh:
            np.savez(fh, features=features, ok=ok, version=np.int64(_CACHE_VERSION))
        logger.info("features: cached %s", path)
    return features, ok


def features_cache_path(model, dataset, *, cache_dir, cache_key: str | None = None,
                        precision: str = "fp32") -> Path:
    """The cache file :func:`extract_features` uses for ``(model, dataset, cache_key)`` computed in
    ``precision`` (a resolved name, "fp32" or "bf16")."""
    data = dataset_fingerprint(dataset)
    if data is None and cache_key is None:
        raise InputError(
            f"cache_key: a {type(dataset).__name__} cannot be fingerprinted, so pass cache_key= "
            "naming its content and split (or no cache_dir)"
        )
    key = combine_keys(v=_CACHE_VERSION, model=module_fingerprint(model), data=data,
                       name=cache_key, n=len(dataset), precision=precision)
    return check_cache_dir(cache_dir) / f"features-{key}.npz"


def extract_from_maps(model, maps, *, batch_size: int = 256, device=None,
                      precision: str = DEFAULT_PRECISION) -> np.ndarray:
    """Pooled features from precomputed backbone feature maps through ``model.head_features``.

    Equals :func:`extract_features` on the images the maps came from, up to the float16
    rounding of cached maps, at a fraction of the cost (the backbone is skipped).

    Parameters
    ----------
    model : DFSNet
    maps : array-like or torch.Tensor, shape (n, C, h, w), any float dtype
        E.g. :attr:`dfsnet.features.FeatureMaps.maps` (float16, memory-mapped).
    batch_size : int
    device : str or torch.device, optional
    precision : {"auto", "fp32", "bf16"}

    Returns
    -------
    features : ndarray of float32, shape (n, D)
    """
    if not callable(getattr(model, "head_features", None)):
        raise InputTypeError(f"model: expected a DFSNet with head_features(), got {type(model).__name__}")
    if not isinstance(maps, torch.Tensor):
        maps = np.asarray(maps)
        if maps.dtype.kind != "f":
            raise InputTypeError(f"maps: expected a float array, got dtype {maps.dtype}")
    if maps.ndim != 4:
        raise InputError(f"maps: expected shape (n, C, h, w), got {tuple(maps.shape)}")
    check_positive_int(batch_size, name="batch_size")
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    chunks = []
    with inference_on(model, dev, prec):
        for start in range(0, maps.shape[0], batch_size):
            block = maps[start:start + batch_size]
            if not isinstance(block, torch.Tensor):
                block = torch.from_numpy(np.array(block))  # a writable copy of a memmap slice
            with prec.autocast():
                out = model.head_features(prec.prepare_input(block.to(dev, torch.float32)))
            chunks.append(out.float().cpu().numpy())
    if not chunks:
        raise InputError("maps: expected at least one row, got 0")
    return np.ascontiguousarray(np.concatenate(chunks), dtype=np.float32)


def _load_cache(path: Path, n: int):
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["version"]) != _CACHE_VERSION:
                return None
            features, ok = z["features"], z["ok"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        logger.warning("features: ignoring unreadable cache file %s (%s)", path, exc)
        return None
    if features.shape[0] != n or ok.shape != (n,) or features.dtype != np.float32:
        logger.warning("features: ignoring cache file %s with shape %s for %d items", path, features.shape, n)
        return None
    return features, ok


def _describe(dataset, i: int) -> str:
    samples = getattr(dataset, "samples", None)
    if isinstance(samples, (list, tuple)) and i < len(samples):
        return f"item {i}, {samples[i][0]}"
    return f"item {i}"
