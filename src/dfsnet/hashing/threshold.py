"""Threshold hashing: one bit per feature, 1 where the value reaches a threshold."""
from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

from dfsnet._validation import check_choice, check_is_fitted, validate_data
from dfsnet.hashing.frozen import threshold_bits

__all__ = ["THRESHOLDS", "ThresholdHasher"]

#: Threshold rules of :class:`ThresholdHasher`.
THRESHOLDS = ("sample_mean", "feature_mean", "feature_median", "zero")

#: Rules that learn one threshold per feature in ``fit`` (``thresholds_``).
PER_FEATURE = ("feature_mean", "feature_median")


class ThresholdHasher(TransformerMixin, BaseEstimator):
    """Binarise each feature against a threshold; bit ``i`` is 1 where ``x[i] >= threshold``
    (``x[i] > 0`` for ``"zero"``).

    Parameters
    ----------
    threshold : {"sample_mean", "feature_mean", "feature_median", "zero"}
        ``"sample_mean"`` (default) is the DFS-Net paper's Algorithm 1: each vector is compared with
        the mean of its own ``b`` values, so ``fit`` learns nothing but ``b``. ``"feature_mean"`` and
        ``"feature_median"``: one threshold per dimension, the mean or median of that column over the
        ``fit`` data. ``"zero"``: whether each value is positive (``x > 0``); strict, because pooled
        ReLU features are never negative and ``>= 0`` would set every bit.

    Attributes
    ----------
    n_bits_ : int
        Code length, equal to the number of input columns.
    n_features_in_ : int
    thresholds_ : ndarray of float64, shape (n_bits_,)
        Per-dimension thresholds; only for ``"feature_mean"`` and ``"feature_median"``.

    Notes
    -----
    Means are accumulated in float64; the comparison is exact between the float32 value and the
    float64 threshold. Encoder files written before this class was renamed name it
    ``MeanThresholdHasher``; :meth:`dfsnet.hashing.Encoder.load` reads them as this class.
    """

    _persist_arrays = ("thresholds_",)
    _persist_scalars = ("n_bits_", "n_features_in_")

    def __init__(self, *, threshold="sample_mean"):
        self.threshold = threshold

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # Packed uint8 codes, whatever the input dtype.
        tags.transformer_tags.preserves_dtype = []
        return tags

    def fit(self, X, y=None):
        """Learn the code length and, for per-feature rules, the thresholds.

        Parameters
        ----------
        X : array-like of float, shape (n, b)
            Converted to float32; must be finite.
        y : ignored

        Returns
        -------
        self
        """
        check_choice(self.threshold, THRESHOLDS, name="threshold")
        X = validate_data(self, X, reset=True)
        self.n_features_in_ = self.n_bits_ = int(X.shape[1])
        if self.threshold == "feature_mean":
            self.thresholds_ = X.mean(axis=0, dtype=np.float64)
        elif self.threshold == "feature_median":
            self.thresholds_ = np.median(X, axis=0).astype(np.float64)
        elif hasattr(self, "thresholds_"):
            del self.thresholds_
        return self

    def transform(self, X) -> np.ndarray:
        """Hash ``X`` into packed codes.

        Parameters
        ----------
        X : array-like of float, shape (n, n_bits_)

        Returns
        -------
        ndarray of uint8, shape (n, ceil(n_bits_ / 8))
            Bit order as in :func:`dfsnet.hashing.pack_bits`.
        """
        return np.packbits(self.bits(X), axis=1, bitorder="big")

    def bits(self, X) -> np.ndarray:
        """The codes unpacked.

        Parameters
        ----------
        X : array-like of float, shape (n, n_bits_)

        Returns
        -------
        ndarray of bool, shape (n, n_bits_)
        """
        check_is_fitted(self, ("n_bits_",))
        check_choice(self.threshold, THRESHOLDS, name="threshold")
        X = validate_data(self, X, reset=False)
        if self.threshold in PER_FEATURE:
            # A per-feature rule set with set_params after fitting another rule has no thresholds yet.
            check_is_fitted(self, ("thresholds_",))
        return threshold_bits(X, self.threshold, getattr(self, "thresholds_", None))

    def with_n_features(self, n_features: int) -> ThresholdHasher:
        """A fitted copy for the first ``n_features`` input columns, without refitting.

        Threshold bits are per column: ``"sample_mean"`` and ``"zero"`` learn nothing but the
        width, and the per-feature thresholds of ``"feature_mean"``/``"feature_median"`` of a
        column do not depend on the other columns, so the copy equals this hasher fitted on
        ``X[:, :n_features]``.

        Parameters
        ----------
        n_features : int
            Columns (bits) to keep, ``1 <= n_features <= n_bits_``.

        Returns
        -------
        ThresholdHasher
            Fitted, with ``n_bits_ == n_features``; ``thresholds_`` (float64, shape
            (n_features,)) is a copy of the first ``n_features`` thresholds.
        """
        from sklearn.base import clone

        from dfsnet._validation import check_positive_int

        check_is_fitted(self, ("n_bits_",))
        b = check_positive_int(n_features, name="n_features", maximum=self.n_bits_,
                               what=f" (this hasher was fitted on {self.n_bits_} feature(s))")
        out = clone(self)
        out.n_features_in_ = out.n_bits_ = b
        if hasattr(self, "thresholds_"):
            out.thresholds_ = self.thresholds_[:b].copy()
        out._validate_fitted_state()
        return out

    def _validate_fitted_state(self) -> None:
        """Consistency of the learned attributes (used when loading them from a file)."""
        check_choice(self.threshold, THRESHOLDS, name="threshold")
        per_feature = self.threshold in PER_FEATURE
        if per_feature != hasattr(self, "thresholds_"):
            state = "missing" if per_feature else "unexpected"
            raise ValueError(f"thresholds_: {state} for threshold={self.threshold!r}")
        if per_feature and self.thresholds_.shape != (self.n_bits_,):
            raise ValueError(f"thresholds_: expected shape ({self.n_bits_},), got {self.thresholds_.shape}")
