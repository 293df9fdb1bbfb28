"""Exact and inverted-file Hamming search over packed binary codes, on faiss."""
from __future__ import annotations

import functools
import logging
import math
import os

import faiss
import numpy as np

from dfsnet._validation import check_choice, check_codes, check_positive_int
from dfsnet.index._common import (
    BaseIndex,
    check_new_ids,
    exact_topk,
    omp_threads,
    resolve_threads,
    sort_candidates,
)
from dfsnet.index._format import read_container, write_container

logger = logging.getLogger(__name__)

KINDS = ("flat", "ivf")
DEFAULT_NPROBE = 16
# k-means samples at most this many codes per list. faiss's default (256) takes minutes on 1M
# codes with 4,000 lists; on 100k clustered codes 16, 32 and 64 per list gave the same recall@10
# (within 0.005 at nprobe 1-16) at 0.55, 1.0 and 1.95 CPU seconds of training.
_TRAIN_CODES_PER_LIST = 32
# From this k on, flat search uses faiss's counting top-k (hammings_knn_mc: one bucket of ids per
# distance value, filled in storage order, O(n) per query) instead of its heap (O(n log k)). On
# 1,000 queries x 20,000 codes of 64 bits it measured 0.02 against 0.045 s at k=300 and 0.55
# against 2.7 s at k=20,000 (whole rankings, as mAP@all needs), with identical results.
_COUNTING_MIN_K = 256
# Bytes of the per-distance id buckets (queries x (bits + 1) x k int64) one counting call holds.
_COUNTING_BUDGET = 64 << 20


class HammingIndex(BaseIndex):
    """k-nearest-neighbour search in Hamming distance over packed binary codes.

    Codes are uint8 arrays of shape (n, ceil(n_bits / 8)), packed as in
    :mod:`dfsnet.hashing` (numpy ``packbits`` order: bit i is in byte i // 8 at mask
    ``0x80 >> (i % 8)``). When ``n_bits`` is not a multiple of 8 the unused low bits of the
    last byte are cleared on the way in, so they never count in a distance.

    Parameters
    ----------
    n_bits : int
        Code length in bits.
    kind : {"flat", "ivf"}
        ``"flat"`` (faiss ``IndexBinaryFlat``) compares every query with every code: exact.
        ``"ivf"`` (faiss ``IndexBinaryIVF``) clusters the codes into ``nlist`` lists with
        k-means and scans only the ``nprobe`` lists nearest to each query: sublinear, but
        approximate. It only pays on structured (clustered) codes, such as hashes of deep
        features of a few classes; on unstructured codes every list is about as near as any
        other and recall collapses unless ``nprobe`` approaches ``nlist``.
        ``benchmarks/bench_index.py`` reports its recall and speed-up against flat.
        faiss's hash, multi-hash and HNSW binary indexes are deliberately not offered: in the
        measurements behind this project's design they never beat flat at recall >= 0.95 for
        k = 100, and cost 3-19x its memory.
    nlist : int or None
        IVF only: number of lists. ``None`` chooses ``round(4 * sqrt(n))`` for the n codes the
        index is trained on (at most n). k-means uses at most 32 of those codes per list.
    nprobe : int or None
        IVF only: lists scanned per query; ``None`` means 16, which reaches recall@10 >= 0.95
        on clustered codes (tested on 100k 64-bit codes around 1,000 centres with 10% of the
        bits flipped; on 1M such codes the benchmark measured recall@100 >= 0.999 at about 10x
        the speed of flat). Can be changed between searches.
    n_threads : int or None
        OpenMP threads faiss uses inside each call (set around the call and restored after).
        ``None`` means 1, which measured fastest on the shared 2-core machine this project is
        developed on: with faiss's default busy-waiting OpenMP, 2 threads searched 1,000
        queries x 1M codes 2.5-10x slower than 1 thread whenever other processes competed for
        the cores (7-100x slower for one-query searches), against at best 2x faster on an
        idle machine. ``benchmarks/bench_index.py`` measures both. On a dedicated machine, or
        with ``OMP_WAIT_POLICY=PASSIVE`` set before the process starts (2 threads then ran
        1.3-3x faster than 1 even under load), more threads do pay.

    Notes
    -----
    Results come back in ascending distance, and equal distances in ascending id, exactly:
    which of several equidistant items make the k-th place never depends on faiss's internal
    order. The flat index keeps its codes in ascending-id order, relying on faiss scanning in
    storage order and breaking heap ties by position (checked once per process against a
    brute-force reference; if a faiss version ever behaves otherwise, it falls back to the
    deeper search below). The IVF index searches deeper than k and sorts by (distance, id),
    deepening until the k-th distance is strictly below the deepest one fetched; its result
    is exact among the codes in the probed lists.

    The flat index stores its codes in ascending-id order: appending increasing ids (the
    default numbering does) costs nothing extra, while adding ids below the largest one
    present makes it re-sort all its codes (a copy of them).
    """

    def __init__(self, n_bits: int, *, kind: str = "flat", nlist: int | None = None,
                 nprobe: int | None = None, n_threads: int | None = None):
        self.n_bits = check_positive_int(n_bits, name="n_bits")
        self.kind = check_choice(kind, KINDS, name="kind")
        for name, value in (("nlist", nlist), ("nprobe", nprobe)):
            if value is not None:
                if kind != "ivf":
                    raise ValueError(f"{name}: only used with kind='ivf', got {name}={value!r} with kind={kind!r}")
                check_positive_int(value, name=name)
        resolve_threads(n_threads)
        self.nlist = nlist
        self.nprobe = nprobe
        self.n_threads = n_threads
        self._init_ids()
        self._index = faiss.IndexBinaryFlat(self._d) if kind == "flat" else None

    @property
    def code_size(self) -> int:
        """Bytes per code: ceil(n_bits / 8)."""
        return (self.n_bits + 7) // 8

    @property
    def _d(self) -> int:
        # faiss binary indexes need whole bytes.
        return 8 * self.code_size

    @property
    def is_trained(self) -> bool:
        """Whether the index can take codes (always for flat; after training for IVF)."""
        return self._index is not None and self._index.is_trained

    def __repr__(self) -> str:
        extra = f", nlist={self.nlist!r}, nprobe={self.nprobe!r}" if self.kind == "ivf" else ""
        return (f"HammingIndex(n_bits={self.n_bits}, kind={self.kind!r}{extra}, "
                f"n_threads={self.n_threads!r}) with {len(self)} codes")

    def _check_codes(self, codes, name: str) -> np.ndarray:
        """``codes`` checked (:func:`dfsnet._validation.check_codes`) for this code length, uint8
        (n, code_size), with the unused low bits of the last byte cleared."""
        arr = check_codes(codes, name=name, min_rows=0)
        if arr.shape[1] != self.code_size:
            raise ValueError(
                f"{name}: expected {self.code_size} bytes per code for n_bits={self.n_bits}, "
                f"got shape {arr.shape}"
            )
        spare = self._d - self.n_bits
        if spare and arr.size and np.any(arr[:, -1] & ((1 << spare) - 1)):
            arr = arr.copy()
            arr[:, -1] &= 0xFF ^ ((1 << spare) - 1)
        return arr

    def train(self, x) -> None:
        """Train the IVF lists with k-means on ``x``; a no-op for flat.

        ``add`` trains on its first batch when the index is untrained; call ``train``
        explicitly with a representative sample when that first batch is small.

        Parameters
        ----------
        x : uint8 (n, code_size)
            Training codes; n >= ``nlist``.
        """
        x = self._check_codes(x, "x")
        if self.kind == "flat":
            return
        if len(self):
            raise ValueError(f"train: this index already holds {len(self)} codes; create a new "
                             "HammingIndex to retrain")
        n = x.shape[0]
        nlist = self.nlist if self.nlist is not None else max(1, min(n, round(4 * math.sqrt(n))))
        if n < nlist:
            raise ValueError(f"x: expected at least nlist={nlist} training codes, got {n}")
        quantizer = faiss.IndexBinaryFlat(self._d)
        index = faiss.IndexBinaryIVF(quantizer, self._d, nlist)
        index.cp.min_points_per_centroid = 1  # nlist is ours to choose: no faiss warning on stderr
        index.cp.max_points_per_centroid = _TRAIN_CODES_PER_LIST
        with self._threads():
            index.train(x)
        logger.info("trained %d IVF lists on %d codes", nlist, n)
        self._index = index  # faiss's Python wrapper keeps the quantizer alive with it
        self.nlist_ = nlist

    def add(self, x, ids=None) -> None:
        """Add codes.

        Parameters
        ----------
        x : uint8 (n, code_size)
            Packed codes.
        ids : int64 (n,) or None
            Non-negative ids, unique and not already in the index. ``None`` numbers the codes
            after the largest id so far (0, 1, ... in an empty index).
        """
        x = self._check_codes(x, "x")
        ids = check_new_ids(ids, x.shape[0], self._sorted_ids)
        if not ids.size:
            return
        if self.kind == "ivf":
            if not self.is_trained:
                self.train(x)
            with self._threads():
                self._index.add_with_ids(x, ids)
            self._append_ids(ids)
            return
        if ids[0] > self._sorted_ids[-1:].max(initial=-1) and np.all(ids[1:] > ids[:-1]):
            self._index.add(x)
            self._ids = self._sorted_ids = np.concatenate([self._ids, ids])
            return
        logger.debug("ids out of order: re-sorting %d codes by id", len(self) + ids.size)
        all_ids = np.concatenate([self._ids, ids])
        order = np.argsort(all_ids, kind="stable")
        all_codes = np.concatenate([self._codes(), x])[order]
        self._index.reset()
        self._index.add(all_codes)
        self._ids = self._sorted_ids = all_ids[order]

    def _codes(self) -> np.ndarray:
        """The flat index's codes, uint8 (n, code_size), in storage order; a view valid until
        the index changes."""
        n = len(self)
        if not n:
            return np.empty((0, self.code_size), dtype=np.uint8)
        return faiss.rev_swig_ptr(self._index.xb.data(), n * self.code_size).reshape(n, -1)

    def search(self, q, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest codes to each query.

        Parameters
        ----------
        q : uint8 (nq, code_size)
            Packed query codes.
        k : int
            Neighbours per query, >= 1.

        Returns
        -------
        distances : int32 (nq, k)
            Hamming distances, ascending; -1 where fewer than k codes are available.
        ids : int64 (nq, k)
            Ids of the neighbours; ties in ascending id; -1 in padded places.

        Notes
        -----
        From k = 256 on, the flat index ranks with faiss's counting top-k rather than its heap:
        linear in the number of codes per query, so whole rankings (k = ``len(self)``, as
        mAP@all needs) cost about as much as a scan. Results are the same either way.
        """
        q = self._check_codes(q, "q")
        k = check_positive_int(k, name="k")
        nq, n = q.shape[0], len(self)
        if not nq or not n:
            return np.full((nq, k), -1, dtype=np.int32), np.full((nq, k), -1, dtype=np.int64)
        n_threads = resolve_threads(self.n_threads)
        kk = min(k, n)
        counting = kk >= _COUNTING_MIN_K
        if (self.kind == "flat" and _flat_ties_by_position(n_threads)
                and (not counting or _flat_counting_ties_by_position(n_threads))):
            with omp_threads(n_threads):
                dist, pos = _counting_search(self._index, q, kk) if counting else self._index.search(q, kk)
            # Ids 0 .. n-1 (the default numbering; flat storage is in ascending id): positions are ids.
            found = pos if self._ids[0] == 0 and self._ids[-1] == n - 1 else self._ids[pos]
            if kk == k:
                return dist, found
            distances = np.full((nq, k), -1, dtype=np.int32)
            ids = np.full((nq, k), -1, dtype=np.int64)
            distances[:, :kk], ids[:, :kk] = dist, found
            return distances, ids
        if self.kind == "ivf":
            nprobe = DEFAULT_NPROBE if self.nprobe is None else check_positive_int(self.nprobe, name="nprobe")
            self._index.nprobe = min(nprobe, self.nlist_)

        def fetch(rows: np.ndarray, depth: int):
            with omp_threads(n_threads):
                dist, labels = self._index.search(q[rows], depth)
            if self.kind == "flat":
                labels = np.where(labels < 0, -1, self._ids[labels])
            dist, labels = sort_candidates(np.where(labels < 0, np.inf, dist), labels)
            return dist, labels, dist[:, -1]

        return exact_topk(nq, k, n, fetch, depth=2 * k + 16, dtype=np.int32)

    def save(self, path: str | os.PathLike) -> None:
        """Write the index to one file, atomically, with a format version and a checksum.

        Flat indexes store their ids and codes; IVF indexes store their ids and faiss's own
        serialisation of the trained lists (centroids, codes and ids) inside the container.
        """
        header = {"class": "HammingIndex", "n_bits": self.n_bits, "kind": self.kind,
                  "nlist": self.nlist, "nprobe": self.nprobe, "count": len(self)}
        sections = {"ids": self._ids}
        if self.kind == "flat":
            sections["codes"] = self._codes()
        elif self.is_trained:
            sections["ivf"] = faiss.serialize_index_binary(self._index)
        write_container(path, header, sections)

    @classmethod
    def load(cls, path: str | os.PathLike, *, n_bits: int | None = None,
             n_threads: int | None = None) -> HammingIndex:
        """Read an index written by :meth:`save`.

        Parameters
        ----------
        path : path-like
        n_bits : int or None
            If given, the code length the caller expects; a file holding another is refused.
        n_threads : int or None
            As in the constructor (thread counts are a property of the machine, not saved).

        Raises
        ------
        FileNotFoundError
            No file at ``path``.
        ValueError
            Not an index file, another format version, truncated or corrupt (checksum), a
            FloatIndex file, or codes of another length than ``n_bits``.
        """
        header, sections = read_container(path, expected_class="HammingIndex")
        try:
            file_bits, kind, count = int(header["n_bits"]), header["kind"], int(header["count"])
            index = cls(file_bits, kind=kind, nlist=header["nlist"], nprobe=header["nprobe"],
                        n_threads=n_threads)
            ids = sections["ids"]
            payload = sections["codes"] if kind == "flat" else sections.get("ivf")
            if kind == "ivf" and count and payload is None:
                raise KeyError("ivf")
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"path: {str(path)!r} is corrupt (bad HammingIndex header: {exc})") from None
        if n_bits is not None and check_positive_int(n_bits, name="n_bits") != file_bits:
            raise ValueError(f"n_bits: expected an index of {n_bits}-bit codes, but {str(path)!r} "
                             f"holds {file_bits}-bit codes")
        if ids.shape != (count,) or ids.dtype != np.int64:
            raise ValueError(f"path: {str(path)!r} is corrupt (ids of {ids.dtype} {ids.shape} for {count} codes)")
        if payload is not None and payload.dtype != np.uint8:
            raise ValueError(f"path: {str(path)!r} is corrupt (codes of dtype {payload.dtype}, not uint8)")
        if kind == "flat":
            if payload.shape != (count, index.code_size) or np.any(ids[1:] <= ids[:-1]):
                raise ValueError(f"path: {str(path)!r} is corrupt (codes or ids inconsistent)")
            index._index.add(payload)
            index._ids = index._sorted_ids = ids
        elif payload is not None:
            try:
                ivf = faiss.deserialize_index_binary(payload)
            except RuntimeError as exc:
                raise ValueError(f"path: {str(path)!r} is corrupt (faiss could not read the IVF lists: "
                                 f"{exc})") from None
            if not isinstance(ivf, faiss.IndexBinaryIVF) or ivf.d != index._d or ivf.ntotal != count:
                raise ValueError(f"path: {str(path)!r} is corrupt (IVF lists do not match the header)")
            index._index, index.nlist_ = ivf, int(ivf.nlist)
            index._ids, index._sorted_ids = ids, np.sort(ids)
        return index


def _counting_search(index, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """faiss's counting top-k (``hammings_knn_mc``) of ``q`` uint8 (nq, code_size) against the
    codes of a ``faiss.IndexBinaryFlat``; ``k <= index.ntotal``.

    Returns int32 distances (nq, k) and int64 storage positions (nq, k), sorted by (distance,
    position). Queries go in blocks so that faiss's id buckets stay within ``_COUNTING_BUDGET``.
    """
    nq, code_size = q.shape
    dist = np.empty((nq, k), dtype=np.int32)
    pos = np.empty((nq, k), dtype=np.int64)
    step = max(1, _COUNTING_BUDGET // ((8 * code_size + 1) * k * 8))
    for start in range(0, nq, step):
        stop = min(start + step, nq)
        faiss.hammings_knn_mc(faiss.swig_ptr(q[start:stop]), index.xb.data(), stop - start, index.ntotal, k,
                              code_size, faiss.swig_ptr(dist[start:stop]), faiss.swig_ptr(pos[start:stop]))
    return dist, pos


@functools.cache
def _flat_counting_ties_by_position(n_threads: int) -> bool:
    """:func:`_flat_ties_by_position` for faiss's counting top-k (:func:`_counting_search`)."""
    return _check_flat_ties(n_threads, counting=True)


@functools.cache
def _flat_ties_by_position(n_threads: int) -> bool:
    """Whether faiss's IndexBinaryFlat heap search returns the exact (distance, position) top-k;
    see :func:`_check_flat_ties`."""
    return _check_flat_ties(n_threads, counting=False)


def _check_flat_ties(n_threads: int, *, counting: bool) -> bool:
    """Whether faiss's IndexBinaryFlat search (``counting=False``: its heap; True: its counting
    top-k, :func:`_counting_search`) returns the exact (distance, position) top-k.

    faiss scans the database in storage order, in blocks of 65,536 codes; its heap keeps the
    smaller label among equal distances (faiss/utils/Heap.h) and its counting top-k appends
    positions to one bucket per distance in scan order, so both should. Checked once per
    process, path and thread count against a stable brute-force sort, on 4 codes at distances
    0-3 from each other repeated over 66,000 positions, with the k-th place inside a tie group
    that spans the first scan block and the second.
    """
    rng = np.random.default_rng(0)
    distinct = np.zeros((4, 8), dtype=np.uint8)
    distinct[:, -1] = [0x00, 0x01, 0x03, 0x07]
    which = np.full(66_000, 3)
    which[rng.choice(65_536, 50, replace=False)] = 2
    which[65_536:] = rng.integers(1, 3, 66_000 - 65_536)
    which[rng.choice(66_000, 30, replace=False)] = 0
    q = np.concatenate([distinct, rng.integers(0, 256, (1, 8), dtype=np.uint8)])
    index = faiss.IndexBinaryFlat(64)
    index.add(distinct[which])
    popcount = np.array([v.bit_count() for v in range(256)], dtype=np.uint8)
    ref_all = popcount[q[:, None, :] ^ distinct[None, :, :]].sum(axis=2, dtype=np.uint8)[:, which]
    ref_pos = np.argsort(ref_all, axis=1, kind="stable")
    ok = True
    for k in (150, 400):
        with omp_threads(n_threads):
            dist, pos = _counting_search(index, q, k) if counting else index.search(q, k)
        ok &= np.array_equal(pos, ref_pos[:, :k]) and np.array_equal(dist, np.take_along_axis(ref_all, pos, 1))
    if not ok:
        logger.warning("faiss %s does not break Hamming distance ties by position (%s top-k); flat search "
                       "falls back to a deeper search to keep ties in ascending id", faiss.__version__,
                       "counting" if counting else "heap")
    return bool(ok)
