"""One call that scores float (Euclidean) and hashed (Hamming) retrieval on a feature split.

:func:`retrieval_eval` is what the experiment runner calls for every scheme: it fits the selector
and hasher on the train features only, encodes the query and database features, computes mAP@all,
mAP@k and precision@k of ranking the whole database for every query, and times fitting, encoding
and searching (top-``k`` search of every query on a ``dfsnet.index`` index).
"""
from __future__ import annotations

import logging
import time

import numpy as np

from dfsnet._validation import check_array, check_choice, check_labels, check_positive_int
from dfsnet.eval.metrics import TIES, _euclidean_scores, _hamming_scores

__all__ = ["retrieval_eval", "ROW_KEYS"]

logger = logging.getLogger(__name__)

#: Keys of every row returned by :func:`retrieval_eval`, in order.
ROW_KEYS = ("method", "bits", "selector", "hasher", "metric", "ties", "map_all", "map_at_k", "k",
            "precision_at_k", "fit_seconds", "encode_seconds", "search_seconds", "seconds_per_query",
            "bytes_per_item")


def _check_bits(bits, d: int, selector, hasher: str) -> list[int]:
    if isinstance(bits, (int, np.integer)):
        bits = [bits]
    bits = [check_positive_int(b, name="bits") for b in bits]
    if not bits:
        raise ValueError("bits: expected at least one code length, got none")
    if len(set(bits)) != len(bits):
        raise ValueError(f"bits: expected distinct code lengths, got {bits}")
    too_long = [b for b in bits if b > d]
    if too_long:
        raise ValueError(f"bits: {too_long} larger than the feature width {d}; "
                         f"a code can have at most one bit per feature")
    if selector is None and hasher != "itq" and bits != [d]:
        raise ValueError(
            f"bits: hasher={hasher!r} without a selector makes one bit per feature, so bits must be "
            f"[{d}], got {bits}; pass a selector or hasher='itq' for shorter codes"
        )
    return bits


def _check_ties_modes(ties) -> list[str]:
    modes = [ties] if isinstance(ties, str) else list(ties)
    if not modes:
        raise ValueError(f"ties: expected at least one of {list(TIES)}, got none")
    for mode in modes:
        check_choice(mode, TIES, name="ties")
    if len(set(modes)) != len(modes):
        raise ValueError(f"ties: expected distinct modes, got {modes}")
    return modes


def _row(**values) -> dict:
    return {key: values[key] for key in ROW_KEYS}


def retrieval_eval(train_features, train_labels, query_features, query_labels, db_features, db_labels, *,
                   bits=(16, 32, 64, 128), selector="gain_ratio", hasher="sample_mean", k=1000,
                   ties=("stable",), euclidean=True) -> list[dict]:
    """Score Euclidean and Hamming retrieval per code length; one tidy row per result.

    For every code length ``b`` in ``bits`` an encoder (``selector`` keeping ``b`` features, then
    ``hasher``; see :func:`dfsnet.hashing.make_encoder`) is fitted on the train features and
    labels only, the query and database features are encoded, and every query ranks the whole
    database by Hamming distance. With ``euclidean=True`` the float features are also ranked by
    Euclidean distance (the no-hashing baseline; ``bits`` is None in its rows).

    The selector's ranking does not depend on ``b``, so it is fitted once per call; its fit time
    is included in the ``fit_seconds`` of every hashed row (the cost of building that encoder
    alone).

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
        - ``fit_seconds`` (selector and hasher on the train set; 0 for Euclidean),
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
            raise ValueError(f"{name}: expected {d} columns like train_features, got {arr.shape[1]}")
    # Gain ratio ranks features against class labels: one label per item, at least two classes.
    needs_classes = selector == "gain_ratio"
    train_y = check_labels(train_labels, train.shape[0], name="train_labels",
                           min_classes=2 if needs_classes else 1)
    if needs_classes and train_y.ndim != 1:
        raise ValueError(f"train_labels: selector='gain_ratio' needs one class label per item, shape "
                         f"({train.shape[0]},), got shape {train_y.shape}")
    query_y = check_labels(query_labels, query.shape[0], name="query_labels")
    db_y = check_labels(db_labels, db.shape[0], name="db_labels")
    k = check_positive_int(k, name="k")
    modes = _check_ties_modes(ties)
    if not isinstance(euclidean, (bool, np.bool_)):
        raise TypeError(f"euclidean: expected a bool, got {euclidean!r}")
    bits = _check_bits(bits, d, selector, hasher)
    # Builds and validates the steps by name before any fitting (unknown names list the valid ones).
    encoders = {b: make_encoder(selector=selector, hasher=hasher,
                                n_bits=None if selector is None and hasher != "itq" else b) for b in bits}
    search_k = min(k, db.shape[0])
    nq = query.shape[0]
    rows: list[dict] = []

    if euclidean:
        index = FloatIndex(d, metric="l2")
        index.add(db)
        start = time.perf_counter()
        index.search(query, search_k)
        search_seconds = time.perf_counter() - start
        del index  # its copy of the database is not needed for scoring
        for mode in modes:
            scores = _euclidean_scores(query, db, query_y, db_y, ks=[None, k], ties=mode)
            rows.append(_row(method="euclidean", bits=None, selector=None, hasher=None, metric="euclidean",
                             ties=mode, map_all=scores[None].map, map_at_k=scores[k].map, k=k,
                             precision_at_k=scores[k].precision_at_k, fit_seconds=0.0, encode_seconds=0.0,
                             search_seconds=search_seconds, seconds_per_query=search_seconds / nq,
                             bytes_per_item=int(db.itemsize * d)))
            logger.info("euclidean ties=%s: mAP@all %.4f, mAP@%d %.4f", mode, scores[None].map, k,
                        scores[k].map)

    ranking, selector_seconds = None, 0.0
    if selector is not None:
        # Fit the ranking once with every feature kept; each code length keeps its prefix.
        ranker = make_encoder(selector=selector, hasher=hasher, n_bits=bits[0]).selector
        ranker.set_params(n_features=None)
        start = time.perf_counter()
        ranker.fit(train, train_y)
        selector_seconds = time.perf_counter() - start
        ranking = ranker.ranking_

    method = hasher if selector is None else f"{selector}+{hasher}"
    for b in bits:
        encoder = encoders[b]
        columns = None
        if ranking is not None:
            keep = encoder.selector.n_features
            columns = ranking if keep is None else ranking[:keep]
        start = time.perf_counter()
        encoder.hasher.fit(train if columns is None else train[:, columns])
        fit_seconds = selector_seconds + time.perf_counter() - start
        start = time.perf_counter()
        q_codes = encoder.hasher.transform(query if columns is None else query[:, columns])
        db_codes = encoder.hasher.transform(db if columns is None else db[:, columns])
        encode_seconds = time.perf_counter() - start
        n_bits = int(encoder.hasher.n_bits_)
        index = HammingIndex(n_bits)
        index.add(db_codes)
        start = time.perf_counter()
        index.search(q_codes, search_k)
        search_seconds = time.perf_counter() - start
        del index
        for mode in modes:
            scores = _hamming_scores(q_codes, db_codes, query_y, db_y, ks=[None, k], ties=mode, block_size=None)
            rows.append(_row(method=method, bits=n_bits, selector=selector, hasher=hasher, metric="hamming",
                             ties=mode, map_all=scores[None].map, map_at_k=scores[k].map, k=k,
                             precision_at_k=scores[k].precision_at_k, fit_seconds=fit_seconds,
                             encode_seconds=encode_seconds, search_seconds=search_seconds,
                             seconds_per_query=search_seconds / nq, bytes_per_item=int(db_codes.shape[1])))
            logger.info("%s %d bits ties=%s: mAP@all %.4f, mAP@%d %.4f", method, n_bits, mode,
                        scores[None].map, k, scores[k].map)
    return rows
