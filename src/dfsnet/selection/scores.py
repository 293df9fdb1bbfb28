"""C4.5 information gain ratio of every feature against class labels, vectorised across features.

With ``D`` the samples, ``C_n`` the samples of class ``n`` and ``D_i`` the samples whose
(discretised) feature value is ``i``, the DFS-Net paper's equations (1)-(5) are C4.5's::

    H(D)   = -sum_n |C_n|/|D| log2(|C_n|/|D|)          entropy of the labels
    H(D|A) =  sum_i |D_i|/|D| H(D_i)                   conditional entropy given feature A
    g      =  H(D) - H(D|A)                            information gain
    H_A(D) = -sum_i |D_i|/|D| log2(|D_i|/|D|)          split information
    gR     =  g / H_A(D)                               gain ratio, 0 where H_A(D) = 0

All of them follow from the contingency table ``N[i, n]`` of one feature. Writing
``T(x) = x log2 x`` (with ``T(0) = 0``) and ``|D| = N``::

    H(D)   = log2 N - sum_n T(|C_n|) / N
    H(D|A) = (sum_i T(|D_i|) - sum_{i,n} T(N[i, n])) / N
    H_A(D) = log2 N - sum_i T(|D_i|) / N

which is how they are computed here: one ``bincount`` builds the tables of a whole block of
features, and the entropies are sums over the tables.
"""
from __future__ import annotations

import numpy as np

from dfsnet._validation import check_array, check_choice, check_labels

__all__ = ["DISCRETIZERS", "discretize", "gain_ratio", "gain_ratio_scores"]

#: Discretisation methods accepted by :func:`gain_ratio_scores` and ``GainRatioSelector``.
DISCRETIZERS = ("quantile", "uniform", "c45", "none")

# Largest integer code accepted by discretizer="none"; it bounds the size of the count tables.
MAX_CODE = 1 << 16
# Binning costs one vectorised pass over the data per edge, and more bins than this only add
# estimation bias to the gain ratio (it grows with the number of values).
MAX_BINS = 256

# Working memory per feature block. Features are processed in blocks of columns so that
# 50,000 x 2,048 inputs never need more than a few hundred MB on top of X itself.
_BLOCK_BYTES = 256 << 20


def _xlog2x(a: np.ndarray) -> np.ndarray:
    """``a * log2(a)`` elementwise with ``0 log 0 = 0``; float64."""
    a = np.asarray(a, dtype=np.float64)
    out = np.zeros_like(a)
    pos = a > 0
    out[pos] = a[pos] * np.log2(a[pos])
    return out


def _encode_labels(y, n_samples: int) -> tuple[np.ndarray, int]:
    """Map labels to ``0..K-1``; return them as intp and ``K``."""
    y = check_labels(y, n_samples, name="y", min_classes=2)
    if y.ndim != 1:
        raise ValueError(f"y: expected a 1-D vector of class labels, got shape {y.shape}")
    classes, codes = np.unique(y, return_inverse=True)
    return codes.astype(np.intp).ravel(), int(classes.size)


def _block_size(n_samples: int, n_features: int, bytes_per_value: int, table_cells: int = 0) -> int:
    """Features per block: ``bytes_per_value`` per sample plus a count table of ``table_cells``
    cells per feature (int64 counts and three float64 temporaries) within ``_BLOCK_BYTES``."""
    per_feature = n_samples * bytes_per_value + table_cells * 32
    return int(max(1, min(n_features, _BLOCK_BYTES // max(1, per_feature))))


def _ratio_from_counts(counts: np.ndarray) -> np.ndarray:
    """Gain ratio of each feature from its contingency table.

    Parameters
    ----------
    counts : ndarray of int64, shape (f, B, K)
        ``counts[j, i, n]`` = samples of class ``n`` with value ``i`` in feature ``j``.

    Returns
    -------
    ndarray of float64, shape (f,)
    """
    n = counts[0].sum()
    log_n = np.log2(n)
    class_sizes = counts[0].sum(axis=0)
    h_d = log_n - _xlog2x(class_sizes).sum() / n
    value_sizes = counts.sum(axis=2)
    t_values = _xlog2x(value_sizes).sum(axis=1)
    h_d_given_a = (t_values - _xlog2x(counts).sum(axis=(1, 2))) / n
    split_info = log_n - t_values / n
    # Rounding can leave a gain of -1e-17 where the true value is 0.
    gain = np.maximum(h_d - h_d_given_a, 0.0)
    informative = (value_sizes > 0).sum(axis=1) > 1
    return np.where(informative, gain / np.where(informative, split_info, 1.0), 0.0)


def _count_table(codes: np.ndarray, base: np.ndarray, n_codes: int, n_classes: int) -> np.ndarray:
    """Contingency tables of a block of discretised features, with a single ``bincount``.

    Parameters
    ----------
    codes : ndarray of unsigned int, shape (f, n)
        Codes in ``[0, n_codes)``, one row per feature.
    base : ndarray of intp, shape (>= f, n)
        ``base[j, i] = j * n_codes * n_classes + class index of sample i`` (see :func:`_count_base`).

    Returns
    -------
    ndarray of int64, shape (f, n_codes, n_classes)
    """
    f = codes.shape[0]
    flat = np.multiply(codes, n_classes, dtype=np.intp)
    flat += base[:f]
    counts = np.bincount(flat.ravel(), minlength=f * n_codes * n_classes)
    return counts.reshape(f, n_codes, n_classes)


def _count_base(cls: np.ndarray, n_rows: int, n_codes: int, n_classes: int) -> np.ndarray:
    """Offsets that make the (feature, code, class) cells of a block distinct; intp (n_rows, n)."""
    offsets = np.arange(n_rows, dtype=np.intp) * (n_codes * n_classes)
    return offsets[:, None] + cls[None, :]


def _transposed(X: np.ndarray, start: int, stop: int) -> np.ndarray:
    """``X[:, start:stop].T`` as a C-contiguous array (one row per feature).

    Copied in tiles of rows: a direct transposed copy of a tall matrix misses the cache on every
    read and costs several times more.
    """
    out = np.empty((stop - start, X.shape[0]), dtype=X.dtype)
    tile = 256
    for i in range(0, X.shape[0], tile):
        out[:, i : i + tile] = X[i : i + tile, start:stop].T
    return out


def _code_dtype(n_codes: int):
    return np.uint8 if n_codes <= 1 << 8 else np.uint16 if n_codes <= 1 << 16 else np.uint32


def _quantile_codes(xt: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-frequency codes of each row of ``xt`` (float32, shape (f, n)) -> uint (f, n).

    Edge ``k`` is the order statistic ``sorted(x)[floor(k n / n_bins)]``, ``k = 1..n_bins-1``, and a
    value's code is the number of edges ``<=`` it, so with distinct values bin ``k`` holds exactly
    ``floor((k+1) n / n_bins) - floor(k n / n_bins)`` samples. Tied values always share a bin (the
    bins they would straddle stay empty).
    """
    n = xt.shape[1]
    positions = (np.arange(1, n_bins, dtype=np.int64) * n) // n_bins
    edges = np.sort(xt, axis=1)[:, positions]
    return _codes_from_edges(xt, edges, n_bins)


def _uniform_codes(xt: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width codes of each row of ``xt`` (float32, shape (f, n)) over ``[min, max]``.

    Edge ``k`` is ``min + k (max - min) / n_bins``; the maximum falls in the last bin. A constant row
    gets code 0 everywhere.
    """
    lo = xt.min(axis=1).astype(np.float64)
    hi = xt.max(axis=1).astype(np.float64)
    steps = np.arange(1, n_bins, dtype=np.float64) / n_bins
    edges = lo[:, None] + (hi - lo)[:, None] * steps[None, :]
    # Round each edge up to the nearest float32: for float32 x, x >= edge32 exactly when
    # x >= edge, and comparing float32 with float32 avoids a float64 upcast of every value.
    edges32 = edges.astype(np.float32)
    low = edges32.astype(np.float64) < edges
    edges32[low] = np.nextafter(edges32[low], np.float32(np.inf))
    return _codes_from_edges(xt, edges32, n_bins)


def _codes_from_edges(xt: np.ndarray, edges: np.ndarray, n_bins: int) -> np.ndarray:
    # One vectorised comparison per edge (n_bins - 1 passes) rather than a per-row searchsorted.
    codes = np.zeros(xt.shape, dtype=_code_dtype(n_bins))
    for k in range(edges.shape[1]):
        codes += xt >= edges[:, k : k + 1]
    return codes


def _c45_block(xt: np.ndarray, cls: np.ndarray, n_classes: int) -> np.ndarray:
    """Gain ratio of the best binary split of each row of ``xt`` (float32, shape (f, n)).

    As C4.5 does for a continuous attribute, every threshold between two consecutive distinct
    values is a candidate; the one with the largest information gain is chosen (the lowest such
    threshold on ties, up to rounding) and the score is that split's gain ratio.

    ``xt`` is overwritten.
    """
    f, n = xt.shape
    # Sort (value, class) pairs packed into one int64 key instead of an argsort: the class rides in
    # the low 32 bits and numpy's SIMD sort handles int64. The float bits become an int32 with the
    # same order by flipping the magnitude bits of negatives; + 0.0 merges -0.0 into +0.0.
    xt += np.float32(0.0)
    bits = xt.view(np.int32)
    flip = bits >> 31
    flip &= 0x7FFFFFFF
    bits ^= flip
    del flip
    keys = bits.astype(np.int64)
    del xt, bits
    keys <<= 32
    keys |= cls
    keys.sort(axis=1)
    # Casting to a narrow unsigned type keeps the low bits, i.e. the class.
    classes = keys.astype(_code_dtype(n_classes))
    # Split after position i (left = first i+1 samples) is a candidate where the value changes,
    # i.e. where consecutive keys differ above the low 32 bits.
    valid = (keys[:, 1:] ^ keys[:, :-1]).view(np.uint64) >= np.uint64(1 << 32)
    del keys

    # With T(x) = x log2 x, sum_c [T(left_c) + T(right_c)] changes at each step only through the
    # class c of the sample moving left: by T(r+1) - T(r) + T(N_c-r-1) - T(N_c-r), r = earlier
    # samples of class c. In class-major order (a stable radix argsort of the classes) r and c are
    # the same for every feature, so the increments are one precomputed vector scattered per row.
    table = _xlog2x(np.arange(n + 1))
    class_sizes = np.bincount(cls, minlength=n_classes)
    class_of = np.repeat(np.arange(n_classes), class_sizes)
    r = np.arange(n) - (np.cumsum(class_sizes) - class_sizes)[class_of]
    remaining = class_sizes[class_of] - r
    increments = table[r + 1] - table[r] + table[remaining - 1] - table[remaining]
    order = np.argsort(classes, axis=1, kind="stable")
    del classes
    running = np.empty((f, n), dtype=np.float64)
    np.put_along_axis(running, order, increments[None, :], axis=1)
    del order
    np.cumsum(running, axis=1, out=running)

    n_left = np.arange(1, n, dtype=np.intp)
    t_sizes = table[n_left] + table[n - n_left]
    # info(i) * n = t_sizes[i] - sum_c T(N_c) - running[i]; the best split maximises running - t_sizes.
    objective = np.where(valid, running[:, :-1] - t_sizes, -np.inf)
    best = np.argmax(objective, axis=1)
    t_classes = _xlog2x(class_sizes).sum()
    h_d = np.log2(n) - t_classes / n
    info = (t_sizes[best] - t_classes - running[np.arange(f), best]) / n
    best_gain = np.maximum(h_d - info, 0.0)
    split_info = np.log2(n) - t_sizes[best] / n
    has_split = valid.any(axis=1)
    return np.where(has_split, best_gain / np.where(has_split, split_info, 1.0), 0.0)


def _check_n_bins(n_bins) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)):
        raise TypeError(f"n_bins: expected an integer >= 2, got {n_bins!r}")
    if n_bins < 2 or n_bins > MAX_BINS:
        raise ValueError(f"n_bins: expected an integer in [2, {MAX_BINS}], got {n_bins}")
    return int(n_bins)


def _check_codes(codes: np.ndarray, name: str) -> int:
    """Require non-negative integer codes below MAX_CODE; return the number of codes used."""
    if codes.size == 0:
        return 1
    lo, hi = codes.min(), codes.max()
    if lo < 0:
        raise ValueError(f"{name}: expected non-negative integer codes, found {lo}")
    if hi >= MAX_CODE:
        raise ValueError(f"{name}: expected integer codes below {MAX_CODE}, found {hi}")
    return int(hi) + 1


def discretize(X, *, method: str = "quantile", n_bins: int = 10) -> np.ndarray:
    """Discretise every column of ``X`` on its own, as :class:`GainRatioSelector` does.

    Parameters
    ----------
    X : array-like of float, shape (n, d)
        Converted to float32; must be finite.
    method : {"quantile", "uniform"}
        ``"quantile"``: equal-frequency bins whose edges are order statistics (tied values share a
        bin). ``"uniform"``: equal-width bins over each column's ``[min, max]``.
    n_bins : int
        Number of bins, in ``[2, 256]``.

    Returns
    -------
    ndarray of int64, shape (n, d)
        Bin index of every value, in ``[0, n_bins)``.
    """
    check_choice(method, ("quantile", "uniform"), name="method")
    n_bins = _check_n_bins(n_bins)
    X = check_array(X, name="X")
    fn = _quantile_codes if method == "quantile" else _uniform_codes
    out = np.empty(X.shape, dtype=np.int64)
    step = _block_size(X.shape[0], X.shape[1], 16)
    for j in range(0, X.shape[1], step):
        out[:, j : j + step] = fn(_transposed(X, j, min(X.shape[1], j + step)), n_bins).T
    return out


def gain_ratio(codes, y) -> np.ndarray:
    """Gain ratio of already-discrete features, by equations (1)-(5).

    Parameters
    ----------
    codes : array-like of int, shape (n, d)
        Non-negative integer category codes (below 65,536), e.g. from :func:`discretize`; codes
        need not be contiguous (unused codes are empty values and change nothing).
    y : array-like of int, shape (n,)
        Class labels, at least two distinct values.

    Returns
    -------
    ndarray of float64, shape (d,)
        Gain ratio of each column; 0 for a column with a single value.
    """
    codes = check_array(codes, name="codes", dtype=np.int64)
    cls, n_classes = _encode_labels(y, codes.shape[0])
    n_codes = _check_codes(codes, "codes")
    return _scores_binned(codes, cls, n_classes, lambda xt: xt, n_codes)


def _scores_binned(X: np.ndarray, cls: np.ndarray, n_classes: int, to_codes, n_codes: int) -> np.ndarray:
    n, d = X.shape
    scores = np.empty(d, dtype=np.float64)
    # Bytes per value in a block: transposed copy, its sorted copy, codes, flat index and base.
    step = _block_size(n, d, 32, n_codes * n_classes)
    base = _count_base(cls, step, n_codes, n_classes)
    for j in range(0, d, step):
        counts = _count_table(to_codes(_transposed(X, j, min(d, j + step))), base, n_codes, n_classes)
        scores[j : j + step] = _ratio_from_counts(counts)
    return scores


def gain_ratio_scores(X, y, *, discretizer: str = "quantile", n_bins: int = 10) -> np.ndarray:
    """Gain ratio of every column of ``X`` against ``y`` after discretisation.

    Parameters
    ----------
    X : array-like, shape (n, d)
        Features, converted to float32; must be finite. For ``discretizer="none"`` they must be
        non-negative integer codes below 65,536.
    y : array-like of int, shape (n,)
        Class labels, at least two distinct values.
    discretizer : {"quantile", "uniform", "c45", "none"}
        ``"quantile"`` and ``"uniform"``: see :func:`discretize`. ``"c45"``: the best binary
        threshold per feature by information gain over all thresholds between distinct values, as
        C4.5 treats a continuous attribute, scored by that split's gain ratio (``n_bins`` unused;
        no MDL correction of the gain). ``"none"``: ``X`` already holds category codes.
    n_bins : int
        Bins for ``"quantile"`` and ``"uniform"``, in ``[2, 256]``.

    Returns
    -------
    ndarray of float64, shape (d,)
    """
    check_choice(discretizer, DISCRETIZERS, name="discretizer")
    n_bins = _check_n_bins(n_bins)
    X = check_array(X, name="X")
    cls, n_classes = _encode_labels(y, X.shape[0])
    n, d = X.shape
    if discretizer == "quantile":
        return _scores_binned(X, cls, n_classes, lambda xt: _quantile_codes(xt, n_bins), n_bins)
    if discretizer == "uniform":
        return _scores_binned(X, cls, n_classes, lambda xt: _uniform_codes(xt, n_bins), n_bins)
    if discretizer == "none":
        if not np.all(X == np.round(X)):
            raise ValueError("X: discretizer='none' expects integer category codes, got fractional values")
        n_codes = _check_codes(X, "X")
        return _scores_binned(X, cls, n_classes, lambda xt: xt.astype(_code_dtype(n_codes)), n_codes)
    scores = np.empty(d, dtype=np.float64)
    step = _block_size(n, d, 48)
    for j in range(0, d, step):
        scores[j : j + step] = _c45_block(_transposed(X, j, min(d, j + step)), cls, n_classes)
    return scores
