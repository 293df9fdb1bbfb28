"""scikit-learn's estimator contract (sklearn.utils.estimator_checks) for every dfsnet estimator."""
from __future__ import annotations

from sklearn.utils.estimator_checks import parametrize_with_checks

from dfsnet.hashing import Encoder, ITQHasher, LinearHasher, ThresholdHasher
from dfsnet.selection import GainRatioSelector, RandomSelector

# The checks fit on as few as 2 features, so every instance keeps at most 2.
ESTIMATORS = [
    GainRatioSelector(n_features=2),
    GainRatioSelector(discretizer="c45"),
    RandomSelector(n_features=2),
    ThresholdHasher(),
    ThresholdHasher(threshold="feature_median"),
    ThresholdHasher(threshold="zero"),
    ITQHasher(n_bits=2),
    Encoder(selector=GainRatioSelector(n_features=2), hasher=ThresholdHasher()),
    Encoder(selector=RandomSelector(n_features=2), hasher=ThresholdHasher(threshold="feature_mean")),
    Encoder(selector=None, hasher=ITQHasher(n_bits=2, n_iter=5)),
    LinearHasher(n_bits=8, epochs=3),
    LinearHasher(n_bits=4, loss="orthohash", epochs=2),
    Encoder(selector=GainRatioSelector(n_features=2), hasher=LinearHasher(n_bits=4, epochs=2)),
]


@parametrize_with_checks(ESTIMATORS)
def test_sklearn_compatible(estimator, check):
    check(estimator)
