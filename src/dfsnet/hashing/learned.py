"""Learned hash layers: a linear map of the pooled feature, trained to class hash centres.

A b-bit hash layer is ``u = x W + bias`` on a D-wide pooled feature; the code is
``sign(u) >= 0``, packed like every other hasher's. Two losses train it, both towards one
binary *centre* per class (:func:`hash_centres`):

- ``"csq"`` (Yuan et al., CVPR 2020, "Central Similarity Quantization"): binary cross-entropy
  between ``(tanh(u) + 1) / 2`` and ``(c_y + 1) / 2``, plus ``lam * mean((|tanh u| - 1)^2)``;
- ``"orthohash"`` (Hoe et al., NeurIPS 2021): cross-entropy over the scaled cosine similarity
  of ``u`` with every centre, with an additive margin on the true class, plus the same
  quantisation term.

DFS-Net trains such a layer jointly with its classifier (``DFSNet(hash_bits=b)``, see
:mod:`dfsnet.train.module`); :class:`LinearHasher` holds the exported layer as a scikit-learn
transformer (``from_weights``), or fits one on given features with the same loss.

Torch is imported inside the functions that train (this room loads numpy and scipy only).
"""
from __future__ import annotations

import logging
import math

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

from dfsnet._validation import (
    check_choice,
    check_is_fitted,
    check_labels,
    check_positive_int,
    check_seed,
    validate_data,
)
from dfsnet.errors import InputError, InputTypeError
from dfsnet.hashing.bits import pack_bits
from dfsnet.hashing.frozen import linear_project

__all__ = ["HASH_LOSSES", "LinearHasher", "hash_centres", "hash_loss"]

logger = logging.getLogger(__name__)

#: Losses of a learned hash layer.
HASH_LOSSES = ("csq", "orthohash")


def hash_centres(n_classes: int, n_bits: int, *, random_state: int | None = 0) -> np.ndarray:
    """One +-1 hash centre per class, as CSQ draws them.

    With ``n_bits`` a power of two, the rows of the ``n_bits x n_bits`` Hadamard matrix and then
    of its negation: any two distinct rows of H are at Hamming distance ``n_bits / 2`` (a row
    and its own negation at ``n_bits``), so up to ``2 * n_bits`` classes get mutually far
    centres. Past ``2 * n_bits`` classes, or for another ``n_bits``, every centre is drawn
    uniformly at random from {-1, +1}^b (expected pairwise distance ``n_bits / 2``).

    Parameters
    ----------
    n_classes : int
    n_bits : int
    random_state : int or None
        Seed of the random centres.

    Returns
    -------
    ndarray of float32, shape (n_classes, n_bits)
        Entries -1 or +1.
    """
    n_classes = check_positive_int(n_classes, name="n_classes")
    n_bits = check_positive_int(n_bits, name="n_bits")
    if n_bits & (n_bits - 1) == 0 and n_classes <= 2 * n_bits:
        from scipy.linalg import hadamard

        h = hadamard(n_bits).astype(np.float32)
        return np.concatenate([h, -h])[:n_classes].copy()
    rng = np.random.default_rng(check_seed(random_state))
    return np.where(rng.random((n_classes, n_bits)) < 0.5, -1.0, 1.0).astype(np.float32)


def hash_loss(u, centres, y, *, loss: str = "csq", lam: float = 1e-4, scale: float = 8.0, margin: float = 0.2):
    """The training loss of a hash layer's outputs against the class centres (torch).

    Parameters
    ----------
    u : torch.Tensor, float, shape (N, b)
        Hash layer outputs (before any squashing).
    centres : torch.Tensor, float, shape (C, b)
        +-1 centres of :func:`hash_centres`.
    y : torch.Tensor, int64, shape (N,)
        Class labels in ``[0, C)``.
    loss : {"csq", "orthohash"}
    lam : float
        Weight of the quantisation term ``mean((|tanh u| - 1)^2)``.
    scale, margin : float
        OrthoHash's cosine scale and additive margin.

    Returns
    -------
    torch.Tensor, float, shape ()
    """
    import torch
    import torch.nn.functional as F

    u = u.float()
    t = torch.tanh(u)
    quantisation = (t.abs() - 1.0).pow(2).mean()
    if loss == "csq":
        target = (centres[y] + 1.0) / 2.0
        # BCE of (tanh u + 1) / 2 against the centre's bits, written on the logits 2u for stability.
        main = F.binary_cross_entropy_with_logits(2.0 * u, target)
    elif loss == "orthohash":
        cos = F.normalize(u, dim=1) @ F.normalize(centres, dim=1).T
        cos = cos - margin * F.one_hot(y, centres.shape[0]).to(cos.dtype)
        main = F.cross_entropy(scale * cos, y)
    else:
        raise InputError(f"loss: expected one of {HASH_LOSSES}, got {loss!r}")
    return main + lam * quantisation


class LinearHasher(TransformerMixin, BaseEstimator):
    """A linear hash layer: packed codes of ``sign(X @ coef_ + intercept_)``.

    ``fit(X, y)`` learns the layer on given features with a learned-hash loss (Adam on
    minibatches, deterministic for a given ``random_state``); :meth:`from_weights` wraps a
    layer trained elsewhere (DFS-Net's hash head) as a fitted instance. Features are
    standardised inside ``fit`` and the scaling folded into ``coef_`` / ``intercept_``, so
    ``transform`` is one affine map.

    Parameters
    ----------
    n_bits : int
        Code length b.
    loss : {"csq", "orthohash"}
        See :func:`hash_loss`.
    lam : float
        Weight of the quantisation term.
    epochs : int
        Passes over the training data.
    lr : float
        Adam's learning rate.
    weight_decay : float
    batch_size : int
    random_state : int or None
        Seeds the initial weights, the batch order and the random centres.

    Attributes
    ----------
    coef_ : ndarray of float32, shape (n_features_in_, n_bits_)
    intercept_ : ndarray of float32, shape (n_bits_,)
    n_bits_ : int
    n_features_in_ : int
    """

    _persist_arrays = ("coef_", "intercept_")
    _persist_scalars = ("n_bits_", "n_features_in_")

    def __init__(self, *, n_bits=64, loss="csq", lam=1e-4, epochs=30, lr=1e-3, weight_decay=1e-4,
                 batch_size=256, random_state=0):
        self.n_bits = n_bits
        self.loss = loss
        self.lam = lam
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.random_state = random_state

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = []  # packed uint8 codes
        tags.target_tags.required = True
        return tags

    @classmethod
    def from_weights(cls, weight, bias, **params) -> LinearHasher:
        """A fitted hasher from a trained layer ``u = x @ weight.T + bias`` (torch's Linear layout).

        Parameters
        ----------
        weight : array-like of float, shape (b, D)
        bias : array-like of float, shape (b,)
        **params
            Constructor parameters recorded with it (``n_bits`` is set from ``weight``).

        Returns
        -------
        LinearHasher
        """
        weight = np.asarray(weight, dtype=np.float32)
        bias = np.asarray(bias, dtype=np.float32)
        if weight.ndim != 2 or bias.shape != (weight.shape[0],):
            raise InputError(f"weight, bias: expected shapes (b, D) and (b,), got {weight.shape} and {bias.shape}")
        if not (np.isfinite(weight).all() and np.isfinite(bias).all()):
            raise InputError("weight, bias: expected finite values")
        out = cls(**{**params, "n_bits": int(weight.shape[0])})
        out.coef_ = np.ascontiguousarray(weight.T)
        out.intercept_ = bias.copy()
        out.n_bits_, out.n_features_in_ = int(weight.shape[0]), int(weight.shape[1])
        return out

    def _check_params(self) -> None:
        check_positive_int(self.n_bits, name="n_bits")
        check_choice(self.loss, HASH_LOSSES, name="loss")
        check_positive_int(self.batch_size, name="batch_size")
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, (int, np.integer)) or self.epochs < 0:
            raise InputTypeError(f"epochs: expected a non-negative integer, got {self.epochs!r}")
        for name in ("lam", "lr", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise InputError(f"{name}: expected a finite non-negative number, got {value!r}")

    def fit(self, X, y):
        """Learn the layer on features ``X`` with class labels ``y``.

        Parameters
        ----------
        X : array-like of float, shape (n, d)
            Converted to float32; must be finite.
        y : array-like of int, shape (n,)
            Class labels (any integers; mapped to centres in sorted order).

        Returns
        -------
        self
        """
        import torch

        self._check_params()
        X = validate_data(self, X, reset=True)
        if y is None:
            raise InputError("y: LinearHasher requires y to be passed, but the target y is None (it learns "
                             "codes from class labels)")
        y = check_labels(y, X.shape[0], name="y")
        if y.ndim != 1:
            raise InputError(f"y: expected one class label per row, shape ({X.shape[0]},), got {y.shape}")
        classes, y_idx = np.unique(y, return_inverse=True)
        n, d = X.shape
        b = int(self.n_bits)
        seed = check_seed(self.random_state)
        # Standardised inputs make one learning rate fit any feature scale.
        mean = X.mean(axis=0, dtype=np.float64)
        std = X.std(axis=0, dtype=np.float64)
        std = np.where(std > 1e-12, std, 1.0)
        gen = torch.Generator().manual_seed(0 if seed is None else seed)
        xs = torch.from_numpy(((X - mean) / std).astype(np.float32))
        ys = torch.from_numpy(y_idx.astype(np.int64))
        centres = torch.from_numpy(hash_centres(len(classes), b, random_state=seed))
        layer = torch.nn.Linear(d, b)
        with torch.no_grad():
            bound = 1.0 / math.sqrt(d)
            layer.weight.uniform_(-bound, bound, generator=gen)
            layer.bias.zero_()
        opt = torch.optim.AdamW(layer.parameters(), lr=float(self.lr), weight_decay=float(self.weight_decay))
        steps = max(1, int(self.epochs) * math.ceil(n / int(self.batch_size)))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        for _ in range(int(self.epochs)):
            order = torch.randperm(n, generator=gen)
            for start in range(0, n, int(self.batch_size)):
                idx = order[start:start + int(self.batch_size)]
                loss = hash_loss(layer(xs[idx]), centres, ys[idx], loss=self.loss, lam=float(self.lam))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        w = layer.weight.detach().numpy().astype(np.float64)  # (b, d)
        bias = layer.bias.detach().numpy().astype(np.float64)
        # Fold the standardisation in: ((x - m) / s) W^T + c = x (W / s)^T + (c - (m / s) W^T).
        self.coef_ = np.ascontiguousarray((w / std).T.astype(np.float32))
        self.intercept_ = (bias - (mean / std) @ w.T).astype(np.float32)
        self.n_bits_, self.n_features_in_ = b, int(d)
        return self

    def project(self, X) -> np.ndarray:
        """The layer's real-valued outputs.

        Parameters
        ----------
        X : array-like of float, shape (n, n_features_in_)

        Returns
        -------
        ndarray of float32, shape (n, n_bits_)
        """
        check_is_fitted(self, ("coef_",))
        X = validate_data(self, X, reset=False)
        return linear_project(X, self.coef_, self.intercept_)

    def transform(self, X) -> np.ndarray:
        """Packed codes: bit i is 1 where output i is >= 0.

        Parameters
        ----------
        X : array-like of float, shape (n, n_features_in_)

        Returns
        -------
        ndarray of uint8, shape (n, ceil(n_bits_ / 8))
        """
        return pack_bits(self.project(X) >= 0)

    def _validate_fitted_state(self) -> None:
        """Consistency of the learned attributes (used when loading them from a file)."""
        b, d = self.n_bits_, self.n_features_in_
        for name, shape in (("coef_", (d, b)), ("intercept_", (b,))):
            value = getattr(self, name)
            if value.shape != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {value.shape}")
            if not np.isfinite(value).all():
                raise ValueError(f"{name}: expected finite values")
            setattr(self, name, np.ascontiguousarray(value, dtype=np.float32))
