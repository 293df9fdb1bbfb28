"""FloatIndex: exact against numpy brute force for both metrics, ties, bad input."""
from __future__ import annotations

import numpy as np
import pytest

from dfsnet.index import FloatIndex, _common, floating


def brute_force(db: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int, metric: str):
    db, q = db.astype(np.float64), q.astype(np.float64)
    if metric == "cosine":
        db = db / np.linalg.norm(db, axis=1, keepdims=True)
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        dist = 1.0 - q @ db.T
    else:
        dist = ((q[:, None, :] - db[None]) ** 2).sum(-1)
    order = np.lexsort((np.broadcast_to(ids, dist.shape), dist), axis=1)[:, :k]
    return np.take_along_axis(dist, order, 1), ids[order]


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_matches_brute_force(rng, metric):
    db = rng.standard_normal((1500, 24)).astype(np.float32) + 0.5
    ids = rng.permutation(1500) + 3
    q = rng.standard_normal((30, 24)).astype(np.float32) + 0.5  # >= 20 queries: faiss's BLAS path
    index = FloatIndex(24, metric=metric)
    index.add(db[:700], ids=ids[:700])
    index.add(db[700:], ids=ids[700:])
    distances, got = index.search(q, 15)
    ref_d, ref_i = brute_force(db, ids, q, 15, metric)
    assert distances.dtype == np.float32 and got.dtype == np.int64
    np.testing.assert_array_equal(got, ref_i)
    np.testing.assert_allclose(distances, ref_d, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("nq", [3, 25])
def test_duplicate_vectors_tie_in_ascending_id(rng, metric, nq):
    distinct = rng.standard_normal((12, 40)).astype(np.float32) * 3 + 1
    db = distinct[rng.integers(0, 12, 1200)]
    ids = rng.permutation(10_000)[:1200]
    index = FloatIndex(40, metric=metric, n_threads=2)
    index.add(db, ids=ids)
    q = np.concatenate([distinct, rng.standard_normal((nq, 40)).astype(np.float32)])[:nq]
    for k in (1, 37, 250):
        distances, got = index.search(q, k)
        ref_d, ref_i = brute_force(db, ids, q, k, metric)
        np.testing.assert_array_equal(got, ref_i)
        np.testing.assert_allclose(distances, ref_d, rtol=1e-6, atol=1e-6)
        # Duplicates got bit-identical distances.
        for row_d, row_i in zip(distances, got):
            same = row_d[1:] == row_d[:-1]
            assert (row_i[1:][same] > row_i[:-1][same]).all()


def test_deep_ties_in_chunks(rng, monkeypatch):
    monkeypatch.setattr(_common, "_RESULT_BUDGET", 3000)
    vector = rng.standard_normal((1, 8)).astype(np.float32)
    ids = rng.permutation(1000) * 2
    index = FloatIndex(8)
    index.add(np.repeat(vector, 1000, axis=0), ids=ids)
    distances, got = index.search(np.repeat(vector, 7, axis=0), 60)
    assert (distances == 0).all()
    np.testing.assert_array_equal(got, np.broadcast_to(np.sort(ids)[:60], (7, 60)))


def test_padding_and_empty(rng):
    index = FloatIndex(4)
    distances, ids = index.search(np.ones((2, 4)), 3)
    assert (distances == -1).all() and (ids == -1).all()
    index.add(rng.standard_normal((2, 4)))
    distances, ids = index.search(np.ones((1, 4)), 5)
    assert (ids[0, 2:] == -1).all() and (distances[0, 2:] == -1).all() and (ids[0, :2] >= 0).all()


@pytest.mark.parametrize("x, exc, match", [
    (np.array([[0.0, np.nan, 1.0]]), ValueError, "expected finite values"),
    (np.array([[np.inf, 0.0, 1.0]]), ValueError, "expected finite values"),
    (np.ones((2, 4)), ValueError, r"expected vectors of dim=3, got shape \(2, 4\)"),
    (np.ones(3), ValueError, "expected a 2-D array"),
    (np.array([["a", "b", "c"]]), TypeError, "expected a numeric array"),
    (np.ones((2, 3)) * 1j, ValueError, "expected real values, got complex"),
])
def test_bad_vectors_are_refused(x, exc, match):
    index = FloatIndex(3)
    with pytest.raises(exc, match=f"x: {match}"):
        index.add(x)
    with pytest.raises(exc, match=f"q: {match}"):
        index.search(x, 2)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"metric: expected one of \['l2', 'cosine'\], got 'ip'"):
        FloatIndex(3, metric="ip")
    with pytest.raises(ValueError, match="dim: expected a positive integer"):
        FloatIndex(0)
    index = FloatIndex(3, metric="cosine")
    with pytest.raises(ValueError, match="x: row 1 is a zero vector"):
        index.add(np.array([[1.0, 0, 0], [0, 0, 0]]))
    index.add(np.eye(3))
    with pytest.raises(ValueError, match="k: expected a positive integer"):
        index.search(np.eye(3), 0)
    with pytest.raises(ValueError, match="ids: expected shape"):
        index.add(np.eye(3), ids=[10, 11])


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_whole_index_search_equals_direct_distances(rng, metric):
    # k >= len(index) ranks every vector from a float64 matrix product, re-checking near ties
    # directly: the same order and float32 distances as the direct computation of every pair.
    db = np.maximum(rng.standard_normal((900, 200)).astype(np.float32), 0) + 0.01
    db[600:700] = db[:100]  # exact duplicates tie
    ids = rng.permutation(900) * 3
    index = FloatIndex(200, metric=metric)
    index.add(db, ids=ids)
    q = np.concatenate([db[:10], np.maximum(rng.standard_normal((10, 200)).astype(np.float32), 0) + 0.01])
    dist, got = index.search(q, 950)
    qq = index._check_vectors(q, "q")
    direct = index._exact_distances(qq, np.broadcast_to(np.arange(900), (20, 900)), index._vectors())
    want_d, want_i = _common.sort_candidates(direct, np.broadcast_to(index._ids, direct.shape).copy())
    np.testing.assert_array_equal(got[:, :900], want_i)
    np.testing.assert_array_equal(dist[:, :900], want_d.astype(np.float32))
    assert (got[:, 900:] == -1).all() and (dist[:, 900:] == -1).all()
    # The top of a short search is the same prefix.
    short_d, short_i = index.search(q, 40)
    np.testing.assert_array_equal(short_i, got[:, :40])
    np.testing.assert_array_equal(short_d, dist[:, :40])


def _direct_ranking(index, q):
    """Every stored vector ranked by directly computed distance, then id (the definition)."""
    qq = index._check_vectors(q, "q")
    n = len(index)
    direct = index._exact_distances(qq, np.broadcast_to(np.arange(n), (len(q), n)), index._vectors())
    d, i = _common.sort_candidates(direct, np.broadcast_to(index._ids, direct.shape).copy())
    return d.astype(np.float32), i


@pytest.mark.parametrize("ascending", [True, False])
def test_whole_index_large_tie_groups_in_ascending_id(rng, ascending):
    # Groups of hundreds of exactly equal distances, which an unstable sort scrambles.
    distinct = rng.standard_normal((3, 16)).astype(np.float32)
    db = distinct[rng.integers(0, 3, 2000)]
    ids = np.arange(2000) * 5 if ascending else rng.permutation(2000) * 5
    index = FloatIndex(16)
    index.add(db, ids=ids)
    q = np.concatenate([distinct, rng.standard_normal((2, 16)).astype(np.float32)])
    dist, got = index.search(q, 2000)
    want_d, want_i = _direct_ranking(index, q)
    np.testing.assert_array_equal(got, want_i)
    np.testing.assert_array_equal(dist, want_d)


def test_whole_index_near_ties_follow_the_direct_distances(rng):
    # Large vectors that differ in the last bits: the matrix-product values lose the order to
    # cancellation, so long runs of near neighbours are recomputed directly and re-sorted.
    base = np.full(256, 300.0, dtype=np.float32)
    steps = rng.integers(-3, 4, (500, 256)).astype(np.float32)
    db = base + steps * np.spacing(base)
    index = FloatIndex(256)
    index.add(db, ids=rng.permutation(500))
    q = np.stack([base, db[7]])
    dist, got = index.search(q, 500)
    want_d, want_i = _direct_ranking(index, q)
    np.testing.assert_array_equal(got, want_i)
    np.testing.assert_array_equal(dist, want_d)
    assert len(np.unique(dist[0])) > 20  # many distinct tiny distances, not one tie


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_direct_distances_do_not_depend_on_the_block_size(rng, monkeypatch, metric):
    db = rng.standard_normal((50, 300)).astype(np.float32)
    q = rng.standard_normal((4, 300)).astype(np.float32)
    index = FloatIndex(300, metric=metric)
    index.add(db)
    qq, vectors = index._check_vectors(q, "q"), index._vectors()
    pos = np.broadcast_to(np.arange(50), (4, 50))
    x, y = vectors.astype(np.float64)[None], qq.astype(np.float64)[:, None]
    want = np.square(x - y).sum(-1) if metric == "l2" else np.maximum(1.0 - (x * y).sum(-1), 0.0)
    for block in (1, 300 * 7, 1 << 16):
        monkeypatch.setattr(floating, "_PAIR_BLOCK", block)
        np.testing.assert_array_equal(index._exact_distances(qq, pos, vectors), want)
