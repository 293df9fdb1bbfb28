"""Gain ratio scores: hand-worked values, properties, discretisers, block processing."""
from __future__ import annotations

import numpy as np
import pytest

from dfsnet.selection import (
    GainRatioSelector,
    discretize,
    gain_ratio,
    gain_ratio_scores,
)
from dfsnet.selection import scores as scores_module

DISCRETIZERS = ("quantile", "uniform", "c45")

# Quinlan's 14-day weather table (C4.5 book, Table 1-1), categories as integer codes.
# Columns: outlook (0 sunny, 1 overcast, 2 rain), temperature (0 hot, 1 mild, 2 cool),
# humidity (0 high, 1 normal), windy (0 false, 1 true). Label: play (1 yes, 0 no).
WEATHER = np.array([
    [0, 0, 0, 0, 0], [0, 0, 0, 1, 0], [1, 0, 0, 0, 1], [2, 1, 0, 0, 1], [2, 2, 1, 0, 1],
    [2, 2, 1, 1, 0], [1, 2, 1, 1, 1], [0, 1, 0, 0, 0], [0, 2, 1, 0, 1], [2, 1, 1, 0, 1],
    [0, 1, 1, 1, 1], [1, 1, 0, 1, 1], [1, 0, 1, 0, 1], [2, 1, 0, 1, 0],
])


def test_weather_table_by_hand():
    """Equations (1)-(5) worked out by hand for the weather table (9 yes, 5 no).

    H(D) = -9/14 log2 9/14 - 5/14 log2 5/14 = 0.940286
    outlook:  sunny 2y3n, overcast 4y0n, rain 3y2n
      H(D|A) = 5/14*0.970951 + 4/14*0 + 5/14*0.970951 = 0.693536, g = 0.246750
      H_A(D) = H(5/14, 4/14, 5/14) = 1.577406,                    gR = 0.156428
    temperature: hot 2y2n, mild 4y2n, cool 3y1n
      H(D|A) = 4/14*1 + 6/14*0.918296 + 4/14*0.811278 = 0.911063, g = 0.029223
      H_A(D) = H(4/14, 6/14, 4/14) = 1.556657,                    gR = 0.018773
    humidity: high 3y4n, normal 6y1n
      H(D|A) = 7/14*0.985228 + 7/14*0.591673 = 0.788450,         g = 0.151836
      H_A(D) = 1,                                                  gR = 0.151836
    windy: false 6y2n, true 3y3n
      H(D|A) = 8/14*0.811278 + 6/14*1 = 0.892159,                 g = 0.048127
      H_A(D) = H(8/14, 6/14) = 0.985228,                           gR = 0.048849
    """
    X, y = WEATHER[:, :4], WEATHER[:, 4]
    expected = np.array([0.156428, 0.018773, 0.151836, 0.048849])
    np.testing.assert_allclose(gain_ratio(X, y), expected, atol=2e-6)
    selector = GainRatioSelector(discretizer="none").fit(X, y)
    np.testing.assert_allclose(selector.scores_, expected, atol=2e-6)
    assert selector.ranking_.tolist() == [0, 2, 3, 1]
    assert selector.scores_.dtype == np.float64 and selector.ranking_.dtype == np.int64


def test_codes_need_not_be_contiguous_and_labels_any_integers():
    X, y = WEATHER[:, :4], WEATHER[:, 4]
    np.testing.assert_array_equal(gain_ratio(X * 7 + 3, y * 5 - 2), gain_ratio(X, y))


def test_c45_hand_example():
    """x = 1..8, y = 0 0 0 0 1 1 1 0: the best threshold is 4.5.

    H(D) = H(5/8, 3/8) = 0.954434; left 4 x class 0 (H = 0), right 1 x class 0 and 3 x class 1
    (H = 0.811278): g = 0.954434 - 4/8*0.811278 = 0.548795 (the split after 7 only gains 0.092),
    H_A(D) = H(4/8, 4/8) = 1, so gR = 0.548795.
    """
    x = np.arange(1, 9, dtype=np.float32)[:, None]
    y = np.array([0, 0, 0, 0, 1, 1, 1, 0])
    np.testing.assert_allclose(gain_ratio_scores(x, y, discretizer="c45"), [0.548795], atol=1e-6)


def _entropy(counts) -> float:
    p = np.asarray([c for c in counts if c > 0], dtype=float)
    p /= p.sum()
    return float(-(p * np.log2(p)).sum())


def _c45_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Every threshold between distinct values, by a plain loop; first best gain wins."""
    h_d = _entropy(np.bincount(y))
    best_gain, best_split = -1.0, 1.0
    values = np.unique(x)
    for lo in values[:-1]:
        left = x <= lo
        info = left.mean() * _entropy(np.bincount(y[left])) + (~left).mean() * _entropy(np.bincount(y[~left]))
        if h_d - info > best_gain + 1e-12:
            best_gain, best_split = h_d - info, _entropy([left.sum(), (~left).sum()])
    return 0.0 if best_gain < 0 else max(best_gain, 0.0) / best_split


def _binned_reference(codes: np.ndarray, y: np.ndarray) -> float:
    values = np.unique(codes)
    h_d = _entropy(np.bincount(y))
    info = sum((codes == v).mean() * _entropy(np.bincount(y[codes == v])) for v in values)
    split = _entropy([(codes == v).sum() for v in values])
    return 0.0 if len(values) < 2 else (h_d - info) / split


@pytest.mark.parametrize("seed", range(4))
def test_matches_plain_loop_reference(seed):
    gen = np.random.default_rng(seed)
    n, n_classes = int(gen.integers(8, 120)), int(gen.integers(2, 5))
    y = gen.integers(0, n_classes, n)
    y[:2] = [0, 1]
    # Rounded values give ties; negatives, -0.0 and +0.0 test the float ordering of c45.
    X = np.round(gen.standard_normal((n, 6)) * 2, 1).astype(np.float32)
    X[:, 1] = y - 0.5
    X[: n // 2, 2] = -0.0
    X[n // 2 :, 2] = 0.0
    for j in range(X.shape[1]):
        assert gain_ratio_scores(X, y, discretizer="c45")[j] == pytest.approx(_c45_reference(X[:, j], y), abs=1e-10)
    for method in ("quantile", "uniform"):
        codes = discretize(X, method=method, n_bins=4)
        got = gain_ratio_scores(X, y, discretizer=method, n_bins=4)
        want = [_binned_reference(codes[:, j], y) for j in range(X.shape[1])]
        np.testing.assert_allclose(got, want, atol=1e-12)
    # -0.0 and +0.0 are one value: no split, no bins.
    assert gain_ratio_scores(X, y, discretizer="c45")[2] == 0.0


@pytest.fixture
def labelled(rng):
    n = 300
    y = rng.integers(0, 3, n)
    X = rng.standard_normal((n, 6)).astype(np.float32)
    X[:, 2] += 0.8 * y  # informative
    X[:, 4] = y  # the label itself
    X[:, 5] = 3.5  # constant
    return X, y


@pytest.mark.parametrize("discretizer", DISCRETIZERS)
def test_label_feature_on_top_constant_feature_zero(labelled, discretizer):
    X, y = labelled
    sel = GainRatioSelector(discretizer=discretizer).fit(X, y)
    assert sel.ranking_[0] == 4
    assert sel.scores_[5] == 0.0
    assert sel.ranking_[-1] == 5
    assert np.all((sel.scores_ >= 0) & (sel.scores_ <= 1 + 1e-12))
    if discretizer != "c45":
        # Three classes fall into three bins: g = H(D) = H_A(D).
        assert sel.scores_[4] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("discretizer", DISCRETIZERS + ("none",))
def test_shuffling_samples_changes_nothing(rng, discretizer):
    X = rng.standard_normal((200, 5)).astype(np.float32)
    if discretizer == "none":
        X = np.floor(np.abs(X) * 3)
    y = rng.integers(0, 4, 200)
    a = gain_ratio_scores(X, y, discretizer=discretizer)
    perm = rng.permutation(200)
    b = gain_ratio_scores(X[perm], y[perm], discretizer=discretizer)
    np.testing.assert_array_equal(a, b)


def test_quantile_bins_are_equal_frequency_and_ties_share_a_bin(rng):
    x = rng.permutation(20).astype(np.float32)
    codes = discretize(x[:, None], method="quantile", n_bins=4)[:, 0]
    assert np.bincount(codes).tolist() == [5, 5, 5, 5]
    assert np.all(np.diff(codes[np.argsort(x)]) >= 0)
    # Half the values tied at 0: they stay together, the bins they would straddle stay empty.
    tied = np.r_[np.zeros(10), np.arange(1, 11)].astype(np.float32)[:, None]
    codes = discretize(tied, method="quantile", n_bins=4)[:, 0]
    assert len(set(codes[:10])) == 1
    assert np.bincount(codes, minlength=4).tolist() == [0, 10, 5, 5]


def test_uniform_bins_are_equal_width():
    x = np.array([0, 1, 2, 3, 10, 9.99], dtype=np.float32)[:, None]
    assert discretize(x, method="uniform", n_bins=2)[:, 0].tolist() == [0, 0, 0, 0, 1, 1]
    assert discretize(x, method="quantile", n_bins=2)[:, 0].tolist() == [0, 0, 0, 1, 1, 1]
    assert discretize(x, method="uniform", n_bins=5)[:, 0].tolist() == [0, 0, 1, 1, 4, 4]


def test_uniform_and_quantile_differ_on_skewed_feature():
    # A value far out makes the equal-width bins collapse the rest into one bin.
    x = np.r_[np.arange(9), 1000].astype(np.float32)[:, None]
    y = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    assert gain_ratio_scores(x, y, discretizer="uniform", n_bins=2)[0] == pytest.approx(
        (_entropy([5, 5]) - 0.9 * _entropy([5, 4])) / _entropy([9, 1])
    )
    assert gain_ratio_scores(x, y, discretizer="quantile", n_bins=2)[0] == pytest.approx(1.0)


@pytest.mark.parametrize("discretizer", DISCRETIZERS)
def test_feature_blocks_give_the_same_scores(rng, monkeypatch, discretizer):
    X = rng.standard_normal((150, 37)).astype(np.float32)
    y = rng.integers(0, 5, 150)
    whole = gain_ratio_scores(X, y, discretizer=discretizer)
    monkeypatch.setattr(scores_module, "_BLOCK_BYTES", 150 * 4 * 48)  # a few features per block
    np.testing.assert_array_equal(gain_ratio_scores(X, y, discretizer=discretizer), whole)


def test_large_code_values_and_many_bins(rng):
    X = rng.integers(0, 60000, size=(100, 3))
    y = rng.integers(0, 2, 100)
    got = gain_ratio(X, y)
    want = [_binned_reference(X[:, j], y) for j in range(3)]
    np.testing.assert_allclose(got, want, atol=1e-12)
    Xf = rng.standard_normal((100, 2)).astype(np.float32)
    codes = discretize(Xf, method="quantile", n_bins=256)
    assert codes.max() < 256 and len(np.unique(codes[:, 0])) == 100
    with pytest.raises(ValueError, match=r"n_bins: expected an integer in \[2, 256\], got 257"):
        discretize(Xf, n_bins=257)


def test_discretize_and_gain_ratio_bad_input():
    with pytest.raises(ValueError, match="method"):
        discretize(np.zeros((3, 2)), method="c45")
    with pytest.raises(ValueError, match="n_bins"):
        discretize(np.zeros((3, 2)), n_bins=1)
    with pytest.raises(TypeError, match="n_bins"):
        discretize(np.zeros((3, 2)), n_bins=2.5)
    with pytest.raises(ValueError, match="codes: expected non-negative"):
        gain_ratio([[-1], [0]], [0, 1])
    with pytest.raises(ValueError, match="codes: expected integer codes below"):
        gain_ratio([[1 << 16], [0]], [0, 1])
    with pytest.raises(TypeError, match="codes: expected integer values"):
        gain_ratio([[0.5], [0]], [0, 1])
    with pytest.raises(ValueError, match="X: discretizer='none' expects integer"):
        gain_ratio_scores([[0.5], [0]], [0, 1], discretizer="none")
