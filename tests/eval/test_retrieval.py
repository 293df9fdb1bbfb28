"""retrieval_eval on scikit-learn's digits (raw 8x8 pixels as 64 features)."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from dfsnet.eval import ROW_KEYS, euclidean_map, hamming_map, retrieval_eval
from dfsnet.hashing import make_encoder


@pytest.fixture(scope="module")
def digits_split():
    X, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    X, y = X[order].astype(np.float32), y[order]
    train, query, db = slice(0, 700), slice(700, 900), slice(900, None)
    return X[train], y[train], X[query], y[query], X[db], y[db]


def test_rows_for_every_bit_width_and_tie_mode(digits_split):
    rows = retrieval_eval(*digits_split, bits=(16, 32, 64), k=50, ties=("stable", "expected"))
    assert len(rows) == 2 + 3 * 2
    for row in rows:
        assert tuple(row) == ROW_KEYS
        assert 0.0 <= row["map_all"] <= 1.0 and 0.0 <= row["map_at_k"] <= 1.0
        assert 0.0 <= row["precision_at_k"] <= 1.0 and row["k"] == 50
        for key in ("fit_seconds", "encode_seconds", "search_seconds", "seconds_per_query"):
            assert row[key] >= 0.0
        assert row["seconds_per_query"] == pytest.approx(row["search_seconds"] / 200)
    euclid = [r for r in rows if r["metric"] == "euclidean"]
    hashed = [r for r in rows if r["metric"] == "hamming"]
    assert [(r["method"], r["bits"], r["ties"]) for r in euclid] == [("euclidean", None, "stable"),
                                                                     ("euclidean", None, "expected")]
    assert sorted({(r["bits"], r["ties"]) for r in hashed}) == [
        (b, t) for b in (16, 32, 64) for t in ("expected", "stable")]
    assert {r["method"] for r in hashed} == {"gain_ratio+sample_mean"}
    assert {r["bytes_per_item"] for r in hashed} == {2, 4, 8} and euclid[0]["bytes_per_item"] == 64 * 4
    # Ten balanced classes: chance mAP is about 0.1; raw-pixel retrieval on digits is far above.
    assert euclid[0]["map_all"] > 0.4 and euclid[0]["map_at_k"] > 0.8
    assert all(r["map_all"] > 0.2 for r in hashed)
    # Precision@k and mAP@k come from the same top k: both high for Euclidean on digits.
    assert euclid[0]["precision_at_k"] > 0.7


def test_values_match_an_encoder_fitted_on_its_own(digits_split):
    Xtr, ytr, Xq, yq, Xdb, ydb = digits_split
    rows = retrieval_eval(Xtr, ytr, Xq, yq, Xdb, ydb, bits=[24], k=30, selector="random",
                          hasher="feature_median")
    enc = make_encoder(selector="random", hasher="feature_median", n_bits=24).fit(Xtr, ytr)
    q, db = enc.transform(Xq), enc.transform(Xdb)
    by_metric = {r["metric"]: r for r in rows}
    assert by_metric["hamming"]["method"] == "random+feature_median"
    assert by_metric["hamming"]["map_all"] == pytest.approx(hamming_map(q, db, yq, ydb).map, abs=1e-12)
    assert by_metric["hamming"]["map_at_k"] == pytest.approx(hamming_map(q, db, yq, ydb, k=30).map, abs=1e-12)
    assert by_metric["euclidean"]["map_all"] == pytest.approx(euclidean_map(Xq, Xdb, yq, ydb).map, abs=1e-12)


def test_itq_without_selector_and_full_width_threshold(digits_split):
    rows = retrieval_eval(*digits_split, bits=[8, 16], selector=None, hasher="itq", k=20, euclidean=False)
    assert [(r["method"], r["bits"], r["selector"]) for r in rows] == [("itq", 8, None), ("itq", 16, None)]
    assert all(r["map_all"] > 0.2 for r in rows)
    rows = retrieval_eval(*digits_split, bits=64, selector=None, hasher="zero", k=20, ties="expected",
                          euclidean=False)
    assert [(r["method"], r["bits"], r["ties"]) for r in rows] == [("zero", 64, "expected")]


def test_bad_input(digits_split):
    Xtr, ytr, Xq, yq, Xdb, ydb = digits_split
    with pytest.raises(ValueError, match=r"bits: \[128\] larger than the feature width 64"):
        retrieval_eval(*digits_split, bits=(16, 128))
    with pytest.raises(ValueError, match="bits: hasher='sample_mean' without a selector"):
        retrieval_eval(*digits_split, bits=(16,), selector=None)
    with pytest.raises(ValueError, match="bits: expected distinct"):
        retrieval_eval(*digits_split, bits=(16, 16))
    with pytest.raises(ValueError, match="hasher: expected one of"):
        retrieval_eval(*digits_split, bits=(16,), hasher="lsh")
    with pytest.raises(ValueError, match="selector: expected one of"):
        retrieval_eval(*digits_split, bits=(16,), selector="chi2")
    with pytest.raises(ValueError, match=r"ties: expected one of \['stable', 'expected'\]"):
        retrieval_eval(*digits_split, bits=(16,), ties=("stable", "optimistic"))
    with pytest.raises(ValueError, match="k: expected a positive integer"):
        retrieval_eval(*digits_split, bits=(16,), k=0)
    with pytest.raises(ValueError, match="query_features: expected 64 columns"):
        retrieval_eval(Xtr, ytr, Xq[:, :10], yq, Xdb, ydb, bits=(16,))
    with pytest.raises(ValueError, match="db_labels: expected"):
        retrieval_eval(Xtr, ytr, Xq, yq, Xdb, ydb[:-1], bits=(16,))
    # Gain ratio needs class labels of the train features: named as train_labels, not as the selector's y.
    with pytest.raises(ValueError, match="train_labels: expected at least 2 classes, found 1"):
        retrieval_eval(Xtr, np.zeros_like(ytr), Xq, yq, Xdb, ydb, bits=(16,))
    with pytest.raises(ValueError, match="train_labels: selector='gain_ratio' needs one class label per item"):
        retrieval_eval(Xtr, np.eye(10, dtype=int)[ytr], Xq, yq, Xdb, ydb, bits=(16,))
    bad = Xdb.copy()
    bad[3, 5] = np.nan
    with pytest.raises(ValueError, match="db_features: expected finite values"):
        retrieval_eval(Xtr, ytr, Xq, yq, bad, ydb, bits=(16,))


# ---------------------------------------------------------------- scoring the index's own output


def _random_split(rng, d=12, n_train=300, nq=40, n_db=500, levels=4, n_classes=5):
    """Small-integer features: every float32 distance is exact, so brute force and index agree
    to the last bit and exact ties abound (both tie modes matter)."""
    def make(n):
        y = rng.integers(0, n_classes, n)
        return (rng.integers(0, levels, (n, d)) + (y[:, None] % 2)).astype(np.float32), y
    return (*make(n_train), *make(nq), *make(n_db))


@pytest.mark.parametrize("selector, hasher, bits", [("gain_ratio", "sample_mean", (4, 8, 12)),
                                                    ("random", "feature_mean", (5, 12)),
                                                    (None, "zero", (12,)),
                                                    ("gain_ratio", "itq", (3, 6))])
def test_numbers_equal_brute_force_maps_on_random_data(rng, selector, hasher, bits):
    Xtr, ytr, Xq, yq, Xdb, ydb = _random_split(rng)
    k = 37
    rows = retrieval_eval(Xtr, ytr, Xq, yq, Xdb, ydb, bits=bits, selector=selector, hasher=hasher, k=k,
                          ties=("stable", "expected"))
    for row in rows:
        if row["metric"] == "euclidean":
            full = euclidean_map(Xq, Xdb, yq, ydb, ties=row["ties"])
            top = euclidean_map(Xq, Xdb, yq, ydb, k=k, ties=row["ties"])
        else:
            enc = make_encoder(selector=selector, hasher=hasher,
                               n_bits=None if selector is None and hasher != "itq" else row["bits"]).fit(Xtr, ytr)
            q, db = enc.transform(Xq), enc.transform(Xdb)
            full = hamming_map(q, db, yq, ydb, ties=row["ties"])
            top = hamming_map(q, db, yq, ydb, k=k, ties=row["ties"])
        assert (row["map_all"], row["map_at_k"], row["precision_at_k"]) == (full.map, top.map, top.precision_at_k)


@pytest.mark.parametrize("index_cls", ["HammingIndex", "FloatIndex"])
def test_a_misordered_index_result_changes_the_map(rng, monkeypatch, index_cls):
    import dfsnet.index as index_module

    split = _random_split(rng)
    kw = dict(bits=(8,), k=25, ties=("stable", "expected"))
    honest = retrieval_eval(*split, **kw)
    cls = getattr(index_module, index_cls)
    search = cls.search

    def misordered(self, q, k):
        dist, ids = search(self, q, k)
        if k < len(self):
            return dist, ids  # the timed top-k search: untouched
        # Swap the first and the last item of every ranking (distances left as they were).
        ids = ids.copy()
        ids[:, [0, -1]] = ids[:, [-1, 0]]
        return dist, ids

    monkeypatch.setattr(cls, "search", misordered)
    broken = retrieval_eval(*split, **kw)
    metric = "hamming" if index_cls == "HammingIndex" else "euclidean"
    for a, b in zip(honest, broken):
        if a["metric"] == metric:
            # Stable: another ranking; expected: the first and last groups of equal distances now
            # hold other items.
            assert b["map_all"] != a["map_all"] and b["map_at_k"] != a["map_at_k"]
        else:
            assert (b["map_all"], b["map_at_k"]) == (a["map_all"], a["map_at_k"])


def test_an_index_result_that_is_no_permutation_is_refused(rng, monkeypatch):
    from dfsnet.index import HammingIndex

    search = HammingIndex.search

    def duplicated(self, q, k):
        dist, ids = search(self, q, k)
        ids = ids.copy()
        ids[:, 1] = ids[:, 0]
        return dist, ids

    monkeypatch.setattr(HammingIndex, "search", duplicated)
    with pytest.raises(ValueError, match=r"search: expected every row of ids to be a permutation"):
        retrieval_eval(*_random_split(rng), bits=(8,), k=10, euclidean=False)
