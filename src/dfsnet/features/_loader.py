"""Ordered, index-tracking batch iteration shared by feature and feature-map extraction."""
from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import os
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dfsnet._io import atomic_write, sha256_file
from dfsnet._validation import check_positive_int
from dfsnet.errors import InputError, InputTypeError
from dfsnet.precision import Precision

logger = logging.getLogger(__name__)


class Batch(NamedTuple):
    """One ordered batch. ``indices`` int64 (b,) are the dataset positions it covers; ``ok``
    bool (b,) marks the items that loaded; ``images`` float (k, 3, H, W) and ``labels`` int64
    (k,) hold the k loaded ones (label -1 when the dataset yields bare images)."""

    indices: np.ndarray
    ok: np.ndarray
    images: torch.Tensor | None
    labels: np.ndarray


class _Indexed(Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        return i, self.dataset[i]


def _collate(batch) -> Batch:
    # Unreadable images come back as None (dfsnet.data's contract); keep their positions so
    # the caller can mark them instead of silently shifting every later row.
    indices = np.array([i for i, _ in batch], dtype=np.int64)
    ok = np.array([item is not None for _, item in batch], dtype=bool)
    items = [item for _, item in batch if item is not None]
    if not items:
        return Batch(indices, ok, None, np.empty(0, dtype=np.int64))
    if isinstance(items[0], torch.Tensor):
        images, labels = torch.stack(items), np.full(len(items), -1, dtype=np.int64)
    else:
        images = torch.stack([item[0] for item in items])
        labels = np.array([int(item[1]) for item in items], dtype=np.int64)
    return Batch(indices, ok, images, labels)


def resolve_device(device) -> torch.device:
    """``None`` or ``"auto"`` -> the first CUDA device when available, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"device: expected e.g. 'cpu', 'cuda' or 'cuda:1', got {device!r} ({exc})") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (dev.index is not None and dev.index >= count):
            raise InputError(f"device: got {device!r}, but this machine has {count} usable CUDA device(s); "
                             "use 'cpu'" + (f" or 'cuda:0'..'cuda:{count - 1}'" if count else ""))
    return dev


def check_cache_dir(cache_dir) -> Path:
    """``cache_dir`` as a Path; refuses an existing file, before any work is done."""
    path = Path(cache_dir)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"cache_dir: expected a folder, but {path} is a file")
    return path


class HashingWriter:
    """A binary file whose ``write`` also feeds a SHA-256 of everything written, so a cache
    entry's checksum costs no second pass over a file of gigabytes."""

    def __init__(self, fh):
        self._fh = fh
        self._sha256 = hashlib.sha256()

    def write(self, data) -> int:
        self._sha256.update(data)
        return self._fh.write(data)

    def hexdigest(self) -> str:
        return self._sha256.hexdigest()


# Array files whose checksum matched in this process, by (path, size, mtime, inode, digest): the
# runner reads one entry several times, and hashing it again each time would cost seconds.
_VERIFIED: set[tuple] = set()


def _checksum_matches(path: Path, digest: str) -> bool:
    st = path.stat()
    stamp = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, digest)
    if stamp in _VERIFIED:
        return True
    if sha256_file(path) != digest:
        return False
    _VERIFIED.add(stamp)
    return True


def read_cache_entry(array_path: Path, meta_path: Path, version: int, *, what: str):
    """``(array, labels, ok)`` of a cache entry: a ``.npy`` array, memory-mapped read-only, and its
    ``.meta.npz`` (``labels``, ``ok``, ``version`` and the array file's ``sha256``), which is
    written last. None when either file is missing, of another ``version``, unreadable, or when
    the array file does not match its checksum (logged as a warning naming ``what``; the caller
    computes the entry again); the caller checks the shapes."""
    if not (array_path.is_file() and meta_path.is_file()):
        return None
    try:
        with np.load(meta_path, allow_pickle=False) as z:
            if int(z["version"]) != version:
                return None
            labels, ok, digest = z["labels"], z["ok"], str(z["sha256"])
        if not _checksum_matches(array_path, digest):
            logger.warning("%s: ignoring damaged cache %s (its SHA-256 is not the one recorded in %s); "
                           "computing it again", what, array_path, meta_path.name)
            return None
        array = np.load(array_path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        logger.warning("%s: ignoring unreadable cache %s (%s)", what, array_path, exc)
        return None
    return array, labels, ok


def write_cache_meta(meta_path: Path, *, labels: np.ndarray, ok: np.ndarray, version: int, sha256: str) -> None:
    """The ``.meta.npz`` that completes a cache entry (atomically; written after its array file)."""
    with atomic_write(meta_path) as fh:
        np.savez(fh, labels=labels, ok=ok, version=np.int64(version), sha256=np.array(sha256))


def check_dataset(dataset, *, name: str = "dataset") -> int:
    try:
        n = len(dataset)
    except TypeError:
        raise InputTypeError(f"{name}: expected a map-style dataset with __len__, "
                             f"got {type(dataset).__name__}") from None
    if n == 0:
        raise InputError(f"{name}: expected at least one item, got an empty dataset")
    return n


def resolve_num_workers(num_workers: int | None, dataset, batch_size: int) -> int:
    """``num_workers`` as given, or for ``None`` (auto): decoding workers for a dataset read from
    files and long enough to amortise their start-up, none for in-memory data.

    Measured on this project's 2-core CPU (CIFAR-10 JPEGs at 128 px, bf16 forward): 0, 1 and 2
    workers gave 36, 53 and 59 images/s, so auto uses up to one worker per core (at most 8).
    """
    if num_workers is None:
        if getattr(dataset, "reads_files", False) and len(dataset) >= 4 * batch_size:
            return min(8, os.cpu_count() or 1)
        return 0
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise InputError(f"num_workers: expected an integer >= 0 or None (auto), got {num_workers!r}")
    return num_workers


def iter_batches(dataset, *, batch_size: int, num_workers: int | None, device: torch.device,
                 progress: bool = False, desc: str = "extract", pixel_cache_dir=None) -> Iterator[Batch]:
    """Yield the dataset in order, ``batch_size`` items at a time, images moved to ``device``.

    ``num_workers=None`` picks the decoding workers (:func:`resolve_num_workers`). With
    ``pixel_cache_dir``, a dataset under the evaluation preprocessing is decoded once and read
    from there afterwards (:mod:`dfsnet.features.pixels`); the batches are the same."""
    from tqdm.auto import tqdm

    from dfsnet.features.pixels import cached_pixel_batches

    check_positive_int(batch_size, name="batch_size")

    def load(ds):
        workers = resolve_num_workers(num_workers, ds, batch_size)
        return iter(DataLoader(_Indexed(ds), batch_size=batch_size, shuffle=False, num_workers=workers,
                               collate_fn=_collate, pin_memory=device.type == "cuda"))

    batches = None
    if pixel_cache_dir is not None:
        batches = cached_pixel_batches(dataset, check_cache_dir(pixel_cache_dir), batch_size=batch_size,
                                       loader=load)
    if batches is None:
        batches = load(dataset)
    with tqdm(total=len(dataset), desc=desc, unit="img", disable=not progress) as bar:
        for batch in batches:
            if batch.images is not None:
                batch = batch._replace(images=batch.images.to(device, non_blocking=True))
            yield batch
            bar.update(len(batch.indices))


@contextlib.contextmanager
def inference_on(model: torch.nn.Module, device: torch.device, precision: Precision | None = None):
    """Run ``model`` in eval mode on ``device``, its weights in ``precision``'s memory format;
    restore its mode, device and memory format afterwards."""
    if not isinstance(model, torch.nn.Module):
        raise InputTypeError(f"model: expected a torch.nn.Module (a DFSNet), got {type(model).__name__}")
    was_training = model.training
    original = next((p.device for p in model.parameters()), None)
    model.eval().to(device)
    if precision is not None:
        precision.prepare_model(model)
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)
        if precision is not None and precision.channels_last:
            model.to(memory_format=torch.contiguous_format)
        if original is not None and original != device:
            model.to(original)


#: Under runtime "auto", datasets this large run in ONNX Runtime: at 150-300 images/s gained
#: against torch, fewer would not repay the export (about 10 s for EfficientNet-Lite0).
ONNX_MIN_ITEMS = 2_000


def onnx_wanted(runtime: str, n: int, device_type: str, precision: str) -> bool:
    """Whether ``n`` items go through an exported graph in ONNX Runtime (see :mod:`dfsnet.runtime`)."""
    from dfsnet.runtime import effective_runtime, resolve_runtime

    runtime = effective_runtime(runtime)
    if runtime == "onnx" or (runtime == "auto" and n >= ONNX_MIN_ITEMS):
        return resolve_runtime(runtime, device_type=device_type, precision=precision, export=True) == "onnx"
    return False


# The last exports, by the weights they were made from: an experiment extracts a network's fit
# and database parts in separate calls, and each export costs about 10 s.
_GRAPHS: collections.OrderedDict[tuple, object] = collections.OrderedDict()
_GRAPHS_KEPT = 2
_GRAPHS_LOCK = threading.Lock()


def exported_graph(model, input_shape: tuple[int, ...], runtime: str, *, maps: bool = False):
    """``model.features`` (``model`` itself with ``maps``) in ONNX Runtime, an
    :class:`~dfsnet.runtime.OnnxFeatures`; None (torch goes on) when the export fails under "auto".
    The last two graphs are reused for a model with the same weights."""
    from dfsnet.features.fingerprint import module_fingerprint
    from dfsnet.runtime import OnnxFeatures, export_features

    key = (module_fingerprint(model), tuple(input_shape), maps)
    with _GRAPHS_LOCK:
        if key in _GRAPHS:
            _GRAPHS.move_to_end(key)
            return _GRAPHS[key]
        try:
            graph = OnnxFeatures(export_features(model, input_shape, maps=maps))
        except RuntimeError as exc:
            if runtime == "onnx":
                raise InputError(f"runtime: {exc}") from None
            logger.warning("%s; running it in torch instead", exc)
            return None
        _GRAPHS[key] = graph
        while len(_GRAPHS) > _GRAPHS_KEPT:
            _GRAPHS.popitem(last=False)
        return graph
