"""GainRatioSelector and RandomSelector: transform, ranking ties, estimator API, bad input."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from dfsnet.selection import GainRatioSelector, RandomSelector


@pytest.fixture
def data(rng):
    n = 120
    y = rng.integers(0, 3, n)
    X = rng.standard_normal((n, 8)).astype(np.float32)
    X[:, 6] += 2.0 * y
    X[:, 1] += 1.0 * y
    return X, y


def test_transform_keeps_top_features_in_rank_order(data):
    X, y = data
    sel = GainRatioSelector(n_features=3).fit(X, y)
    assert sel.ranking_[:2].tolist() == [6, 1]
    out = sel.transform(X)
    assert out.dtype == np.float32 and out.shape == (120, 3) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, X[:, sel.ranking_[:3]])
    np.testing.assert_array_equal(sel.selected_features_, sel.ranking_[:3])
    np.testing.assert_array_equal(sel.fit_transform(X, y), out)


def test_none_keeps_all_features_reordered(data):
    X, y = data
    sel = GainRatioSelector().fit(X, y)
    assert sorted(sel.ranking_.tolist()) == list(range(8))
    np.testing.assert_array_equal(sel.transform(X), X[:, sel.ranking_])


def test_equal_scores_rank_by_ascending_index(data):
    X, y = data
    X = np.repeat(X[:, [6, 0]], 3, axis=1)  # columns 0-2 identical, 3-5 identical
    sel = GainRatioSelector(discretizer="c45").fit(X, y)
    assert sel.ranking_.tolist() == [0, 1, 2, 3, 4, 5]


def test_estimator_api(data):
    X, y = data
    sel = GainRatioSelector(n_features=2, discretizer="uniform", n_bins=5)
    assert sel.get_params() == {"n_features": 2, "discretizer": "uniform", "n_bins": 5}
    assert sel.fit(X, y) is sel
    copy = clone(sel).set_params(n_bins=7)
    assert copy.n_bins == 7 and not hasattr(copy, "scores_")
    assert sel.n_features_in_ == 8
    with pytest.raises(TypeError):
        GainRatioSelector(2)  # keyword-only


def test_random_selector_is_seeded_permutation(data):
    X, y = data
    a = RandomSelector(n_features=4, random_state=3).fit(X)
    b = RandomSelector(n_features=4, random_state=3).fit(X, y)
    c = RandomSelector(n_features=4, random_state=4).fit(X)
    np.testing.assert_array_equal(a.ranking_, b.ranking_)
    assert not np.array_equal(a.ranking_, c.ranking_)
    assert sorted(a.ranking_.tolist()) == list(range(8))
    np.testing.assert_array_equal(a.ranking_, np.argsort(-a.scores_, kind="stable"))
    np.testing.assert_array_equal(a.transform(X), X[:, a.ranking_[:4]])
    assert a.ranking_.dtype == np.int64 and a.scores_.dtype == np.float64


@pytest.mark.parametrize("cls", [GainRatioSelector, RandomSelector])
def test_unfitted_transform_raises(cls, data):
    with pytest.raises(NotFittedError):
        cls().transform(data[0])


@pytest.mark.parametrize(
    "X, y, exc, match",
    [
        ([[np.nan, 1.0], [0.0, 1.0]], [0, 1], ValueError, "X: expected finite values"),
        ([[np.inf, 1.0], [0.0, 1.0]], [0, 1], ValueError, "X: expected finite values"),
        ([1.0, 2.0], [0, 1], ValueError, "X: expected a 2-D array"),
        (np.zeros((2, 2, 2)), [0, 1], ValueError, "X: expected a 2-D array"),
        ([["a", "b"], ["c", "d"]], [0, 1], TypeError, "X: expected a numeric array"),
        ([[1.0], [2.0], [3.0]], [0, 1], ValueError, "y: expected 3 labels"),
        ([[1.0], [2.0]], [1, 1], ValueError, "y: expected at least 2 classes, found 1"),
        ([[1.0], [2.0]], [0.5, 1.0], TypeError, "y: expected integer labels"),
        ([[1.0], [2.0]], [[0, 1], [1, 0]], ValueError, "y: expected a 1-D vector"),
        ([[1.0], [2.0]], None, ValueError, "y: GainRatioSelector needs class labels"),
        (np.zeros((2, 0)), [0, 1], ValueError, "X: expected at least 1 column"),
        ([[1 + 1j], [2.0]], [0, 1], ValueError, "X: expected real values, got complex"),
        (np.array([[1.0], ["a"]], dtype=object), [0, 1], TypeError, "X: expected a numeric array"),
    ],
)
def test_gain_ratio_fit_bad_input(X, y, exc, match):
    with pytest.raises(exc, match=match):
        GainRatioSelector().fit(X, y)


def test_bad_parameters(data):
    X, y = data
    with pytest.raises(ValueError, match="n_features: expected at most 8, got 9"):
        GainRatioSelector(n_features=9).fit(X, y)
    with pytest.raises(ValueError, match="n_features: expected a positive integer, got 0"):
        GainRatioSelector(n_features=0).fit(X, y)
    with pytest.raises(TypeError, match="n_features"):
        RandomSelector(n_features=2.0).fit(X)
    with pytest.raises(ValueError, match="n_features: expected at most 8"):
        RandomSelector(n_features=20).fit(X)
    with pytest.raises(ValueError, match=r"discretizer: expected one of \['quantile', 'uniform', 'c45', 'none'\]"):
        GainRatioSelector(discretizer="entropy").fit(X, y)
    with pytest.raises(ValueError, match="n_bins"):
        GainRatioSelector(n_bins=1).fit(X, y)
    with pytest.raises(TypeError, match="random_state"):
        RandomSelector(random_state="seed").fit(X)
    with pytest.raises(ValueError, match=r"random_state: expected an int in \[0, 2\*\*32\) or None, got -1"):
        RandomSelector(random_state=-1).fit(X)
    with pytest.raises(ValueError, match="y: expected 120 labels"):
        RandomSelector().fit(X, y[:5])


@pytest.mark.parametrize("cls", [GainRatioSelector, RandomSelector])
def test_transform_bad_input(cls, data):
    X, y = data
    sel = cls(n_features=2).fit(X, y)
    with pytest.raises(ValueError, match="X: expected 8 columns .* got 5"):
        sel.transform(X[:, :5])
    bad = X.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="X: expected finite values"):
        sel.transform(bad)
    with pytest.raises(ValueError, match="X: expected a 2-D array"):
        sel.transform(X[0])


def test_sparse_input_is_refused_by_name(data):
    from scipy.sparse import csr_matrix

    X, y = data
    with pytest.raises(TypeError, match="X: sparse input is not supported.*toarray"):
        GainRatioSelector().fit(csr_matrix(X), y)


def test_object_array_of_numbers_is_accepted(data):
    X, y = data
    as_objects = GainRatioSelector().fit(X.astype(object), y)
    np.testing.assert_array_equal(as_objects.scores_, GainRatioSelector().fit(X, y).scores_)
