"""The Milvus backend of the image index: codes and metadata in one Milvus collection.

The index folder keeps what every process needs to encode a query (``manifest.json``, the model
copy and ``encoder.npz``, a few MB); the codes (a ``BINARY_VECTOR`` field searched with the
``HAMMING`` metric), the metadata (path, content hash, label, size, mtime in scalar fields) and,
optionally, the float features (a ``FLOAT_VECTOR`` field, for re-ranking) live in the collection.
Any number of processes then add to it and search it at once: ``dfsnet index add --shard I/N``
workers of a job array, and stateless ``dfsnet serve`` replicas behind a load balancer, each with
a copy of the folder. The URI is a Milvus server's (``http://host:19530``: standalone or a
cluster) or a local Milvus Lite file (``./codes.db``; tested here, one process at a time).

Ids are derived from the content hash (its first 63 bits), so shards never collide and adding
the same image twice, from any worker, is a no-op. The collection's description holds the
identity of the index (model hash, bits, encoder), checked on every open: a collection built
with another model or bit width, or one whose schema is not dfsnet's, is refused.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from dfsnet import __version__
from dfsnet._io import atomic_write, sha256_file
from dfsnet.errors import InputError, NotFoundError
from dfsnet.hashing.bits import n_bytes
from dfsnet.store.builder import AddReport, Builder, export_onnx_graph, scan_images
from dfsnet.store.image_index import ImageIndex, SearchHit, _search_codes
from dfsnet.store.maintenance import PruneReport, RemoveReport
from dfsnet.store.manifest import (
    ENCODER_FILE,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    MODEL_FILE,
    encoder_params,
    now,
    read_manifest,
    write_manifest,
)
from dfsnet.store.metadata import ImageRecord
from dfsnet.store.verify import VerifyReport

__all__ = ["MilvusIndex", "MilvusCodes", "content_id", "parse_shard", "in_shard"]

logger = logging.getLogger(__name__)

SCHEMA_FORMAT = "dfsnet.milvus/1"
BACKEND = "milvus"
_SCALARS = ("sha256", "path", "label", "size", "mtime")
_MAX_PATH = 4096
_BATCH = 1000  # rows per insert / ids per query: well under Milvus's message and expression limits


def content_id(sha256_hex: str) -> int:
    """The int64 id of an image: the first 63 bits of its content hash (non-negative)."""
    return int(sha256_hex[:16], 16) >> 1


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N``."""
    index, sep, count = str(text).partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i = n = -1
    if not sep or n < 1 or not 0 <= i < n:
        raise InputError(f"shard: expected I/N with 0 <= I < N (e.g. 0/4), got {text!r}")
    return i, n


def in_shard(path: str, shard: tuple[int, int]) -> bool:
    """Whether ``path`` belongs to shard ``(I, N)``: a stable hash of the path, so shards are
    disjoint, cover every file, and do not move when files are added."""
    i, n = shard
    return int(hashlib.sha256(os.fsencode(path)).hexdigest()[:16], 16) % n == i


def _is_lite(uri: str) -> bool:
    return not uri.startswith(("http://", "https://", "tcp://", "unix:"))


def connect(uri: str, *, timeout: float = 10.0):
    """A ``pymilvus.MilvusClient`` on ``uri``; an unreachable server fails within ``timeout`` s
    with the URI in the message."""
    try:
        from pymilvus import MilvusClient
        from pymilvus.exceptions import MilvusException
    except ImportError:
        raise InputError("backend: the Milvus backend needs pymilvus (and milvus-lite for a local file): "
                         "pip install pymilvus milvus-lite") from None
    if not isinstance(uri, str) or not uri:
        raise InputError(f"uri: expected a Milvus URI (http://host:19530 or a local .db file), got {uri!r}")
    if _is_lite(uri):
        Path(uri).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        uri = str(Path(uri).expanduser().resolve())
    try:
        return MilvusClient(uri=uri, timeout=timeout)
    except MilvusException as exc:
        raise InputError(f"uri: cannot reach Milvus at {uri} ({exc.message})") from None
    except Exception as exc:  # noqa: BLE001 - pymilvus raises many connection error types
        raise InputError(f"uri: cannot reach Milvus at {uri} ({type(exc).__name__}: {exc})") from None


@dataclasses.dataclass(frozen=True)
class Identity:
    """What a collection must agree with to be this index's."""

    checkpoint_hash: str
    bits: int
    encoder_sha256: str
    feature_dim: int
    store_features: bool

    def describe(self) -> str:
        return json.dumps({"format": SCHEMA_FORMAT, **dataclasses.asdict(self)}, sort_keys=True)


class MilvusCodes:
    """One Milvus collection holding an index's codes, metadata and optional features.

    Parameters
    ----------
    client : pymilvus.MilvusClient
    collection : str
    identity : Identity
    """

    def __init__(self, client, collection: str, identity: Identity):
        self.client = client
        self.collection = collection
        self.identity = identity

    @classmethod
    def create(cls, uri: str, collection: str, identity: Identity, *, nlist: int, timeout: float = 10.0,
               force: bool = False) -> MilvusCodes:
        """Create the collection (``BIN_FLAT`` on Milvus Lite, ``BIN_IVF_FLAT`` with ``nlist``
        lists on a server); one that exists already is refused unless ``force`` (then dropped)."""
        from pymilvus import DataType, MilvusClient

        client = connect(uri, timeout=timeout)
        if client.has_collection(collection):
            if not force:
                raise InputError(f"collection: {collection!r} exists at {uri}; add to it with `dfsnet index add`, "
                                 "choose another name, or pass force (--force) to replace it")
            client.drop_collection(collection)
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False,
                                            description=identity.describe())
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("code", DataType.BINARY_VECTOR, dim=identity.bits)
        schema.add_field("sha256", DataType.VARCHAR, max_length=64)
        schema.add_field("path", DataType.VARCHAR, max_length=_MAX_PATH)
        schema.add_field("label", DataType.VARCHAR, max_length=512)
        schema.add_field("size", DataType.INT64)
        schema.add_field("mtime", DataType.DOUBLE)
        if identity.store_features:
            schema.add_field("features", DataType.FLOAT_VECTOR, dim=identity.feature_dim)
        params = client.prepare_index_params()
        if _is_lite(uri):  # Milvus Lite refuses BIN_IVF_FLAT ("local mode only support BIN_FLAT")
            params.add_index(field_name="code", index_type="BIN_FLAT", metric_type="HAMMING")
        else:
            params.add_index(field_name="code", index_type="BIN_IVF_FLAT", metric_type="HAMMING",
                             params={"nlist": int(nlist)})
        if identity.store_features:
            params.add_index(field_name="features", index_type="FLAT", metric_type="L2")
        client.create_collection(collection, schema=schema, index_params=params)
        logger.info("created Milvus collection %r at %s (%d-bit codes)", collection, uri, identity.bits)
        return cls(client, collection, identity)

    @classmethod
    def open(cls, uri: str, collection: str, identity: Identity, *, timeout: float = 10.0) -> MilvusCodes:
        """Open the collection, refusing a missing one, a foreign schema or another identity."""
        client = connect(uri, timeout=timeout)
        if not client.has_collection(collection):
            raise InputError(f"collection: no collection {collection!r} at {uri}")
        desc = client.describe_collection(collection)
        try:
            found = json.loads(desc.get("description") or "")
        except json.JSONDecodeError:
            found = None
        fields = {f["name"] for f in desc.get("fields", [])}
        ours = {"id", "code", *_SCALARS}
        if not isinstance(found, dict) or found.get("format") != SCHEMA_FORMAT or not ours <= fields:
            raise InputError(f"collection: {collection!r} at {uri} is not a dfsnet collection (its schema has "
                             f"fields {sorted(fields)}, expected {sorted(ours)} and a {SCHEMA_FORMAT} description)")
        expected = dataclasses.asdict(identity)
        wrong = [f"{k}: collection {found.get(k)!r}, index {v!r}" for k, v in expected.items() if found.get(k) != v]
        if wrong:
            raise InputError(f"collection: {collection!r} at {uri} belongs to another index ({'; '.join(wrong)})")
        return cls(client, collection, identity)

    # -- reading ---------------------------------------------------------------------------

    def count(self) -> int:
        self.client.flush(self.collection)
        return int(self.client.get_collection_stats(self.collection)["row_count"])

    def _query(self, flt: str, fields: list[str]) -> list[dict]:
        return list(self.client.query(self.collection, filter=flt, output_fields=fields))

    def by_hash(self, hashes: list[str]) -> dict[str, ImageRecord]:
        """The indexed records among content ``hashes``."""
        out = {}
        for start in range(0, len(hashes), _BATCH):
            chunk = hashes[start:start + _BATCH]
            for row in self._query(f"sha256 in {json.dumps(chunk)}", ["id", *_SCALARS]):
                out[row["sha256"]] = _record(row)
        return out

    def records(self, ids) -> dict[int, ImageRecord]:
        ids = [int(i) for i in ids]
        out = {}
        for start in range(0, len(ids), _BATCH):
            chunk = ids[start:start + _BATCH]
            for row in self._query(f"id in {chunk}", ["id", *_SCALARS]):
                out[int(row["id"])] = _record(row)
        return out

    def all_records(self) -> list[ImageRecord]:
        """Every record, in id order (streamed in batches)."""
        it = self.client.query_iterator(self.collection, batch_size=_BATCH, filter="id >= 0",
                                        output_fields=["id", *_SCALARS])
        rows: list[ImageRecord] = []
        try:
            while batch := it.next():
                rows.extend(_record(r) for r in batch)
        finally:
            it.close()
        return sorted(rows, key=lambda r: r.id)

    def codes_of(self, ids: np.ndarray) -> np.ndarray:
        """uint8 (len(ids), B): the stored codes of ``ids``, in that order."""
        rows = {int(r["id"]): _code_bytes(r["code"])
                for r in self._query(f"id in {[int(i) for i in ids]}", ["id", "code"])}
        missing = [int(i) for i in ids if int(i) not in rows]
        if missing:
            raise NotFoundError(f"ids: {missing[:5]} are not indexed")
        return np.stack([np.frombuffer(rows[int(i)], dtype=np.uint8) for i in ids])

    def page(self, offset: int, limit: int) -> list[ImageRecord]:
        """Records ``offset`` to ``offset + limit - 1`` in ascending id order (reads every id:
        Milvus queries have no order)."""
        return self.all_records()[offset:offset + limit]

    def duplicates(self) -> dict[str, list[str]]:
        """Copies skipped as duplicates, by content hash: the collection does not record them
        (concurrent workers skip them independently), so none are reported."""
        return {}

    def label_counts(self) -> dict[str | None, int]:
        counts: dict[str | None, int] = {}
        for r in self.all_records():
            counts[r.label] = counts.get(r.label, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (kv[0] is None, kv[0] or "")))

    def features_of(self, ids: np.ndarray) -> np.ndarray:
        """float32 (len(ids), D) stored features of ``ids``."""
        if not self.identity.store_features:
            raise InputError("rerank: this index stores no float features")
        rows = {int(r["id"]): r["features"] for start in range(0, len(ids), _BATCH)
                for r in self._query(f"id in {[int(i) for i in ids[start:start + _BATCH]]}", ["id", "features"])}
        return np.asarray([rows[int(i)] for i in ids], dtype=np.float32)

    def search(self, codes: np.ndarray, k: int, *, nprobe: int = 16) -> tuple[np.ndarray, np.ndarray]:
        """faiss's contract: int32 (nq, k) Hamming distances and int64 (nq, k) ids, padded with -1;
        ids ascending within equal distances among the results returned."""
        from pymilvus.exceptions import MilvusException

        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        params: dict[str, Any] = {"metric_type": "HAMMING"}
        if not _is_lite_client(self.client):
            params["params"] = {"nprobe": int(nprobe)}
        try:
            results = self.client.search(self.collection, data=[c.tobytes() for c in codes], anns_field="code",
                                         limit=int(k), search_params=params, output_fields=["id"])
        except MilvusException as exc:
            raise InputError(f"search: Milvus refused the search on {self.collection!r} ({exc.message})") from None
        distances = np.full((len(codes), k), -1, dtype=np.int32)
        ids = np.full((len(codes), k), -1, dtype=np.int64)
        for q, hits in enumerate(results):
            pairs = sorted((int(round(h["distance"])), int(h["id"])) for h in hits)
            for j, (d, i) in enumerate(pairs[:k]):
                distances[q, j], ids[q, j] = d, i
        return distances, ids

    # -- writing ---------------------------------------------------------------------------

    def insert(self, ids: np.ndarray, codes: np.ndarray, records: list[tuple], features: np.ndarray | None) -> None:
        """Insert rows: ``records`` as ``(path, label, sha256, size, mtime)`` per id."""
        for start in range(0, len(ids), _BATCH):
            rows = []
            for j in range(start, min(start + _BATCH, len(ids))):
                path, label, digest, size, mtime = records[j]
                row = {"id": int(ids[j]), "code": codes[j].tobytes(), "sha256": digest, "path": path,
                       "label": label or "", "size": int(size), "mtime": float(mtime)}
                if self.identity.store_features:
                    row["features"] = features[j].astype(np.float32).tolist()
                rows.append(row)
            self.client.insert(self.collection, rows)
        self.client.flush(self.collection)

    def delete(self, ids: list[int]) -> None:
        for start in range(0, len(ids), _BATCH):
            self.client.delete(self.collection, ids=[int(i) for i in ids[start:start + _BATCH]])
        self.client.flush(self.collection)


def _is_lite_client(client) -> bool:
    uri = getattr(getattr(client, "_config", None), "uri", "") or ""
    return _is_lite(str(uri))


def _record(row: dict) -> ImageRecord:
    return ImageRecord(id=int(row["id"]), path=row["path"], sha256=row["sha256"], size=int(row["size"]),
                       mtime=float(row["mtime"]), label=row["label"] or None)


class _MilvusState:
    """What :class:`ImageIndex`'s search and record lookups read, served by a collection."""

    def __init__(self, index_dir: Path, manifest: dict, codes: MilvusCodes):
        self.manifest = manifest
        self.generation = int(manifest["generation"])
        self.codes = codes
        self.metadata = codes  # records(ids), label_counts()
        self.index = codes  # search(codes, k) -> (D, I)

    @property
    def count(self) -> int:
        return self.codes.count()

    def features_of(self, ids: np.ndarray) -> np.ndarray:
        return self.codes.features_of(ids)


def _identity(manifest: dict) -> Identity:
    return Identity(checkpoint_hash=manifest["checkpoint"]["hash"], bits=int(manifest["bits"]),
                    encoder_sha256=manifest["encoder"]["sha256"], feature_dim=int(manifest["model"]["feature_dim"]),
                    store_features=bool(manifest["store_features"]))


class MilvusIndex(ImageIndex):
    """An :class:`ImageIndex` whose codes and metadata live in a Milvus collection.

    Opened by :meth:`ImageIndex.load` (and ``dfsnet`` commands) when the manifest names the
    Milvus backend; same API: :meth:`add` (with ``shard``), :meth:`search`, :meth:`remove`,
    :meth:`prune`, :meth:`info`, :meth:`verify`. Writes are live in the collection, so
    :meth:`refresh` has nothing to follow.
    """

    def _open_state(self):
        manifest = read_manifest(self.index_dir)
        backend = manifest["backend"]
        return _MilvusState(self.index_dir, manifest,
                            MilvusCodes.open(backend["uri"], backend["collection"], _identity(manifest),
                                             timeout=float(backend.get("timeout", 10.0))))

    @property
    def codes(self) -> MilvusCodes:
        return self._state.codes

    def __len__(self) -> int:
        return self._state.count

    def __repr__(self) -> str:
        backend = self.manifest["backend"]
        return f"MilvusIndex({str(self.index_dir)!r}, uri={backend['uri']!r}, collection={backend['collection']!r})"

    @classmethod
    def build(cls, model_path, images_dir, out_dir, *, uri: str, collection: str | None = None,
              bits: int | None = None, fit_on=None, selector: str | None = "gain_ratio", hasher: str = "sample_mean",
              store_features: bool = False, image_size: int | None = None, batch_size: int = 64,
              num_workers: int | None = None, device=None, precision: str = "auto", runtime: str = "auto",
              progress: bool = False, force: bool = False, shard: str | None = None,
              timeout: float = 10.0) -> MilvusIndex:
        """Create the collection and the index folder ``out_dir``, then add ``images_dir`` (or its
        ``shard``). Parameters as :meth:`ImageIndex.build`, plus:

        Parameters
        ----------
        uri : str
            ``http://host:19530`` (a server) or a local Milvus Lite file.
        collection : str, optional
            Default: ``dfsnet_<folder name>``.
        shard : str, optional
            ``"I/N"``: add only this shard of ``images_dir`` (see :func:`in_shard`).
        timeout : float
            Seconds to wait for the server.
        """
        from dfsnet.features import resolve_device
        from dfsnet.hashing import Encoder
        from dfsnet.models import checkpoint_hash, read_checkpoint_meta
        from dfsnet.precision import resolve_precision
        from dfsnet.train.workflow import build_encoder

        started = time.perf_counter()
        device = resolve_device(device)
        prec = resolve_precision(precision, device)
        model_path = Path(model_path).expanduser().resolve()
        meta, extra = read_checkpoint_meta(model_path)
        image_size = int(image_size or extra.get("image_size") or meta.input_size[-1])
        out_dir = Path(out_dir).expanduser().resolve()
        if (out_dir / MANIFEST).exists() and not force:
            raise InputError(f"out_dir: {out_dir} already holds an index; add images with `dfsnet index add`, "
                             "choose a new folder, or pass force (--force) to replace it")
        collection = collection or "dfsnet_" + "".join(c if c.isalnum() else "_" for c in out_dir.name)
        shard_spec = parse_shard(shard) if shard else None
        if fit_on is not None:
            build_encoder(meta.feature_dim, selector=selector, hasher=hasher, n_bits=bits)
        files = scan_images(images_dir)
        if not files:
            raise InputError(f"images_dir: no image files found under {Path(images_dir).resolve()}")
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_write(out_dir / MODEL_FILE) as fh, open(model_path, "rb") as src:
            shutil.copyfileobj(src, fh, 1 << 20)
        builder = Builder.from_checkpoint(out_dir, image_size, device, precision=prec.name)
        onnx_entry, _ = export_onnx_graph(builder.model, out_dir, image_size, runtime=runtime,
                                          device_type=device.type, precision=precision)
        if fit_on is not None:
            encoder = builder.fit_encoder(fit_on, bits=bits, selector=selector, hasher=hasher,
                                          batch_size=batch_size, num_workers=num_workers, progress=progress)
        else:
            saved = model_path.parent / ENCODER_FILE
            if not saved.is_file():
                raise FileNotFoundError(f"fit_on: no {ENCODER_FILE} beside the checkpoint ({saved}); pass fit_on "
                                        "(--fit-on) with a labelled image folder to fit one")
            encoder = Encoder.load(saved)
        encoder.save(out_dir / ENCODER_FILE)
        nlist = int(min(65536, max(16, 4 * math.sqrt(max(len(files), 1)))))
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "dfsnet_version": __version__,
            "generation": 1, "created": now(), "updated": now(), "count": 0, "next_id": 0,
            "bits": int(encoder.n_bits_), "image_size": image_size, "precision": prec.name, "onnx": onnx_entry,
            "checkpoint": {"hash": checkpoint_hash(out_dir / MODEL_FILE), "file": MODEL_FILE,
                           "source": str(model_path)},
            "model": {"backbone": meta.name, "timm_name": meta.timm_name, "num_classes": meta.num_classes,
                      "class_names": list(meta.class_names) if meta.class_names else None,
                      "feature_dim": meta.feature_dim, "dfs": meta.dfs},
            "encoder": {"file": ENCODER_FILE, "sha256": sha256_file(out_dir / ENCODER_FILE),
                        "source": "fit_on" if fit_on is not None else str(model_path.parent / ENCODER_FILE),
                        "fit_on": str(Path(fit_on).resolve()) if fit_on is not None else None,
                        "params": encoder_params(encoder)},
            "store_features": bool(store_features),
            "files": {"codes": None, "metadata": None, "features": None},
            "stats": {"n_bad": 0, "n_duplicates": 0},
            "backend": {"kind": BACKEND, "uri": uri, "collection": collection,
                        "index_type": "BIN_FLAT" if _is_lite(uri) else "BIN_IVF_FLAT", "nlist": nlist,
                        "timeout": float(timeout)},
        }
        MilvusCodes.create(uri, collection, _identity(manifest), nlist=nlist, timeout=timeout, force=force)
        write_manifest(out_dir, manifest)
        index = cls(out_dir, device=device, precision=precision, runtime=runtime)
        report = index.add(images_dir, shard=shard_spec and f"{shard_spec[0]}/{shard_spec[1]}",
                           batch_size=batch_size, num_workers=num_workers, progress=progress)
        index.last_report = dataclasses.replace(report, seconds=time.perf_counter() - started)
        return index

    def add(self, images_dir, *, model=None, shard: str | None = None, batch_size: int = 64,
            num_workers: int | None = None, progress: bool = False) -> AddReport:
        """Index the images under ``images_dir`` (only shard ``"I/N"`` of them, if given) that the
        collection does not hold yet (by content hash); safe to run from many processes at once."""
        from dfsnet.store.manifest import check_compatible

        started = time.perf_counter()
        check_compatible(self.index_dir, self.manifest, model=model)
        files = scan_images(images_dir)
        if shard:
            spec = parse_shard(shard)
            files = [f for f in files if in_shard(f[0], spec)]
        bad: list[str] = []
        candidates = []
        for path, label in files:
            try:
                st = os.stat(path)
                digest = sha256_file(path)
            except OSError as exc:
                logger.warning("skipping unreadable file %s: %s", path, exc)
                bad.append(path)
                continue
            candidates.append((path, label, digest, st.st_size, st.st_mtime))
        known = self.codes.by_hash([c[2] for c in candidates])
        seen: set[str] = set()
        new = []
        for c in candidates:
            if c[2] not in known and c[2] not in seen:
                seen.add(c[2])
                new.append(c)
        n_dup = len(candidates) - len(new)
        added = 0
        if new:
            builder = self._builder()
            features, ok = builder.extract([c[0] for c in new], batch_size=batch_size, num_workers=num_workers,
                                           progress=progress)
            bad += [new[j][0] for j in np.flatnonzero(~ok)]
            rows = [c for c, good in zip(new, ok) if good]
            if rows:
                features = features[ok]
                ids = np.array([content_id(r[2]) for r in rows], dtype=np.int64)
                self.codes.insert(ids, self.encoder.transform(features), rows, features)
                added = len(rows)
        report = AddReport(n_found=len(files), n_added=added, n_duplicates=n_dup, n_bad=len(bad), bad_paths=bad,
                           generation=self._state.generation, count=len(self), seconds=time.perf_counter() - started)
        self.last_report = report
        logger.info("added %d images to collection %r (%d already there, %d bad)", added, self.codes.collection,
                    n_dup, len(bad))
        return report

    def refresh(self) -> bool:
        """Nothing to follow: writes to the collection are live."""
        return False

    def search_id(self, image_id: int, k: int = 10, *, rerank: bool = False,
                  rerank_factor: int = 10) -> list[SearchHit]:
        """As :meth:`ImageIndex.search_id`: the stored code (and features) of an indexed image."""
        self._check_search_args(k, rerank, rerank_factor)
        self.record(image_id)  # NotFoundError for an unknown id
        ids = np.array([int(image_id)], dtype=np.int64)
        query = self.codes.features_of(ids) if rerank else None
        return _search_codes(self._state, self.codes.codes_of(ids), query, k, rerank_factor)

    def remove(self, ids=(), *, paths=()) -> RemoveReport:
        """Delete the images with these ids and/or paths from the collection."""
        ids = [int(i) for i in ids]
        found = self.codes.records(ids)
        missing = [i for i in ids if i not in found]
        if missing:
            raise InputError(f"ids: no image with id {missing[0]} in the index"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        wanted = {str(Path(p).expanduser().resolve()) for p in paths}
        if wanted:
            by_path = {r.path: r for r in self.codes.all_records() if r.path in wanted}
            unknown = sorted(wanted - set(by_path))
            if unknown:
                raise InputError(f"paths: no indexed image at {unknown[0]}"
                                 + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
            found.update({r.id: r for r in by_path.values()})
        self.codes.delete(list(found))
        return RemoveReport(removed=sorted(found.values(), key=lambda r: r.id), generation=self._state.generation,
                            count=len(self))

    def prune(self, *, dry_run: bool = False) -> PruneReport:
        """Drop the entries whose file is gone or whose content changed (``dry_run``: only list them)."""
        gone, changed = [], []
        for r in self.codes.all_records():
            try:
                st = os.stat(r.path)
            except OSError:
                gone.append(r)
                continue
            if (st.st_size, st.st_mtime) != (r.size, r.mtime) and sha256_file(r.path) != r.sha256:
                changed.append(r)
        if not dry_run and (gone or changed):
            self.codes.delete([r.id for r in gone + changed])
        return PruneReport(gone=gone, changed=changed, dry_run=dry_run, generation=self._state.generation,
                           count=len(self))

    def info(self) -> dict[str, Any]:
        """As :meth:`ImageIndex.info`, with the backend's URI, collection and index type."""
        m = self.manifest
        size = sum((self.index_dir / f).stat().st_size for f in (MANIFEST, MODEL_FILE, ENCODER_FILE))
        return {
            "index_dir": str(self.index_dir), "generation": self._state.generation, "count": len(self),
            "bits": m["bits"], "image_size": m["image_size"],
            "precision": {"built": m.get("precision", "fp32"),
                          "loaded": "fp32" if self.runtime == "onnx" else self.precision.name},
            "runtime": {"loaded": self.runtime, "onnx_graph": bool(m.get("onnx"))},
            "backbone": m["model"]["backbone"], "num_classes": m["model"]["num_classes"],
            "feature_dim": m["model"]["feature_dim"], "checkpoint": m["checkpoint"],
            "encoder": {k: m["encoder"][k] for k in ("source", "fit_on", "params")},
            "has_features": bool(m["store_features"]), "labels": self.codes.label_counts(),
            "stats": m["stats"], "created": m["created"], "updated": m["updated"], "bytes_on_disk": size,
            "backend": {k: m["backend"][k] for k in ("kind", "uri", "collection", "index_type", "nlist")},
        }

    def verify(self, *, model=None, files: str = "sample", sample_size: int = 200, seed: int = 0) -> VerifyReport:
        """Check the folder's model and encoder against the manifest, the collection's identity
        (done on open), every row's code width, and (a sample of) the indexed files' content."""
        from dfsnet._validation import check_choice
        from dfsnet.models import checkpoint_hash

        check_choice(files, ("sample", "all", "none"), name="files")
        m = self.manifest
        errors: list[str] = []
        if checkpoint_hash(self.index_dir / MODEL_FILE) != m["checkpoint"]["hash"]:
            errors.append(f"{MODEL_FILE} does not match the checkpoint hash in the manifest")
        if model is not None and checkpoint_hash(model) != m["checkpoint"]["hash"]:
            errors.append(f"the index was built with checkpoint hash {m['checkpoint']['hash']}, not {model}")
        if sha256_file(self.index_dir / ENCODER_FILE) != m["encoder"]["sha256"]:
            errors.append(f"{ENCODER_FILE} does not match the sha256 recorded in the manifest")
        records = self.codes.all_records()
        width = n_bytes(int(m["bits"]))
        rows = list(self.codes.client.query(self.codes.collection, filter="id >= 0", output_fields=["id", "code"],
                                            limit=min(len(records), 16384))) if records else []
        short = [r["id"] for r in rows if len(_code_bytes(r["code"])) != width]
        if short:
            errors.append(f"{len(short)} rows hold codes of another width than {m['bits']} bits (first id {short[0]})")
        picks = range(len(records))
        if files == "none":
            picks = range(0)
        elif files == "sample" and len(records) > sample_size:
            picks = np.sort(np.random.default_rng(seed).choice(len(records), sample_size, replace=False))
        for i in picks:
            r = records[int(i)]
            try:
                now_hash = sha256_file(r.path)
            except OSError as exc:
                errors.append(f"image {r.id}: {r.path} cannot be read ({exc.strerror or exc})")
                continue
            if now_hash != r.sha256:
                errors.append(f"image {r.id}: {r.path} changed since it was indexed (content hash differs)")
        return VerifyReport(errors, len(picks), len(records), self._state.generation,
                            notes=[f"Milvus collection {self.codes.collection!r} at {m['backend']['uri']}"])


def _code_bytes(value) -> bytes:
    # pymilvus returns a binary vector as bytes, or as a one-element list of bytes.
    if isinstance(value, (list, tuple)):
        value = value[0] if value else b""
    return bytes(value)
