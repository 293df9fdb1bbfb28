"""Input checks shared by the estimators, indexes and metrics.

Every error names the argument, what was expected and what was found, so a user
mistake never surfaces as a traceback from deep inside numpy, faiss or torch.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
from scipy.sparse import issparse
from sklearn.exceptions import NotFittedError

__all__ = [
    "NotFittedError",
    "check_array",
    "check_labels",
    "check_positive_int",
    "check_is_fitted",
    "check_choice",
    "check_seed",
]


def check_array(
    X,
    *,
    name: str = "X",
    ndim: int = 2,
    dtype=np.float32,
    allow_nonfinite: bool = False,
    min_rows: int = 1,
) -> np.ndarray:
    """Return ``X`` as a C-contiguous array of ``dtype`` after validating it.

    Sparse matrices and complex values are refused; an object array is accepted when all its
    items are numbers. A 2-D or higher array needs at least one column.

    Parameters
    ----------
    X : array-like, dense
    name : str
        Argument name used in error messages.
    ndim : int
        Required number of dimensions.
    dtype : numpy dtype or None
        Target dtype; ``None`` keeps the input dtype. Integer targets refuse float input
        with a fractional part instead of silently truncating.
    allow_nonfinite : bool
        Whether NaN and inf are accepted (only meaningful for float input).
    min_rows : int
        Minimum length of the first axis.

    Returns
    -------
    ndarray of ``dtype`` (the input's dtype if None), shape of ``X``, C-contiguous
    """
    if X is None:
        raise TypeError(f"{name}: expected an array, got None")
    if issparse(X):
        raise TypeError(f"{name}: sparse input is not supported; expected a dense array, got "
                        f"{type(X).__name__} (convert it with .toarray())")
    try:
        arr = np.asarray(X)
    except Exception as exc:  # ragged lists and similar
        raise TypeError(f"{name}: expected an array-like, got {type(X).__name__} ({exc})") from None
    if arr.dtype == object:
        try:
            arr = arr.astype(np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"{name}: expected a numeric array, got dtype object with non-numeric items") from None
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"{name}: expected real values, got complex dtype {arr.dtype} (complex data is not supported)")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise TypeError(f"{name}: expected a numeric array, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {arr.shape}")
    if arr.shape[0] < min_rows:
        raise ValueError(f"{name}: expected at least {min_rows} row(s), got shape {arr.shape}")
    if arr.ndim >= 2 and arr.shape[1] == 0:
        raise ValueError(f"{name}: expected at least 1 column, got shape {arr.shape}")
    if not allow_nonfinite and np.issubdtype(arr.dtype, np.floating):
        finite = np.isfinite(arr)
        if not finite.all():
            bad = np.argwhere(~finite)[0]
            raise ValueError(
                f"{name}: expected finite values, found {int((~finite).sum())} NaN/inf "
                f"(first at index {tuple(int(i) for i in bad)})"
            )
    if dtype is not None and arr.dtype != dtype:
        target = np.dtype(dtype)
        if np.issubdtype(target, np.integer) and np.issubdtype(arr.dtype, np.floating):
            if not np.all(arr == np.round(arr)):
                raise TypeError(f"{name}: expected integer values, got non-integral floats")
        arr = arr.astype(target)
    return np.ascontiguousarray(arr)


def check_labels(y, n_samples: int | None = None, *, name: str = "y", min_classes: int = 1) -> np.ndarray:
    """Validate class labels: integers of shape (n,), or a 0/1 multi-label matrix of shape (n, c).

    Integral floats are accepted; ``n_samples`` (if given) must equal n, and single-label
    input needs ``min_classes`` distinct values.

    Returns
    -------
    ndarray of int64, shape (n,), or the (n, c) matrix in its own integer or bool dtype; C-contiguous
    """
    y = np.asarray(y)
    if y.ndim not in (1, 2):
        raise ValueError(f"{name}: expected a 1-D label vector or a 2-D 0/1 label matrix, got shape {y.shape}")
    if y.dtype == object or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.bool_)):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise TypeError(f"{name}: expected integer labels, got dtype {y.dtype}")
    if n_samples is not None and y.shape[0] != n_samples:
        raise ValueError(f"{name}: expected {n_samples} labels to match the features, got {y.shape[0]}")
    if min_classes > 1 and y.ndim == 1:
        n_classes = np.unique(y).size
        if n_classes < min_classes:
            raise ValueError(f"{name}: expected at least {min_classes} classes, found {n_classes}")
    return np.ascontiguousarray(y.astype(np.int64) if y.ndim == 1 else y)


def check_positive_int(value, *, name: str, maximum: int | None = None) -> int:
    """Return ``value`` as an int, requiring ``1 <= value <= maximum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected a positive integer, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name}: expected a positive integer, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}: expected at most {maximum}, got {value}")
    return int(value)


def check_seed(value, *, name: str = "random_state") -> int | None:
    """Return a seed for ``numpy.random.default_rng``: None or an int in ``[0, 2**32)``.

    The upper bound is what scikit-learn estimators (e.g. PCA) accept as ``random_state``.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int or None, got {value!r}")
    if not 0 <= value < 2**32:
        raise ValueError(f"{name}: expected an int in [0, 2**32) or None, got {value}")
    return int(value)


def check_choice(value, choices: Iterable[str], *, name: str) -> str:
    """Require ``value`` to be one of ``choices``; the error lists them."""
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
    return value


def check_is_fitted(estimator, attributes: Iterable[str]) -> None:
    """Raise NotFittedError unless every attribute in ``attributes`` is set."""
    missing = [a for a in attributes if not hasattr(estimator, a)]
    if missing:
        raise NotFittedError(
            f"This {type(estimator).__name__} instance is not fitted yet; call fit() before using it."
        )
