"""Pieces shared by the Hamming and float indexes: threads, ids and exact tie order."""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import faiss
import numpy as np

from dfsnet._validation import check_positive_int

logger = logging.getLogger(__name__)

# Result entries (queries x depth) held per deep search; bounds memory when ties force a
# search down to most of a large database.
_RESULT_BUDGET = 1 << 22

# A fetch returns, for some query rows and a depth, the candidates sorted by (distance, id)
# as float64 distances padded with inf and int64 ids padded with -1, plus a lower bound on
# the distance of every item the fetch did not return (inf when it returned them all).
Fetch = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray, np.ndarray]]


def resolve_threads(n_threads) -> int:
    """``n_threads`` as a positive int; ``None`` means 1 (see the index docstrings)."""
    return 1 if n_threads is None else check_positive_int(n_threads, name="n_threads")


@contextlib.contextmanager
def omp_threads(n_threads: int) -> Iterator[None]:
    """Run faiss with ``n_threads`` OpenMP threads, restoring the previous setting after.

    OpenMP's thread count is per calling thread, so this does not disturb other Python
    threads running faiss at the same time.
    """
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n_threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def check_new_ids(ids, n: int, existing_sorted: np.ndarray) -> np.ndarray:
    """Validate the ids of ``n`` new items against the ids already in an index.

    Returns int64 (n,). ``None`` numbers the items after the largest id so far (0, 1, ...
    in an empty index).
    """
    if ids is None:
        start = int(existing_sorted[-1]) + 1 if existing_sorted.size else 0
        return np.arange(start, start + n, dtype=np.int64)
    arr = np.asarray(ids)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"ids: expected integer ids, got dtype {arr.dtype}")
    if arr.shape != (n,):
        raise ValueError(f"ids: expected shape ({n},), one id per added item, got shape {arr.shape}")
    if n == 0:
        return np.empty(0, dtype=np.int64)
    if arr.dtype == np.uint64 and arr.max() > np.iinfo(np.int64).max:
        raise ValueError(f"ids: expected ids below 2**63, got {int(arr.max())}")
    arr = arr.astype(np.int64)
    if arr.min() < 0:
        raise ValueError(f"ids: expected non-negative ids (-1 marks padding in search results), "
                         f"got {int(arr.min())}")
    ordered = np.sort(arr)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    if repeated.size:
        raise ValueError(f"ids: expected unique ids, id {int(repeated[0])} appears more than once")
    if existing_sorted.size:
        pos = np.minimum(np.searchsorted(existing_sorted, ordered), existing_sorted.size - 1)
        clash = ordered[existing_sorted[pos] == ordered]
        if clash.size:
            raise ValueError(f"ids: id {int(clash[0])} is already in the index ({clash.size} clashing id(s))")
    return arr


def sort_candidates(distances: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort every row by (distance, id); padding (distance inf, id -1) goes last."""
    order = np.lexsort((np.where(ids < 0, np.iinfo(np.int64).max, ids), distances), axis=-1)
    return np.take_along_axis(distances, order, -1), np.take_along_axis(ids, order, -1)


def exact_topk(nq: int, k: int, ntotal: int, fetch: Fetch, *, depth: int,
               dtype) -> tuple[np.ndarray, np.ndarray]:
    """The k smallest (distance, id) pairs per query, exact at the k-th distance.

    An approximate-order top-k (faiss's IVF heap, float rounding) may cut a group of equal
    distances anywhere. Each query is fetched ``depth`` deep; it is settled once its k-th
    distance lies strictly below the bound on everything not fetched, so that every item
    that could tie with it is among the candidates. Unsettled queries are fetched again four
    times deeper, down to the whole index.

    Returns distances of ``dtype`` (nq, k) and int64 ids (nq, k), both padded with -1.
    """
    out_d = np.full((nq, k), -1, dtype=dtype)
    out_i = np.full((nq, k), -1, dtype=np.int64)
    rows = np.arange(nq)
    while rows.size:
        depth = min(depth, ntotal)
        kk = min(k, depth)
        unsettled = [rows[:0]]
        step = max(1, _RESULT_BUDGET // depth)
        for start in range(0, rows.size, step):
            sub = rows[start:start + step]
            dist, ids, bound = fetch(sub, depth)
            settled = (dist[:, kk - 1] < bound) | np.isinf(bound) | (depth >= ntotal)
            if settled.all() and sub[-1] - sub[0] + 1 == sub.size and (ids[:, kk - 1] >= 0).all():
                # The usual case (consecutive queries, all settled, no padding): plain slices,
                # without the copies of masked indexing.
                out_d[sub[0]:sub[-1] + 1, :kk] = dist[:, :kk]
                out_i[sub[0]:sub[-1] + 1, :kk] = ids[:, :kk]
                continue
            done = sub[settled]
            top_d, top_i = dist[settled, :kk], ids[settled, :kk]
            out_d[done, :kk] = np.where(top_i < 0, -1, top_d)
            out_i[done, :kk] = top_i
            unsettled.append(sub[~settled])
        rows = np.concatenate(unsettled)
        if rows.size:
            logger.debug("distance ties at the k-th result: %d queries searched again %d deep",
                         rows.size, min(4 * depth, ntotal))
        depth *= 4
    return out_d, out_i


class BaseIndex:
    """Id bookkeeping shared by the indexes.

    ``_ids`` maps faiss storage positions to ids (insertion order, or ascending for the flat
    Hamming index); ``_sorted_ids`` is the same set in ascending order.
    """

    n_threads: int | None

    def _init_ids(self) -> None:
        self._ids = np.empty(0, dtype=np.int64)
        self._sorted_ids = self._ids

    def __len__(self) -> int:
        return int(self._ids.size)

    @property
    def ids(self) -> np.ndarray:
        """int64 (n,): the ids of the added items, ascending (a read-only view)."""
        view = self._sorted_ids.view()
        view.flags.writeable = False
        return view

    def _append_ids(self, ids: np.ndarray) -> None:
        self._ids = np.concatenate([self._ids, ids])
        # A stable sort merges the two sorted runs in linear time.
        self._sorted_ids = np.sort(np.concatenate([self._sorted_ids, np.sort(ids)]), kind="stable")

    def _threads(self):
        return omp_threads(resolve_threads(self.n_threads))
