"""A persistent, searchable image index: model + encoder + Hamming index + metadata in one folder.

>>> from dfsnet.pipeline import Pipeline
>>> pipe = Pipeline.build("runs/cifar/best.safetensors", "photos/", "photos.index")
>>> pipe.add("more_photos/")
>>> [(h.rank, h.distance, h.path) for h in Pipeline.load("photos.index").search("query.jpg", k=5)]

Index folder layout (format version 1)::

    manifest.json               the commit point: readers follow only what it names
    model.safetensors           copy of the checkpoint (the index is self-contained)
    encoder.npz                 the fitted selector + hasher (dfsnet.hashing.Encoder)
    codes.<gen>.hidx            HammingIndex of generation <gen>, ids 0..count-1
    metadata.<gen>.sqlite       one row per indexed image: id, path, sha256, size, mtime, label
    features.<gen>.npy          float32 features of the images added in generation <gen>
                                (only with store_features; chunks accumulate across generations)

Crash safety. Every write produces a new generation: the new codes, metadata and feature chunk
are written under new names and fsynced, then ``manifest.json`` is replaced atomically
(``dfsnet._io.atomic_write``: temp file, fsync, rename, directory fsync). A process killed at any
point leaves either the old manifest, whose files are untouched, or the new one, whose files are
complete. Files no manifest names (an interrupted write's, or a superseded generation's) are
removed under the write lock. Writers of one folder are serialised with ``fcntl.flock`` on
``.lock`` (POSIX).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import re
import shutil
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from dfsnet import __version__
from dfsnet._io import _fsync_dir, atomic_write, atomic_write_text, sha256_file
from dfsnet._validation import check_choice, check_positive_int
from dfsnet.images import ImageTooLargeError, InvalidImageError, open_image

__all__ = [
    "Pipeline",
    "SearchHit",
    "AddReport",
    "VerifyReport",
    "ImageRecord",
    "InvalidImageError",
    "ImageTooLargeError",
    "open_image",
    "read_manifest",
    "verify_index",
    "FORMAT_VERSION",
]

logger = logging.getLogger(__name__)

FORMAT = "dfsnet.index"
FORMAT_VERSION = 1
DEFAULT_BITS = 128
MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
ENCODER_FILE = "encoder.npz"
LOCK_FILE = ".lock"
# Files this module creates and may delete when no manifest names them.
_OWNED = re.compile(r"^(codes\.\d+\.hidx|metadata\.\d+\.sqlite(-journal|-wal|-shm)?|features\.\d+\.npy"
                    r"|\..+\.tmp(-journal)?)$")

_SCHEMA = """
CREATE TABLE images (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    mtime REAL NOT NULL,
    label TEXT
);
CREATE TABLE info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


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


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """Metadata of one indexed image (a row of ``metadata.<gen>.sqlite``)."""

    id: int
    path: str
    sha256: str
    size: int
    mtime: float
    label: str | None


@dataclasses.dataclass
class AddReport:
    """What one :meth:`Pipeline.add` (or build) did.

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


@dataclasses.dataclass
class VerifyReport:
    """Result of :meth:`Pipeline.verify`: ``ok`` when ``errors`` is empty."""

    errors: list[str]
    n_files_checked: int
    count: int
    generation: int

    @property
    def ok(self) -> bool:
        return not self.errors


# --------------------------------------------------------------------------------------------
# On-disk state


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _gen_name(kind: str, generation: int) -> str:
    ext = {"codes": "hidx", "metadata": "sqlite", "features": "npy"}[kind]
    return f"{kind}.{generation:06d}.{ext}"


def read_manifest(index_dir) -> dict[str, Any]:
    """The manifest of the index at ``index_dir`` (FileNotFoundError / ValueError if there is none)."""
    index_dir = Path(index_dir).expanduser()
    path = index_dir / MANIFEST
    if not index_dir.is_dir():
        raise FileNotFoundError(f"index_dir: no such folder: {index_dir}")
    if not path.is_file():
        raise FileNotFoundError(
            f"index_dir: {index_dir} is not a dfsnet index (no {MANIFEST}); create one with "
            "`dfsnet index build` or Pipeline.build()")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"index_dir: {path} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"index_dir: {path} is not a dfsnet index manifest (format "
                         f"{manifest.get('format') if isinstance(manifest, dict) else None!r}, expected {FORMAT!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"index_dir: {index_dir} has index format version {version!r}; this dfsnet "
                         f"({__version__}) reads version {FORMAT_VERSION}")
    return manifest


def _sqlite_uri(path: Path, *, read_only: bool) -> str:
    # immutable=1: generations are never modified after their commit, so SQLite needs no locks.
    return path.resolve().as_uri() + ("?mode=ro&immutable=1" if read_only else "")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_metadata(src: Path | None, dst: Path, rows: list[tuple], generation: int) -> None:
    """Write ``dst`` as a copy of ``src`` (or a new database) plus ``rows``, crash-safely."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    for leftover in (tmp, tmp.with_name(tmp.name + "-journal")):
        leftover.unlink(missing_ok=True)
    conn = sqlite3.connect(tmp)
    try:
        if src is None:
            conn.executescript(_SCHEMA)
        else:
            with contextlib.closing(sqlite3.connect(_sqlite_uri(src, read_only=True), uri=True)) as source:
                source.backup(conn)
        with conn:
            conn.executemany("INSERT INTO images (id, path, sha256, size, mtime, label) VALUES (?, ?, ?, ?, ?, ?)",
                             rows)
            conn.execute("INSERT OR REPLACE INTO info (key, value) VALUES ('generation', ?)", (str(generation),))
    finally:
        conn.close()
    _fsync_file(tmp)
    os.replace(tmp, dst)
    _fsync_dir(dst.parent)


@contextlib.contextmanager
def _write_lock(index_dir: Path) -> Iterator[None]:
    import fcntl

    with open(index_dir / LOCK_FILE, "a+b") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process writing %s", index_dir)
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _collect_garbage(index_dir: Path, manifest: dict | None) -> None:
    """Delete files of this module's naming scheme that ``manifest`` does not name. Call under the lock."""
    keep = set()
    if manifest is not None:
        files = manifest["files"]
        keep = {files["codes"], files["metadata"], *(c["file"] for c in files["features"] or [])}
    for entry in os.scandir(index_dir):
        if entry.is_file() and _OWNED.match(entry.name) and entry.name not in keep:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
            logger.debug("removed unreferenced %s", entry.path)


def _scan_images(images_dir) -> list[tuple[str, str | None]]:
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


class _State:
    """One committed generation, loaded: immutable, so searches may hold it while a write swaps it."""

    def __init__(self, index_dir: Path, manifest: dict):
        from dfsnet.index import HammingIndex

        files = manifest["files"]
        self.manifest = manifest
        self.generation = int(manifest["generation"])
        self.count = int(manifest["count"])
        self.index = HammingIndex.load(index_dir / files["codes"])
        if len(self.index) != self.count:
            raise ValueError(f"index_dir: {files['codes']} holds {len(self.index)} codes but the manifest "
                             f"counts {self.count}; run `dfsnet index verify`")
        self.db = sqlite3.connect(_sqlite_uri(index_dir / files["metadata"], read_only=True), uri=True,
                                  check_same_thread=False)
        self.db_lock = threading.Lock()
        self.chunks: list[np.ndarray] = []
        self.offsets = np.zeros(1, dtype=np.int64)
        if files["features"]:
            self.chunks = [np.load(index_dir / c["file"], mmap_mode="r", allow_pickle=False)
                           for c in files["features"]]
            self.offsets = np.cumsum([0] + [c.shape[0] for c in self.chunks])

    def records(self, ids) -> dict[int, ImageRecord]:
        ids = [int(i) for i in ids]
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        with self.db_lock:
            rows = self.db.execute(
                f"SELECT id, path, sha256, size, mtime, label FROM images WHERE id IN ({marks})", ids).fetchall()
        return {row[0]: ImageRecord(*row) for row in rows}

    def features_of(self, ids: np.ndarray) -> np.ndarray:
        """float32 (len(ids), D): stored features of ``ids``."""
        chunk = np.searchsorted(self.offsets, ids, side="right") - 1
        return np.stack([self.chunks[c][i - self.offsets[c]] for c, i in zip(chunk, ids)]).astype(np.float32)

    def hashes(self) -> set[str]:
        with self.db_lock:
            return {row[0] for row in self.db.execute("SELECT sha256 FROM images")}


def _load_state(index_dir: Path) -> _State:
    # A writer may commit and delete the generation whose manifest we just read; then re-read.
    retries = 4
    while True:
        manifest = read_manifest(index_dir)
        try:
            return _State(index_dir, manifest)
        except FileNotFoundError:
            retries -= 1
            if retries < 0 or read_manifest(index_dir)["generation"] == manifest["generation"]:
                raise


class Pipeline:
    """Model, encoder, Hamming index and image metadata of one index folder.

    Create with :meth:`build` or :meth:`load`, not directly. Searching is thread-safe; model
    inference is serialised by a lock (it uses every core by itself).

    Attributes
    ----------
    index_dir : pathlib.Path
    model : dfsnet.models.DFSNet
    encoder : dfsnet.hashing.Encoder
    manifest : dict
        The committed manifest this object currently serves.
    """

    def __init__(self, index_dir, *, device=None, _model=None):
        import torch

        from dfsnet.data import build_transforms
        from dfsnet.hashing import Encoder
        from dfsnet.models import checkpoint_hash, load_checkpoint

        self.index_dir = Path(index_dir).expanduser().resolve()
        self._state = _load_state(self.index_dir)
        manifest = self._state.manifest
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        found = checkpoint_hash(self.index_dir / MODEL_FILE)
        if found != manifest["checkpoint"]["hash"]:
            raise ValueError(f"index_dir: {MODEL_FILE} has hash {found}, but the index was built with checkpoint "
                             f"hash {manifest['checkpoint']['hash']}; the file was replaced or damaged")
        # _model: build() hands over the network it just loaded from the same (hash-checked) file.
        self.model = _model if _model is not None else load_checkpoint(self.index_dir / MODEL_FILE,
                                                                       map_location=self.device)[0]
        if sha256_file(self.index_dir / ENCODER_FILE) != manifest["encoder"]["sha256"]:
            raise ValueError(f"index_dir: {ENCODER_FILE} does not match the sha256 recorded in the manifest; "
                             "the file was replaced or damaged")
        self.encoder = Encoder.load(self.index_dir / ENCODER_FILE)
        if self.encoder.n_bits_ != manifest["bits"]:
            raise ValueError(f"index_dir: {ENCODER_FILE} makes {self.encoder.n_bits_}-bit codes but the "
                             f"manifest says {manifest['bits']}; run `dfsnet index verify`")
        self.transform = build_transforms(self.model.meta, train=False, image_size=manifest["image_size"])
        self._model_lock = threading.Lock()
        self.last_report: AddReport | None = None

    # ---------------------------------------------------------------------------------------
    # construction

    @classmethod
    def build(cls, model_path, images_dir, out_dir, *, bits: int | None = None, fit_on=None,
              selector: str | None = "gain_ratio", hasher: str = "sample_mean",
              store_features: bool = False, image_size: int | None = None, batch_size: int = 64,
              num_workers: int = 0, device=None, progress: bool = False) -> "Pipeline":
        """Index the images under ``images_dir`` into a new index folder ``out_dir``.

        Parameters
        ----------
        model_path : path-like
            A checkpoint from :func:`dfsnet.models.save_checkpoint` (e.g. ``dfsnet train``'s).
        images_dir : path-like
            Folder searched recursively for images. When images sit in sub-folders, the first
            sub-folder's name is recorded as the label.
        out_dir : path-like
            The index folder; must not hold an index already.
        bits : int, optional
            Code length. Default: the saved encoder's, or 128 when fitting one. Must agree with
            the saved encoder when one is used.
        fit_on : path-like, optional
            A labelled image folder (``ROOT/<class>/<image>``) to fit the selector and hasher on,
            instead of the ``encoder.npz`` saved beside the checkpoint by ``dfsnet train``.
        selector, hasher : str
            Encoder components when fitting (see :func:`dfsnet.hashing.make_encoder`).
        store_features : bool
            Keep the float features (``4 * D`` bytes per image) for ``search(rerank=True)``.
        image_size : int, optional
            Network input size; default: the checkpoint's ``extra["image_size"]`` if it
            records one, else the backbone's native input size.
        batch_size, num_workers : int
            Feature-extraction DataLoader settings.
        device : str or torch.device, optional
            Default: the CPU.
        progress : bool
            Show progress bars.

        Returns
        -------
        Pipeline
            Loaded on the new index.
        """
        from dfsnet.hashing import Encoder
        from dfsnet.models import read_checkpoint_meta

        started = time.perf_counter()
        model_path = Path(model_path).expanduser().resolve()
        meta, extra = read_checkpoint_meta(model_path)
        if bits is not None:
            bits = check_positive_int(bits, name="bits")
        if image_size is None:
            image_size = extra.get("image_size")
        image_size = check_positive_int(image_size if image_size is not None else meta.input_size[-1],
                                        name="image_size")
        out_dir = Path(out_dir).expanduser().resolve()
        if (out_dir / MANIFEST).exists():
            raise ValueError(f"out_dir: {out_dir} already holds an index; add images with `dfsnet index add` "
                             "(Pipeline.add) or choose a new folder")
        if out_dir.exists() and not out_dir.is_dir():
            raise NotADirectoryError(f"out_dir: expected a folder, got the file {out_dir}")
        files = _scan_images(images_dir)
        if not files:
            raise ValueError(f"images_dir: no image files found under {Path(images_dir).resolve()}")
        encoder = None
        if fit_on is None:
            saved = model_path.parent / ENCODER_FILE
            if not saved.is_file():
                raise FileNotFoundError(
                    f"fit_on: no {ENCODER_FILE} beside the checkpoint ({saved}); train with `dfsnet train`, "
                    "which saves one, or pass fit_on (--fit-on) with a labelled image folder to fit one")
            encoder = Encoder.load(saved)
            if bits is not None and bits != encoder.n_bits_:
                raise ValueError(f"bits: the encoder saved with the checkpoint ({saved}) makes "
                                 f"{encoder.n_bits_}-bit codes, but {bits} bits were requested; omit bits "
                                 "(--bits) or fit a new encoder with fit_on (--fit-on)")
            if encoder.n_features_in_ != meta.feature_dim:
                raise ValueError(f"fit_on: the encoder saved beside the checkpoint ({saved}) takes "
                                 f"{encoder.n_features_in_} features, but the checkpoint's model makes "
                                 f"{meta.feature_dim}; it belongs to another model: pass fit_on (--fit-on)")
        out_dir.mkdir(parents=True, exist_ok=True)
        with _write_lock(out_dir):
            if (out_dir / MANIFEST).exists():  # another process built here meanwhile
                raise ValueError(f"out_dir: {out_dir} already holds an index; choose a new folder")
            _collect_garbage(out_dir, None)
            try:
                report, net = cls._build_locked(model_path, meta, out_dir, files, encoder, bits=bits, fit_on=fit_on,
                                           selector=selector, hasher=hasher, store_features=store_features,
                                           image_size=image_size, batch_size=batch_size,
                                           num_workers=num_workers, device=device, progress=progress)
            finally:
                if not (out_dir / MANIFEST).exists():  # failed: leave no half-built index behind
                    for name in (MODEL_FILE, ENCODER_FILE):
                        (out_dir / name).unlink(missing_ok=True)
        pipe = cls(out_dir, device=device, _model=net)
        pipe.last_report = dataclasses.replace(report, seconds=time.perf_counter() - started)
        logger.info("built %s: %d images, %d-bit codes, %d bad files skipped", out_dir, report.count,
                    pipe.n_bits, report.n_bad)
        return pipe

    @staticmethod
    def _build_locked(model_path, meta, out_dir, files, encoder, *, bits, fit_on, selector, hasher,
                      store_features, image_size, batch_size, num_workers, device, progress):
        """Write generation 1 of a new index; returns its AddReport and the loaded network."""
        from dfsnet.models import checkpoint_hash

        # The copy makes the index self-contained; its hash is checked on every load.
        with atomic_write(out_dir / MODEL_FILE) as fh, open(model_path, "rb") as src:
            shutil.copyfileobj(src, fh, 1 << 20)
        ckpt = checkpoint_hash(out_dir / MODEL_FILE)
        if ckpt != checkpoint_hash(model_path):
            raise RuntimeError(f"model_path: {model_path} changed while it was being copied")
        builder = _Builder(out_dir, out_dir / MODEL_FILE, meta, image_size, device)
        if encoder is None:
            encoder = builder.fit_encoder(fit_on, bits=bits, selector=selector,
                                          hasher=hasher, batch_size=batch_size, num_workers=num_workers,
                                          progress=progress)
        encoder.save(out_dir / ENCODER_FILE)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dfsnet_version": __version__,
            "generation": 0,
            "created": _now(),
            "updated": _now(),
            "count": 0,
            "bits": int(encoder.n_bits_),
            "image_size": image_size,
            "checkpoint": {"hash": ckpt, "file": MODEL_FILE, "source": str(model_path)},
            "model": {"backbone": meta.name, "timm_name": meta.timm_name, "num_classes": meta.num_classes,
                      "class_names": list(meta.class_names) if meta.class_names else None,
                      "feature_dim": meta.feature_dim, "dfs": meta.dfs},
            "encoder": {"file": ENCODER_FILE, "sha256": sha256_file(out_dir / ENCODER_FILE),
                        "source": "fit_on" if fit_on is not None else str(model_path.parent / ENCODER_FILE),
                        "fit_on": str(Path(fit_on).resolve()) if fit_on is not None else None,
                        "params": _encoder_params(encoder)},
            "store_features": bool(store_features),
            "files": {"codes": None, "metadata": None, "features": [] if store_features else None},
            "stats": {"n_bad": 0, "n_duplicates": 0},
        }
        report = builder.commit(manifest, None, files, encoder, batch_size=batch_size,
                                num_workers=num_workers, progress=progress)
        if report.n_added == 0:
            raise ValueError(f"images_dir: none of the {len(files)} image files could be decoded; "
                             "no index was written")
        return report, builder.model

    @classmethod
    def load(cls, index_dir, *, model=None, bits: int | None = None, device=None) -> "Pipeline":
        """Open an index folder.

        Parameters
        ----------
        index_dir : path-like
        model : path-like, optional
            A checkpoint the index must have been built with; another one is refused.
        bits : int, optional
            The code length the caller expects; another one is refused.
        device : str or torch.device, optional

        Raises
        ------
        FileNotFoundError
            No index at ``index_dir``.
        ValueError
            Built with another checkpoint or bit width, or inconsistent files.
        """
        index_dir = Path(index_dir).expanduser().resolve()
        manifest = read_manifest(index_dir)
        _check_compatible(index_dir, manifest, model=model, bits=bits)
        return cls(index_dir, device=device)

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
        return f"Pipeline({str(self.index_dir)!r}, count={len(self)}, bits={self.n_bits})"

    # ---------------------------------------------------------------------------------------
    # writing

    def add(self, images_dir, *, model=None, batch_size: int = 64, num_workers: int = 0,
            progress: bool = False) -> AddReport:
        """Index the images under ``images_dir`` not indexed yet (by content hash).

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
        _check_compatible(self.index_dir, self.manifest, model=model, bits=None)
        files = _scan_images(images_dir)
        with _write_lock(self.index_dir):
            self.refresh()
            _collect_garbage(self.index_dir, self.manifest)
            builder = _Builder(self.index_dir, None, self.model.meta, self.manifest["image_size"], self.device,
                               model=self.model, model_lock=self._model_lock)
            report = builder.commit(dict(self.manifest), self._state, files, self.encoder,
                                    batch_size=batch_size, num_workers=num_workers, progress=progress)
            self.refresh()
        report.seconds = time.perf_counter() - started
        self.last_report = report
        logger.info("added %d images to %s (%d duplicates, %d bad); %d in total", report.n_added,
                    self.index_dir, report.n_duplicates, report.n_bad, report.count)
        return report

    def refresh(self) -> bool:
        """Follow a newer committed generation (written by another process). Returns True if it changed."""
        manifest = read_manifest(self.index_dir)
        if manifest["generation"] == self._state.generation:
            return False
        _check_compatible(self.index_dir, manifest, model=None, bits=None,
                          expect_hash=self._state.manifest["checkpoint"]["hash"])
        self._state = _load_state(self.index_dir)
        return True

    # ---------------------------------------------------------------------------------------
    # searching

    def embed(self, images) -> np.ndarray:
        """Deep features of query images.

        Parameters
        ----------
        images : list of (path, bytes or PIL.Image.Image)

        Returns
        -------
        ndarray of float32, shape (n, D)
        """
        import torch

        tensors = [self.transform(open_image(im)) for im in images]
        if not tensors:
            raise ValueError("images: expected at least one image, got none")
        batch = torch.stack(tensors).to(self.device)
        with self._model_lock, torch.inference_mode():
            out = self.model.features(batch)
        return np.ascontiguousarray(out.float().cpu().numpy())

    def search(self, image, k: int = 10, *, rerank: bool = False, rerank_factor: int = 10) -> list[SearchHit]:
        """The ``k`` indexed images nearest to ``image``.

        Parameters
        ----------
        image : str, os.PathLike, bytes or PIL.Image.Image
            The query; paths and bytes are decoded with :func:`open_image`.
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
        state = self._state
        query = check_array(np.asarray(features).reshape(1, -1), name="features")
        codes = self.encoder.transform(query)
        shortlist = min(k * rerank_factor if rerank else k, state.count)
        distances, ids = state.index.search(codes, shortlist)
        keep = ids[0] >= 0
        distances, ids = distances[0][keep].astype(np.int64), ids[0][keep]
        scores = None
        if rerank and ids.size:
            scores = np.linalg.norm(state.features_of(ids) - query, axis=1)
            order = np.lexsort((ids, distances, scores))[:k]
            distances, ids, scores = distances[order], ids[order], scores[order]
        records = state.records(ids)
        return [SearchHit(rank=r + 1, id=int(i), distance=int(d), path=records[int(i)].path,
                          label=records[int(i)].label, score=None if scores is None else float(scores[r]))
                for r, (i, d) in enumerate(zip(ids, distances))]

    def _check_search_args(self, k, rerank, rerank_factor) -> None:
        check_positive_int(k, name="k")
        check_positive_int(rerank_factor, name="rerank_factor")
        if rerank and not self.has_features:
            raise ValueError(f"rerank: the index {self.index_dir} stores no float features; rebuild it with "
                             "store_features=True (--store-features) to re-rank")

    def record(self, image_id: int) -> ImageRecord:
        """Metadata of the indexed image ``image_id`` (KeyError if there is none)."""
        if isinstance(image_id, bool) or not isinstance(image_id, (int, np.integer)):
            raise TypeError(f"image_id: expected an int, got {type(image_id).__name__}")
        found = self._state.records([image_id])
        if int(image_id) not in found:
            raise KeyError(f"image_id: no image with id {image_id} in the index (ids are 0..{len(self) - 1})")
        return found[int(image_id)]

    # ---------------------------------------------------------------------------------------
    # inspection

    def info(self) -> dict[str, Any]:
        """A JSON-ready summary: counts, code width, model, encoder, labels, files and sizes."""
        state = self._state
        m = state.manifest
        with state.db_lock:
            labels = dict(state.db.execute("SELECT COALESCE(label, ''), COUNT(*) FROM images GROUP BY label"))
        referenced = [MANIFEST, MODEL_FILE, ENCODER_FILE, m["files"]["codes"], m["files"]["metadata"],
                      *(c["file"] for c in m["files"]["features"] or [])]
        size = sum((self.index_dir / f).stat().st_size for f in referenced if (self.index_dir / f).exists())
        return {
            "index_dir": str(self.index_dir),
            "generation": state.generation,
            "count": state.count,
            "bits": m["bits"],
            "image_size": m["image_size"],
            "backbone": m["model"]["backbone"],
            "num_classes": m["model"]["num_classes"],
            "feature_dim": m["model"]["feature_dim"],
            "checkpoint": m["checkpoint"],
            "encoder": {k: m["encoder"][k] for k in ("source", "fit_on", "params")},
            "has_features": m["files"]["features"] is not None,
            "labels": {(k or None): v for k, v in sorted(labels.items())},
            "stats": m["stats"],
            "created": m["created"],
            "updated": m["updated"],
            "bytes_on_disk": size,
        }

    def verify(self, *, model=None, files: str = "sample", sample_size: int = 200, seed: int = 0) -> VerifyReport:
        """Check the committed index on disk for consistency.

        Checks the manifest against the codes (count, bit width, ids 0..n-1, checksum), the
        metadata (generation, count, ids) and the feature chunks (rows, width); the model copy
        and encoder against their recorded hashes; optionally a checkpoint against the one the
        index was built with; and the indexed image files against their recorded content hashes.

        Parameters
        ----------
        model : path-like, optional
            A checkpoint that must be the index's.
        files : {"sample", "all", "none"}
            Which indexed image files to re-hash.
        sample_size : int
            Files re-hashed with ``files="sample"``.
        seed : int

        Returns
        -------
        VerifyReport
        """
        return verify_index(self.index_dir, model=model, files=files, sample_size=sample_size, seed=seed)


def _encoder_params(encoder) -> dict[str, Any]:
    def step(est):
        if est is None:
            return None
        return {"class": type(est).__name__, **est.get_params(deep=False)}

    desc = {"selector": step(encoder.selector), "hasher": step(encoder.hasher), "n_bits": int(encoder.n_bits_),
            "n_features_in": int(encoder.n_features_in_)}
    return json.loads(json.dumps(desc, default=str))


def _check_compatible(index_dir: Path, manifest: dict, *, model, bits, expect_hash: str | None = None) -> None:
    from dfsnet.models import checkpoint_hash

    built = manifest["checkpoint"]
    if model is not None:
        found = checkpoint_hash(model)
        if found != built["hash"]:
            raise ValueError(f"model: the index {index_dir} was built with checkpoint {built['source']} "
                             f"(hash {built['hash']}), not with {Path(model).resolve()} (hash {found})")
    if expect_hash is not None and expect_hash != built["hash"]:
        raise ValueError(f"index_dir: {index_dir} now holds an index of checkpoint hash {built['hash']}, "
                         f"not {expect_hash} as when it was loaded")
    if bits is not None and int(bits) != manifest["bits"]:
        raise ValueError(f"bits: the index {index_dir} holds {manifest['bits']}-bit codes, not {bits}-bit ones")


class _Builder:
    """Feature extraction, encoding and the commit of one new generation."""

    def __init__(self, index_dir: Path, model_path: Path | None, meta, image_size: int, device, *,
                 model=None, model_lock: threading.Lock | None = None):
        from dfsnet.data import build_transforms
        from dfsnet.models import load_checkpoint

        self.index_dir = index_dir
        self.model = model if model is not None else load_checkpoint(model_path, map_location=device or "cpu")[0]
        self.model_lock = model_lock or threading.Lock()
        self.device = device
        self.transform = build_transforms(meta, train=False, image_size=image_size)

    def extract(self, paths: list[str], *, batch_size, num_workers, progress):
        """float32 (n, D) features and bool (n,) ok mask of ``paths`` (bad images are not ok)."""
        from dfsnet.data import ImageList
        from dfsnet.features import extract_features_with_mask

        dataset = ImageList(paths, transform=self.transform)
        with self.model_lock:
            try:
                return extract_features_with_mask(self.model, dataset, batch_size=batch_size,
                                                  num_workers=num_workers, device=self.device or "cpu",
                                                  progress=progress)
            except ValueError:
                if dataset.n_skipped == len(dataset):  # every image unreadable
                    return np.zeros((len(paths), 0), dtype=np.float32), np.zeros(len(paths), dtype=bool)
                raise

    def fit_encoder(self, fit_on, *, bits, selector, hasher, batch_size, num_workers, progress):
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
            raise ValueError(f"fit_on: fewer than 2 readable images in {fit_on}")
        if selector is not None and bits > features.shape[1]:
            raise ValueError(f"bits: {bits} bits select {bits} features, but the model's features have "
                             f"{features.shape[1]} dimensions; choose bits <= {features.shape[1]}")
        encoder.fit(features[ok], folder.targets[ok])
        logger.info("fitted a %d-bit %s/%s encoder on %d images of %s", encoder.n_bits_, selector, hasher,
                    int(ok.sum()), fit_on)
        return encoder

    def commit(self, manifest: dict, state: _State | None, files: list[tuple[str, str | None]], encoder, *,
               batch_size, num_workers, progress) -> AddReport:
        """Index the new ones among ``files`` as generation ``manifest["generation"] + 1``.

        Writes nothing when no file is new and readable. Call under the write lock.
        """
        from tqdm.auto import tqdm

        from dfsnet.index import HammingIndex

        known = state.hashes() if state is not None else set()
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

        generation = report.generation + 1
        ids = np.arange(report.count, report.count + len(added), dtype=np.int64)
        files_entry = dict(manifest["files"])
        if state is None:
            index = HammingIndex(int(manifest["bits"]))
        else:  # a fresh copy: the loaded generation stays intact for concurrent searches
            index = HammingIndex.load(self.index_dir / state.manifest["files"]["codes"])
        index.add(encoder.transform(features), ids=ids)
        files_entry["codes"] = _gen_name("codes", generation)
        index.save(self.index_dir / files_entry["codes"])
        if files_entry["features"] is not None:
            chunk = _gen_name("features", generation)
            with atomic_write(self.index_dir / chunk) as fh:
                np.save(fh, np.ascontiguousarray(features, dtype=np.float32), allow_pickle=False)
            files_entry["features"] = [*files_entry["features"], {"file": chunk, "rows": len(added)}]
        files_entry["metadata"] = _gen_name("metadata", generation)
        rows = [(int(i), path, digest, size, mtime, label)
                for i, (path, label, digest, size, mtime) in zip(ids, added)]
        src = self.index_dir / state.manifest["files"]["metadata"] if state is not None else None
        _write_metadata(src, self.index_dir / files_entry["metadata"], rows, generation)
        stats = dict(manifest["stats"])
        stats["n_bad"] = int(stats.get("n_bad", 0)) + len(bad_paths)
        stats["n_duplicates"] = int(stats.get("n_duplicates", 0)) + n_dup
        manifest = {**manifest, "generation": generation, "count": report.count + len(added),
                    "updated": _now(), "files": files_entry, "stats": stats}
        # The commit point: everything it names is complete and durable before this rename.
        atomic_write_text(self.index_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        _collect_garbage(self.index_dir, manifest)
        report.generation, report.count = generation, manifest["count"]
        return report


def verify_index(index_dir, *, model=None, files: str = "sample", sample_size: int = 200,
                 seed: int = 0) -> VerifyReport:
    """Check the committed index at ``index_dir`` without loading its model; see :meth:`Pipeline.verify`."""
    from dfsnet.hashing import Encoder
    from dfsnet.index import HammingIndex
    from dfsnet.models import checkpoint_hash

    check_choice(files, ("sample", "all", "none"), name="files")
    sample_size = check_positive_int(sample_size, name="sample_size")
    index_dir = Path(index_dir).expanduser().resolve()
    errors: list[str] = []
    manifest = read_manifest(index_dir)
    generation, count, bits = int(manifest["generation"]), int(manifest["count"]), int(manifest["bits"])
    fl = manifest["files"]
    names = [MODEL_FILE, ENCODER_FILE, fl["codes"], fl["metadata"], *(c["file"] for c in fl["features"] or [])]
    missing = [n for n in names if not (index_dir / n).is_file()]
    if missing:
        errors.append(f"files named by the manifest are missing: {', '.join(missing)}")
        return VerifyReport(errors, 0, count, generation)

    built = manifest["checkpoint"]["hash"]
    found = checkpoint_hash(index_dir / MODEL_FILE)
    if found != built:
        errors.append(f"{MODEL_FILE} has hash {found}, but the index was built with checkpoint hash {built}")
    if model is not None:
        given = checkpoint_hash(model)
        if given != built:
            errors.append(f"the index was built with checkpoint {manifest['checkpoint']['source']} (hash {built}), "
                          f"not with {Path(model).resolve()} (hash {given})")
    if sha256_file(index_dir / ENCODER_FILE) != manifest["encoder"]["sha256"]:
        errors.append(f"{ENCODER_FILE} does not match the sha256 recorded in the manifest")
    else:
        encoder = Encoder.load(index_dir / ENCODER_FILE)
        if encoder.n_bits_ != bits:
            errors.append(f"{ENCODER_FILE} makes {encoder.n_bits_}-bit codes, the manifest says {bits}")

    try:
        index = HammingIndex.load(index_dir / fl["codes"])
    except ValueError as exc:
        errors.append(f"{fl['codes']}: {exc}")
    else:
        if index.n_bits != bits:
            errors.append(f"{fl['codes']} holds {index.n_bits}-bit codes, the manifest says {bits}")
        if len(index) != count:
            errors.append(f"{fl['codes']} holds {len(index)} codes, the manifest counts {count}")
        elif not np.array_equal(np.sort(np.asarray(index.ids)), np.arange(count)):
            errors.append(f"{fl['codes']}: ids are not 0..{count - 1}")

    with contextlib.closing(sqlite3.connect(_sqlite_uri(index_dir / fl["metadata"], read_only=True),
                                            uri=True)) as db:
        try:
            meta_gen = db.execute("SELECT value FROM info WHERE key = 'generation'").fetchone()
            rows = db.execute("SELECT id, path, sha256 FROM images ORDER BY id").fetchall()
        except sqlite3.DatabaseError as exc:
            errors.append(f"{fl['metadata']}: not a readable metadata database ({exc})")
            return VerifyReport(errors, 0, count, generation)
    ids = np.array([r[0] for r in rows], dtype=np.int64)
    if meta_gen is None or int(meta_gen[0]) != generation:
        errors.append(f"{fl['metadata']} belongs to generation {meta_gen and meta_gen[0]}, the manifest is at "
                      f"{generation}")
    if ids.size != count:
        errors.append(f"{fl['metadata']} holds {ids.size} images, the manifest counts {count}")
    elif not np.array_equal(ids, np.arange(count)):
        errors.append(f"{fl['metadata']}: ids are not 0..{count - 1}")

    if fl["features"] is not None:
        rows_total = 0
        for chunk in fl["features"]:
            try:
                arr = np.load(index_dir / chunk["file"], mmap_mode="r", allow_pickle=False)
            except ValueError as exc:
                errors.append(f"{chunk['file']}: unreadable ({exc})")
                continue
            expected = (chunk["rows"], manifest["model"]["feature_dim"])
            if arr.dtype != np.float32 or arr.shape != expected:
                errors.append(f"{chunk['file']}: expected float32 {expected}, found {arr.dtype} {arr.shape}")
            rows_total += arr.shape[0]
        if rows_total != count:
            errors.append(f"feature chunks hold {rows_total} rows, the manifest counts {count}")

    checked = 0
    if files != "none" and rows:
        picks = range(len(rows))
        if files == "sample" and len(rows) > sample_size:
            picks = np.sort(np.random.default_rng(seed).choice(len(rows), sample_size, replace=False))
        for i in picks:
            image_id, path, digest = rows[int(i)]
            checked += 1
            try:
                now = sha256_file(path)
            except OSError as exc:
                errors.append(f"image {image_id}: {path} cannot be read ({exc.strerror or exc})")
                continue
            if now != digest:
                errors.append(f"image {image_id}: {path} changed since it was indexed (content hash differs)")
    return VerifyReport(errors, checked, count, generation)
