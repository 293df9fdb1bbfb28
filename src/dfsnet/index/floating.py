"""Exact Euclidean and cosine search over float features, on faiss."""
from __future__ import annotations

import logging
import math
import os

import faiss
import numpy as np

from dfsnet._validation import check_array, check_choice, check_positive_int
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

METRICS = ("l2", "cosine")
# float64 values per block of directly computed pairs: small enough to stay in a core's L2 cache.
_PAIR_BLOCK = 1 << 16
# Stored vectors converted to float64 per block of the exhaustive (whole-index) path: large
# enough that the matrix product's calls are few (many small multi-threaded BLAS calls stall
# on a busy machine).
_SCAN_BUDGET = 1 << 21
# (query, vector) distances the exhaustive path ranks at once.
_RANK_BUDGET = 1 << 21


class FloatIndex(BaseIndex):
    """Exact k-nearest-neighbour search over float vectors (faiss ``IndexFlatL2``/``IndexFlatIP``).

    The float counterpart of :class:`~dfsnet.index.HammingIndex`, with the same interface,
    for retrieval on the raw or selected deep features (the paper's Schemes 1 and 2).

    Parameters
    ----------
    dim : int
        Vector length.
    metric : {"l2", "cosine"}
        ``"l2"``: squared Euclidean distance. ``"cosine"``: cosine distance ``1 - cos``; the
        vectors are L2-normalised on the way in (zero vectors are refused) and searched by
        inner product.
    n_threads : int or None
        OpenMP threads faiss uses inside each call; ``None`` means 1, for the reasons given in
        :class:`~dfsnet.index.HammingIndex`.

    Notes
    -----
    faiss computes L2 distances as ``|x|^2 + |y|^2 - 2 x.y`` in float32, whose rounding can
    order identical vectors arbitrarily. The candidates faiss returns are therefore re-ranked
    with distances recomputed directly in float64 (so identical vectors get identical
    distances), sorted by (distance, id), and the search deepens until the k-th distance is
    below faiss's deepest distance by more than faiss's rounding error: results are exact,
    with equal distances in ascending id. Returned distances are those float64 values as
    float32.

    A search that reaches the whole index (k close to ``len(self)``, e.g. the full rankings
    mAP@all needs) skips faiss: distances to every vector come from one float64 matrix product,
    ``|q|^2 + |x|^2 - 2 q.x``, whose rounding error has a proven bound far below float32
    resolution; the few values within that bound of a neighbour's or of a float32 rounding
    boundary are recomputed directly. Ranking and returned distances are the same as the
    direct computation's, at the cost of a matrix product.
    """

    def __init__(self, dim: int, *, metric: str = "l2", n_threads: int | None = None):
        self.dim = check_positive_int(dim, name="dim")
        self.metric = check_choice(metric, METRICS, name="metric")
        resolve_threads(n_threads)
        self.n_threads = n_threads
        self._init_ids()
        self._max_sq_norm = 0.0
        self._sq_norms = None  # float64 squared norms of the stored vectors, once computed
        self._index = faiss.IndexFlatL2(self.dim) if metric == "l2" else faiss.IndexFlatIP(self.dim)

    def __repr__(self) -> str:
        return (f"FloatIndex(dim={self.dim}, metric={self.metric!r}, n_threads={self.n_threads!r}) "
                f"with {len(self)} vectors")

    def _check_vectors(self, x, name: str) -> np.ndarray:
        arr = check_array(x, name=name, ndim=2, dtype=np.float32, min_rows=0)
        if arr.shape[1] != self.dim:
            raise ValueError(f"{name}: expected vectors of dim={self.dim}, got shape {arr.shape}")
        if self.metric == "cosine" and arr.size:
            norms = np.linalg.norm(arr, axis=1, keepdims=True)
            if not norms.all():
                row = int(np.flatnonzero(norms[:, 0] == 0)[0])
                raise ValueError(f"{name}: row {row} is a zero vector, whose cosine distance is undefined")
            arr = arr / norms
        return arr

    def _vectors(self) -> np.ndarray:
        """faiss's stored vectors, float32 (n, dim); a view valid until the next add."""
        n = len(self)
        if not n:
            return np.empty((0, self.dim), dtype=np.float32)
        return faiss.rev_swig_ptr(self._index.get_xb(), n * self.dim).reshape(n, self.dim)

    def add(self, x, ids=None) -> None:
        """Add vectors.

        Parameters
        ----------
        x : float32 (n, dim)
            Finite vectors (other real dtypes are converted).
        ids : int64 (n,) or None
            Non-negative ids, unique and not already in the index. ``None`` numbers the
            vectors after the largest id so far (0, 1, ... in an empty index).
        """
        x = self._check_vectors(x, "x")
        ids = check_new_ids(ids, x.shape[0], self._sorted_ids)
        if not ids.size:
            return
        self._index.add(x)
        self._append_ids(ids)
        self._sq_norms = None
        self._max_sq_norm = max(self._max_sq_norm, float(np.max(np.einsum("ij,ij->i", x, x))))

    def search(self, q, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest vectors to each query.

        Parameters
        ----------
        q : float32 (nq, dim)
            Finite query vectors.
        k : int
            Neighbours per query, >= 1.

        Returns
        -------
        distances : float32 (nq, k)
            Squared L2 or cosine distances, ascending; -1 where fewer than k vectors are
            available.
        ids : int64 (nq, k)
            Ids of the neighbours; ties in ascending id; -1 in padded places.
        """
        q = self._check_vectors(q, "q")
        k = check_positive_int(k, name="k")
        nq, n = q.shape[0], len(self)
        if not nq or not n:
            return np.full((nq, k), -1, dtype=np.float32), np.full((nq, k), -1, dtype=np.int64)
        n_threads = resolve_threads(self.n_threads)
        # A bound on faiss's float32 rounding error, about 20x what was measured at dim 1280.
        scale = np.einsum("ij,ij->i", q, q).astype(np.float64) + self._max_sq_norm
        tolerance = 4 * np.finfo(np.float32).eps * math.sqrt(self.dim) * scale
        vectors = self._vectors()

        def fetch(rows: np.ndarray, depth: int):
            if depth >= n:
                # The whole index: exhaustive float64 ranking, in blocks of queries.
                step = max(1, _RANK_BUDGET // n)
                ranked = [self._rank_all(q[rows[part:part + step]], vectors) for part in range(0, rows.size, step)]
                dist, ids = ranked[0] if len(ranked) == 1 else map(np.concatenate, zip(*ranked))
                return dist, ids, np.full(rows.size, np.inf)
            with omp_threads(n_threads):
                approx, pos = self._index.search(q[rows], depth)
            if self.metric == "cosine":
                approx = 1.0 - approx.astype(np.float64)
            exact = self._exact_distances(q[rows], pos, vectors)
            dist, ids = sort_candidates(exact, np.where(pos < 0, -1, self._ids[pos]))
            bound = np.where(pos[:, -1] < 0, np.inf, approx[:, -1] - tolerance[rows])
            return dist, ids, bound

        return exact_topk(nq, k, n, fetch, depth=k + max(8, k // 8), dtype=np.float32)

    def _rank_all(self, q: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every stored vector ranked for each query, exactly as :meth:`_exact_distances` orders them.

        Parameters
        ----------
        q : ndarray of float32, shape (nq, dim)
            Queries (normalised for cosine).
        vectors : ndarray of float32, shape (n, dim)
            The stored vectors, in storage order.

        Returns
        -------
        dist : ndarray of float64, shape (nq, n)
            Distances sorted ascending; each equals :meth:`_exact_distances`' value where two
            could be confused (within the error bound of each other or of a float32 rounding
            boundary), else is within that bound of it and casts to the same float32.
        ids : ndarray of int64, shape (nq, n)
            Ids, sorted by (distance, id).

        Notes
        -----
        With ``u = 2**-53``, the float64 product ``g = |q|^2 + |x|^2 - 2 q.x`` is within
        ``(dim + 3) u (|q| + |x|)^2`` of the exact distance, and the direct sum of squares is
        within ``(dim + 2) u |q - x|^2`` of it (standard dot-product bounds, any summation
        order); ``tol`` is twice their sum, bounded by ``|q - x|^2 <= (|q| + |x|)^2``.

        The values of ``g`` are sorted in any order; only runs of neighbours closer than ``2 tol``
        can hold ties or be out of order after the direct recomputation, so only those runs are
        then sorted by (distance, id). Every other value is more than ``tol`` from the rest and
        keeps its place.
        """
        n, nq = vectors.shape[0], q.shape[0]
        q64 = q.astype(np.float64)
        g = np.empty((nq, n))
        sq = self._sq_norms
        norms = np.empty(n) if sq is None else None
        # One float64 block reused: converting into fresh arrays cost more than the product.
        step = max(1, _SCAN_BUDGET // self.dim)
        block = np.empty((min(step, n), self.dim))
        for start in range(0, n, step):
            part = block[:min(step, n - start)]
            np.copyto(part, vectors[start:start + step])
            if sq is None:
                np.einsum("ij,ij->i", part, part, out=norms[start:start + step])
            np.matmul(q64, part.T, out=g[:, start:start + step])
        if sq is None:
            # Kept until the next add: every search of the whole index needs them.
            sq = self._sq_norms = norms
        q_sq = np.einsum("ij,ij->i", q64, q64)
        if self.metric == "l2":
            g *= -2.0
            g += sq
            g += q_sq[:, None]
        else:
            np.subtract(1.0, g, out=g)
        np.maximum(g, 0.0, out=g)  # the direct values are never negative
        # One bound per query: the largest stored norm stands for every x.
        u = np.finfo(np.float64).eps / 2
        tol = (2 * (2 * self.dim + 5) * u * (np.sqrt(q_sq) + np.sqrt(sq.max())) ** 2)[:, None]
        # The default (unstable) sort is several times faster than a stable one; the runs
        # below restore the (distance, id) order wherever it matters.
        order = np.argsort(g, axis=1)
        g = np.take_along_axis(g, order, axis=1)
        ids = self._ids[order]
        # Neighbours close enough to be in the other order ...
        close = (g[:, 1:] - g[:, :-1]) <= 2 * tol
        near = np.zeros(g.shape, dtype=bool)
        near[:, 1:] = close
        near[:, :-1] |= close
        # ... and values whose float32 cast the bound does not settle are recomputed directly.
        rows, cols = np.nonzero(near | ((g - tol).astype(np.float32) != (g + tol).astype(np.float32)))
        if rows.size:
            g[rows, cols] = self._exact_pairs(q, rows, vectors, order[rows, cols])
        # Sort each run of near entries by (distance, id); an entry starts a run unless it is
        # close to the one before it.
        flat = np.flatnonzero(near)
        if flat.size:
            starts = near.copy()
            starts[:, 1:] &= ~close
            run = np.cumsum(starts.ravel()[flat])
            g_flat, ids_flat = g.reshape(-1), ids.reshape(-1)
            d_run, i_run = g_flat[flat], ids_flat[flat]
            perm = np.lexsort((i_run, d_run, run))
            g_flat[flat], ids_flat[flat] = d_run[perm], i_run[perm]
        return g, ids

    def _exact_pairs(self, q: np.ndarray, qi: np.ndarray, v: np.ndarray, vi: np.ndarray) -> np.ndarray:
        """float64 (m,) distances between ``q[qi]`` and ``v[vi]`` (rows of float32 (., dim)),
        computed directly (the definition every search result follows).

        Pairs go in blocks small enough for the float64 temporaries to stay in cache; each
        value is the same float64 sum over the row as for any other block size.
        """
        out = np.empty(qi.size)
        step = max(1, _PAIR_BLOCK // self.dim)
        diff = np.empty((min(step, qi.size), self.dim))
        op = np.subtract if self.metric == "l2" else np.multiply
        for start in range(0, qi.size, step):
            part = diff[:min(step, qi.size - start)]
            # dtype: the float32 operands are widened first, as the definition requires.
            op(v[vi[start:start + step]], q[qi[start:start + step]], out=part, dtype=np.float64)
            if self.metric == "l2":
                np.square(part, out=part)
            part.sum(axis=1, out=out[start:start + step])
        if self.metric == "cosine":
            # Rounding in the normalised vectors must not make a distance negative.
            np.subtract(1.0, out, out=out)
            np.maximum(out, 0.0, out=out)
        return out

    def _exact_distances(self, q: np.ndarray, pos: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """float64 (nq, depth) distances from ``q`` to ``vectors[pos]``; inf where pos < 0."""
        out = np.full(pos.shape, np.inf)
        rows, cols = np.nonzero(pos >= 0)
        out[rows, cols] = self._exact_pairs(q, rows, vectors, pos[rows, cols])
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write the index (ids and stored vectors) to one file, atomically, with a format
        version and a checksum."""
        header = {"class": "FloatIndex", "dim": self.dim, "metric": self.metric, "count": len(self)}
        write_container(path, header, {"ids": self._ids, "vectors": self._vectors()})

    @classmethod
    def load(cls, path: str | os.PathLike, *, dim: int | None = None,
             n_threads: int | None = None) -> FloatIndex:
        """Read an index written by :meth:`save`.

        Parameters
        ----------
        path : path-like
        dim : int or None
            If given, the vector length the caller expects; a file holding another is refused.
        n_threads : int or None
            As in the constructor.

        Raises
        ------
        FileNotFoundError
            No file at ``path``.
        ValueError
            Not an index file, another format version, truncated or corrupt (checksum), a
            HammingIndex file, or vectors of another length than ``dim``.
        """
        header, sections = read_container(path, expected_class="FloatIndex")
        try:
            file_dim, count = int(header["dim"]), int(header["count"])
            index = cls(file_dim, metric=header["metric"], n_threads=n_threads)
            ids, vectors = sections["ids"], sections["vectors"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"path: {str(path)!r} is corrupt (bad FloatIndex header: {exc})") from None
        if dim is not None and check_positive_int(dim, name="dim") != file_dim:
            raise ValueError(f"dim: expected an index of {dim}-d vectors, but {str(path)!r} holds "
                             f"{file_dim}-d vectors")
        if (ids.shape != (count,) or vectors.shape != (count, file_dim) or ids.dtype != np.int64
                or vectors.dtype != np.float32):
            raise ValueError(f"path: {str(path)!r} is corrupt (ids or vectors inconsistent with the header)")
        if count:
            index._index.add(vectors)
            index._max_sq_norm = float(np.max(np.einsum("ij,ij->i", vectors, vectors)))
        index._ids, index._sorted_ids = ids, np.sort(ids)
        return index
