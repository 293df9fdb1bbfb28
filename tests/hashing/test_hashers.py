"""ThresholdHasher (the paper's Algorithm 1 and variants) and ITQHasher."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.exceptions import NotFittedError

from dfsnet.hashing import ITQHasher, ThresholdHasher, unpack_bits


def test_paper_rule_bit_exact():
    # Row means 0.5 and 2.0; a value equal to the mean gives bit 1.
    X = np.array([[0.2, 0.9, 0.4, 0.5, 0.0, 1.0, 0.5, 0.5, 0.5],
                  [3.0, 1.0, 2.0, 2.0, 0.0, 4.0, 1.5, 2.5, 2.0]], dtype=np.float32)
    h = ThresholdHasher().fit(X[:1])
    assert h.n_bits_ == 9 and not hasattr(h, "thresholds_")
    codes = h.transform(X)
    # row 0 bits 0 1 0 1 0 1 1 1 | 1 ; row 1 bits 1 0 1 1 0 1 0 1 | 1
    assert codes.dtype == np.uint8 and codes.tolist() == [[0b01010111, 0x80], [0b10110101, 0x80]]


def test_sample_mean_ignores_fit_data(rng):
    X = rng.standard_normal((5, 16)).astype(np.float32)
    a = ThresholdHasher().fit(X).transform(X)
    b = ThresholdHasher().fit(X * 100 + 7).transform(X)
    np.testing.assert_array_equal(a, b)


def test_per_feature_and_zero_thresholds():
    X = np.array([[0.0, -1.0, 5.0], [1.0, 0.0, 6.0], [5.0, 1.0, 100.0]], dtype=np.float32)
    mean = ThresholdHasher(threshold="feature_mean").fit(X)
    np.testing.assert_allclose(mean.thresholds_, [2.0, 0.0, 37.0])
    np.testing.assert_array_equal(unpack_bits(mean.transform(X), 3),
                                  [[0, 0, 0], [0, 1, 0], [1, 1, 1]])
    median = ThresholdHasher(threshold="feature_median").fit(X)
    np.testing.assert_allclose(median.thresholds_, [1.0, 0.0, 6.0])
    np.testing.assert_array_equal(unpack_bits(median.transform(X), 3),
                                  [[0, 0, 0], [1, 1, 1], [1, 1, 1]])
    # "zero" is strict: a ReLU-zero feature is a 0 bit, otherwise every bit of pooled
    # non-negative features would be 1.
    zero = ThresholdHasher(threshold="zero").fit(X)
    np.testing.assert_array_equal(unpack_bits(zero.transform(X), 3),
                                  [[0, 0, 1], [1, 0, 1], [1, 1, 1]])
    # Refitting with a rule that learns nothing drops the old thresholds.
    assert not hasattr(mean.set_params(threshold="zero").fit(X), "thresholds_")


def test_threshold_hasher_bad_input():
    X = np.zeros((3, 4), dtype=np.float32)
    with pytest.raises(NotFittedError):
        ThresholdHasher().transform(X)
    with pytest.raises(ValueError, match=r"threshold: expected one of \['sample_mean'"):
        ThresholdHasher(threshold="median").fit(X)
    h = ThresholdHasher().fit(X)
    with pytest.raises(ValueError, match="X: expected 4 columns .* got 3"):
        h.transform(X[:, :3])
    with pytest.raises(ValueError, match="X: expected finite values"):
        h.transform(np.full((1, 4), np.nan))
    with pytest.raises(ValueError, match="X: expected a 2-D array"):
        h.fit(np.zeros(4))
    with pytest.raises(NotFittedError):  # was an AttributeError: the new rule's thresholds are not learned
        h.set_params(threshold="feature_mean").transform(X)


@pytest.fixture
def anisotropic(rng):
    # Decaying spectrum, as deep features have: PCA directions carry very unequal variance.
    scales = np.geomspace(2.0, 0.1, 24)
    return (rng.standard_normal((600, 24)) * scales @ np.linalg.qr(rng.standard_normal((24, 24)))[0]).astype(
        np.float32
    ) + 3.0


def test_itq_lowers_quantization_loss(anisotropic):
    X = anisotropic
    itq = ITQHasher(n_bits=8, n_iter=50).fit(X)
    losses = itq.quantization_loss_
    assert losses.shape == (51,)
    assert np.all(np.diff(losses) <= 1e-9 * losses[0])
    # The same PCA projection, binarised without a rotation.
    v = (X - itq.mean_) @ itq.components_.T
    unrotated = float(np.square(np.where(v >= 0, 1.0, -1.0) - v).sum() / len(X))
    assert itq.quantization_loss(X) == pytest.approx(losses[-1], rel=1e-5)
    assert losses[-1] < 0.9 * unrotated
    assert losses[-1] < 0.95 * losses[0]
    np.testing.assert_allclose(itq.rotation_ @ itq.rotation_.T, np.eye(8), atol=1e-10)


def test_itq_codes_are_signs_of_rotated_projection(anisotropic):
    X = anisotropic
    itq = ITQHasher(n_bits=12, n_iter=5, random_state=1).fit(X)
    codes = itq.transform(X)
    assert codes.dtype == np.uint8 and codes.shape == (600, 2)
    z = (X.astype(np.float64) - itq.mean_) @ itq.components_.T @ itq.rotation_
    bits = unpack_bits(codes, 12)
    clear = np.abs(z) > 1e-4  # float32 evaluation may flip values within rounding of 0
    np.testing.assert_array_equal(bits[clear], (z >= 0)[clear])
    again = ITQHasher(n_bits=12, n_iter=5, random_state=1).fit(X)
    np.testing.assert_array_equal(again.transform(X), codes)
    # Bits are roughly balanced: the data are centred before projection.
    assert 0.3 < bits.mean() < 0.7


def test_itq_bad_input(anisotropic):
    X = anisotropic
    with pytest.raises(ValueError, match="n_bits: .* n_bits <= the input dimension 24; got n_bits=32"):
        ITQHasher(n_bits=32).fit(X)
    with pytest.raises(ValueError, match="n_bits: expected at most the 5 training samples"):
        ITQHasher(n_bits=8).fit(X[:5])
    with pytest.raises(ValueError, match="n_bits: expected a positive integer"):
        ITQHasher(n_bits=0).fit(X)
    with pytest.raises(ValueError, match="n_iter"):
        ITQHasher(n_bits=4, n_iter=-1).fit(X)
    with pytest.raises(TypeError, match="n_iter: expected a non-negative integer, got 1.5"):
        ITQHasher(n_bits=4, n_iter=1.5).fit(X)
    with pytest.raises(ValueError, match=r"random_state: expected an int in \[0, 2\*\*32\) or None, got -1"):
        ITQHasher(n_bits=4, random_state=-1).fit(X)
    with pytest.raises(ValueError, match=r"X: expected at least 2 row\(s\), got shape \(1, 24\)"):
        ITQHasher(n_bits=1).fit(X[:1])
    with pytest.raises(ValueError, match="X: every one of the 24 columns is constant"):
        ITQHasher(n_bits=4).fit(np.ones_like(X))
    with pytest.raises(NotFittedError):
        ITQHasher(n_bits=4).transform(X)
    itq = ITQHasher(n_bits=4, n_iter=2).fit(X)
    with pytest.raises(ValueError, match="X: expected 24 columns .* got 23"):
        itq.transform(X[:, :23])
    with pytest.raises(TypeError):
        ITQHasher()  # n_bits is required


@pytest.mark.parametrize("cls, params", [(ThresholdHasher, {"threshold": "feature_median"}),
                                         (ITQHasher, {"n_bits": 4, "n_iter": 3, "random_state": 2})])
def test_hashers_clone_and_run_in_a_pipeline(anisotropic, cls, params):
    from sklearn.base import clone
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    hasher = cls(**params)
    copy = clone(hasher)
    assert copy.get_params() == hasher.get_params() and not hasattr(copy, "n_bits_")
    X = anisotropic
    pipe = make_pipeline(StandardScaler(), hasher).fit(X)
    scaled = StandardScaler().fit(X).transform(X)
    np.testing.assert_array_equal(pipe.transform(X), clone(hasher).fit(scaled).transform(scaled))
    assert pipe.transform(X).dtype == np.uint8


@pytest.mark.parametrize("threshold", ["sample_mean", "feature_mean", "feature_median", "zero"])
def test_threshold_prefix_equals_fitting_the_prefix(rng, threshold):
    X = rng.standard_normal((101, 30)).astype(np.float32)
    wide = ThresholdHasher(threshold=threshold).fit(X)
    for b in (1, 9, 30):
        short = wide.with_n_features(b)
        alone = ThresholdHasher(threshold=threshold).fit(np.ascontiguousarray(X[:, :b]))
        assert short.n_bits_ == short.n_features_in_ == b
        np.testing.assert_array_equal(short.transform(X[:, :b]), alone.transform(X[:, :b]))
        if hasattr(alone, "thresholds_"):
            np.testing.assert_array_equal(short.thresholds_, alone.thresholds_)
    with pytest.raises(ValueError, match="n_features: expected at most 30, got 31"):
        wide.with_n_features(31)
