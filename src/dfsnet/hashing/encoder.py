"""Encoder: feature selection followed by hashing, fitted together and saved as one file.

With ``GainRatioSelector(n_features=b)`` and ``ThresholdHasher("sample_mean")`` it is exactly
the DFS-Net paper's Scheme 3 encoding: keep the ``b`` features of highest gain ratio, then set each
bit where the feature reaches the mean of the vector's own ``b`` selected values.
"""
from __future__ import annotations

import copy
import json
import logging
import os

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.utils import get_tags

from dfsnet import __version__
from dfsnet._io import atomic_write
from dfsnet._validation import (
    check_choice,
    check_is_fitted,
    check_positive_int,
    validate_data,
)
from dfsnet.errors import InputError
from dfsnet.hashing.frozen import FORMAT, FORMAT_VERSION, read_encoder_file
from dfsnet.hashing.itq import ITQHasher
from dfsnet.hashing.learned import HASH_LOSSES, LinearHasher
from dfsnet.hashing.threshold import THRESHOLDS, ThresholdHasher
from dfsnet.selection import GainRatioSelector, RandomSelector

__all__ = ["FORMAT", "FORMAT_VERSION", "FREE_LENGTH_HASHERS", "HASHERS", "SELECTORS", "Encoder", "make_encoder"]

logger = logging.getLogger(__name__)


#: Names accepted by :func:`make_encoder`.
SELECTORS = ("gain_ratio", "random", None)
HASHERS = THRESHOLDS + ("itq",) + HASH_LOSSES
#: Hashers whose code length is a free parameter (not one bit per selected feature).
FREE_LENGTH_HASHERS = ("itq",) + HASH_LOSSES

# Classes an encoder file may name; nothing else is ever instantiated on load.
_CLASSES = {cls.__name__: cls for cls in (GainRatioSelector, RandomSelector, ThresholdHasher, ITQHasher,
                                          LinearHasher)}
# Names files written by earlier versions use for a class in _CLASSES (read, never written).
_LEGACY_CLASSES = {"MeanThresholdHasher": ThresholdHasher}


class Encoder(TransformerMixin, BaseEstimator):
    """A feature selector (or None) followed by a hasher: float features in, packed codes out.

    ``fit`` fits clones of the ``selector`` and ``hasher`` parameters: the selector on ``(X, y)``,
    the hasher on the selected features; the parameters themselves stay unfitted (scikit-learn's
    convention, so ``clone`` and ``set_params`` behave as for any estimator).

    Parameters
    ----------
    selector : GainRatioSelector, RandomSelector or None
        None hashes the input columns as they are.
    hasher : ThresholdHasher, ITQHasher or LinearHasher
        A hasher that requires labels (LinearHasher) is fitted on ``(selected X, y)``.

    Attributes
    ----------
    selector_ : GainRatioSelector, RandomSelector or None
        The fitted selector.
    hasher_ : ThresholdHasher, ITQHasher or LinearHasher
        The fitted hasher.
    n_bits_ : int
        Code length.
    n_features_in_ : int
        Input columns expected by ``transform``.
    """

    def __init__(self, *, selector, hasher):
        self.selector = selector
        self.hasher = hasher

    def _check_steps(self) -> None:
        for name, step, required in (("selector", self.selector, False), ("hasher", self.hasher, True)):
            if step is None and not required:
                continue
            if not (hasattr(step, "fit") and hasattr(step, "transform")):
                raise TypeError(f"{name}: expected an estimator with fit and transform, got {step!r}")

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # Packed uint8 codes, whatever the input dtype.
        tags.transformer_tags.preserves_dtype = []
        tags.target_tags.required = any(
            step is not None and hasattr(step, "__sklearn_tags__") and get_tags(step).target_tags.required
            for step in (self.selector, self.hasher))
        return tags

    def fit(self, X, y=None):
        """Fit a clone of the selector, then a clone of the hasher on the selected features.

        Parameters
        ----------
        X : array-like of float, shape (n, d)
            Converted to float32; must be finite.
        y : array-like of int, shape (n,), or None
            Class labels; required by ``GainRatioSelector``.

        Returns
        -------
        self
        """
        self._check_steps()
        # y is checked by the selector, whose messages name it.
        X = validate_data(self, X, reset=True)
        selector = None if self.selector is None else clone(self.selector)
        hasher = clone(self.hasher)
        if selector is not None:
            X = selector.fit(X, y).transform(X)
        _fit_hasher(hasher, X, y)
        self.selector_, self.hasher_ = selector, hasher
        self.n_bits_ = int(hasher.n_bits_)
        self.n_features_in_ = int(selector.n_features_in_ if selector is not None else X.shape[1])
        return self

    def transform(self, X) -> np.ndarray:
        """Encode features into packed codes.

        Parameters
        ----------
        X : array-like of float, shape (n, n_features_in_)

        Returns
        -------
        ndarray of uint8, shape (n, ceil(n_bits_ / 8))
            Bit ``i`` in byte ``i // 8`` at mask ``0x80 >> (i % 8)``.
        """
        check_is_fitted(self, ("n_bits_", "hasher_"))
        X = validate_data(self, X, reset=False)
        if self.selector_ is not None:
            X = self.selector_.transform(X)
        return self.hasher_.transform(X)

    def with_n_bits(self, n_bits: int, X=None, y=None) -> Encoder:
        """A fitted encoder for a shorter (or, with ITQ, any) code length, derived from this one.

        - Threshold hasher with a selector: the new encoder keeps the selector's top ``n_bits``
          features (a prefix of the fitted ranking, nothing refitted) and the hasher's first
          ``n_bits`` bits (``"sample_mean"`` and ``"zero"`` learn nothing per feature; the
          per-feature thresholds of ``"feature_mean"``/``"feature_median"`` are sliced). Its
          codes equal those of the same encoder fitted with ``n_bits``, without refitting.
          Requires ``n_bits <= n_bits_``; ``X`` is not used.
        - ITQ: its bits are rotated principal directions of all the selected features, so no
          prefix exists. The selector is kept as it is and a new ``ITQHasher`` with the same
          parameters but ``n_bits`` is fitted on ``selector_.transform(X)``; ``X`` must be the
          training features (without it, ``InputError`` is raised). The result equals fitting
          the encoder with ``n_bits`` (same selector ranking, same ITQ fit).
        - LinearHasher: refitted like ITQ, on ``X`` and the labels ``y``.

        ``n_bits == n_bits_`` returns a copy of this encoder.

        Parameters
        ----------
        n_bits : int
            Code length of the new encoder.
        X : array-like of float, shape (n, n_features_in_), optional
            Training features; required for ITQ and LinearHasher, ignored otherwise.
        y : array-like of int, shape (n,), optional
            Training labels; required for LinearHasher.

        Returns
        -------
        Encoder
            Fitted; ``n_bits_ == n_bits``. This encoder is not modified.

        Raises
        ------
        InputError
            ``n_bits`` larger than this threshold encoder's code length, a threshold encoder
            without a selector (one bit per input column: no prefix to take), or ITQ without ``X``.
        """
        check_is_fitted(self, ("n_bits_", "hasher_"))
        n_bits = check_positive_int(n_bits, name="n_bits")
        if n_bits == self.n_bits_:
            return copy.deepcopy(self)
        selector = copy.deepcopy(self.selector_)
        if hasattr(self.hasher_, "with_n_features"):
            if selector is None:
                raise InputError(f"n_bits: a {type(self.hasher_).__name__} without a selector makes one bit per "
                                 f"input column, so its code length is fixed at {self.n_bits_}; got n_bits={n_bits}")
            check_positive_int(n_bits, name="n_bits", maximum=self.n_bits_,
                               what=" (a prefix of this encoder's features: refit for longer codes)")
            selector.set_params(n_features=n_bits)
            hasher = self.hasher_.with_n_features(n_bits)
        else:
            if X is None:
                raise InputError(f"X: {type(self.hasher_).__name__} must be refitted for n_bits={n_bits}; pass "
                                 "the training features as X")
            X = validate_data(self, X, reset=False)
            hasher = clone(self.hasher_).set_params(n_bits=n_bits)
            _fit_hasher(hasher, X if selector is None else selector.transform(X), y)
        out = type(self)(selector=None if selector is None else clone(selector), hasher=clone(hasher))
        out.selector_, out.hasher_ = selector, hasher
        out.n_bits_ = int(hasher.n_bits_)
        out.n_features_in_ = self.n_features_in_
        if hasattr(self, "feature_names_in_"):
            out.feature_names_in_ = self.feature_names_in_.copy()
        return out

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the fitted encoder to one ``.npz`` file, atomically.

        The file holds ``format``, ``format_version``, the constructor parameters and scalar
        attributes as a JSON string (``meta``), and each learned array as ``selector.<name>`` or
        ``hasher.<name>``. Nothing is pickled; the zip container's CRC-32 of every member lets
        :meth:`load` detect corruption.
        """
        check_is_fitted(self, ("n_bits_", "hasher_"))
        arrays: dict[str, np.ndarray] = {}
        meta = {
            "dfsnet_version": __version__,
            "n_bits": self.n_bits_,
            "n_features_in": self.n_features_in_,
            "selector": None if self.selector_ is None else _describe(self.selector_, "selector", arrays),
            "hasher": _describe(self.hasher_, "hasher", arrays),
        }
        arrays["format"] = np.array(FORMAT)
        arrays["format_version"] = np.array(FORMAT_VERSION, dtype=np.int64)
        arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
        with atomic_write(path, "wb") as fh:
            np.savez(fh, **arrays)
        logger.info("saved %d-bit encoder to %s", self.n_bits_, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Encoder:
        """Read an encoder written by :meth:`save`.

        Raises
        ------
        FileNotFoundError
            If ``path`` does not exist.
        ValueError
            If the file is not a dfsnet encoder, is corrupt or truncated, was written by a newer
            format version, or its contents are inconsistent; the message names the path and the
            problem.
        """
        meta, contents = read_encoder_file(path)
        try:
            return cls._from_contents(meta, contents)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ValueError(f"{path}: invalid dfsnet encoder file: {exc}") from None

    @classmethod
    def _from_contents(cls, meta: dict, contents: dict[str, np.ndarray]) -> Encoder:
        selector = None if meta["selector"] is None else _rebuild(meta["selector"], "selector", contents)
        hasher = _rebuild(meta["hasher"], "hasher", contents)
        encoder = cls(selector=None if selector is None else clone(selector), hasher=clone(hasher))
        encoder.selector_, encoder.hasher_ = selector, hasher
        encoder.n_bits_ = int(meta["n_bits"])
        encoder.n_features_in_ = int(meta["n_features_in"])
        hashed = encoder.n_features_in_ if selector is None else len(selector.selected_features_)
        if selector is not None and selector.n_features_in_ != encoder.n_features_in_:
            raise ValueError(
                f"selector: expects {selector.n_features_in_} inputs, the encoder {encoder.n_features_in_}"
            )
        if hasher.n_features_in_ != hashed or hasher.n_bits_ != encoder.n_bits_:
            raise ValueError(
                f"hasher: expects {hasher.n_features_in_} inputs and makes {hasher.n_bits_} bits; the encoder "
                f"feeds it {hashed} and records {encoder.n_bits_} bits"
            )
        return encoder


def _fit_hasher(hasher, X: np.ndarray, y) -> None:
    """Fit ``hasher`` on ``X``, with the labels when it learns from them."""
    if get_tags(hasher).target_tags.required:
        hasher.fit(X, y)
    else:
        hasher.fit(X)


def _describe(estimator, role: str, arrays: dict[str, np.ndarray]) -> dict:
    """JSON description of a fitted step; its learned arrays go into ``arrays``."""
    name = type(estimator).__name__
    if _CLASSES.get(name) is not type(estimator):
        raise TypeError(f"{role}: only {sorted(_CLASSES)} can be saved, got {name}")
    params = estimator.get_params(deep=False)
    for key, value in params.items():
        if isinstance(value, np.integer):
            params[key] = int(value)
        elif isinstance(value, np.floating):
            params[key] = float(value)
        elif value is not None and not isinstance(value, (bool, int, float, str)):
            raise TypeError(f"{role}.{key}: only None, bool, int, float or str can be saved, got {value!r}")
    saved = []
    for attr in estimator._persist_arrays:
        if hasattr(estimator, attr):
            arrays[f"{role}.{attr}"] = np.ascontiguousarray(getattr(estimator, attr))
            saved.append(attr)
    scalars = {attr: int(getattr(estimator, attr)) for attr in estimator._persist_scalars}
    return {"class": name, "params": params, "scalars": scalars, "arrays": saved}


def _rebuild(desc: dict, role: str, contents: dict[str, np.ndarray]):
    """Instantiate and restore a step described by :func:`_describe`; validates its state."""
    name = desc["class"]
    cls = _CLASSES.get(name, _LEGACY_CLASSES.get(name))
    if cls is None:
        raise ValueError(f"{role}: unknown class {name!r}; expected one of {sorted(_CLASSES)}")
    estimator = cls(**desc["params"])
    for attr, value in desc["scalars"].items():
        if attr not in estimator._persist_scalars:
            raise ValueError(f"{role}: unexpected attribute {attr!r}")
        setattr(estimator, attr, int(value))
    for attr in desc["arrays"]:
        if attr not in estimator._persist_arrays:
            raise ValueError(f"{role}: unexpected array {attr!r}")
        key = f"{role}.{attr}"
        if key not in contents:
            raise ValueError(f"{key}: missing from the file")
        if not np.issubdtype(contents[key].dtype, np.number):
            raise ValueError(f"{key}: expected a numeric array, found dtype {contents[key].dtype}")
        setattr(estimator, attr, contents[key])
    estimator._validate_fitted_state()
    return estimator


def make_encoder(selector: str | None = "gain_ratio", hasher: str = "sample_mean", n_bits: int | None = None,
                 **kw) -> Encoder:
    """Build an unfitted :class:`Encoder` by name.

    Parameters
    ----------
    selector : {"gain_ratio", "random", None}
    hasher : {"sample_mean", "feature_mean", "feature_median", "zero", "itq", "csq", "orthohash"}
        The first four are :class:`ThresholdHasher` rules (one bit per selected feature, so the
        selector keeps ``n_bits`` features); ``"itq"`` is :class:`ITQHasher` with ``n_bits`` bits;
        ``"csq"`` and ``"orthohash"`` are a :class:`LinearHasher` learned with that loss (needs
        labels).
    n_bits : int or None
        Code length. Required, except for a threshold hasher without a selector, which makes one bit
        per input column (``n_bits`` must then be None).
    **kw
        ``discretizer``, ``n_bins`` (gain_ratio); ``random_state`` (random selector and itq);
        ``n_iter`` (itq); ``lam``, ``epochs``, ``lr`` (csq, orthohash); ``n_features`` (selector
        output width with itq, csq, orthohash; default None keeps all features, reordered).

    Returns
    -------
    Encoder
    """
    check_choice(selector, SELECTORS, name="selector")
    check_choice(hasher, HASHERS, name="hasher")
    kw = dict(kw)
    allowed = set()
    if hasher == "itq":
        n_bits = check_positive_int(n_bits, name="n_bits")
        allowed |= {"random_state", "n_iter"} | ({"n_features"} if selector is not None else set())
        hash_step = ITQHasher(n_bits=n_bits, **{k: kw[k] for k in ("n_iter", "random_state") if k in kw})
        n_features = kw.get("n_features")
    elif hasher in HASH_LOSSES:
        n_bits = check_positive_int(n_bits, name="n_bits")
        learned = ("lam", "epochs", "lr", "random_state")
        allowed |= set(learned) | ({"n_features"} if selector is not None else set())
        hash_step = LinearHasher(n_bits=n_bits, loss=hasher, **{k: kw[k] for k in learned if k in kw})
        n_features = kw.get("n_features")
    else:
        hash_step = ThresholdHasher(threshold=hasher)
        if selector is None:
            if n_bits is not None:
                raise ValueError(
                    f"n_bits: hasher={hasher!r} without a selector makes one bit per input column; "
                    f"pass n_bits=None or a selector, got n_bits={n_bits}"
                )
        else:
            n_bits = check_positive_int(n_bits, name="n_bits")
        n_features = n_bits
    if selector == "gain_ratio":
        allowed |= {"discretizer", "n_bins"}
        select_step = GainRatioSelector(
            n_features=n_features, **{k: kw[k] for k in ("discretizer", "n_bins") if k in kw}
        )
    elif selector == "random":
        allowed |= {"random_state"}
        select_step = RandomSelector(n_features=n_features, random_state=kw.get("random_state", 0))
    else:
        select_step = None
    unexpected = sorted(set(kw) - allowed)
    if unexpected:
        raise TypeError(
            f"make_encoder: unexpected keyword argument(s) {unexpected} for selector={selector!r}, "
            f"hasher={hasher!r}; valid here: {sorted(allowed)}"
        )
    return Encoder(selector=select_step, hasher=hash_step)
