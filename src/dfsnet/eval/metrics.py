"""Retrieval metrics: average precision, mAP (@all and @k), precision/recall at k, PR curves.

Two layers:

* Per-ranking functions (:func:`average_precision`, :func:`precision_at_k`,
  :func:`recall_at_k`, :func:`precision_recall_curve`) take a 0/1 relevance vector already in
  rank order, shape ``(n,)``, or a batch of them, shape ``(nq, n)``.
* Query-set functions (:func:`mean_average_precision`, :func:`hamming_map`,
  :func:`euclidean_map`) take labels plus distances, rankings, codes or features, rank the
  database for every query and average over queries, working in query blocks so memory stays
  bounded.

Relevance: with single-label data (int labels, shape ``(n,)``) a database item is relevant to a
query when the labels are equal; with multi-label data (0/1 matrices, shape ``(n, c)``) when
they share at least one label.

Definitions
-----------
AP@all ranks the whole database, drops no item, and divides the sum of the precisions at the
ranks of the relevant items by the number of relevant items in the database. A query with no
relevant item scores 0 and still counts in the mean.

AP@k follows DeepHash-pytorch's ``CalcTopMap``: the sum of the precisions at the ranks of the
relevant items found in the top ``k``, divided by the number of relevant items found in the top
``k`` (not by ``min(k, R)``); 0 when none is found. With ``k >= n_db`` it equals AP@all.

Ties
----
Hamming distances take only ``n_bits + 1`` values, so thousands of database items tie, and the
order inside a tie can move AP by points, e.g. per class when the database is stored class by
class (see benchmarks/bench_map.py).

``ties="stable"``
    Items at equal distance are ranked in database order (ascending database index), i.e. a
    stable sort on the distance. Deterministic, and the order ``dfsnet.index`` returns ties in.
``ties="expected"``
    The exact expectation of the metric when the order inside every tied group is uniformly
    random (McSherry & Najork, ECIR 2008), in closed form. For a tied group at ranks
    ``a+1 .. a+t`` holding ``r`` relevant items, with ``R_b`` relevant items ranked before it,
    the expected sum of the precisions at its relevant items is::

        r/t * [ (R_b + 1) * dH + (r - 1)/(t - 1) * (t - (a + 1) * dH) ],  dH = H(a+t) - H(a)

    (``H`` the harmonic numbers; the second term is 0 for ``t = 1``). AP@all is linear in these
    sums. For AP@k a tied group can straddle the cut-off: only its first ``m = k - a`` ranks are
    inside, and the number ``h`` of relevant items among them is hypergeometric (``t`` items,
    ``r`` relevant, ``m`` drawn). Since AP@k divides by the number of hits, ``ties="expected"``
    AP@k is defined as the exact expectation of the DeepHash AP@k over the random orders, i.e.
    ``sum_h P(h) * (S_before + E[S_m | h]) / (R_b + h)``, where ``E[S_m | h]`` is the formula
    above for a group of ``m`` ranks holding ``h`` relevant items and a term with
    ``R_b + h = 0`` is 0. ``MapResult.precision_at_k`` uses the expected number of hits,
    ``R_b + m * r / t``.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from dfsnet._validation import check_array, check_choice, check_codes, check_labels, check_positive_int
from dfsnet.errors import InputError
from dfsnet.hashing.bits import code_words, popcount

__all__ = [
    "TIES",
    "MapResult",
    "average_precision",
    "precision_at_k",
    "recall_at_k",
    "precision_recall_curve",
    "mean_average_precision",
    "hamming_map",
    "euclidean_map",
    "search_map",
    "leave_one_out_map",
]

logger = logging.getLogger(__name__)

TIES = ("stable", "expected")

# Query blocks of this many rows keep the (block, n_db) distance matrix in the CPU cache's
# reach; measured on 54k database items, 16-32 rows ran 3-4x faster than 256.
_HAMMING_BLOCK = 32
# Working-set budget per block for float distances (float distances + int64 order + masks).
_FLOAT_BLOCK_BYTES = 64 << 20


@dataclass(frozen=True, eq=False)
class MapResult:
    """Mean average precision over a query set.

    Attributes
    ----------
    map : float
        Mean of ``per_query``.
    per_query : ndarray of float64, shape (nq,)
        AP (or AP@k) of every query.
    seconds : float
        Wall time of the computation (distances, ranking and scoring).
    k : int or None
        Cut-off; None for mAP@all.
    ties : str
        Tie mode used, ``"stable"`` or ``"expected"``.
    precision_at_k : float or None
        Mean precision@k over the queries when ``k`` is set (expected precision with
        ``ties="expected"``), else None.
    """

    map: float
    per_query: np.ndarray = field(repr=False)
    seconds: float
    k: int | None = None
    ties: str = "stable"
    precision_at_k: float | None = None


# --------------------------------------------------------------------------- per ranking


def _check_relevance(relevance, name: str = "relevance") -> tuple[np.ndarray, bool]:
    """Return relevance as bool (nq, n) and whether the input was a single ranking."""
    try:
        arr = np.asarray(relevance)
    except ValueError as exc:  # ragged nested lists
        raise TypeError(f"{name}: expected an array-like, got {type(relevance).__name__} ({exc})") from None
    if arr.ndim not in (1, 2):
        raise ValueError(f"{name}: expected shape (n,) or (nq, n), got shape {arr.shape}")
    if arr.shape[-1] == 0:
        raise ValueError(f"{name}: expected at least one ranked item, got shape {arr.shape}")
    single = arr.ndim == 1
    arr = check_array(arr.reshape(1, -1) if single else arr, name=name, dtype=None)
    if arr.dtype != np.bool_:
        if not np.isin(arr, (0, 1)).all():
            bad = arr[~np.isin(arr, (0, 1))][0]
            raise ValueError(f"{name}: expected 0/1 relevance values, found {bad.item()!r}")
        arr = arr.astype(bool)
    return arr, single


def _check_n_relevant(n_relevant, rel: np.ndarray) -> np.ndarray:
    found = rel.sum(axis=1)
    if n_relevant is None:
        return found
    n_rel = np.asarray(n_relevant)
    if n_rel.ndim == 0:
        n_rel = np.full(found.shape, n_rel)
    if (n_rel.shape != found.shape or not np.issubdtype(n_rel.dtype, np.integer)
            or (n_rel < found).any()):
        raise ValueError(
            f"n_relevant: expected an int or {found.shape[0]} ints, each >= the relevant items in "
            f"its ranking, got {n_relevant!r}"
        )
    return n_rel.astype(np.int64)


def _out(values: np.ndarray, single: bool):
    return float(values[0]) if single else values


def average_precision(relevance, *, k: int | None = None):
    """Average precision of one ranking or of a batch of rankings.

    Parameters
    ----------
    relevance : array-like of bool or {0, 1}, shape (n,) or (nq, n)
        Relevance of the ranked items, best first. For AP@all this must be the whole ranked
        database (the normaliser is the number of relevant items in it).
    k : int, optional
        Cut-off. AP@k follows DeepHash-pytorch: the mean of the precisions at the relevant
        items found in the top ``k`` (0 when none is found). None ranks everything.

    Returns
    -------
    float, or ndarray of float64 with shape (nq,) for 2-D input
    """
    rel, single = _check_relevance(relevance)
    if k is not None:
        k = check_positive_int(k, name="k")
    ap, _ = _stable_scores(rel, rel.sum(axis=1), k)
    return _out(ap, single)


def precision_at_k(relevance, k: int):
    """Fraction of the top ``k`` ranked items that are relevant.

    Parameters
    ----------
    relevance : array-like of bool or {0, 1}, shape (n,) or (nq, n)
        Relevance of the ranked items, best first.
    k : int
        Cut-off. When ``k > n`` the missing ranks count as not relevant (divides by ``k``).

    Returns
    -------
    float, or ndarray of float64 with shape (nq,) for 2-D input
    """
    rel, single = _check_relevance(relevance)
    k = check_positive_int(k, name="k")
    return _out(rel[:, :k].sum(axis=1) / k, single)


def recall_at_k(relevance, k: int, *, n_relevant=None):
    """Fraction of all relevant items that appear in the top ``k``.

    Parameters
    ----------
    relevance : array-like of bool or {0, 1}, shape (n,) or (nq, n)
        Relevance of the ranked items, best first.
    k : int
        Cut-off.
    n_relevant : int or array-like of int with shape (nq,), optional
        Total number of relevant items per query, for truncated rankings. Defaults to the
        number found in ``relevance``. Recall is 0 for a query with no relevant item.

    Returns
    -------
    float, or ndarray of float64 with shape (nq,) for 2-D input
    """
    rel, single = _check_relevance(relevance)
    k = check_positive_int(k, name="k")
    n_rel = _check_n_relevant(n_relevant, rel)
    hits = rel[:, :k].sum(axis=1)
    return _out(_safe_divide(hits, n_rel), single)


def precision_recall_curve(relevance, *, n_relevant=None):
    """Precision and recall at every rank cut-off ``1 .. n``.

    Parameters
    ----------
    relevance : array-like of bool or {0, 1}, shape (n,) or (nq, n)
        Relevance of the ranked items, best first.
    n_relevant : int or array-like of int with shape (nq,), optional
        Total number of relevant items per query (default: the number in ``relevance``).

    Returns
    -------
    precision, recall : ndarray of float64, shape (n,) or (nq, n)
        Entry ``i`` is the value at cut-off ``i + 1``. Average over axis 0 for a mean curve.
    """
    rel, single = _check_relevance(relevance)
    n_rel = _check_n_relevant(n_relevant, rel)
    hits = np.cumsum(rel, axis=1, dtype=np.float64)
    precision = hits / np.arange(1, rel.shape[1] + 1)
    recall = _safe_divide(hits, n_rel[:, None].astype(np.float64))
    if single:
        return precision[0], recall[0]
    return precision, recall


# --------------------------------------------------------------------------- scoring kernels


def _nonzero_2d(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.nonzero`` of a 2-D bool array; flat indices are ~3x faster to find than pairs."""
    rows, cols = np.divmod(np.flatnonzero(mask), mask.shape[1])
    return rows, cols


def _safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast_shapes(num.shape, np.shape(den))), where=den > 0)


def _stable_scores(rel_sorted: np.ndarray, n_rel: np.ndarray, k: int | None) -> tuple[np.ndarray, np.ndarray]:
    """AP (or DeepHash AP@k) and hits@k of rankings given as bool (B, L) in rank order.

    Only the positions of the relevant items matter: the m-th hit at 0-based rank c adds
    m / (c + 1).
    """
    if k is not None:
        rel_sorted = rel_sorted[:, :k]
    n_rows, n = rel_sorted.shape
    # Flat hit indices are sorted by row, so row boundaries come from a binary search rather
    # than per-hit division and bincount.
    flat = np.flatnonzero(rel_sorted)
    starts = np.searchsorted(flat, np.arange(n_rows) * n)
    hits = np.diff(starts, append=flat.size)
    m = np.arange(1, flat.size + 1) - np.repeat(starts, hits)
    cols = flat - np.repeat(np.arange(n_rows) * n, hits)
    sums = np.zeros(n_rows)
    found = hits > 0
    if found.any():
        sums[found] = np.add.reduceat(m / (cols + 1.0), starts[found])
    return _safe_divide(sums, hits if k is not None else n_rel), hits.astype(np.float64)


class _Tables:
    """Harmonic numbers H(0..n) and log-factorials log(0..n!) as float64 lookup tables."""

    def __init__(self, n: int) -> None:
        self.harmonic = np.concatenate(([0.0], np.cumsum(1.0 / np.arange(1, n + 1))))
        from scipy.special import gammaln  # here: scipy.special costs 0.2 s of the CLI's start-up

        self.log_factorial = gammaln(np.arange(n + 1) + 1.0)

    def log_comb(self, n: np.ndarray, x: np.ndarray) -> np.ndarray:
        lf = self.log_factorial
        return lf[n] - lf[x] - lf[n - x]


def _expected_group_sum(a, t, r, rb, tables: _Tables) -> np.ndarray:
    """E[sum of precisions at the relevant items] of tied groups at ranks a+1..a+t.

    All arguments are arrays of the same shape: ``a`` items ranked before the group, ``t`` its
    size, ``r`` relevant items in it, ``rb`` relevant items ranked before it.
    """
    a = np.asarray(a, dtype=np.int64)
    t = np.asarray(t, dtype=np.int64)
    dh = tables.harmonic[a + t] - tables.harmonic[a]
    # The second term is E[#relevant earlier in the group | item j relevant] = (j-1)(r-1)/(t-1).
    coef = np.divide(r - 1.0, t - 1.0, out=np.zeros(np.shape(t)), where=t > 1)
    return _safe_divide(np.asarray(r, np.float64), t) * ((rb + 1.0) * dh + coef * (t - (a + 1.0) * dh))


def _expected_scores(row, a, t, r, rb, n_rel, n_rows: int, k: int | None, tables: _Tables):
    """Expected AP (or AP@k) and expected hits@k from tied groups.

    ``row, a, t, r, rb`` are int arrays of shape (G,) describing every non-empty tied group
    (its query row, the number of items ranked before it, its size, its relevant items and the
    relevant items before it); ``n_rel`` int (n_rows,) is the number of relevant items per row.
    """
    if k is None:
        sums = np.bincount(row, weights=_expected_group_sum(a, t, r, rb, tables), minlength=n_rows)
        return _safe_divide(sums, n_rel), n_rel.astype(np.float64)
    inside = a + t <= k
    s_before = np.bincount(row[inside], weights=_expected_group_sum(
        a[inside], t[inside], r[inside], rb[inside], tables), minlength=n_rows)
    hits_before = np.bincount(row[inside], weights=r[inside], minlength=n_rows).astype(np.float64)
    ap = _safe_divide(s_before, hits_before)
    hits = hits_before.copy()

    cut = (a < k) & ~inside  # at most one group per row straddles the cut-off
    if cut.any():
        rows = row[cut]
        ac, tc, rc, rbc = a[cut], t[cut], r[cut], rb[cut].astype(np.float64)
        m = k - ac
        hits[rows] += m * rc / tc
        lo = np.maximum(0, m - (tc - rc))
        hi = np.minimum(rc, m)
        h = lo[:, None] + np.arange(int((hi - lo).max()) + 1)[None, :]
        valid = h <= hi[:, None]
        h = np.where(valid, h, hi[:, None])
        # Hypergeometric P(h relevant among the m ranks inside the cut-off), renormalised to
        # cancel the rounding of the log-gamma terms.
        pmf = np.exp(tables.log_comb(rc[:, None], h) + tables.log_comb((tc - rc)[:, None], m[:, None] - h)
                     - tables.log_comb(tc, m)[:, None]) * valid
        pmf /= pmf.sum(axis=1, keepdims=True)
        shape = h.shape
        part = _expected_group_sum(np.broadcast_to(ac[:, None], shape), np.broadcast_to(m[:, None], shape),
                                   h, np.broadcast_to(rbc[:, None], shape), tables)
        den = rbc[:, None] + h
        value = _safe_divide(s_before[rows][:, None] + part, den)
        ap[rows] = (pmf * value).sum(axis=1)
    return ap, hits


def _segment_exclusive_cumsum(values: np.ndarray, row: np.ndarray, n_rows: int) -> np.ndarray:
    """Per-row exclusive cumulative sum of ``values`` (int (G,), sorted by ``row``, no empty row)."""
    excl = np.cumsum(values) - values
    counts = np.bincount(row, minlength=n_rows)
    first = np.cumsum(counts) - counts
    return excl - excl[first][row]


def _groups_from_sorted(d_sorted: np.ndarray, rel_sorted: np.ndarray):
    """Tied groups (row, a, t, r, rb) from distances and relevance sorted per row."""
    n_rows, n = d_sorted.shape
    boundary = np.ones((n_rows, n), dtype=bool)
    np.not_equal(d_sorted[:, 1:], d_sorted[:, :-1], out=boundary[:, 1:])
    row, a = _nonzero_2d(boundary)
    gid = np.cumsum(boundary.ravel()) - 1
    t = np.bincount(gid, minlength=row.size)
    r = np.bincount(gid[rel_sorted.ravel()], minlength=row.size)
    return row, a, t, r, _segment_exclusive_cumsum(r, row, n_rows)


def _groups_from_buckets(d: np.ndarray, rel: np.ndarray, n_values: int):
    """Tied groups of small non-negative integer distances, counted without sorting.

    Every distance value is one group; one ``bincount`` over ``(row, distance, relevant)``
    gives the size and the relevant count of every group.
    """
    n_rows = d.shape[0]
    key = d.astype(np.intp)
    key *= 2
    key += rel
    key += (np.arange(n_rows, dtype=np.intp) * (2 * n_values))[:, None]
    counts = np.bincount(key.ravel(), minlength=2 * n_values * n_rows).reshape(n_rows, n_values, 2)
    t = counts.sum(axis=2)
    r = counts[:, :, 1]
    a = np.cumsum(t, axis=1) - t
    rb = np.cumsum(r, axis=1) - r
    row, value = np.nonzero(t)
    return row, a[row, value], t[row, value], r[row, value], rb[row, value]


# --------------------------------------------------------------------------- labels


class _Relevance:
    """Relevance of database items to blocks of queries, single- or multi-label."""

    def __init__(self, query_labels, db_labels, n_queries: int | None = None, n_db: int | None = None):
        q = check_labels(query_labels, n_queries, name="query_labels")
        db = check_labels(db_labels, n_db, name="db_labels")
        for name, lab in (("query_labels", q), ("db_labels", db)):
            if lab.shape[0] == 0:
                raise ValueError(f"{name}: expected at least one item, got shape {lab.shape}")
        if q.ndim != db.ndim or (q.ndim == 2 and q.shape[1] != db.shape[1]):
            raise ValueError(
                "query_labels, db_labels: expected the same kind of labels (both (n,) single-label "
                f"or both (n, c) multi-label with equal c), got shapes {q.shape} and {db.shape}"
            )
        self.multilabel = q.ndim == 2
        if self.multilabel:
            for name, lab in (("query_labels", q), ("db_labels", db)):
                if not np.isin(lab, (0, 1)).all():
                    raise ValueError(f"{name}: expected a 0/1 multi-label matrix, found other values")
            self.query = q.astype(np.float32)
            self.db_t = np.ascontiguousarray(db.T.astype(np.float32))
        else:
            # Compact codes make the per-rank label gather a lookup in a cache-sized table.
            classes, codes = np.unique(np.concatenate([q, db]), return_inverse=True)
            dtype = np.min_scalar_type(max(classes.size - 1, 0))
            self.query = codes[: q.size].astype(dtype)
            self.db = codes[q.size:].astype(dtype)
            self.class_counts = np.bincount(self.db, minlength=classes.size)
        self.n_queries = q.shape[0]
        self.n_db = db.shape[0]

    def block(self, rows: slice) -> np.ndarray:
        """Relevance matrix, bool (B, n_db)."""
        if self.multilabel:
            return (self.query[rows] @ self.db_t) > 0
        return self.db[None, :] == self.query[rows, None]

    def n_relevant(self, rows: slice, rel: np.ndarray | None = None) -> np.ndarray:
        """Relevant database items per query, int64 (B,); ``rel`` is ``block(rows)`` if known."""
        if not self.multilabel:
            return self.class_counts[self.query[rows]]
        return (self.block(rows) if rel is None else rel).sum(axis=1)

    def ranked(self, rows: slice, order: np.ndarray, rel: np.ndarray | None = None) -> np.ndarray:
        """Relevance in rank order, bool (B, L), for database indices ``order`` int (B, L)."""
        if self.multilabel:
            return np.take_along_axis(self.block(rows) if rel is None else rel, order, axis=1)
        return self.db[order] == self.query[rows, None]


# --------------------------------------------------------------------------- query-set engine


def _check_ties(ties: str) -> str:
    return check_choice(ties, TIES, name="ties")


def _check_k(k):
    return None if k is None else check_positive_int(k, name="k")


def _score_distance_block(d, labels: _Relevance, rows: slice, ks, ties, tables, n_values=None):
    """Score one query block for every cut-off in ``ks``; returns {k: (ap, hits)}.

    ``d`` (B, n_db) distances of the queries ``rows`` (any real dtype; ``n_values`` is set when
    they are integers in ``0 .. n_values-1``, which allows the sort-free path for expected ties).
    """
    n_rows, n = d.shape
    out = {}
    if ties == "expected":
        rel = labels.block(rows)
        if n_values is not None:
            groups = _groups_from_buckets(d, rel, n_values)
        else:
            order = np.argsort(d, axis=1, kind="stable")
            groups = _groups_from_sorted(np.take_along_axis(d, order, axis=1), labels.ranked(rows, order, rel))
        n_rel = labels.n_relevant(rows, rel)
        for k in ks:
            out[k] = _expected_scores(*groups, n_rel, n_rows, None if k is None or k >= n else k, tables)
        return out
    # Stable sort: radix sort for uint8/uint16 distances, so O(n) per query for Hamming codes.
    order = np.argsort(d, axis=1, kind="stable")
    width = n if None in ks else min(max(ks), n)
    rel = labels.block(rows) if labels.multilabel else None  # single-label gathers labels instead
    rel_sorted = labels.ranked(rows, order[:, :width], rel)
    n_rel = labels.n_relevant(rows, rel)
    for k in ks:
        out[k] = _stable_scores(rel_sorted, n_rel, k)
    return out


class _Accumulator:
    def __init__(self, ks, n_queries: int):
        self.ks = ks
        self.ap = {k: np.zeros(n_queries) for k in ks}
        self.hits = {k: np.zeros(n_queries) for k in ks}

    def add(self, rows: slice, scores) -> None:
        for k, (ap, hits) in scores.items():
            self.ap[k][rows] = ap
            self.hits[k][rows] = hits

    def results(self, seconds: float, ties: str) -> dict:
        out = {}
        for k in self.ks:
            p_at_k = None if k is None else float(np.mean(self.hits[k] / k))
            out[k] = MapResult(map=float(self.ap[k].mean()), per_query=self.ap[k], seconds=seconds,
                               k=k, ties=ties, precision_at_k=p_at_k)
        return out


def _blocks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _check_block_size(block_size, default: int) -> int:
    return default if block_size is None else check_positive_int(block_size, name="block_size")


def mean_average_precision(query_labels, db_labels, *, distances=None, rankings=None, k=None,
                           ties="stable") -> float:
    """Mean average precision of a query set from distances or rankings.

    Parameters
    ----------
    query_labels : array-like of int, shape (nq,), or 0/1 matrix, shape (nq, c)
    db_labels : array-like of int, shape (n_db,), or 0/1 matrix, shape (n_db, c)
        Single-label: relevant means equal labels. Multi-label: relevant means sharing at least
        one label.
    distances : array-like of real, shape (nq, n_db), optional
        Query-to-database distances, smaller is closer; must be finite.
    rankings : array-like of int, shape (nq, L), optional
        Database indices per query, best first. For mAP@all every row must be a permutation of
        ``range(n_db)``; for mAP@k rows need ``L >= min(k, n_db)`` distinct indices. Exactly one
        of ``distances`` and ``rankings`` is required.
    k : int, optional
        Cut-off; None is mAP@all. mAP@k follows DeepHash-pytorch (AP over the relevant items
        found in the top ``k``, 0 when none); see the module docstring.
    ties : {"stable", "expected"}
        Order inside equal distances: ``"stable"`` is database order (ascending index),
        ``"expected"`` the exact expectation over random orders (McSherry & Najork 2008).
        Rankings carry no ties, so ``"expected"`` requires ``distances``.

    Returns
    -------
    float
        The mean over all queries; queries with no relevant item count as 0.
    """
    _check_ties(ties)
    k = _check_k(k)
    if (distances is None) == (rankings is None):
        raise ValueError("distances, rankings: expected exactly one of them, got "
                         f"{'both' if distances is not None else 'neither'}")
    labels = _Relevance(query_labels, db_labels)
    nq, n_db = labels.n_queries, labels.n_db
    if rankings is not None:
        if ties == "expected":
            raise ValueError("ties: 'expected' needs distances (a ranking has no ties); "
                             "use ties='stable' with rankings")
        ranks = _check_rankings(rankings, nq, n_db, k)
        ap = np.empty(nq)
        for rows in _blocks(nq, max(1, _FLOAT_BLOCK_BYTES // (9 * ranks.shape[1]))):
            rel_sorted = labels.ranked(rows, ranks[rows])
            ap[rows] = _stable_scores(rel_sorted, labels.n_relevant(rows), k)[0]
        return float(ap.mean())
    dist = check_array(distances, name="distances", dtype=None)
    if dist.shape != (nq, n_db):
        raise ValueError(f"distances: expected shape (n_queries, n_db) = {(nq, n_db)}, got {dist.shape}")
    if dist.dtype == np.bool_:
        dist = dist.astype(np.uint8)
    acc = _Accumulator([k], nq)
    tables = _Tables(n_db)
    for rows in _blocks(nq, max(1, _FLOAT_BLOCK_BYTES // (24 * n_db))):
        acc.add(rows, _score_distance_block(dist[rows], labels, rows, [k], ties, tables))
    return float(acc.ap[k].mean())


def _check_rankings(rankings, nq: int, n_db: int, k: int | None) -> np.ndarray:
    ranks = check_array(rankings, name="rankings", dtype=None)
    if not np.issubdtype(ranks.dtype, np.integer):
        raise TypeError(f"rankings: expected integer database indices, got dtype {ranks.dtype}")
    need = n_db if k is None else min(k, n_db)
    if ranks.shape[0] != nq or ranks.shape[1] < need:
        raise ValueError(
            f"rankings: expected shape ({nq}, >= {need}) "
            f"({'every database item for mAP@all' if k is None else f'the top {need} per query'}), "
            f"got {ranks.shape}"
        )
    if ranks.min() < 0 or ranks.max() >= n_db:
        raise ValueError(f"rankings: expected indices in [0, {n_db}), found values in "
                         f"[{ranks.min()}, {ranks.max()}]")
    ranks = ranks[:, :n_db] if k is None else ranks[:, :need]
    srt = np.sort(ranks, axis=1)
    dup = np.nonzero((srt[:, 1:] == srt[:, :-1]).any(axis=1))[0]
    if dup.size:
        raise ValueError(f"rankings: expected distinct database indices per row, "
                         f"row {int(dup[0])} repeats an index")
    return ranks.astype(np.intp)


def hamming_map(query_codes, db_codes, query_labels, db_labels, *, k=None, ties="stable",
                block_size=None) -> MapResult:
    """mAP of Hamming ranking with packed binary codes, computed in query blocks.

    Distances are popcounts of XORed 64-bit words. With ``ties="stable"`` each query's
    distances (uint8, or uint16 beyond 255 bits) are ordered by numpy's stable radix sort, which
    is linear in ``n_db``; with ``ties="expected"`` no sort is needed at all, only per-distance
    counts of all and of relevant items (one ``bincount``).

    Parameters
    ----------
    query_codes : ndarray of uint8, shape (nq, n_bytes)
    db_codes : ndarray of uint8, shape (n_db, n_bytes)
        Packed codes (``numpy.packbits`` order, see ``dfsnet.hashing.pack_bits``); unused
        padding bits must be equal (zero) in both.
    query_labels : array-like of int, shape (nq,), or 0/1 matrix, shape (nq, c)
    db_labels : array-like of int, shape (n_db,), or 0/1 matrix, shape (n_db, c)
    k : int, optional
        Cut-off for mAP@k (DeepHash-pytorch definition, see :func:`mean_average_precision`);
        None for mAP@all.
    ties : {"stable", "expected"}
        See the module docstring.
    block_size : int, optional
        Queries per block; the default keeps a block's distances cache-sized. Working memory
        is about ``block_size * n_db * 20`` bytes.

    Returns
    -------
    MapResult
    """
    k = _check_k(k)
    return _hamming_scores(query_codes, db_codes, query_labels, db_labels, ks=[k], ties=ties,
                           block_size=block_size)[k]


def _hamming_scores(query_codes, db_codes, query_labels, db_labels, *, ks, ties, block_size):
    """:func:`hamming_map` for several cut-offs from one pass; returns {k: MapResult}."""
    _check_ties(ties)
    start = time.perf_counter()
    q = check_codes(query_codes, name="query_codes")
    db = check_codes(db_codes, name="db_codes")
    if q.shape[1] != db.shape[1]:
        raise ValueError(f"query_codes, db_codes: expected the same code width, got {q.shape[1]} "
                         f"and {db.shape[1]} bytes")
    labels = _Relevance(query_labels, db_labels, q.shape[0], db.shape[0])
    block = _check_block_size(block_size, _HAMMING_BLOCK)
    n_bits = 8 * q.shape[1]
    dtype = np.uint8 if n_bits <= np.iinfo(np.uint8).max else np.uint16
    qw, dbw = code_words(q), code_words(db)
    xor = np.empty((block, db.shape[0]), dtype=np.uint64)
    count = np.empty((block, db.shape[0]), dtype=dtype)
    dist = np.empty((block, db.shape[0]), dtype=dtype)
    tables = _Tables(db.shape[0])
    acc = _Accumulator(ks, q.shape[0])
    for rows in _blocks(q.shape[0], block):
        b = rows.stop - rows.start
        d = dist[:b]
        for w in range(qw.shape[0]):
            np.bitwise_xor(qw[w, rows, None], dbw[w][None, :], out=xor[:b])
            if w == 0:
                popcount(xor[:b], out=d)
            else:
                d += popcount(xor[:b], out=count[:b])
        scores = _score_distance_block(d, labels, rows, ks, ties, tables, n_values=n_bits + 1)
        acc.add(rows, scores)
    seconds = time.perf_counter() - start
    logger.debug("hamming mAP of %d queries x %d items, %d bits, ties=%s: %.3f s",
                 q.shape[0], db.shape[0], n_bits, ties, seconds)
    return acc.results(seconds, ties)


def euclidean_map(query_feats, db_feats, query_labels, db_labels, *, k=None, ties="stable",
                  metric="l2", block_size=None) -> MapResult:
    """mAP of exhaustive float-feature ranking, computed in query blocks.

    Parameters
    ----------
    query_feats : array-like of float, shape (nq, d)
    db_feats : array-like of float, shape (n_db, d)
        Finite features; computed in float32 as ``|x|^2 - 2 q.x`` (the ``|q|^2`` term is the
        same for every item and does not change the ranking).
    query_labels : array-like of int, shape (nq,), or 0/1 matrix, shape (nq, c)
    db_labels : array-like of int, shape (n_db,), or 0/1 matrix, shape (n_db, c)
    k : int, optional
        Cut-off for mAP@k (DeepHash-pytorch definition); None for mAP@all.
    ties : {"stable", "expected"}
        Exact float ties only (duplicate items); see the module docstring.
    metric : {"l2", "cosine"}
        ``"cosine"`` ranks by cosine similarity (L2 on unit-normalised features).
    block_size : int, optional
        Queries per block (default: a ~64 MB working set).

    Returns
    -------
    MapResult
    """
    k = _check_k(k)
    return _euclidean_scores(query_feats, db_feats, query_labels, db_labels, ks=[k], ties=ties,
                             metric=metric, block_size=block_size)[k]


def _euclidean_scores(query_feats, db_feats, query_labels, db_labels, *, ks, ties, metric="l2",
                      block_size=None):
    """:func:`euclidean_map` for several cut-offs from one pass; returns {k: MapResult}."""
    _check_ties(ties)
    check_choice(metric, ("l2", "cosine"), name="metric")
    start = time.perf_counter()
    q = check_array(query_feats, name="query_feats")
    db = check_array(db_feats, name="db_feats")
    if q.shape[1] != db.shape[1]:
        raise ValueError(f"query_feats, db_feats: expected the same feature width, got {q.shape[1]} "
                         f"and {db.shape[1]}")
    labels = _Relevance(query_labels, db_labels, q.shape[0], db.shape[0])
    if metric == "cosine":
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), np.finfo(np.float32).tiny)
        db = db / np.maximum(np.linalg.norm(db, axis=1, keepdims=True), np.finfo(np.float32).tiny)
    db_t = np.ascontiguousarray(db.T)
    db_sq = np.einsum("ij,ij->i", db, db)
    block = _check_block_size(block_size, max(1, _FLOAT_BLOCK_BYTES // (24 * db.shape[0])))
    tables = _Tables(db.shape[0])
    acc = _Accumulator(ks, q.shape[0])
    for rows in _blocks(q.shape[0], block):
        d = q[rows] @ db_t
        d *= -2.0
        d += db_sq
        acc.add(rows, _score_distance_block(d, labels, rows, ks, ties, tables))
    seconds = time.perf_counter() - start
    logger.debug("euclidean mAP of %d queries x %d items, dim %d, ties=%s: %.3f s",
                 q.shape[0], db.shape[0], q.shape[1], ties, seconds)
    return acc.results(seconds, ties)


# Ranked entries (queries x database items) :func:`search_map` asks one search call for.
_SEARCH_BLOCK_ENTRIES = 1 << 21
# Integer distances below this are grouped by counting (Hamming distances of up to 4,095 bits).
_MAX_BUCKETS = 1 << 12


def _covers_all(ids: np.ndarray) -> bool:
    """Whether every row of ``ids`` (int, shape (b, n), values in ``[0, n)``) holds every value,
    i.e. is a permutation of ``range(n)`` (a mark per value: cheaper than counting them)."""
    seen = np.zeros(ids.shape, dtype=bool)
    np.put_along_axis(seen, ids, True, axis=1)
    return bool(seen.all())


def search_map(search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]], queries: np.ndarray,
               query_labels, db_labels, *, ks: Sequence[int | None] = (None,),
               ties: Sequence[str] = ("stable",), block_size: int | None = None) -> dict[str, dict]:
    """mAP of the rankings a search function returns, for several cut-offs and tie modes at once.

    ``search`` (e.g. ``HammingIndex.search`` or ``FloatIndex.search`` of an index holding the
    database with ids ``0 .. n_db-1``) is called with blocks of queries and ``k = n_db``; its
    result is scored as returned: ``ties="stable"`` scores the ranking ``ids`` (an index that
    orders equal distances by ascending id gives exactly :func:`hamming_map`'s stable ranking),
    ``ties="expected"`` the expectation over random orders among the items the search puts at
    equal distance (runs of equal adjacent ``distances``; counted per value for small integer
    distances such as Hamming's). Both come from one search per query block.

    Parameters
    ----------
    search : callable ``(q, k) -> (distances, ids)``
        ``q`` is a block of ``queries`` (shape (B, ...)); ``distances`` real, shape (B, n_db),
        ascending; ``ids`` int, shape (B, n_db), database indices, each row a permutation of
        ``range(n_db)`` (checked).
    queries : ndarray, shape (nq, ...)
        What ``search`` takes: packed uint8 codes (nq, n_bytes) or float features (nq, d).
    query_labels : array-like of int, shape (nq,), or 0/1 matrix, shape (nq, c)
    db_labels : array-like of int, shape (n_db,), or 0/1 matrix, shape (n_db, c)
    ks : sequence of int or None
        Cut-offs; None is mAP@all (DeepHash-pytorch mAP@k otherwise, see the module docstring).
    ties : sequence of {"stable", "expected"}
    block_size : int, optional
        Queries per search call (default: about 2M ranked entries per call).

    Returns
    -------
    dict
        ``{tie mode: {k: MapResult}}``; ``MapResult.seconds`` is the wall time of the whole
        call (searches included).

    Raises
    ------
    InputError
        Mismatched lengths, or a search result of the wrong shape or whose ids are not a
        permutation of the database indices.
    """
    start = time.perf_counter()
    modes = [_check_ties(t) for t in ties]
    ks = [_check_k(k) for k in ks]
    queries = np.asarray(queries)
    labels = _Relevance(query_labels, db_labels, queries.shape[0])
    nq, n_db = labels.n_queries, labels.n_db
    block = _check_block_size(block_size, max(1, _SEARCH_BLOCK_ENTRIES // n_db))
    tables = _Tables(n_db) if "expected" in modes else None
    acc = {mode: _Accumulator(ks, nq) for mode in modes}
    for rows in _blocks(nq, block):
        dist, ids = search(queries[rows], n_db)
        dist, ids = np.asarray(dist), np.asarray(ids)
        b = rows.stop - rows.start
        if dist.shape != (b, n_db) or ids.shape != (b, n_db):
            raise InputError(f"search: expected distances and ids of shape {(b, n_db)} (every database item), "
                             f"got {dist.shape} and {ids.shape}")
        if ids.min() < 0 or ids.max() >= n_db or not _covers_all(ids):
            # Cheap next to the scoring: an index that loses or repeats items must not score.
            raise InputError(f"search: expected every row of ids to be a permutation of range({n_db}), the "
                             "database indices")
        rel = labels.block(rows) if labels.multilabel else None
        rel_sorted = labels.ranked(rows, ids, rel)
        n_rel = labels.n_relevant(rows, rel)
        for mode in modes:
            if mode == "stable":
                scores = {k: _stable_scores(rel_sorted, n_rel, k) for k in ks}
            else:
                if np.issubdtype(dist.dtype, np.integer) and dist.min() >= 0 and dist.max() < _MAX_BUCKETS:
                    # Small integer distances (Hamming): the groups are counted per value, without
                    # reading the order (the same groups as the runs of a sorted row).
                    groups = _groups_from_buckets(dist, rel_sorted, int(dist.max()) + 1)
                else:
                    groups = _groups_from_sorted(dist, rel_sorted)
                scores = {k: _expected_scores(*groups, n_rel, b, None if k is None or k >= n_db else k, tables)
                          for k in ks}
            acc[mode].add(rows, scores)
    seconds = time.perf_counter() - start
    logger.debug("mAP of %d queries x %d items from search results, ties=%s: %.3f s", nq, n_db, modes, seconds)
    return {mode: acc[mode].results(seconds, mode) for mode in modes}


def leave_one_out_map(distances, labels, *, k: int | None = None, ties: str = "stable") -> float:
    """mAP of a set searched against itself, each item's own match left out.

    Every item is a query against the other ``n - 1``. Both sides are then unseen by a model
    trained on other data, as queries and database are in use, unlike a search of held-out
    queries against the training items.

    Parameters
    ----------
    distances : array-like of real, shape (n, n)
        Pairwise distances, smaller is closer; the diagonal is ignored.
    labels : array-like of int, shape (n,), or 0/1 matrix, shape (n, c)
    k : int, optional
        Cut-off, capped at ``n - 1``; None is mAP@all over the others.
    ties : {"stable", "expected"}
        As in :func:`mean_average_precision`.

    Returns
    -------
    float
    """
    d = np.array(distances, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] != d.shape[1] or d.shape[0] < 2:
        raise ValueError(f"distances: expected a square (n, n) matrix with n >= 2, got shape {d.shape}")
    np.fill_diagonal(d, 0.0)
    if not np.isfinite(d).all():
        raise ValueError("distances: expected finite values")
    n = d.shape[0]
    # Each item alone at the far end of its own ranking, hence outside its top n - 1; the cut-off
    # n - 1 then scores exactly the others (mAP@k counts the relevant items found in the top k).
    np.fill_diagonal(d, d.max() + 1.0)
    cut = n - 1 if k is None else min(_check_k(k), n - 1)
    return mean_average_precision(labels, labels, distances=d, k=cut, ties=ties)
