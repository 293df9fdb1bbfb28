"""``ImageIndex``: a persistent, searchable image index (model + encoder + Hamming codes +
metadata in one folder).

>>> from dfsnet import ImageIndex
>>> index = ImageIndex.build("runs/cifar/model.safetensors", "photos/", "photos.index")
>>> index.add("more_photos/")
>>> [(h.rank, h.distance, h.path) for h in ImageIndex.load("photos.index").search("query.jpg", k=5)]

Crash safety. Every write produces a new generation: the new codes, metadata and feature chunk
are written under new names and fsynced, then ``manifest.json`` is replaced atomically
(``dfsnet._io.atomic_write``: temp file, fsync, rename, directory fsync). A process killed at any
point leaves either the old manifest, whose files are untouched, or the new one, whose files are
complete. Files no manifest names (an interrupted write's, or a superseded generation's) are
removed under the write lock. Writers of one folder are serialised with ``fcntl.flock`` on
``.lock`` (POSIX). The layout is described in :mod:`dfsnet.store.manifest`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from dfsnet import __version__
from dfsnet._io import atomic_write, checkpoint_hash, sha256_file
from dfsnet._validation import check_positive_int
from dfsnet.errors import InputError, InputTypeError, NotFoundError
from dfsnet.images import open_image
from dfsnet.precision import DEFAULT_PRECISION, resolve_precision
from dfsnet.runtime import DEFAULT_RUNTIME, effective_runtime, resolve_runtime
from dfsnet.store.builder import AddReport, Builder, export_onnx_graph, scan_images
from dfsnet.store.files import check_on_load, npy_layout
from dfsnet.store.lock import collect_garbage, write_lock
from dfsnet.store.maintenance import (
    PruneReport,
    RemoveReport,
    RepairReport,
    find_remains,
    prune_index,
    remove_images,
    repair_index,
)
from dfsnet.store.manifest import (
    ENCODER_FILE,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    MODEL_FILE,
    ONNX_FILE,
    IndexDamagedError,
    check_compatible,
    check_same_index,
    encoder_params,
    now,
    read_manifest,
    referenced_files,
)
from dfsnet.store.metadata import INT64_MAX, INT64_MIN, ImageRecord, MetadataReader
from dfsnet.store.verify import VerifyReport, verify_index

# ITQ's PCA and rotation settle on a few tens of thousands of rows; more only costs time.
DEFAULT_FIT_SAMPLE = 20_000

__all__ = ["ImageIndex", "SearchHit"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SearchHit:
    """One search result.

    Attributes
    ----------
    rank : int
        1-based position.
    id : int
        The image's id in the index.
    distance : int
        Hamming distance between the query's code and the image's.
    path : str
        Absolute path of the indexed image file.
    label : str or None
        Its class (the sub-folder it was indexed from), when known.
    score : float or None
        Euclidean distance between the float features, when re-ranked.
    """

    rank: int
    id: int
    distance: int
    path: str
    label: str | None
    score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Generation:
    """One committed generation, loaded: immutable, so searches may hold it while a write swaps it.

    Raises :class:`IndexDamagedError` naming the file when one is missing, damaged (by the
    checks of :func:`dfsnet.store.files.check_on_load`) or inconsistent with the manifest.
    """

    def __init__(self, index_dir: Path, manifest: dict):
        from dfsnet.index import HammingIndex

        files = manifest["files"]
        self.manifest = manifest
        self.generation = int(manifest["generation"])
        self.count = int(manifest["count"])
        if files["codes"] is None or files["metadata"] is None:
            raise IndexDamagedError(f"index_dir: the manifest of {index_dir} names no codes or metadata file")
        check_on_load(index_dir, manifest)
        try:
            self.index = HammingIndex.load(index_dir / files["codes"])
        except ValueError as exc:
            raise IndexDamagedError(f"index_dir: {files['codes']} is damaged ({exc}); run `dfsnet index verify`, "
                                    "then `dfsnet index repair`") from None
        for what, found, expected in (("codes", len(self.index), self.count),
                                      ("bit width", self.index.n_bits, int(manifest["bits"]))):
            if found != expected:
                raise IndexDamagedError(f"index_dir: {files['codes']} has {what} {found}, the manifest says "
                                        f"{expected}; run `dfsnet index verify`")
        self.metadata = MetadataReader(index_dir / files["metadata"])
        try:
            found_gen, found_count = self.metadata.generation(), self.metadata.count()
        except IndexDamagedError:
            self.metadata.close()
            raise
        if (found_gen, found_count) != (self.generation, self.count):
            self.metadata.close()
            raise IndexDamagedError(f"index_dir: {files['metadata']} holds {found_count} images of generation "
                                    f"{found_gen}, the manifest counts {self.count} at generation "
                                    f"{self.generation}; run `dfsnet index verify`")
        # Feature rows are read with pread, not a memory map: a chunk truncated while it is
        # served then fails one request with an error instead of killing the process (SIGBUS).
        self.chunks: list[tuple[Path, int, int]] = []
        self.offsets = np.zeros(1, dtype=np.int64)
        if files["features"]:
            self.chunks = [(index_dir / c["file"], npy_layout(index_dir / c["file"]).offset, int(c["rows"]))
                           for c in files["features"]]
            self.offsets = np.cumsum([0] + [rows for _, _, rows in self.chunks])
        self.feature_dim = int(manifest["model"]["feature_dim"])

    @classmethod
    def load(cls, index_dir: Path) -> _Generation:
        # A writer may commit and delete the generation whose manifest we just read; then re-read.
        retries = 4
        while True:
            manifest = read_manifest(index_dir)
            try:
                return cls(index_dir, manifest)
            except (FileNotFoundError, IndexDamagedError):
                retries -= 1
                if retries < 0 or read_manifest(index_dir)["generation"] == manifest["generation"]:
                    raise

    def codes_of(self, ids: np.ndarray) -> np.ndarray:
        """uint8 (len(ids), B): the stored codes of indexed ``ids``, in that order."""
        stored = np.asarray(self.index.ids, dtype=np.int64)  # a flat HammingIndex keeps them sorted
        rows = np.searchsorted(stored, ids)
        if np.any(rows >= stored.size) or not np.array_equal(stored[np.minimum(rows, stored.size - 1)], ids):
            raise NotFoundError(f"ids: not all of {ids.tolist()[:5]} are indexed")
        # HammingIndex has no public accessor for its codes; _codes() is the storage-order view
        return np.ascontiguousarray(self.index._codes()[rows])

    def features_of(self, ids: np.ndarray) -> np.ndarray:
        """float32 (len(ids), D): stored features of ``ids``."""
        chunk = np.searchsorted(self.offsets, ids, side="right") - 1
        row_bytes = 4 * self.feature_dim
        out = np.empty((len(ids), self.feature_dim), dtype=np.float32)
        by_chunk: dict[int, list[int]] = {}
        for j, c in enumerate(chunk):
            by_chunk.setdefault(int(c), []).append(j)
        for c, rows in by_chunk.items():
            path, offset, _ = self.chunks[c]
            try:
                with open(path, "rb", buffering=0) as fh:
                    for j in rows:
                        data = os.pread(fh.fileno(), row_bytes, offset + int(ids[j] - self.offsets[c]) * row_bytes)
                        if len(data) != row_bytes:
                            raise OSError(f"short read of {len(data)} of {row_bytes} bytes")
                        out[j] = np.frombuffer(data, dtype="<f4")
            except OSError as exc:
                raise IndexDamagedError(f"index_dir: {path.name} cannot be read ({exc}); run "
                                        "`dfsnet index verify`") from None
        return out

    def close(self) -> None:
        self.metadata.close()


class ImageIndex:
    """Model, encoder, Hamming index and image metadata of one index folder.

    ``ImageIndex(index_dir)`` opens an existing index (the same as :meth:`load`);
    :meth:`build` creates one. Searching is thread-safe; model inference is serialised by a
    lock (it uses every core by itself).

    Parameters
    ----------
    index_dir : path-like
    model : path-like, optional
        A checkpoint the index must have been built with; another one is refused.
    bits : int, optional
        The code length the caller expects; another one is refused.
    device : str or torch.device, optional
        ``None`` or ``"auto"``: CUDA when available, else the CPU.
    precision : {"auto", "fp32", "bf16"}
        The network's precision in torch, for queries and :meth:`add`
        (:func:`dfsnet.precision.resolve_precision`); any index is searchable in either.
    runtime : {"auto", "torch", "onnx"}
        What runs the network for queries (:mod:`dfsnet.runtime`): ``"onnx"`` is the index's
        ``model.onnx`` in ONNX Runtime, fp32 on the CPU, without importing torch (fast start-up,
        and faster than torch on a CPU); ``"auto"`` takes it when the index has one, the device
        is the CPU (or ``"auto"``) and bf16 was not asked for, else torch. :meth:`add` runs the
        same way.

    Attributes
    ----------
    index_dir : pathlib.Path
    runtime : str
        "onnx" or "torch", as resolved.
    model : dfsnet.models.DFSNet
        The torch network, loaded on first use when the runtime is "onnx".
    device : torch.device
        Likewise; the CPU for ONNX Runtime.
    precision : dfsnet.precision.Precision
    encoder : dfsnet.hashing.Encoder
    manifest : dict
        The committed manifest this object currently serves.
    last_report : AddReport or None
        What the last :meth:`build` or :meth:`add` did.

    Raises
    ------
    FileNotFoundError
        No index at ``index_dir``.
    InputError
        Built with another checkpoint or bit width, or inconsistent files.
    """

    def __init__(self, index_dir, *, model=None, bits: int | None = None, device=None,
                 precision: str = DEFAULT_PRECISION, runtime: str = DEFAULT_RUNTIME):
        from dfsnet.hashing.frozen import FrozenEncoder

        self.index_dir = Path(index_dir).expanduser().resolve()
        check_compatible(self.index_dir, read_manifest(self.index_dir), model=model, bits=bits)
        self._state = self._open_state()
        manifest = self._state.manifest
        self._device_arg, self._precision_arg = device, precision
        self._torch: tuple | None = None
        self.runtime = _query_runtime(runtime, manifest, device, precision)
        if self.runtime == "onnx":
            self._onnx = _load_onnx(self.index_dir, manifest)
        else:
            self._load_torch()
        if sha256_file(self.index_dir / ENCODER_FILE) != manifest["encoder"]["sha256"]:
            raise InputError(f"index_dir: {ENCODER_FILE} does not match the sha256 recorded in the manifest; "
                             "the file was replaced or damaged")
        # Queries are encoded without scikit-learn (a second of start-up); the estimator loads on demand.
        self._codes = FrozenEncoder.load(self.index_dir / ENCODER_FILE)
        self._encoder = None
        if self._codes.n_bits_ != manifest["bits"]:
            raise InputError(f"index_dir: {ENCODER_FILE} makes {self._codes.n_bits_}-bit codes but the "
                             f"manifest says {manifest['bits']}; run `dfsnet index verify`")
        self._model_lock = threading.Lock()
        self.last_report: AddReport | None = None

    def _load_torch(self) -> tuple:
        """``(model, device, precision, transform)`` of torch, loaded on first use."""
        if self._torch is None:
            from dfsnet.data import build_transforms
            from dfsnet.features import resolve_device
            from dfsnet.store.unsupervised import load_index_model

            manifest = self._state.manifest
            device = resolve_device(self._device_arg if self.runtime == "torch" else "cpu")
            precision = resolve_precision(self._precision_arg if self.runtime == "torch" else "fp32", device)
            found = checkpoint_hash(self.index_dir / MODEL_FILE)
            if found != manifest["checkpoint"]["hash"]:
                raise InputError(f"index_dir: {MODEL_FILE} has hash {found}, but the index was built with "
                                 f"checkpoint hash {manifest['checkpoint']['hash']}; the file was replaced or damaged")
            model = load_index_model(self.index_dir / MODEL_FILE, map_location=device)[0].eval()
            model = precision.prepare_model(model)
            transform = build_transforms(model.meta, train=False, image_size=manifest["image_size"])
            self._torch = (model, device, precision, transform)
        return self._torch

    @property
    def encoder(self):
        if self._encoder is None:
            from dfsnet.hashing import Encoder

            self._encoder = Encoder.load(self.index_dir / ENCODER_FILE)
        return self._encoder

    @property
    def model(self):
        return self._load_torch()[0]

    @property
    def device(self):
        return self._load_torch()[1]

    @property
    def precision(self):
        return self._load_torch()[2]

    @property
    def transform(self):
        """The query images' transform, PIL image to float32 tensor (3, H, W) (torch's path)."""
        return self._load_torch()[3]

    # ---------------------------------------------------------------------------------------
    # construction

    @classmethod
    def load(cls, index_dir, *, model=None, bits: int | None = None, device=None,
             precision: str = DEFAULT_PRECISION, runtime: str = DEFAULT_RUNTIME) -> ImageIndex:
        """Open an index folder; see the class parameters."""
        if read_manifest(index_dir).get("backend", {}).get("kind") == "milvus":
            from dfsnet.store.milvus import MilvusIndex

            cls = MilvusIndex
        return cls(index_dir, model=model, bits=bits, device=device, precision=precision, runtime=runtime)

    def _open_state(self) -> _Generation:
        """The committed state searches read: the local backend's newest generation."""
        if read_manifest(self.index_dir).get("backend", {}).get("kind") == "milvus":
            raise InputError(f"index_dir: {self.index_dir} keeps its codes in Milvus; open it with "
                             "ImageIndex.load()")
        return _Generation.load(self.index_dir)

    @classmethod
    def build(cls, model_path=None, images_dir=None, out_dir=None, *, bits: int | None = None, fit_on=None,
              selector: str | None = "gain_ratio", hasher: str = "sample_mean", backbone: str | None = None,
              weights=None, fit_sample: int = DEFAULT_FIT_SAMPLE, store_features: bool = False,
              image_size: int | None = None, batch_size: int = 64, num_workers: int | None = None, device=None,
              precision: str = DEFAULT_PRECISION, runtime: str = DEFAULT_RUNTIME, progress: bool = False,
              force: bool = False) -> ImageIndex:
        """Index the images of ``images_dir`` into a new index folder ``out_dir``.

        With a ``model_path`` the codes come from a trained model (task-specific codes). Without
        one the index needs no labels and no training: the features are a pretrained
        backbone's pooled, L2-normalised features and the encoder is ITQ fitted on the
        collection itself (on a sample of ``fit_sample`` images when it is larger), or the
        ``fit_on`` encoder when a labelled folder is given.

        Parameters
        ----------
        model_path : path-like, optional
            A checkpoint from :func:`dfsnet.models.save_checkpoint` (e.g. ``dfsnet train``'s).
        images_dir : path-like
            A folder searched recursively for images (when images sit in sub-folders, the first
            sub-folder's name is recorded as the label), or a text file of image paths, one a
            line (``PATH`` or ``PATH<TAB>LABEL``, relative to the file's folder).
        out_dir : path-like
            The index folder; must not hold an index already.
        bits : int, optional
            Code length. Default: the saved encoder's with a model, 128 with ``fit_on``, else
            64 (fewer for a collection of fewer images; ITQ makes at most one bit per image).
            Must agree with the saved encoder when one is used.
        fit_on : path-like, optional
            A labelled image folder (``ROOT/<class>/<image>``) to fit the selector and hasher on,
            instead of the ``encoder.npz`` saved beside the checkpoint by ``dfsnet train`` (or,
            without a model, instead of ITQ on the collection).
        selector, hasher : str
            Encoder components when fitting on ``fit_on`` (see :func:`dfsnet.hashing.make_encoder`).
        backbone : str, optional
            Without a model: the pretrained backbone (an alias or timm name; default
            ``efficientnet_lite0``, whose ImageNet weights are packaged, offline).
        weights : path-like, optional
            Without a model: a local state dict for ``backbone`` instead of its pretrained weights.
        fit_sample : int
            Without a model and ``fit_on``: images ITQ is fitted on, drawn at random (seed 0).
        store_features : bool
            Keep the float features (``4 * D`` bytes per image) for ``search(rerank=True)`` and
            the cosine check of :func:`dfsnet.dedup.find_duplicates`.
        image_size : int, optional
            Network input size; default: the checkpoint's ``extra["image_size"]`` if it
            records one, else the backbone's native input size.
        batch_size : int
        num_workers : int, optional
            Image-decoding workers; default: one per core (see
            :func:`dfsnet.features.extract_features`).
        device : str or torch.device, optional
            ``None`` or ``"auto"``: CUDA when available, else the CPU.
        precision : {"auto", "fp32", "bf16"}
            The network's precision in torch (:func:`dfsnet.precision.resolve_precision`),
            recorded in the manifest. An index is searchable in either precision; the codes of
            an image agree between them up to a few bits near the thresholds.
        runtime : {"auto", "torch", "onnx"}
            Unless "torch", the model's ``features()`` is also saved as ``model.onnx`` (when
            ``onnxscript`` and ``onnxruntime`` are installed), which queries run without torch;
            the collection is then extracted with it too where the runtime resolves to ONNX
            Runtime (:func:`dfsnet.runtime.resolve_runtime`: the CPU, bf16 not asked for).
        progress : bool
            Show progress bars.
        force : bool
            Build even where ``out_dir`` holds an index or its remains (files of an index
            without a manifest, which `dfsnet index repair` may recover): the new index
            replaces it once committed. Its generations are numbered above every one found,
            so no file of the old index is ever taken for one of the new. If the build fails,
            the old files stay for `dfsnet index repair`.

        Returns
        -------
        ImageIndex
            Opened on the new index; ``last_report`` says what was indexed.

        Raises
        ------
        InputError
            ``out_dir`` holds an index or its remains (without ``force``), ``bits`` more
            than the model's feature width when fitting a selector or ITQ (or, for ITQ on the
            collection, more than its images), ``backbone`` or ``weights`` with a model, or no
            decodable image under ``images_dir``.
        """
        from dfsnet.features import resolve_device
        from dfsnet.hashing import Encoder

        started = time.perf_counter()
        if images_dir is None or out_dir is None:
            raise InputTypeError("images_dir, out_dir: both are required")
        device = resolve_device(device)
        prec = resolve_precision(precision, device)
        resolve_runtime(runtime, device_type=device.type, precision=precision, export=True)  # refused early
        if bits is not None:
            bits = check_positive_int(bits, name="bits")
        fit_sample = check_positive_int(fit_sample, name="fit_sample")
        out_dir = Path(out_dir).expanduser().resolve()
        if out_dir.exists() and not out_dir.is_dir():
            raise NotADirectoryError(f"out_dir: expected a folder, got the file {out_dir}")
        _refuse_remains(out_dir, force)
        files = scan_images(images_dir)
        if not files:
            raise InputError(f"images_dir: no image files found under {Path(images_dir).resolve()}")
        if model_path is None:
            from dfsnet.models import DEFAULT_BACKBONE
            from dfsnet.store.unsupervised import pretrained_model

            model = pretrained_model(backbone or DEFAULT_BACKBONE, weights)
            meta = model.meta
            image_size = check_positive_int(image_size or meta.input_size[-1], name="image_size")
            if fit_on is None and bits is not None and bits > min(len(files), meta.feature_dim):
                raise InputError(f"bits: ITQ fitted on the collection makes at most min(images, feature width) = "
                                 f"min({len(files)}, {meta.feature_dim}) bits, {bits} were requested")
        else:
            from dfsnet.models import read_checkpoint_meta

            if backbone is not None or weights is not None:
                raise InputError("backbone: a trained model (model_path, --model) fixes the backbone; pass "
                                 "backbone/weights (--backbone/--weights) only to index without a model")
            model = None
            model_path = Path(model_path).expanduser().resolve()
            meta, extra = read_checkpoint_meta(model_path)
            if image_size is None:
                image_size = extra.get("image_size")
            image_size = check_positive_int(image_size if image_size is not None else meta.input_size[-1],
                                            name="image_size")
        if fit_on is not None:  # the encoder settings are checked here, before minutes of extraction
            from dfsnet.train.workflow import build_encoder

            build_encoder(meta.feature_dim, selector=selector, hasher=hasher, n_bits=bits)
        encoder = None
        if fit_on is None and model_path is not None:
            saved = model_path.parent / ENCODER_FILE
            if not saved.is_file():
                raise FileNotFoundError(
                    f"fit_on: no {ENCODER_FILE} beside the checkpoint ({saved}); train with `dfsnet train`, "
                    "which saves one, pass fit_on (--fit-on) with a labelled image folder to fit one, or "
                    "index without a model (ITQ on the collection itself)")
            encoder = Encoder.load(saved)
            if bits is not None and bits != encoder.n_bits_:
                raise InputError(f"bits: the encoder saved with the checkpoint ({saved}) makes "
                                 f"{encoder.n_bits_}-bit codes, but {bits} bits were requested; omit bits "
                                 "(--bits) or fit a new encoder with fit_on (--fit-on)")
            if encoder.n_features_in_ != meta.feature_dim:
                raise InputError(f"fit_on: the encoder saved beside the checkpoint ({saved}) takes "
                                 f"{encoder.n_features_in_} features, but the checkpoint's model makes "
                                 f"{meta.feature_dim}; it belongs to another model: pass fit_on (--fit-on)")
        out_dir.mkdir(parents=True, exist_ok=True)
        with write_lock(out_dir):
            remains = _refuse_remains(out_dir, force)  # again: another process may have built here meanwhile
            base = max([g for _, g in remains], default=0)
            try:
                report = _write_first_generation(
                    model_path, model, meta, out_dir, files, encoder, bits=bits, fit_on=fit_on, selector=selector,
                    hasher=hasher, fit_sample=fit_sample, store_features=store_features, image_size=image_size,
                    batch_size=batch_size, num_workers=num_workers, device=device, precision=prec.name,
                    runtime=runtime, precision_arg=precision, progress=progress, base_generation=base)
            finally:
                if not remains and not (out_dir / MANIFEST).exists():  # failed: leave no half-built index
                    for name in (MODEL_FILE, ENCODER_FILE, ONNX_FILE):
                        (out_dir / name).unlink(missing_ok=True)
        index = cls(out_dir, device=device, precision=precision, runtime=runtime)
        index.last_report = dataclasses.replace(report, seconds=time.perf_counter() - started)
        logger.info("built %s: %d images, %d-bit codes, %d bad files skipped", out_dir, report.count,
                    index.n_bits, report.n_bad)
        return index

    # ---------------------------------------------------------------------------------------
    # properties

    @property
    def manifest(self) -> dict[str, Any]:
        return self._state.manifest

    @property
    def n_bits(self) -> int:
        return int(self._state.manifest["bits"])

    @property
    def has_features(self) -> bool:
        return self._state.manifest["files"]["features"] is not None

    def __len__(self) -> int:
        return self._state.count

    def __repr__(self) -> str:
        return f"ImageIndex({str(self.index_dir)!r}, count={len(self)}, bits={self.n_bits})"

    # ---------------------------------------------------------------------------------------
    # writing

    def add(self, images_dir, *, model=None, batch_size: int = 64, num_workers: int | None = None,
            progress: bool = False) -> AddReport:
        """Index the images under ``images_dir`` not indexed yet (by content hash).

        A file whose content is indexed under another path that is gone or changed (a moved
        file) is re-pointed to its new path and keeps its id; ``AddReport.n_moved`` counts
        those. Files with names that are not valid UTF-8, or that are no regular file, are
        skipped, logged and counted in ``n_bad``.

        Parameters
        ----------
        images_dir : path-like
            Searched recursively; the first sub-folder's name is the label, as in :meth:`build`.
        model : path-like, optional
            A checkpoint the caller means to use; refused unless it is the index's.
        batch_size, num_workers : int
        progress : bool

        Returns
        -------
        AddReport
        """
        started = time.perf_counter()
        check_compatible(self.index_dir, self.manifest, model=model)
        files = scan_images(images_dir)
        with write_lock(self.index_dir):
            self.refresh()
            collect_garbage(self.index_dir, self.manifest)
            builder = self._builder()
            recorded = frozenset(p for paths in self._state.metadata.duplicates().values() for p in paths)
            report = builder.commit(dict(self.manifest), self._state.metadata.by_hash(), files, self.encoder,
                                    batch_size=batch_size, num_workers=num_workers, progress=progress,
                                    recorded_duplicates=recorded)
            self.refresh()
        report.seconds = time.perf_counter() - started
        self.last_report = report
        logger.info("added %d images to %s (%d moved, %d duplicates, %d bad); %d in total", report.n_added,
                    self.index_dir, report.n_moved, report.n_duplicates, report.n_bad, report.count)
        return report

    def _builder(self) -> Builder:
        """The extraction and commit machinery for :meth:`add`, on this object's runtime."""
        if self.runtime == "onnx":  # the graph extracts: torch's network is not loaded
            return Builder(self.index_dir, self.manifest["onnx"]["preprocess"], self.manifest["image_size"], "cpu",
                           model_lock=self._model_lock, onnx=self._onnx[0])
        return Builder(self.index_dir, self.model, self.manifest["image_size"], self.device,
                       precision=self.precision.name, model_lock=self._model_lock)

    def remove(self, ids=(), *, paths=()) -> RemoveReport:
        """Drop images from the index by id or by path; see :func:`dfsnet.store.remove_images`.

        Ids are never renumbered: the others keep theirs, and removed ids are not given out again.
        """
        report = remove_images(self.index_dir, ids=ids, paths=paths)
        self.refresh()
        return report

    def prune(self, *, dry_run: bool = False) -> PruneReport:
        """Drop the images whose file is gone or changed; see :func:`dfsnet.store.prune_index`."""
        report = prune_index(self.index_dir, dry_run=dry_run)
        self.refresh()
        return report

    @staticmethod
    def repair(index_dir) -> RepairReport:
        """Recover the newest complete generation of ``index_dir``; see :func:`dfsnet.store.repair_index`."""
        return repair_index(index_dir)

    def refresh(self) -> bool:
        """Follow a newer committed generation (written by another process). Returns True if it changed.

        Raises
        ------
        InputError
            The new generation was made with another model, encoder, code width, feature width
            or image size than the loaded one (:class:`IndexDamagedError` when one of its files
            is damaged); this object keeps serving the generation it has.
        """
        manifest = read_manifest(self.index_dir)
        if manifest["generation"] == self._state.generation:
            return False
        check_same_index(self.index_dir, self._state.manifest, manifest)
        state = _Generation.load(self.index_dir)
        check_same_index(self.index_dir, self._state.manifest, state.manifest)
        self._state = state
        return True

    # ---------------------------------------------------------------------------------------
    # searching

    def embed(self, images) -> np.ndarray:
        """Deep features of query images.

        Parameters
        ----------
        images : list of (path, bytes or PIL.Image.Image)
            Paths and bytes are decoded with :func:`dfsnet.images.open_image`.

        Returns
        -------
        ndarray of float32, shape (n, D)
        """
        if not len(images):
            raise InputError("images: expected at least one image, got none")
        if self.runtime == "onnx":
            runner, preprocess = self._onnx
            batch = np.stack([preprocess(open_image(im)) for im in images])
            with self._model_lock:
                return runner(batch)
        import torch

        tensors = [self.transform(open_image(im)) for im in images]
        batch = self.precision.prepare_input(torch.stack(tensors).to(self.device))
        with self._model_lock, torch.inference_mode(), self.precision.autocast():
            out = self.model.features(batch)
        return np.ascontiguousarray(out.float().cpu().numpy())

    def search(self, image, k: int = 10, *, rerank: bool = False, rerank_factor: int = 10) -> list[SearchHit]:
        """The ``k`` indexed images nearest to ``image``.

        Parameters
        ----------
        image : str, os.PathLike, bytes or PIL.Image.Image
            The query; paths and bytes are decoded with :func:`dfsnet.images.open_image`.
        k : int
            Number of results (fewer when the index is smaller).
        rerank : bool
            Take a Hamming shortlist of ``k * rerank_factor`` and order it by the Euclidean
            distance between float features (needs an index built with ``store_features``).
        rerank_factor : int

        Returns
        -------
        list of SearchHit
            Ordered by Hamming distance (ties: ascending id), or by Euclidean distance when
            re-ranked.
        """
        self._check_search_args(k, rerank, rerank_factor)
        return self.search_features(self.embed([image])[0], k, rerank=rerank, rerank_factor=rerank_factor)

    def search_features(self, features, k: int = 10, *, rerank: bool = False,
                        rerank_factor: int = 10) -> list[SearchHit]:
        """Like :meth:`search`, for a query given as its deep features.

        Parameters
        ----------
        features : array-like of float, shape (D,)
            E.g. a row of :meth:`embed`'s output.
        k, rerank, rerank_factor
            As in :meth:`search`.

        Returns
        -------
        list of SearchHit
        """
        from dfsnet._validation import check_array

        self._check_search_args(k, rerank, rerank_factor)
        query = check_array(np.asarray(features).reshape(1, -1), name="features")
        return _search_codes(self._state, self._codes.transform(query), query if rerank else None, k,
                             rerank_factor)

    def search_id(self, image_id: int, k: int = 10, *, rerank: bool = False,
                  rerank_factor: int = 10) -> list[SearchHit]:
        """Like :meth:`search`, for a query that is an indexed image ("more like this"), by id.

        The query is the image's stored code (and, to re-rank, its stored features): its file
        is not read and the network does not run.

        Raises
        ------
        NotFoundError
            No image with that id.
        """
        self._check_search_args(k, rerank, rerank_factor)
        record = self.record(image_id)  # NotFoundError for an unknown id
        state = self._state
        if not isinstance(state, _Generation):  # another backend: embed the indexed file instead
            return self.search(record.path, k, rerank=rerank, rerank_factor=rerank_factor)
        ids = np.array([int(image_id)], dtype=np.int64)
        query = state.features_of(ids) if rerank else None
        return _search_codes(state, state.codes_of(ids), query, k, rerank_factor)

    def _check_search_args(self, k, rerank, rerank_factor) -> None:
        check_positive_int(k, name="k")
        check_positive_int(rerank_factor, name="rerank_factor")
        if rerank and not self.has_features:
            raise InputError(f"rerank: the index {self.index_dir} stores no float features; rebuild it with "
                             "store_features=True (--store-features) to re-rank")

    def records(self, *, offset: int = 0, limit: int = 50) -> list[ImageRecord]:
        """A page of the indexed images, by ascending id (for browsing the collection)."""
        if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)) or offset < 0:
            raise InputError(f"offset: expected an integer >= 0, got {offset!r}")
        return self._state.metadata.page(int(offset), check_positive_int(limit, name="limit"))

    def record(self, image_id: int) -> ImageRecord:
        """Metadata of the indexed image ``image_id`` (NotFoundError, a KeyError, if there is none)."""
        if isinstance(image_id, bool) or not isinstance(image_id, (int, np.integer)):
            raise InputTypeError(f"image_id: expected an int, got {type(image_id).__name__}")
        if not INT64_MIN <= int(image_id) <= INT64_MAX:
            raise NotFoundError(f"image_id: no image with id {image_id} in the index (ids are 64-bit integers)")
        found = self._state.metadata.records([image_id])
        if int(image_id) not in found:
            raise NotFoundError(f"image_id: no image with id {image_id} in the index")
        return found[int(image_id)]

    # ---------------------------------------------------------------------------------------
    # inspection

    def info(self) -> dict[str, Any]:
        """A JSON-ready summary: counts, code width, model (a trained DFSNet, or a pretrained backbone for an
        index built without labels), encoder, labels, files and sizes."""
        state = self._state
        m = state.manifest
        names = [MANIFEST, *referenced_files(m)]
        size = sum((self.index_dir / f).stat().st_size for f in names if (self.index_dir / f).exists())
        return {
            "index_dir": str(self.index_dir),
            "generation": state.generation,
            "count": state.count,
            "bits": m["bits"],
            "image_size": m["image_size"],
            "precision": {"built": m.get("precision", "fp32"),
                          "loaded": "fp32" if self.runtime == "onnx" else self.precision.name},
            "runtime": {"built": m.get("runtime", "torch"), "loaded": self.runtime,
                        "onnx_graph": bool(m.get("onnx"))},
            "backbone": m["model"]["backbone"],
            # "dfsnet": a trained DFSNet checkpoint; "backbone": a pretrained backbone, no training
            "model_kind": m["model"].get("kind", "dfsnet"),
            "supervised": bool(m.get("supervised", True)),
            "weights": m["model"].get("weights"),
            "num_classes": m["model"]["num_classes"],
            "feature_dim": m["model"]["feature_dim"],
            "checkpoint": m["checkpoint"],
            "encoder": {k: m["encoder"].get(k) for k in ("source", "fit_on", "fit_images", "params", "selection")},
            "has_features": m["files"]["features"] is not None,
            "labels": state.metadata.label_counts(),
            "stats": m["stats"],
            "created": m["created"],
            "updated": m["updated"],
            "bytes_on_disk": size,
        }

    def verify(self, *, model=None, files: str = "sample", sample_size: int = 200, seed: int = 0) -> VerifyReport:
        """Check the committed index on disk for consistency; see :func:`dfsnet.store.verify_index`."""
        return verify_index(self.index_dir, model=model, files=files, sample_size=sample_size, seed=seed)


def _search_codes(state: _Generation, codes: np.ndarray, query: np.ndarray | None, k: int,
                  rerank_factor: int) -> list[SearchHit]:
    """Hits of one query's ``codes`` uint8 (1, B); re-ranked by its float features ``query``
    float32 (1, D) when given."""
    rerank = query is not None
    shortlist = min(k * rerank_factor if rerank else k, state.count)
    if not shortlist:  # every image removed
        return []
    distances, ids = state.index.search(codes, shortlist)
    keep = ids[0] >= 0
    distances, ids = distances[0][keep].astype(np.int64), ids[0][keep]
    scores = None
    if rerank and ids.size:
        scores = np.linalg.norm(state.features_of(ids) - query, axis=1)
        order = np.lexsort((ids, distances, scores))[:k]
        distances, ids, scores = distances[order], ids[order], scores[order]
    records = state.metadata.records(ids)
    return [SearchHit(rank=r + 1, id=int(i), distance=int(d), path=records[int(i)].path,
                      label=records[int(i)].label, score=None if scores is None else float(scores[r]))
            for r, (i, d) in enumerate(zip(ids, distances))]


def _write_first_generation(model_path: Path | None, model, meta, out_dir: Path, files, encoder, *, bits, fit_on,
                            selector, hasher, fit_sample, store_features, image_size, batch_size, num_workers,
                            device, precision, runtime, precision_arg, progress,
                            base_generation: int = 0) -> AddReport:
    """Copy the model (or save the pretrained backbone), fit or copy the encoder and write the first
    generation of a new index (``base_generation + 1``: above every generation of an index it replaces)."""
    from dfsnet.models import checkpoint_hash

    if model_path is None:
        from dfsnet.store.unsupervised import save_backbone

        save_backbone(model, out_dir / MODEL_FILE)
        builder = Builder(out_dir, model, image_size, device, precision=precision)
        source = f"pretrained:{meta.weights}"
    else:
        # The copy makes the index self-contained; its hash is checked on every load.
        with atomic_write(out_dir / MODEL_FILE) as fh, open(model_path, "rb") as src:
            shutil.copyfileobj(src, fh, 1 << 20)
        if checkpoint_hash(out_dir / MODEL_FILE) != checkpoint_hash(model_path):
            raise RuntimeError(f"model_path: {model_path} changed while it was being copied")
        builder = Builder.from_checkpoint(out_dir, image_size, device, precision=precision)
        source = str(model_path)
    onnx_entry, builder.onnx = export_onnx_graph(builder.model, out_dir, image_size, runtime=runtime,
                                                 device_type=device.type, precision=precision_arg)
    if builder.onnx is not None:
        precision = "fp32"
    if encoder is None and fit_on is not None:
        encoder = builder.fit_encoder(fit_on, bits=bits, selector=selector, hasher=hasher, batch_size=batch_size,
                                      num_workers=num_workers, progress=progress)
    plan = builder.plan({}, files, progress=progress)
    features = builder.extract_plan(plan, batch_size=batch_size, num_workers=num_workers, progress=progress)
    if features is None or not len(features):
        raise InputError(f"images_dir: none of the {len(files)} image files could be decoded; "
                         "no index was written")
    if encoder is None:  # no model, no labels: ITQ on the collection's own features
        from dfsnet.store.unsupervised import DEFAULT_UNSUPERVISED_BITS, fit_unsupervised_encoder

        if bits is None:
            bits = min(DEFAULT_UNSUPERVISED_BITS, meta.feature_dim, len(features))
            if bits < DEFAULT_UNSUPERVISED_BITS:
                logger.warning("bits: %d-bit codes, because ITQ makes at most one bit per image and the "
                               "collection has %d readable images", bits, len(features))
        encoder = fit_unsupervised_encoder(features, n_bits=bits, sample=fit_sample)
        encoder_source = "collection"
    else:
        encoder_source = "fit_on" if fit_on is not None else str(model_path.parent / ENCODER_FILE)
    encoder.save(out_dir / ENCODER_FILE)
    kind = "backbone" if model_path is None else "dfsnet"
    model_entry = {"kind": kind, "backbone": meta.name, "timm_name": meta.timm_name,
                   "num_classes": getattr(meta, "num_classes", None),
                   "class_names": list(meta.class_names) if getattr(meta, "class_names", None) else None,
                   "feature_dim": meta.feature_dim, "dfs": bool(getattr(meta, "dfs", False))}
    if kind == "backbone":
        model_entry |= {"weights": meta.weights, "features": "pooled, L2-normalised"}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dfsnet_version": __version__,
        "generation": base_generation,
        "created": now(),
        "updated": now(),
        "count": 0,
        "next_id": 0,
        "bits": int(encoder.n_bits_),
        "image_size": image_size,
        "precision": precision,
        "runtime": "torch" if builder.onnx is None else "onnx",
        "onnx": onnx_entry,
        "supervised": kind == "dfsnet" or fit_on is not None,
        "checkpoint": {"hash": checkpoint_hash(out_dir / MODEL_FILE), "file": MODEL_FILE, "source": source},
        "model": model_entry,
        "encoder": {"file": ENCODER_FILE, "sha256": sha256_file(out_dir / ENCODER_FILE),
                    "source": encoder_source,
                    "fit_on": str(Path(fit_on).resolve()) if fit_on is not None else None,
                    "fit_images": min(len(features), fit_sample) if encoder_source == "collection" else None,
                    "params": encoder_params(encoder),
                    "selection": _training_selection(model_path) if fit_on is None else None},
        "store_features": bool(store_features),
        "files": {"codes": None, "metadata": None, "features": [] if store_features else None},
        "stats": {"n_bad": 0, "n_duplicates": 0},
        "checksums": {},
    }
    # keep_previous=False: the files of an index this one replaces (build --force) go.
    return builder.finish(manifest, plan, features, encoder, keep_previous=False)


def _query_runtime(runtime: str, manifest: dict, device, precision: str) -> str:
    """The runtime an index's queries use: "onnx" (its graph in ONNX Runtime) or "torch"."""
    runtime = effective_runtime(runtime)
    if runtime == "torch":
        return "torch"
    device_type = "cpu" if device is None or str(device) == "auto" else str(device).partition(":")[0]
    if not manifest.get("onnx"):
        if runtime == "onnx":
            raise InputError("runtime: the index has no ONNX graph (it was built with runtime torch, without "
                             "onnxscript installed, or by an older dfsnet); add one with `dfsnet index export-onnx`, "
                             "or use runtime torch (--runtime torch)")
        return "torch"
    return resolve_runtime(runtime, device_type=device_type, precision=precision)


def _load_onnx(index_dir: Path, manifest: dict) -> tuple:
    """``(OnnxFeatures, EvalPreprocess)`` of an index's graph, its checksum and shapes checked."""
    from dfsnet.preprocess import eval_preprocess
    from dfsnet.runtime import OnnxFeatures

    entry = manifest["onnx"]
    path = index_dir / ONNX_FILE
    if not path.is_file():
        raise IndexDamagedError(f"index_dir: {ONNX_FILE}, named by the manifest, is missing; search with "
                                "runtime torch (--runtime torch), or rebuild the index to restore it")
    if sha256_file(path) != entry["sha256"]:
        raise IndexDamagedError(f"index_dir: {ONNX_FILE} does not match the sha256 recorded in the manifest; "
                                "the file was replaced or damaged (`dfsnet index verify`); search with runtime "
                                "torch (--runtime torch) meanwhile")
    runner = OnnxFeatures(path)
    if list(runner.input_shape) != entry["input_shape"] or runner.output_shape != (manifest["model"]["feature_dim"],):
        raise IndexDamagedError(f"index_dir: {ONNX_FILE} maps {runner.input_shape} images to {runner.output_shape} "
                                f"outputs, but the manifest says {tuple(entry['input_shape'])} and "
                                f"{manifest['model']['feature_dim']}")
    return runner, eval_preprocess(entry["preprocess"], image_size=manifest["image_size"])


def _training_selection(model_path: Path | None) -> dict | None:
    """How `dfsnet train` chose the encoder saved beside ``model_path`` (its ``train_summary.json``
    record: the choice and each candidate's validation figures), for ``index info``."""
    if model_path is None:
        return None
    try:
        summary = json.loads((model_path.parent / "train_summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    record = summary.get("encoder") if isinstance(summary, dict) else None
    return record if isinstance(record, dict) else None


def _refuse_remains(out_dir: Path, force: bool) -> list[tuple[str, int]]:
    """The index files in ``out_dir`` as ``(name, generation)``; refused unless ``force``."""
    remains = find_remains(out_dir)
    if remains and not force:
        names = sorted(n for n, _ in remains)
        if (out_dir / MANIFEST).exists():
            raise InputError(f"out_dir: {out_dir} already holds an index; add images with `dfsnet index add` "
                             "(ImageIndex.add), choose a new folder, or pass force (--force) to replace it")
        raise InputError(f"out_dir: {out_dir} holds the remains of an index ({', '.join(names[:4])}"
                         f"{' ...' if len(names) > 4 else ''}) but no {MANIFEST}; recover it with "
                         "`dfsnet index repair` (ImageIndex.repair), or pass force (--force) to replace it")
    return remains
