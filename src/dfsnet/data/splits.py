"""Seeded retrieval splits of a pool, saved as files so every scheme uses the same images.

The pool is the train source followed by the test source (:class:`dfsnet.data.ConcatPool`).
A :class:`Split` holds int64 index arrays into it:

- ``train``: the images the protocol gives to training (and to fitting the selector and the
  hasher). ``val`` is carved out of ``train``, stratified by class, never from the queries:
  the model is fitted on ``fit`` = ``train`` minus ``val`` and early-stopped on ``val``;
- ``query``: the retrieval queries;
- ``database``: the retrieval database.

Protocols (per-class draws are seeded; class order and draws are deterministic):

``paper``
    ``train`` = the whole train source (``pool_sources == 0``), which is also the ``database``;
    ``query`` = the whole test source. Needs ``pool_sources``.
``cifar10`` (DeepHash-pytorch)
    From the whole pool, per class: up to ``query_per_class`` (100) queries, up to
    ``train_per_class`` (500) train images, the rest database. On CIFAR-10: 1,000 / 5,000 /
    54,000. Train, query and database are disjoint.
``cifar10-1``
    Queries and train as ``cifar10``; database = everything but the queries (59,000 on
    CIFAR-10, so it includes the train images).
``per-class``
    For any labelled pool: per class, ``query_per_class`` or ``query_fraction`` (default 0.1)
    queries and ``train_per_class`` or ``train_fraction`` (default 0.5) train images (a fraction
    takes ``max(1, round(fraction * n_class))``); the database is the rest, plus the train images
    when ``database_includes_train`` (default True, as in ``paper``).

Queries never enter ``train`` or ``database``.

Per-class counts are caps ("up to N"): a class with fewer images than its queries and train
images together gives both in proportion to the request, keeping at least
``min_query_per_class`` queries and ``min_train_per_class`` train images (the floors, 1 and 1
by default). A class below the floors is a :class:`SplitError` that names every such class,
by name when ``class_names`` are given, with its image count. :func:`make_split` reads only the
labels, so it can run (and fail) before any model is loaded.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np

from dfsnet._io import atomic_write_text
from dfsnet._validation import check_choice, check_labels
from dfsnet.errors import InputError, InputTypeError

__all__ = ["PROTOCOLS", "Split", "SplitError", "labels_fingerprint", "make_split", "stratified_holdout"]

PROTOCOLS = ("paper", "cifar10", "cifar10-1", "per-class")
PARTS = ("train", "val", "query", "database")
_FORMAT = "dfsnet.split"
_VERSION = 1
_FLOORS = {"min_query_per_class": 1, "min_train_per_class": 1}
_PROTOCOL_KW = {
    "paper": {},
    "cifar10": {"query_per_class": 100, "train_per_class": 500, **_FLOORS},
    "cifar10-1": {"query_per_class": 100, "train_per_class": 500, **_FLOORS},
    "per-class": {"query_per_class": None, "train_per_class": None, "query_fraction": None,
                  "train_fraction": None, "database_includes_train": True, **_FLOORS},
}


class SplitError(InputError):
    """A split that cannot be drawn from the pool's labels (e.g. classes with too few images).

    Raised by :func:`make_split` from the labels alone: callers make the split before loading
    any model so that this fails in milliseconds. ``short_classes`` lists ``(name, count)`` of
    every class below the floors.
    """

    def __init__(self, message: str, short_classes: list[tuple[str, int]] = ()):
        super().__init__(message)
        self.short_classes = list(short_classes)


def labels_fingerprint(targets) -> str:
    """Identity of a pool known only by its labels, ``targets`` int (n,): ``"labels:"`` + a hash
    of them as int64."""
    data = np.ascontiguousarray(np.asarray(targets, dtype=np.int64)).tobytes()
    return "labels:" + hashlib.sha256(data).hexdigest()[:20]


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def _stratified_take(indices: np.ndarray, targets: np.ndarray, fraction: float,
                     rng: np.random.Generator) -> np.ndarray:
    """Draw ``round(fraction * n_c)`` of each class's ``indices``, leaving at least one per class."""
    taken = []
    labels = targets[indices]
    for c in np.unique(labels):
        members = indices[labels == c]
        k = min(_round_half_up(fraction * members.size), members.size - 1)
        if k > 0:
            taken.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(taken)) if taken else np.empty(0, dtype=np.int64)


def stratified_holdout(targets, fraction: float, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class holdout.

    Parameters
    ----------
    targets : array-like of int, shape (n,)
    fraction : float
        Share of each class held out, in [0, 1); at least one image per class stays.
    seed : int

    Returns
    -------
    rest, held : ndarray of int64
        Sorted, disjoint positions covering ``range(n)``.
    """
    targets = check_labels(targets, name="targets")
    fraction = _check_fraction(fraction, "fraction", low_inclusive=True)
    held = _stratified_take(np.arange(targets.size, dtype=np.int64), targets, fraction,
                            np.random.default_rng(seed))
    return np.setdiff1d(np.arange(targets.size, dtype=np.int64), held), held


def _check_fraction(value, name: str, *, low_inclusive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise InputTypeError(f"{name}: expected a number, got {value!r}")
    value = float(value)
    if not ((0 <= value if low_inclusive else 0 < value) and value < 1):
        interval = "[0, 1)" if low_inclusive else "(0, 1)"
        raise InputError(f"{name}: expected a fraction in {interval}, got {value}")
    return value


def _as_index_array(values, name: str, n_pool: int) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise InputError(f"{name}: expected a 1-D integer index array, got {arr.dtype} {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= n_pool):
        raise InputError(f"{name}: expected indices in [0, {n_pool}), got min {arr.min()}, max {arr.max()}")
    if np.unique(arr).size != arr.size:
        raise InputError(f"{name}: expected unique indices, found {arr.size - np.unique(arr).size} duplicate(s)")
    return arr


@dataclass(frozen=True, eq=False)
class Split:
    """Index arrays into a pool (train source then test source), made by :func:`make_split`.

    Attributes
    ----------
    protocol : str
    seed : int
    train : ndarray of int64, shape (n_train,)
        Training images of the protocol, ``val`` included.
    val : ndarray of int64, shape (n_val,)
        Validation images, a stratified part of ``train``.
    query : ndarray of int64, shape (n_query,)
    database : ndarray of int64, shape (n_database,)
    pool_fingerprint : str
        ``fingerprint()`` of the pool it indexes, or :func:`labels_fingerprint` of its labels.
    n_pool : int
    params : dict
        The protocol's parameters (counts, fractions, ``val_fraction``).
    """

    protocol: str
    seed: int
    train: np.ndarray
    val: np.ndarray
    query: np.ndarray
    database: np.ndarray
    pool_fingerprint: str
    n_pool: int
    params: dict = field(default_factory=dict)

    def __post_init__(self):
        check_choice(self.protocol, PROTOCOLS, name="protocol")
        for name in PARTS:
            object.__setattr__(self, name, _as_index_array(getattr(self, name), name, self.n_pool))
        if np.setdiff1d(self.val, self.train).size:
            raise InputError("val: expected a subset of train")
        for other in ("train", "database"):
            if np.intersect1d(self.query, getattr(self, other)).size:
                raise InputError(f"query: expected no overlap with {other}")

    @property
    def fit(self) -> np.ndarray:
        """int64 (n_train - n_val,): the images the model is fitted on, ``train`` minus ``val``."""
        return np.setdiff1d(self.train, self.val)

    def sizes(self) -> dict[str, int]:
        return {"train": self.train.size, "fit": self.train.size - self.val.size, "val": self.val.size,
                "query": self.query.size, "database": self.database.size}

    def subset(self, pool, part: str, *, transform=None):
        """A :class:`dfsnet.data.Subset` of ``pool`` for ``part`` (train, fit, val, query, database).

        Refuses a pool whose fingerprint (or, for a split made from labels, whose labels) differ
        from the one the split was made for.
        """
        from dfsnet.data.datasets import Subset

        check_choice(part, ("train", "fit", "val", "query", "database"), name="part")
        found = (labels_fingerprint(pool.targets) if self.pool_fingerprint.startswith("labels:")
                 else pool.fingerprint())
        if len(pool) != self.n_pool or found != self.pool_fingerprint:
            raise InputError(f"pool: this split was made for pool {self.pool_fingerprint} "
                             f"({self.n_pool} items), got pool {found} ({len(pool)} items)")
        return Subset(pool, getattr(self, part), transform=transform)

    def save(self, path: str | os.PathLike) -> None:
        """Write the split as JSON (atomically), one key per line."""
        header = {"format": _FORMAT, "version": _VERSION, "protocol": self.protocol, "seed": self.seed,
                  "pool_fingerprint": self.pool_fingerprint, "n_pool": self.n_pool,
                  "params": self.params, "sizes": self.sizes()}
        body = {**header, **{name: getattr(self, name).tolist() for name in PARTS}}
        lines = [f"  {json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}" for k, v in body.items()]
        atomic_write_text(path, "{\n" + ",\n".join(lines) + "\n}\n")

    @classmethod
    def load(cls, path: str | os.PathLike, *, expect_fingerprint: str | None = None) -> Split:
        """Read a split written by :meth:`save`.

        Parameters
        ----------
        expect_fingerprint : str, optional
            The pool's fingerprint; a split made for another pool is refused naming both.

        Raises
        ------
        FileNotFoundError
            No file at ``path``.
        ValueError
            Not a split file, another format version, invalid contents, or another pool.
        """
        if not os.path.isfile(path):
            raise FileNotFoundError(f"path: no such split file: {path}")
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError (a binary file)
            raise InputError(f"path: {path} is not a dfsnet split file ({type(exc).__name__}: {exc})") from None
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise InputError(f"path: {path} is not a dfsnet split file (no format {_FORMAT!r})")
        if data.get("version") != _VERSION:
            raise InputError(f"path: {path} has split format version {data.get('version')!r}; "
                             f"this dfsnet reads version {_VERSION}")
        missing = [k for k in ("protocol", "seed", "pool_fingerprint", "n_pool", *PARTS) if k not in data]
        if missing:
            raise InputError(f"path: {path} is missing {missing}")
        if expect_fingerprint is not None and data["pool_fingerprint"] != expect_fingerprint:
            raise InputError(f"path: split {path} was made for pool {data['pool_fingerprint']}, "
                             f"but this pool is {expect_fingerprint}; make a new split for it")
        try:
            return cls(protocol=data["protocol"], seed=int(data["seed"]),
                       pool_fingerprint=str(data["pool_fingerprint"]), n_pool=int(data["n_pool"]),
                       params=dict(data.get("params") or {}),
                       **{name: np.asarray(data[name]) for name in PARTS})
        except (TypeError, ValueError) as exc:
            raise InputError(f"path: {path} holds an invalid split: {exc}") from None

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={v}" for k, v in self.sizes().items())
        return f"Split(protocol={self.protocol!r}, seed={self.seed}, {sizes})"


def _count_rule(params: dict, part: str):
    """A function n_class -> count for ``part``, from ``{part}_per_class`` or ``{part}_fraction``."""
    count_key, fraction_key = f"{part}_per_class", f"{part}_fraction"
    count, fraction = params[count_key], params.get(fraction_key)
    if count is not None and fraction is not None:
        raise InputError(f"{count_key}, {fraction_key}: give one of them, not both")
    if count is not None:
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
            raise InputError(f"{count_key}: expected a positive integer, got {count!r}")
        params[count_key] = count = int(count)
        return lambda n: count
    params[fraction_key] = fraction = _check_fraction(fraction, fraction_key, low_inclusive=False)
    return lambda n: max(1, _round_half_up(fraction * n))


def _class_name(label: int, class_names) -> str:
    if class_names is not None and 0 <= int(label) < len(class_names):
        return str(class_names[int(label)])
    return f"class {int(label)}"


def _capped(nq: int, nt: int, n: int, min_q: int, min_t: int) -> tuple[int, int]:
    """Query and train counts of a class of ``n`` images asked for ``nq`` and ``nt`` ("up to"):
    both as asked when they fit, else in proportion to the request, at least the floors."""
    if nq + nt <= n:
        return nq, nt
    q = min(max(min_q, math.floor(n * nq / (nq + nt))), n - min_t)
    return q, min(nt, n - q)


def make_split(protocol: str, pool_targets, *, pool_sources=None, seed: int = 0, val_fraction: float = 0.1,
               pool_fingerprint: str | None = None, class_names=None, **kw) -> Split:
    """Draw a seeded split of a pool by ``protocol`` (see the module docstring).

    Parameters
    ----------
    protocol : {"paper", "cifar10", "cifar10-1", "per-class"}
    pool_targets : array-like of int, shape (n,)
        Class labels of the pool (train source then test source), non-negative.
    pool_sources : array-like of int, shape (n,), optional
        0 for train-source items, 1 for test-source items (``ConcatPool.sources``); required by
        ``paper``.
    seed : int
        Same seed, same split.
    val_fraction : float
        Share of each class of ``train`` carved out as ``val``, in [0, 1); at least one image per
        class stays in ``fit``.
    pool_fingerprint : str, optional
        The pool's ``fingerprint()``, recorded so that the split refuses other pools; default:
        a hash of ``pool_targets``.
    class_names : sequence of str, optional
        Name of each label (``pool.classes``), used in error messages.
    **kw
        ``cifar10``, ``cifar10-1``: ``query_per_class`` (up to 100), ``train_per_class`` (up to
        500). ``per-class``: ``query_per_class`` (up to) or ``query_fraction`` (0.1),
        ``train_per_class`` (up to) or ``train_fraction`` (0.5), ``database_includes_train``
        (True). All but ``paper``: the floors ``min_query_per_class`` and ``min_train_per_class``
        (1 each).

    Raises
    ------
    SplitError
        Classes below the floors (all of them named, with their counts), ``paper`` without a
        test source.
    ValueError
        Unknown protocol, invalid counts or fractions.
    TypeError
        A keyword the protocol does not take.
    """
    check_choice(protocol, PROTOCOLS, name="protocol")
    targets = check_labels(pool_targets, name="pool_targets")
    if targets.ndim != 1 or targets.size == 0:
        raise InputError(f"pool_targets: expected a non-empty 1-D label array, got shape {targets.shape}")
    if targets.min() < 0:
        raise InputError("pool_targets: expected non-negative class labels (a labelled pool), found negative ones")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed: expected a non-negative integer, got {seed!r}")
    val_fraction = _check_fraction(val_fraction, "val_fraction", low_inclusive=True)
    unknown = sorted(set(kw) - set(_PROTOCOL_KW[protocol]))
    if unknown:
        raise InputTypeError(f"make_split(): protocol {protocol!r} takes no keyword(s) {unknown}; "
                        f"it takes {sorted(_PROTOCOL_KW[protocol]) or 'none'}")
    params = {**_PROTOCOL_KW[protocol], **kw}
    sources = None
    if pool_sources is not None:
        sources = check_labels(pool_sources, targets.size, name="pool_sources")
        if not np.isin(sources, (0, 1)).all():
            raise InputError("pool_sources: expected 0 (train source) or 1 (test source) per item")
    n = targets.size
    everything = np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(int(seed))

    if protocol == "paper":
        if sources is None or not (sources == 1).any() or not (sources == 0).any():
            raise InputError("pool_sources: protocol 'paper' needs a pool with both a train source (0) and a "
                             "test source (1); for a source without a test split use 'per-class'")
        train = np.flatnonzero(sources == 0).astype(np.int64)
        query = np.flatnonzero(sources == 1).astype(np.int64)
        database = train.copy()
    else:
        if protocol == "per-class":
            if not isinstance(params["database_includes_train"], (bool, np.bool_)):
                raise InputTypeError(f"database_includes_train: expected a bool, "
                                f"got {params['database_includes_train']!r}")
            params["database_includes_train"] = bool(params["database_includes_train"])
            for part, default in (("query", 0.1), ("train", 0.5)):
                if params[f"{part}_per_class"] is None and params[f"{part}_fraction"] is None:
                    params[f"{part}_fraction"] = default
        query_count, train_count = _count_rule(params, "query"), _count_rule(params, "train")
        floors = {}
        for key in _FLOORS:
            value = params[key]
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise InputError(f"{key}: expected an integer >= 0, got {value!r}")
            floors[key] = params[key] = int(value)
        min_q, min_t = floors["min_query_per_class"], floors["min_train_per_class"]
        classes = np.unique(targets)
        counts = np.bincount(targets)[classes]
        short = [(_class_name(c, class_names), int(size)) for c, size in zip(classes, counts)
                 if size < min_q + min_t]
        if short:
            listed = ", ".join(f"{name!r} ({n})" for name, n in short)
            raise SplitError(
                f"split: {len(short)} of {classes.size} classes have fewer than {min_q + min_t} images "
                f"({min_q} query + {min_t} train, the floors min_query_per_class and min_train_per_class), "
                f"so protocol {protocol!r} cannot draw them: {listed}; add images, drop those classes, or "
                "lower the floors", short)
        queries, trains = [], []
        for c, size in zip(classes, counts):
            members = rng.permutation(np.flatnonzero(targets == c))
            nq, nt = _capped(query_count(int(size)), train_count(int(size)), int(size), min_q, min_t)
            queries.append(members[:nq])
            trains.append(members[nq:nq + nt])
        query = np.sort(np.concatenate(queries)).astype(np.int64)
        train = np.sort(np.concatenate(trains)).astype(np.int64)
        keep_train = protocol == "cifar10-1" or (protocol == "per-class" and params["database_includes_train"])
        database = np.setdiff1d(everything, query if keep_train else np.concatenate([query, train]))
    val = _stratified_take(train, targets, val_fraction, rng)
    params["val_fraction"] = val_fraction
    return Split(protocol=protocol, seed=int(seed), train=train, val=val, query=query, database=database,
                 pool_fingerprint=pool_fingerprint or labels_fingerprint(targets), n_pool=n, params=params)
