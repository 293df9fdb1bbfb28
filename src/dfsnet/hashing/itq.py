"""Iterative quantization (Gong & Lazebnik, CVPR 2011): PCA, then a rotation learned to binarise well."""
from __future__ import annotations

import logging

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.decomposition import PCA

from dfsnet._validation import check_is_fitted, check_positive_int, check_seed, validate_data
from dfsnet.errors import InputError, InputTypeError
from dfsnet.hashing.frozen import itq_project

__all__ = ["ITQHasher"]

logger = logging.getLogger(__name__)


class ITQHasher(TransformerMixin, BaseEstimator):
    """Iterative quantization hashing.

    ``fit`` centres the data, projects it on its top ``n_bits`` principal directions (``V``), starts
    from a random orthogonal rotation ``R`` and alternates ``B = sign(V R)`` with the orthogonal
    Procrustes update of ``R`` (``R = U W^T`` from the SVD ``V^T B = U S W^T``), which minimises the
    quantization loss ``||B - V R||_F^2`` for fixed ``B``. Both steps never increase the loss.
    ``transform`` returns ``sign((x - mean_) @ components_.T @ rotation_)`` as packed bits
    (1 where the projection is ``>= 0``).

    Parameters
    ----------
    n_bits : int
        Code length; at most the input dimension and the number of training samples.
    n_iter : int
        Alternating iterations (0 keeps the random rotation).
    random_state : int or None
        Seed of the initial rotation and of the PCA solver, in ``[0, 2**32)``.

    Attributes
    ----------
    n_bits_ : int
    n_features_in_ : int
    mean_ : ndarray of float64, shape (n_features_in_,)
    components_ : ndarray of float64, shape (n_bits_, n_features_in_)
        Principal directions, one per row.
    rotation_ : ndarray of float64, shape (n_bits_, n_bits_)
        Learned orthogonal rotation.
    quantization_loss_ : ndarray of float64, shape (n_iter + 1,)
        ``||sign(V R) - V R||_F^2 / n`` on the training data for the initial rotation and after each
        iteration; non-increasing.
    """

    _persist_arrays = ("mean_", "components_", "rotation_", "quantization_loss_")
    _persist_scalars = ("n_bits_", "n_features_in_")

    def __init__(self, *, n_bits, n_iter=50, random_state=0):
        self.n_bits = n_bits
        self.n_iter = n_iter
        self.random_state = random_state

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # Packed uint8 codes, whatever the input dtype.
        tags.transformer_tags.preserves_dtype = []
        return tags

    def fit(self, X, y=None):
        """Learn the projection and the rotation.

        Parameters
        ----------
        X : array-like of float, shape (n, d)
            Converted to float32; must be finite; n >= 2.
        y : ignored

        Returns
        -------
        self
        """
        # PCA needs two samples to have a direction at all.
        X = validate_data(self, X, reset=True, min_rows=2)
        n, d = X.shape
        n_bits = check_positive_int(self.n_bits, name="n_bits")
        if n_bits > d:
            raise InputError(
                f"n_bits: ITQ projects onto principal directions, so it needs n_bits <= the input "
                f"dimension {d}; got n_bits={n_bits} (X has {d} feature(s))"
            )
        if n_bits > n:
            raise InputError(f"n_bits: expected at most the {n} training samples for PCA, got {n_bits}")
        if isinstance(self.n_iter, bool) or not isinstance(self.n_iter, (int, np.integer)):
            raise InputTypeError(f"n_iter: expected a non-negative integer, got {self.n_iter!r}")
        if self.n_iter < 0:
            raise InputError(f"n_iter: expected a non-negative integer, got {self.n_iter}")
        seed = check_seed(self.random_state)
        if not np.ptp(X, axis=0).any():
            raise InputError(f"X: every one of the {d} columns is constant over the {n} samples; ITQ's PCA "
                             "needs features that vary")

        pca = PCA(n_components=n_bits, random_state=seed).fit(X)
        self.mean_ = pca.mean_.astype(np.float64)
        self.components_ = pca.components_.astype(np.float64)
        v = self._project(X).astype(np.float64)

        rng = np.random.default_rng(seed)
        rotation, _ = np.linalg.qr(rng.standard_normal((n_bits, n_bits)))
        losses = []
        for _ in range(int(self.n_iter)):
            z = v @ rotation
            b = np.where(z >= 0, 1.0, -1.0)
            losses.append(self._loss(b, z))
            u, _, wt = np.linalg.svd(v.T @ b)
            rotation = u @ wt
        z = v @ rotation
        losses.append(self._loss(np.where(z >= 0, 1.0, -1.0), z))
        self.rotation_ = rotation
        self.quantization_loss_ = np.asarray(losses, dtype=np.float64)
        self.n_features_in_ = int(d)
        self.n_bits_ = n_bits
        logger.debug("ITQ %d bits: quantization loss %.4f -> %.4f", n_bits, losses[0], losses[-1])
        return self

    @staticmethod
    def _loss(b: np.ndarray, z: np.ndarray) -> float:
        return float(np.square(b - z).sum() / z.shape[0])

    def _project(self, X: np.ndarray, rotation: np.ndarray | None = None) -> np.ndarray:
        """``(X - mean_) @ components_.T [@ rotation]`` for float32 X (n, d); float32 (n, n_bits_).

        Computed as ``X @ W - mean_ @ W`` in float32, which avoids a centred float64 copy of X.
        """
        return itq_project(X, self.mean_, self.components_, rotation)

    def _check_input(self, X) -> np.ndarray:
        check_is_fitted(self, ("rotation_",))
        return validate_data(self, X, reset=False)

    def transform(self, X) -> np.ndarray:
        """Hash ``X`` into packed codes.

        Parameters
        ----------
        X : array-like of float, shape (n, n_features_in_)

        Returns
        -------
        ndarray of uint8, shape (n, ceil(n_bits_ / 8))
            Bit order as in :func:`dfsnet.hashing.pack_bits`.
        """
        X = self._check_input(X)
        return np.packbits(self._project(X, self.rotation_) >= 0, axis=1, bitorder="big")

    def quantization_loss(self, X) -> float:
        """Mean squared distance between the rotated projections and their signs.

        Parameters
        ----------
        X : array-like of float, shape (n, n_features_in_)

        Returns
        -------
        float
            ``||sign(V R) - V R||_F^2 / n`` with ``V`` the PCA projection of ``X``.
        """
        z = self._project(self._check_input(X), self.rotation_).astype(np.float64)
        return self._loss(np.where(z >= 0, 1.0, -1.0), z)

    def _validate_fitted_state(self) -> None:
        """Consistency of the learned attributes (used when loading them from a file)."""
        b, d = self.n_bits_, self.n_features_in_
        expected = {"mean_": (d,), "components_": (b, d), "rotation_": (b, b)}
        for name, shape in expected.items():
            if getattr(self, name).shape != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {getattr(self, name).shape}")
