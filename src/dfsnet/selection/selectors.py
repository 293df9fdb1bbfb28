"""Feature selectors: C4.5 gain ratio ranking (the paper's) and a random ranking (ablation)."""
from __future__ import annotations

import logging
import time

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

from dfsnet._validation import (
    check_choice,
    check_is_fitted,
    check_positive_int,
    check_seed,
    validate_data,
)
from dfsnet.errors import InputError
from dfsnet.selection.scores import DISCRETIZERS, _check_n_bins, gain_ratio_scores

__all__ = ["GainRatioSelector", "RandomSelector"]

logger = logging.getLogger(__name__)


class _RankingSelector(TransformerMixin, BaseEstimator):
    """Shared transform of selectors that rank features: keep the top ``n_features`` in rank order."""

    _persist_arrays = ("scores_", "ranking_")
    _persist_scalars = ("n_features_in_",)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # transform returns float32 whatever the input dtype (the contract of dfsnet's features).
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags

    def _check_n_features(self, n_features_in: int) -> int:
        if self.n_features is None:
            return n_features_in
        return check_positive_int(self.n_features, name="n_features", maximum=n_features_in,
                                  what=f" (X has {n_features_in} feature(s))")

    def _set_ranking(self, scores: np.ndarray) -> None:
        self.scores_ = np.asarray(scores, dtype=np.float64)
        # Stable sort of the negated scores: equal scores keep ascending feature index.
        self.ranking_ = np.argsort(-self.scores_, kind="stable").astype(np.int64)
        self.n_features_in_ = int(self.scores_.shape[0])

    def transform(self, X) -> np.ndarray:
        """Keep the top ``n_features`` columns, best first.

        Parameters
        ----------
        X : array-like of float, shape (n, n_features_in_)

        Returns
        -------
        ndarray of float32, shape (n, n_features) (``n_features_in_`` columns if ``n_features`` is
        None), C-contiguous.
        """
        check_is_fitted(self, ("ranking_",))
        X = validate_data(self, X, reset=False)
        # np.take gathers whole rows at a time: many times faster than fancy indexing X[:, idx]
        # by a long column permutation, with the same values.
        return np.take(X, self.selected_features_, axis=1)

    @property
    def selected_features_(self) -> np.ndarray:
        """Indices of the kept input columns, best first; int64, shape (n_features,)."""
        check_is_fitted(self, ("ranking_",))
        return self.ranking_[: self._check_n_features(self.n_features_in_)]

    def _validate_fitted_state(self) -> None:
        """Consistency of the learned attributes (used when loading them from a file)."""
        d = self.n_features_in_
        if self.scores_.shape != (d,) or self.ranking_.shape != (d,):
            raise InputError(
                f"scores_ and ranking_: expected shape ({d},), got {self.scores_.shape} and {self.ranking_.shape}"
            )
        if not np.array_equal(np.sort(self.ranking_), np.arange(d)):
            raise InputError("ranking_: expected a permutation of the feature indices")
        self._check_n_features(d)


class GainRatioSelector(_RankingSelector):
    """Rank features by C4.5 information gain ratio against class labels; keep the best.

    The ranking of the DFS-Net paper (equations (1)-(5)); see :mod:`dfsnet.selection.scores` for the
    formulas. Computed for all features at once (vectorised across feature blocks).

    Parameters
    ----------
    n_features : int or None
        Number of columns ``transform`` keeps. None keeps all of them, reordered best first.
    discretizer : {"quantile", "uniform", "c45", "none"}
        How continuous features become discrete values. ``"quantile"`` (default): ``n_bins``
        equal-frequency bins whose edges are order statistics; tied values share a bin.
        ``"uniform"``: ``n_bins`` equal-width bins over the feature's ``[min, max]``. ``"c45"``: the
        best binary threshold by information gain among all thresholds between distinct values, as
        C4.5 treats a continuous attribute, scored by the gain ratio of that split (``n_bins``
        unused). ``"none"``: ``X`` already holds non-negative integer category codes (below 65,536).
    n_bins : int
        Bins per feature for ``"quantile"`` and ``"uniform"``, in ``[2, 256]``.

    Attributes
    ----------
    scores_ : ndarray of float64, shape (n_features_in_,)
        Gain ratio of each feature, in [0, 1]; 0 for a constant feature.
    ranking_ : ndarray of int64, shape (n_features_in_,)
        Feature indices, best first; equal scores in ascending index order.
    n_features_in_ : int
    """

    def __init__(self, *, n_features=None, discretizer="quantile", n_bins=10):
        self.n_features = n_features
        self.discretizer = discretizer
        self.n_bins = n_bins

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True  # gain ratio is measured against the class labels
        return tags

    def fit(self, X, y):
        """Score every feature.

        Parameters
        ----------
        X : array-like of float, shape (n, d)
            Converted to float32; must be finite.
        y : array-like of int, shape (n,)
            Class labels, at least two distinct values.

        Returns
        -------
        self
        """
        check_choice(self.discretizer, DISCRETIZERS, name="discretizer")
        _check_n_bins(self.n_bins)
        X = validate_data(self, X, y, reset=True)
        self._check_n_features(X.shape[1])
        start = time.perf_counter()
        scores = gain_ratio_scores(X, y, discretizer=self.discretizer, n_bins=self.n_bins)
        logger.debug("gain ratio of %d features x %d samples (%s) in %.2f s",
                     X.shape[1], X.shape[0], self.discretizer, time.perf_counter() - start)
        self._set_ranking(scores)
        return self


class RandomSelector(_RankingSelector):
    """Rank features in a random order: the ablation baseline for :class:`GainRatioSelector`.

    Parameters
    ----------
    n_features : int or None
        Number of columns ``transform`` keeps; None keeps all, shuffled.
    random_state : int or None
        Seed of ``numpy.random.default_rng``, in ``[0, 2**32)``; None draws a fresh order on every fit.

    Attributes
    ----------
    scores_ : ndarray of float64, shape (n_features_in_,)
        Independent uniform draws in [0, 1); the ranking sorts them in descending order.
    ranking_ : ndarray of int64, shape (n_features_in_,)
    n_features_in_ : int
    """

    def __init__(self, *, n_features=None, random_state=0):
        self.n_features = n_features
        self.random_state = random_state

    def fit(self, X, y=None):
        """Draw a ranking of the columns of ``X``; ``y`` is ignored (checked for length if given).

        Parameters
        ----------
        X : array-like of float, shape (n, d)
        y : None or array-like of shape (n,)

        Returns
        -------
        self
        """
        X = validate_data(self, X, reset=True)
        if y is not None and np.asarray(y).shape[:1] != (X.shape[0],):
            raise InputError(f"y: expected {X.shape[0]} labels to match X, got shape {np.asarray(y).shape}")
        seed = check_seed(self.random_state)
        self._check_n_features(X.shape[1])
        rng = np.random.default_rng(seed)
        self._set_ranking(rng.random(X.shape[1]))
        return self
