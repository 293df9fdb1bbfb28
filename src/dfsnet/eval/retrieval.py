"""One call that scores float (Euclidean) and hashed (Hamming) retrieval on a feature split.

:func:`retrieval_eval` is what the experiment runner calls for every scheme: it fits the selector
and hasher on the train features only, encodes the query and database features, puts the database
in a ``dfsnet.index`` index, and scores mAP@all, mAP@k and precision@k on the rankings that index
returns for every query (the whole database, searched in query blocks), so that the numbers are
those of the search a deployment runs. It also times fitting, encoding and a top-``k`` search of
every query.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np

from dfsnet._validation import check_array, check_choice, check_labels, check_positive_int
from dfsnet.errors import InputError, InputTypeError
from dfsnet.eval.metrics import TIES, search_map

__all__ = ["retrieval_eval", "ROW_KEYS"]

logger = logging.getLogger(__name__)

#: Keys of every row returned by :func:`retrieval_eval`, in order.
ROW_KEYS = ("method", "bits", "selector", "hasher", "metric", "ties", "map_all", "map_at_k", "k",
            "precision_at_k", "fit_seconds", "encode_seconds", "search_seconds", "seconds_per_query",
            "bytes_per_item")


def _check_bits(bits, d: int, selector: str | None, hasher: str) -> list[int]:
    if isinstance(bits, (int, np.integer)):
        bits = [bits]
    bits = [check_positive_int(b, name="bits") for b in bits]
    if not bits:
        raise InputError("bits: expected at least one code length, got none")
    if len(set(bits)) != len(bits):
        raise InputError(f"bits: expected distinct code lengths, got {bits}")
    too_long = [b for b in bits if b > d]
    if too_long:
        raise InputError(f"bits: {too_long} larger than the feature width {d}; "
                         f"a code can have at most one bit per feature")
    if selector is None and hasher != "itq" and bits != [d]:
        raise InputError(
            f"bits: hasher={hasher!r} without a selector makes one bit per feature, so bits must be "
            f"[{d}], got {bits}; pass a selector or hasher='itq' for shorter codes"
        )
    return bits


def _check_ties_modes(ties) -> list[str]:
    modes = [ties] if isinstance(ties, str) else list(ties)
    if not modes:
        raise InputError(f"ties: expected at least one of {list(TIES)}, got none")
    for mode in modes:
        check_choice(mode, TIES, name="ties")
    if len(set(modes)) != len(modes):
        raise InputError(f"ties: expected distinct modes, got {modes}")
    return modes


def _row(**values) -> dict:
    return {key: values[key] for key in ROW_KEYS}


def retrieval_eval(train_features: np.ndarray, train_labels: np.ndarray, query_features: np.ndarray,
                   query_labels: np.ndarray, db_features: np.ndarray, db_labels: np.ndarray, *,
                   bits: int | Sequence[int] = (16, 32, 64, 128), selector: str | None = "gain_ratio",
                   hasher: str = "sample_mean", k: int = 1000, ties: str | Sequence[str] = ("stable",),
                   euclidean: bool = True) -> list[dict]:
    """Score Euclidean and Hamming retrieval per code length; one tidy row per result.

    For every code length ``b`` in ``bits`` an encoder (``selector`` keeping ``b`` features, then
    ``hasher``; see :func:`dfsnet.hashing.make_encoder`) is fitted on the train features and
    labels only, the query and database features are encoded, the database codes go into a flat
    :class:`~dfsnet.index.HammingIndex`, and every query's ranking of the whole database comes
    from its ``search`` (ties in ascending database index). With ``euclidean=True`` the float
    features are also ranked, by a :class:`~dfsnet.index.FloatIndex` (squared L2; the no-hashing
    baseline; ``bits`` is None in its rows). mAP is computed on those search results
    (:func:`dfsnet.eval.metrics.search_map`), so it is exactly :func:`~dfsnet.eval.hamming_map`
    of the codes, and for the float rows the mAP of exact float64 distances.

    The selector's ranking does not depend on ``b``: one encoder is fitted for the longest code
    and every shorter one is derived from it with :meth:`dfsnet.hashing.Encoder.with_n_bits`
    (a prefix of the ranking and of the threshold bits; ITQ is refitted on the train features
    for each length), which gives the same codes as fitting each length on its own.

    Parameters
    ----------
    train_features : array-like of float, shape (n_train, d)
    train_labels : array-like of int, shape (n_train,)
        Fit data of the selector and hasher.
    query_features : array-like of float, shape (nq, d)
    query_labels : array-like of int, shape (nq,), or 0/1 matrix, shape (nq, c)
    db_features : array-like of float, shape (n_db, d)
    db_labels : array-like of int, shape (n_db,), or 0/1 matrix, shape (n_db, c)
        Relevance: equal labels (single-label) or at least one shared label (multi-label).
    bits : int or sequence of int
        Distinct code lengths, each at most ``d``. Without a selector, a threshold hasher makes
        one bit per feature, so only ``bits=[d]`` is valid there.
    selector : {"gain_ratio", "random", None}
    hasher : {"sample_mean", "feature_mean", "feature_median", "zero", "itq"}
    k : int
        Cut-off of mAP@k (DeepHash-pytorch definition, see :mod:`dfsnet.eval.metrics`) and
        precision@k, and the ``k`` of the timed index search.
    ties : str or sequence of {"stable", "expected"}
        Tie modes to report; one row per mode.
    euclidean : bool
        Also score Euclidean ranking of the float features.

    Returns
    -------
    list of dict
        Rows with the keys in :data:`ROW_KEYS`:

        - ``method``: ``"euclidean"``, or ``"<selector>+<hasher>"`` (``"<hasher>"`` without a
          selector); ``metric``: ``"euclidean"`` or ``"hamming"``; ``bits``: code length or None;
          ``selector``, ``hasher``: names or None; ``ties``.
        - ``map_all``, ``map_at_k``, ``precision_at_k`` (float in [0, 1]) and ``k``.
        - ``fit_seconds`` (fitting the longest code's encoder on the train set, plus deriving
          this length from it; 0 for Euclidean),
          ``encode_seconds`` (query and database features to codes; 0 for Euclidean),
          ``search_seconds`` (top-``k`` search of all queries on a flat ``HammingIndex`` or
          ``FloatIndex`` holding the database; building the index is not included),
          ``seconds_per_query`` and ``bytes_per_item`` (stored size of one database item).
    """
    from dfsnet.hashing import make_encoder
    from dfsnet.index import FloatIndex, HammingIndex

    train = check_array(train_features, name="train_features")
    query = check_array(query_features, name="query_features")
    db = check_array(db_features, name="db_features")
    d = train.shape[1]
    for name, arr in (("query_features", query), ("db_features", db)):
        if arr.shape[1] != d:
            raise InputError(f"{name}: expected {d} columns like train_features, got {arr.shape[1]}")
    # Gain ratio ranks features against class labels: one label per item, at least two classes.
    needs_classes = selector == "gain_ratio"
    train_y = check_labels(train_labels, train.shape[0], name="train_labels",
                           min_classes=2 if needs_classes else 1)
    if needs_classes and train_y.ndim != 1:
        raise InputError(f"train_labels: selector='gain_ratio' needs one class label per item, shape "
                         f"({train.shape[0]},), got shape {train_y.shape}")
    query_y = check_labels(query_labels, query.shape[0], name="query_labels")
    db_y = check_labels(db_labels, db.shape[0], name="db_labels")
    k = check_positive_int(k, name="k")
    modes = _check_ties_modes(ties)
    if not isinstance(euclidean, (bool, np.bool_)):
        raise InputTypeError(f"euclidean: expected a bool, got {euclidean!r}")
    bits = _check_bits(bits, d, selector, hasher)
    # Builds and validates the steps by name before any fitting (unknown names list the valid ones).
    widest = max(bits)
    base = make_encoder(selector=selector, hasher=hasher,
                        n_bits=None if selector is None and hasher != "itq" else widest)
    search_k = min(k, db.shape[0])
    nq = query.shape[0]
    rows: list[dict] = []

    if euclidean:
        index = FloatIndex(d, metric="l2")
        index.add(db)
        start = time.perf_counter()
        index.search(query, search_k)
        search_seconds = time.perf_counter() - start
        scores = search_map(index.search, query, query_y, db_y, ks=[None, k], ties=modes)
        del index
        for mode in modes:
            s = scores[mode]
            rows.append(_row(method="euclidean", bits=None, selector=None, hasher=None, metric="euclidean",
                             ties=mode, map_all=s[None].map, map_at_k=s[k].map, k=k,
                             precision_at_k=s[k].precision_at_k, fit_seconds=0.0, encode_seconds=0.0,
                             search_seconds=search_seconds, seconds_per_query=search_seconds / nq,
                             bytes_per_item=int(db.itemsize * d)))
            logger.debug("euclidean ties=%s: mAP@all %.4f, mAP@%d %.4f", mode, s[None].map, k, s[k].map)

    start = time.perf_counter()
    base.fit(train, train_y)
    base_seconds = time.perf_counter() - start
    method = hasher if selector is None else f"{selector}+{hasher}"
    for b in bits:
        start = time.perf_counter()
        encoder = base.with_n_bits(b, train)
        fit_seconds = base_seconds + time.perf_counter() - start
        start = time.perf_counter()
        q_codes = encoder.transform(query)
        db_codes = encoder.transform(db)
        encode_seconds = time.perf_counter() - start
        n_bits = int(encoder.n_bits_)
        index = HammingIndex(n_bits)
        index.add(db_codes)
        start = time.perf_counter()
        index.search(q_codes, search_k)
        search_seconds = time.perf_counter() - start
        scores = search_map(index.search, q_codes, query_y, db_y, ks=[None, k], ties=modes)
        del index
        for mode in modes:
            s = scores[mode]
            rows.append(_row(method=method, bits=n_bits, selector=selector, hasher=hasher, metric="hamming",
                             ties=mode, map_all=s[None].map, map_at_k=s[k].map, k=k,
                             precision_at_k=s[k].precision_at_k, fit_seconds=fit_seconds,
                             encode_seconds=encode_seconds, search_seconds=search_seconds,
                             seconds_per_query=search_seconds / nq, bytes_per_item=int(db_codes.shape[1])))
            logger.debug("%s %d bits ties=%s: mAP@all %.4f, mAP@%d %.4f", method, n_bits, mode,
                        s[None].map, k, s[k].map)
    return rows
