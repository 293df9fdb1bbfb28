"""Input checks shared by the estimators, indexes and metrics.

Every error names the argument, what was expected and what was found, so a user
mistake never surfaces as a traceback from deep inside numpy, faiss or torch.
"""
from __future__ import annotations

import sys
from collections.abc import Iterable

import numpy as np

from dfsnet.errors import InputError, InputTypeError

# scikit-learn and scipy are imported where an estimator needs them, not here: the indexes and
# the search path use these checks, and importing scikit-learn costs about a second.

__all__ = [
    "check_array",
    "check_codes",
    "check_labels",
    "check_positive_int",
    "check_is_fitted",
    "check_choice",
    "check_seed",
    "validate_data",
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

    Raises
    ------
    InputTypeError
        None, sparse, non-numeric or ragged input, or non-integral floats for an integer ``dtype``.
    InputError
        Complex values, wrong number of dimensions, too few rows, no column, NaN or inf.

    Notes
    -----
    Messages name the argument, what was expected and what was found; they also carry the
    phrases scikit-learn's estimator checks look for ("Complex data not supported",
    "Reshape your data", "0 feature(s)", "n_samples=").
    """
    if X is None:
        raise InputTypeError(f"{name}: expected an array, got None")
    sparse = sys.modules.get("scipy.sparse")  # a sparse matrix exists only once scipy.sparse is imported
    if sparse is not None and sparse.issparse(X):
        raise InputTypeError(f"{name}: sparse input is not supported; expected a dense array, got "
                             f"{type(X).__name__} (convert it with .toarray())")
    try:
        arr = np.asarray(X)
    except Exception as exc:  # ragged lists and similar
        raise InputTypeError(f"{name}: expected an array-like, got {type(X).__name__} ({exc})") from None
    if arr.dtype == object:
        try:
            arr = arr.astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise InputTypeError(f"{name}: expected a numeric array, got dtype object with non-numeric items "
                                 f"({exc})") from None
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise InputError(f"{name}: expected real values, got complex dtype {arr.dtype} (Complex data not supported)")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise InputTypeError(f"{name}: expected a numeric array, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        hint = ""
        if ndim == 2 and arr.ndim == 1:
            hint = (". Reshape your data with array.reshape(-1, 1) if it has a single feature or "
                    "array.reshape(1, -1) if it is a single sample")
        raise InputError(f"{name}: expected a {ndim}-D array, got shape {arr.shape}{hint}")
    if arr.shape[0] < min_rows:
        raise InputError(f"{name}: expected at least {min_rows} row(s), got shape {arr.shape} "
                         f"(n_samples={arr.shape[0]})")
    if arr.ndim >= 2 and arr.shape[1] == 0:
        raise InputError(f"{name}: expected at least 1 column, got 0 feature(s) (shape={arr.shape}) while a "
                         f"minimum of 1 is required.")
    if not allow_nonfinite and np.issubdtype(arr.dtype, np.floating):
        finite = np.isfinite(arr)
        if not finite.all():
            bad = np.argwhere(~finite)[0]
            raise InputError(
                f"{name}: expected finite values, found {int((~finite).sum())} NaN/inf "
                f"(first at index {tuple(int(i) for i in bad)})"
            )
    if dtype is not None and arr.dtype != dtype:
        target = np.dtype(dtype)
        if np.issubdtype(target, np.integer) and np.issubdtype(arr.dtype, np.floating):
            if not np.all(arr == np.round(arr)):
                raise InputTypeError(f"{name}: expected integer values, got non-integral floats")
        arr = arr.astype(target)
    return np.ascontiguousarray(arr)


def check_codes(codes, *, name: str, min_rows: int = 1) -> np.ndarray:
    """Validate packed binary codes: a 2-D uint8 array, one row per code.

    The one check of packed codes shared by :mod:`dfsnet.hashing`, :mod:`dfsnet.eval.metrics`
    and :mod:`dfsnet.index` (callers check the code width against their ``n_bits``).

    Parameters
    ----------
    codes : ndarray of uint8, shape (n, n_bytes)
    name : str
        Argument name used in error messages.
    min_rows : int
        Minimum number of codes.

    Returns
    -------
    ndarray of uint8, shape (n, n_bytes), C-contiguous (the input itself when it already is)

    Raises
    ------
    InputTypeError
        None, or a dtype other than uint8 (booleans get a hint to pack them first).
    InputError
        Not 2-D, fewer than ``min_rows`` codes, or zero bytes per code.
    """
    arr = None if codes is None else np.asarray(codes)
    if arr is not None and arr.dtype != np.uint8:
        hint = " (pack bits with dfsnet.hashing.pack_bits)" if arr.dtype == np.bool_ else ""
        raise InputTypeError(f"{name}: expected packed uint8 codes, got dtype {arr.dtype}{hint}")
    return check_array(arr, name=name, ndim=2, dtype=np.uint8, min_rows=min_rows)


def check_labels(y, n_samples: int | None = None, *, name: str = "y", min_classes: int = 1) -> np.ndarray:
    """Validate class labels: integers of shape (n,), or a 0/1 multi-label matrix of shape (n, c).

    Integral floats are accepted; ``n_samples`` (if given) must equal n, and single-label
    input needs ``min_classes`` distinct values.

    Parameters
    ----------
    y : array-like of int, shape (n,), or 0/1 matrix, shape (n, c)
    n_samples : int or None
        Required length of the first axis.
    name : str
        Argument name used in error messages.
    min_classes : int
        Distinct values single-label input needs.

    Returns
    -------
    ndarray of int64, shape (n,), or the (n, c) matrix in its own integer or bool dtype; C-contiguous

    Raises
    ------
    InputTypeError
        Labels that are not integers (object arrays among them: "Unknown label type").
    InputError
        Wrong shape, length or number of classes.
    """
    y = np.asarray(y)
    if y.ndim not in (1, 2):
        raise InputError(f"{name}: expected a 1-D label vector or a 2-D 0/1 label matrix, got shape {y.shape}")
    if y.dtype == object:
        raise InputTypeError(f"{name}: expected integer labels, got dtype object (Unknown label type: "
                             "convert the labels to an integer array)")
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.bool_)):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise InputTypeError(f"{name}: expected integer labels, got dtype {y.dtype}")
    if n_samples is not None and y.shape[0] != n_samples:
        raise InputError(f"{name}: expected {n_samples} labels to match the features, got {y.shape[0]}")
    if min_classes > 1 and y.ndim == 1:
        n_classes = np.unique(y).size
        if n_classes < min_classes:
            plural = "class" if n_classes == 1 else "classes"
            raise InputError(f"{name}: expected at least {min_classes} classes, found {n_classes} {plural}")
    return np.ascontiguousarray(y.astype(np.int64) if y.ndim == 1 else y)


def check_positive_int(value, *, name: str, maximum: int | None = None, what: str = "") -> int:
    """Return ``value`` as an int, requiring ``1 <= value <= maximum``.

    ``what`` (e.g. ``" (X has 3 feature(s))"``) is appended to the message when ``value``
    exceeds ``maximum``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputTypeError(f"{name}: expected a positive integer, got {value!r}")
    if value <= 0:
        raise InputError(f"{name}: expected a positive integer, got {value}")
    if maximum is not None and value > maximum:
        raise InputError(f"{name}: expected at most {maximum}, got {value}{what}")
    return int(value)


def check_seed(value, *, name: str = "random_state") -> int | None:
    """Return a seed for ``numpy.random.default_rng``: None or an int in ``[0, 2**32)``.

    The upper bound is what scikit-learn estimators (e.g. PCA) accept as ``random_state``.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputTypeError(f"{name}: expected an int or None, got {value!r}")
    if not 0 <= value < 2**32:
        raise InputError(f"{name}: expected an int in [0, 2**32) or None, got {value}")
    return int(value)


def check_choice(value, choices: Iterable[str], *, name: str) -> str:
    """Require ``value`` to be one of ``choices``; the error lists them."""
    choices = list(choices)
    if value not in choices:
        raise InputError(f"{name}: expected one of {choices}, got {value!r}")
    return value


def check_is_fitted(estimator, attributes: Iterable[str]) -> None:
    """Raise NotFittedError unless every attribute in ``attributes`` is set.

    scikit-learn's :func:`sklearn.utils.validation.check_is_fitted` with dfsnet's message.
    """
    from sklearn.utils.validation import check_is_fitted as sk_check_is_fitted

    sk_check_is_fitted(
        estimator, list(attributes),
        msg="This %(name)s instance is not fitted yet; call fit() before using it.",
    )


def validate_data(estimator, X, y="no_validation", *, reset: bool, name: str = "X", dtype=np.float32,
                  min_rows: int = 1) -> np.ndarray:
    """Validate the features of an estimator's ``fit`` (``reset=True``) or later method.

    :func:`check_array` converts and checks ``X`` (with dfsnet's messages); then scikit-learn's
    :func:`sklearn.utils.validation.validate_data` (without converting again) records
    ``n_features_in_`` and, for a DataFrame, ``feature_names_in_`` on ``reset``, refuses
    ``y=None`` when the estimator's tags say it requires ``y``, and checks feature names after
    fit. The width after fit is checked here first, so the message names what was expected.

    Parameters
    ----------
    estimator : BaseEstimator
    X : array-like, shape (n, d)
    y : array-like, None or "no_validation"
        Only checked for None against the ``target_tags.required`` tag; labels are validated
        by :func:`check_labels` where they are used.
    reset : bool
        True in ``fit``: set ``n_features_in_``; False: require ``d == n_features_in_``.
    name : str
        Argument name used in error messages.
    dtype : numpy dtype or None
        As in :func:`check_array`.
    min_rows : int
        As in :func:`check_array`.

    Returns
    -------
    ndarray of ``dtype``, shape (n, d), C-contiguous
    """
    from sklearn.utils import validation as _skv

    if y is None and _skv.get_tags(estimator).target_tags.required:
        cls = type(estimator).__name__
        raise InputError(f"y: {cls} needs class labels, got None ({cls} requires y to be passed, but the "
                         "target y is None)")
    arr = check_array(X, name=name, dtype=dtype, min_rows=min_rows)
    if not reset and hasattr(estimator, "n_features_in_") and arr.shape[1] != estimator.n_features_in_:
        expected, cls = estimator.n_features_in_, type(estimator).__name__
        raise InputError(f"{name}: expected {expected} columns (the features seen in fit), got {arr.shape[1]} "
                         f"({name} has {arr.shape[1]} features, but {cls} is expecting {expected} features "
                         "as input)")
    try:
        _skv.validate_data(estimator, X, reset=reset, skip_check_array=True)
    except ValueError as exc:  # feature names that differ from fit's
        raise InputError(f"{name}: {exc}") from None
    return arr
