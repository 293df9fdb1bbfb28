"""Metrics against plain-Python references, brute-force tie expectations and bad input."""
from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import pytest

from dfsnet.eval.metrics import (
    MapResult,
    average_precision,
    euclidean_map,
    hamming_map,
    leave_one_out_map,
    mean_average_precision,
    precision_at_k,
    precision_recall_curve,
    recall_at_k,
    search_map,
)

# ----------------------------------------------------------------- plain-Python references


def ref_ap(rel, k=None):
    """DeepHash-style AP: mean precision at the relevant hits in the top k (all if k is None)."""
    rel = list(rel)[:k] if k is not None else list(rel)
    hits, total = 0, 0.0
    for i, r in enumerate(rel):
        if r:
            hits += 1
            total += hits / (i + 1)
    return total / hits if hits else 0.0


def ref_precision(rel, k):
    return sum(list(rel)[:k]) / k


def ref_recall(rel, k):
    total = sum(rel)
    return sum(list(rel)[:k]) / total if total else 0.0


def ref_relevant(q, d):
    if np.ndim(q) == 0:
        return int(q == d)
    return int(any(a and b for a, b in zip(q, d)))


def ref_rank(dist_row):
    """Stable ranking: by distance, then database index."""
    return sorted(range(len(dist_row)), key=lambda j: (dist_row[j], j))


def ref_expected_ap(dist_row, rel, k=None):
    """Average of AP over every order inside tied groups (itertools.permutations)."""
    groups = [[j for j in range(len(dist_row)) if dist_row[j] == v] for v in sorted(set(dist_row))]
    values = []
    for combo in itertools.product(*(itertools.permutations(g) for g in groups)):
        values.append(ref_ap([rel[j] for g in combo for j in g], k))
    return sum(values) / len(values)


def ref_expected_hits(dist_row, rel, k):
    groups = [[j for j in range(len(dist_row)) if dist_row[j] == v] for v in sorted(set(dist_row))]
    values = [sum(rel[j] for j in [j for g in combo for j in g][:k])
              for combo in itertools.product(*(itertools.permutations(g) for g in groups))]
    return sum(values) / len(values)


def random_labels(rng, n, multilabel, n_classes=3):
    if multilabel:
        return (rng.random((n, n_classes)) < 0.4).astype(np.int64)
    return rng.integers(0, n_classes, n)


def popcount_distances(q, db):
    return np.array([[sum((int(x) ^ int(y)).bit_count() for x, y in zip(a, b)) for b in db] for a in q])


# ----------------------------------------------------------------- per-ranking functions


@pytest.mark.parametrize("k", [None, 1, 3, 7, 25])
def test_average_precision_matches_reference(rng, k):
    rel = rng.random((40, 20)) < 0.3
    got = average_precision(rel, k=k)
    assert got.shape == (40,) and got.dtype == np.float64
    np.testing.assert_allclose(got, [ref_ap(r, k) for r in rel], rtol=0, atol=1e-12)
    assert average_precision(rel[0].astype(int), k=k) == pytest.approx(ref_ap(rel[0], k), abs=1e-12)


def test_average_precision_known_values():
    assert average_precision([1, 0, 1, 0]) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision([0, 0, 0]) == 0.0
    # AP@k divides by the hits in the top k (DeepHash), not by all relevant items.
    assert average_precision([0, 1, 0, 1, 1], k=2) == pytest.approx(0.5)
    # Rows without hits, including the last ones, score 0 and leave the others untouched.
    rel = np.zeros((5, 6), bool)
    rel[1, [0, 3]] = rel[2, 5] = True
    np.testing.assert_allclose(average_precision(rel), [0, 0.75, 1 / 6, 0, 0])
    np.testing.assert_allclose(average_precision(rel, k=4), [0, 0.75, 0, 0, 0])


@pytest.mark.parametrize("k", [1, 5, 20, 30])
def test_precision_and_recall_at_k_match_reference(rng, k):
    rel = rng.random((30, 20)) < 0.25
    np.testing.assert_allclose(precision_at_k(rel, k), [ref_precision(r, k) for r in rel], atol=1e-12)
    np.testing.assert_allclose(recall_at_k(rel, k), [ref_recall(r, k) for r in rel], atol=1e-12)
    assert precision_at_k(list(rel[1]), k) == pytest.approx(ref_precision(rel[1], k))


def test_recall_with_truncated_ranking():
    assert recall_at_k([1, 0, 1], 2, n_relevant=4) == pytest.approx(0.25)
    np.testing.assert_allclose(recall_at_k([[1, 0], [0, 1]], 1, n_relevant=[2, 3]), [0.5, 0.0])


def test_precision_recall_curve_matches_reference(rng):
    rel = rng.random((10, 15)) < 0.3
    precision, recall = precision_recall_curve(rel)
    assert precision.shape == recall.shape == (10, 15)
    for i, r in enumerate(rel):
        for c in range(1, 16):
            assert precision[i, c - 1] == pytest.approx(ref_precision(r, c))
            assert recall[i, c - 1] == pytest.approx(ref_recall(r, c))
    p1, r1 = precision_recall_curve([0, 1, 1], n_relevant=4)
    np.testing.assert_allclose(p1, [0, 1 / 2, 2 / 3])
    np.testing.assert_allclose(r1, [0, 1 / 4, 2 / 4])


# ----------------------------------------------------------------- query sets, stable ties


@pytest.mark.parametrize("multilabel", [False, True])
@pytest.mark.parametrize("k", [None, 1, 4, 30])
def test_map_from_rankings_and_distances_matches_reference(rng, multilabel, k):
    nq, n = 12, 25
    ql, dl = random_labels(rng, nq, multilabel), random_labels(rng, n, multilabel)
    dist = rng.integers(0, 5, (nq, n))  # many ties: stable order must be database order
    expected = np.mean([ref_ap([ref_relevant(ql[i], dl[j]) for j in ref_rank(dist[i])], k)
                        for i in range(nq)])
    assert mean_average_precision(ql, dl, distances=dist, k=k) == pytest.approx(expected, abs=1e-12)
    rankings = np.array([ref_rank(row) for row in dist])
    assert mean_average_precision(ql, dl, rankings=rankings, k=k) == pytest.approx(expected, abs=1e-12)
    assert mean_average_precision(ql, dl, distances=dist.astype(np.float32) / 3, k=k) == pytest.approx(
        expected, abs=1e-12)


def test_truncated_rankings_are_enough_for_map_at_k(rng):
    ql, dl = rng.integers(0, 3, 5), rng.integers(0, 3, 30)
    full = np.array([rng.permutation(30) for _ in range(5)])
    assert mean_average_precision(ql, dl, rankings=full[:, :8], k=8) == pytest.approx(
        mean_average_precision(ql, dl, rankings=full, k=8))


def test_query_without_relevant_items_counts_as_zero():
    ql = np.array([0, 9])
    dl = np.array([0, 1, 0])
    dist = np.array([[0, 1, 2], [0, 1, 2]])
    assert mean_average_precision(ql, dl, distances=dist) == pytest.approx((1 + 2 / 3) / 2 / 2)
    assert mean_average_precision(ql, dl, distances=dist, ties="expected") == pytest.approx(
        (1 + 2 / 3) / 2 / 2)


# ----------------------------------------------------------------- expected ties


@pytest.mark.parametrize("k", [None, 1, 2, 3, 4, 6])
def test_expected_ties_equal_average_over_all_permutations(rng, k):
    for _ in range(25):
        n = int(rng.integers(1, 7))
        dist = rng.integers(0, 3, n)
        rel = rng.integers(0, 2, n)
        got = mean_average_precision([1], rel, distances=dist[None, :], k=k, ties="expected")
        assert got == pytest.approx(ref_expected_ap(list(dist), list(rel), k), abs=1e-12), (dist, rel)


def test_expected_ties_several_queries_multilabel(rng):
    nq, n = 4, 6
    ql, dl = random_labels(rng, nq, True), random_labels(rng, n, True)
    dist = rng.integers(0, 2, (nq, n)).astype(np.float64)
    for k in (None, 3):
        expected = np.mean([ref_expected_ap(list(dist[i]), [ref_relevant(ql[i], dl[j]) for j in range(n)], k)
                            for i in range(nq)])
        got = mean_average_precision(ql, dl, distances=dist, k=k, ties="expected")
        assert got == pytest.approx(expected, abs=1e-12)


def test_expected_ties_on_a_large_group_by_exact_enumeration():
    # One group of 12 tied items (5 relevant) after 3 ranked items: enumerate the C(12, 5)
    # equally likely relevance patterns inside the group instead of 12! permutations.
    head, t, r = [1, 0, 1], 12, 5
    dist = np.array([0, 1, 2] + [3] * t)
    rel = np.array(head + [1] * r + [0] * (t - r))
    for k in (None, 4, 8, 15):
        patterns = [head + [int(i in pos) for i in range(t)] for pos in itertools.combinations(range(t), r)]
        expected = np.mean([ref_ap(p, k) for p in patterns])
        got = mean_average_precision([1], rel, distances=dist[None, :], k=k, ties="expected")
        assert got == pytest.approx(expected, abs=1e-12)


def test_expected_differs_from_stable_only_through_tie_order():
    # All items tied: stable puts the relevant item last, expected averages its position.
    dist = np.zeros((1, 4))
    assert mean_average_precision([1], [0, 0, 0, 1], distances=dist) == pytest.approx(0.25)
    assert mean_average_precision([1], [0, 0, 0, 1], distances=dist, ties="expected") == pytest.approx(
        np.mean([1, 1 / 2, 1 / 3, 1 / 4]))
    untied = np.arange(4.0)[None, :]
    assert mean_average_precision([1], [0, 1, 0, 1], distances=untied, ties="expected") == pytest.approx(
        mean_average_precision([1], [0, 1, 0, 1], distances=untied))


# ----------------------------------------------------------------- Hamming and Euclidean engines


@pytest.mark.parametrize("n_bytes", [1, 3, 8, 17, 40])  # 40 bytes = 320 bits: uint16 distances
@pytest.mark.parametrize("ties", ["stable", "expected"])
@pytest.mark.parametrize("multilabel", [False, True])
def test_hamming_map_equals_map_on_explicit_distances(rng, n_bytes, ties, multilabel):
    nq, n = 7, 40
    # Few distinct codes so that distances tie heavily.
    pool = rng.integers(0, 256, (5, n_bytes), dtype=np.uint8)
    q, db = pool[rng.integers(0, 5, nq)], pool[rng.integers(0, 5, n)]
    db[::3] ^= rng.integers(0, 256, (db[::3].shape), dtype=np.uint8)
    ql, dl = random_labels(rng, nq, multilabel), random_labels(rng, n, multilabel)
    dist = popcount_distances(q, db)
    for k in (None, 5, 100):
        res = hamming_map(q, db, ql, dl, k=k, ties=ties, block_size=3)
        assert isinstance(res, MapResult) and res.k == k and res.ties == ties
        assert res.per_query.shape == (nq,) and res.per_query.dtype == np.float64
        assert res.map == pytest.approx(mean_average_precision(ql, dl, distances=dist, k=k, ties=ties), abs=1e-12)
        assert res.seconds >= 0
    if ties == "stable":
        rel = np.array([[ref_relevant(ql[i], dl[j]) for j in ref_rank(dist[i])] for i in range(nq)])
        np.testing.assert_allclose(hamming_map(q, db, ql, dl).per_query, [ref_ap(r) for r in rel], atol=1e-12)
        assert hamming_map(q, db, ql, dl, k=5).precision_at_k == pytest.approx(precision_at_k(rel, 5).mean())


def test_hamming_precision_at_k_expected_ties(rng):
    q = rng.integers(0, 4, (3, 1), dtype=np.uint8)
    db = rng.integers(0, 4, (6, 1), dtype=np.uint8)
    ql, dl = rng.integers(0, 2, 3), rng.integers(0, 2, 6)
    dist = popcount_distances(q, db)
    res = hamming_map(q, db, ql, dl, k=3, ties="expected")
    expected = np.mean([ref_expected_hits(list(dist[i]), [int(ql[i] == d) for d in dl], 3) / 3 for i in range(3)])
    assert res.precision_at_k == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_euclidean_map_equals_map_on_explicit_distances(rng, metric):
    q, db = rng.normal(size=(9, 6)), rng.normal(size=(30, 6))
    ql, dl = rng.integers(0, 3, 9), rng.integers(0, 3, 30)
    a, b = q, db
    if metric == "cosine":
        a = q / np.linalg.norm(q, axis=1, keepdims=True)
        b = db / np.linalg.norm(db, axis=1, keepdims=True)
    dist = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    for k in (None, 4):
        res = euclidean_map(q, db, ql, dl, k=k, metric=metric, block_size=4)
        assert res.map == pytest.approx(mean_average_precision(ql, dl, distances=dist, k=k), abs=1e-12)


def test_euclidean_map_duplicate_items_tie(rng):
    db = np.repeat(rng.normal(size=(3, 4)).astype(np.float32), 4, axis=0)  # 3 points, 4 copies each
    dl = np.tile([0, 1, 0, 1], 3)
    q, ql = db[[0, 4]], np.array([1, 0])
    stable = euclidean_map(q, db, ql, dl).map
    expected = euclidean_map(q, db, ql, dl, ties="expected").map
    dist = ((q[:, None, :] - db[None, :, :]) ** 2).sum(-1)
    assert expected == pytest.approx(mean_average_precision(ql, dl, distances=dist, ties="expected"), abs=1e-9)
    assert stable != pytest.approx(expected)


def test_k_beyond_database_equals_map_all(rng):
    q = rng.integers(0, 256, (5, 2), dtype=np.uint8)
    db = rng.integers(0, 256, (20, 2), dtype=np.uint8)
    ql, dl = rng.integers(0, 3, 5), rng.integers(0, 3, 20)
    for ties in ("stable", "expected"):
        assert hamming_map(q, db, ql, dl, k=20, ties=ties).map == pytest.approx(
            hamming_map(q, db, ql, dl, ties=ties).map, abs=1e-12)
        assert hamming_map(q, db, ql, dl, k=500, ties=ties).map == pytest.approx(
            hamming_map(q, db, ql, dl, ties=ties).map, abs=1e-12)


# ----------------------------------------------------------------- bad input


def test_bad_k():
    with pytest.raises(ValueError, match="k: expected a positive integer, got 0"):
        average_precision([1, 0], k=0)
    with pytest.raises(ValueError, match="k"):
        precision_at_k([1, 0], -2)
    with pytest.raises(TypeError, match="k"):
        mean_average_precision([0], [0, 1], distances=[[1, 2]], k=1.5)
    with pytest.raises(ValueError, match="k"):
        hamming_map(np.zeros((1, 1), np.uint8), np.zeros((2, 1), np.uint8), [0], [0, 1], k=0)


def test_bad_ties_lists_valid_modes():
    with pytest.raises(ValueError, match=r"ties: expected one of \['stable', 'expected'\], got 'random'"):
        mean_average_precision([0], [0, 1], distances=[[1, 2]], ties="random")
    with pytest.raises(ValueError, match="ties"):
        hamming_map(np.zeros((1, 1), np.uint8), np.zeros((2, 1), np.uint8), [0], [0, 1], ties="mean")
    with pytest.raises(ValueError, match="ties: 'expected' needs distances"):
        mean_average_precision([0], [0, 1], rankings=[[1, 0]], ties="expected")


def test_bad_distances_and_rankings():
    with pytest.raises(ValueError, match="distances: expected finite values"):
        mean_average_precision([0], [0, 1], distances=[[np.nan, 1.0]])
    with pytest.raises(ValueError, match="distances: expected finite values"):
        mean_average_precision([0], [0, 1], distances=[[np.inf, 1.0]])
    with pytest.raises(ValueError, match=r"distances: expected shape \(n_queries, n_db\) = \(1, 2\)"):
        mean_average_precision([0], [0, 1], distances=[[1.0, 2.0, 3.0]])
    with pytest.raises(ValueError, match="distances: expected a 2-D array"):
        mean_average_precision([0], [0, 1], distances=[1.0, 2.0])
    with pytest.raises(ValueError, match="exactly one"):
        mean_average_precision([0], [0, 1])
    with pytest.raises(ValueError, match="exactly one"):
        mean_average_precision([0], [0, 1], distances=[[1, 2]], rankings=[[0, 1]])
    with pytest.raises(ValueError, match="rankings: expected shape"):
        mean_average_precision([0], [0, 1, 1], rankings=[[0, 1]])
    with pytest.raises(ValueError, match="rankings: expected distinct"):
        mean_average_precision([0], [0, 1], rankings=[[1, 1]])
    with pytest.raises(ValueError, match=r"rankings: expected indices in \[0, 2\)"):
        mean_average_precision([0], [0, 1], rankings=[[0, 2]])
    with pytest.raises(TypeError, match="rankings: expected integer"):
        mean_average_precision([0], [0, 1], rankings=[[0.0, 1.0]])


def test_bad_labels():
    with pytest.raises(ValueError, match="db_labels: expected 3 labels"):
        hamming_map(np.zeros((1, 1), np.uint8), np.zeros((3, 1), np.uint8), [0], [0, 1])
    with pytest.raises(ValueError, match="query_labels: expected 2 labels"):
        euclidean_map(np.zeros((2, 3)), np.zeros((3, 3)), [0], [0, 1, 1])
    with pytest.raises(ValueError, match="query_labels, db_labels: expected the same kind"):
        mean_average_precision([0], [[0, 1], [1, 0]], distances=[[1, 2]])
    with pytest.raises(ValueError, match="db_labels: expected a 0/1 multi-label"):
        mean_average_precision([[1, 0]], [[0, 2], [1, 0]], distances=[[1, 2]])
    with pytest.raises(TypeError, match="query_labels: expected integer labels"):
        mean_average_precision(["a"], [0, 1], distances=[[1, 2]])
    # An empty database: from distances and from rankings alike.
    with pytest.raises(ValueError, match=r"db_labels: expected at least one item, got shape \(0,\)"):
        mean_average_precision([0, 1], np.zeros(0, int), distances=np.zeros((2, 0)))
    with pytest.raises(ValueError, match=r"db_labels: expected at least one item"):
        mean_average_precision([0, 1], np.zeros(0, int), rankings=np.zeros((2, 0), int), k=3)


def test_bad_codes_features_and_relevance():
    with pytest.raises(TypeError, match="query_codes: expected packed uint8 codes"):
        hamming_map(np.zeros((1, 8), bool), np.zeros((2, 1), np.uint8), [0], [0, 1])
    with pytest.raises(ValueError, match="query_codes, db_codes: expected the same code width, got 1 and 2"):
        hamming_map(np.zeros((1, 1), np.uint8), np.zeros((2, 2), np.uint8), [0], [0, 1])
    with pytest.raises(ValueError, match="db_codes: expected a 2-D array"):
        hamming_map(np.zeros((1, 1), np.uint8), np.zeros(2, np.uint8), [0], [0, 1])
    with pytest.raises(ValueError, match="query_feats: expected finite values"):
        euclidean_map([[np.nan, 0.0]], np.zeros((2, 2)), [0], [0, 1])
    with pytest.raises(ValueError, match="query_feats, db_feats: expected the same feature width"):
        euclidean_map(np.zeros((1, 3)), np.zeros((2, 2)), [0], [0, 1])
    with pytest.raises(ValueError, match="metric"):
        euclidean_map(np.zeros((1, 2)), np.zeros((2, 2)), [0], [0, 1], metric="ip")
    with pytest.raises(ValueError, match="relevance: expected 0/1 relevance values, found 2"):
        average_precision([0, 2, 1])
    with pytest.raises(ValueError, match=r"relevance: expected shape \(n,\) or \(nq, n\)"):
        average_precision(np.zeros((2, 2, 2)))
    with pytest.raises(TypeError, match="relevance: expected an array-like"):
        average_precision([[1, 0], [1]])
    with pytest.raises(ValueError, match="n_relevant"):
        recall_at_k([1, 1, 0], 2, n_relevant=1)
    with pytest.raises(ValueError, match="block_size"):
        hamming_map(np.zeros((1, 1), np.uint8), np.zeros((2, 1), np.uint8), [0], [0, 1], block_size=0)


def test_importing_eval_loads_neither_torch_nor_faiss():
    code = ("import sys, dfsnet.eval; "
            "print(sorted(m for m in ('torch', 'faiss', 'dfsnet.index') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("bad", ["repeat", "low", "high"])
def test_search_map_refuses_rankings_that_are_not_permutations(rng, bad):
    ql, dl = rng.integers(0, 3, 4), rng.integers(0, 3, 20)

    def search(q, k):
        ids = np.array([rng.permutation(k) for _ in range(len(q))])
        if bad == "repeat":
            ids[-1, 5] = ids[-1, 6]
        else:
            ids[1, 0] = -1 if bad == "low" else k
        return np.zeros(ids.shape), ids

    with pytest.raises(ValueError, match=r"every row of ids to be a permutation of range\(20\)"):
        search_map(search, np.zeros((4, 2)), ql, dl)
    good = search_map(lambda q, k: (np.zeros((len(q), k)), np.tile(np.arange(k), (len(q), 1))),
                      np.zeros((4, 2)), ql, dl)
    assert good["stable"][None].map == mean_average_precision(ql, dl, distances=np.zeros((4, 20)))


# ----------------------------------------------------------------- leave-one-out


@pytest.mark.parametrize("multilabel", [False, True])
@pytest.mark.parametrize("k", [None, 3, 50])
def test_leave_one_out_map_matches_reference(rng, multilabel, k):
    n = 13
    d = rng.integers(0, 4, size=(n, n)).astype(float)  # many ties: the stable order matters
    labels = random_labels(rng, n, multilabel)
    aps = []
    for i in range(n):
        others = [j for j in ref_rank(d[i]) if j != i]
        rel = [ref_relevant(labels[i], labels[j]) for j in others]
        aps.append(ref_ap(rel, k))
    assert leave_one_out_map(d, labels, k=k) == pytest.approx(np.mean(aps), abs=1e-12)


def test_leave_one_out_map_expected_ties_match_reference(rng):
    n = 6
    d = rng.integers(0, 2, size=(n, n)).astype(float)
    labels = rng.integers(0, 2, n)
    aps = []
    for i in range(n):
        others = [j for j in range(n) if j != i]
        aps.append(ref_expected_ap([d[i, j] for j in others], [int(labels[i] == labels[j]) for j in others], 3))
    assert leave_one_out_map(d, labels, k=3, ties="expected") == pytest.approx(np.mean(aps), abs=1e-12)


def test_leave_one_out_map_ignores_the_diagonal(rng):
    d = rng.random((6, 6))
    y = np.array([0, 0, 1, 1, 2, 2])
    other = d.copy()
    np.fill_diagonal(other, [5.0, -3.0, 0.0, 1e6, 2.0, -1.0])  # an item's own distance plays no part
    assert leave_one_out_map(d, y) == leave_one_out_map(other, y)


@pytest.mark.parametrize("bad, match", [(np.zeros((3, 4)), "square"), (np.zeros((1, 1)), "n >= 2"),
                                        (np.full((3, 3), np.nan), "finite")])
def test_leave_one_out_map_refuses_bad_distances(bad, match):
    with pytest.raises(ValueError, match=match):
        leave_one_out_map(bad, np.zeros(bad.shape[0], dtype=int))
