"""An encoder file's codes with numpy alone: the arithmetic every encoder step shares, and
:class:`FrozenEncoder`, which applies a saved :class:`~dfsnet.hashing.Encoder` without
scikit-learn.

The estimators' ``transform`` methods call the functions here, so there is one implementation of
each step. A search (``dfsnet search``, a web query) only needs the codes of a few query vectors;
importing scikit-learn for them would cost about a second of start-up, more than everything else
a query needs.
"""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np

from dfsnet._validation import check_array

__all__ = ["FrozenEncoder", "read_encoder_file", "threshold_bits", "itq_project", "linear_project"]

#: Value of the ``format`` entry of an encoder file, and the version this code writes and reads.
FORMAT = "dfsnet.encoder"
FORMAT_VERSION = 1
_SELECTORS = ("GainRatioSelector", "RandomSelector")
_THRESHOLD_HASHERS = ("ThresholdHasher", "MeanThresholdHasher")  # the second: files of earlier versions


def threshold_bits(X: np.ndarray, rule: str, thresholds: np.ndarray | None) -> np.ndarray:
    """One bit per column of ``X`` (float, (n, b)): ``"sample_mean"`` (the row's own mean, the
    paper's rule), ``"zero"`` (> 0), or a per-column ``thresholds`` (float64, (b,)); bool (n, b)."""
    if rule == "sample_mean":
        return X >= X.mean(axis=1, keepdims=True, dtype=np.float64)
    if rule == "zero":
        return X > 0
    return X >= thresholds


def itq_project(X: np.ndarray, mean: np.ndarray, components: np.ndarray,
                rotation: np.ndarray | None = None) -> np.ndarray:
    """ITQ's (rotated) PCA projection of ``X`` float32 (n, d): ``(X - mean) @ components.T @ rotation``.

    Computed as ``X @ W - mean @ W`` in float32, which avoids a centred float64 copy of X.
    Returns float32 (n, b).
    """
    w = components.T if rotation is None else components.T @ rotation
    return X @ w.astype(np.float32) - (mean @ w).astype(np.float32)


def linear_project(X: np.ndarray, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
    """A linear hash layer's outputs ``X @ coef + intercept``: float32 (n, d) -> float32 (n, b)."""
    return X @ coef + intercept


def read_encoder_file(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """``(meta, arrays)`` of an encoder file, its format and version checked.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Not a readable dfsnet encoder file of this format version; the message names the path.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: encoder file {str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            # Reading every member here makes a damaged archive fail now (zip CRC check).
            contents = {key: data[key] for key in data.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError, TypeError) as exc:
        # TypeError: a plain .npy file loads as an array, which is no context manager.
        raise ValueError(f"{path}: not a readable dfsnet encoder file ({type(exc).__name__}: {exc})") from None
    try:
        if "format" not in contents or str(contents["format"]) != FORMAT:
            raise ValueError(f"format: expected {FORMAT!r}, found {str(contents.get('format'))!r}")
        version = int(contents["format_version"])
        if version != FORMAT_VERSION:
            raise ValueError(f"format_version: this dfsnet reads version {FORMAT_VERSION}, the file has "
                             f"version {version}")
        meta = json.loads(str(contents["meta"]))
        if not isinstance(meta, dict):
            raise ValueError("meta: expected a JSON object")
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{path}: invalid dfsnet encoder file: {exc}") from None
    return meta, contents


class FrozenEncoder:
    """The ``transform`` of a saved :class:`~dfsnet.hashing.Encoder`, without scikit-learn.

    Use :meth:`load`; the codes equal ``Encoder.load(path).transform(X)`` bit for bit.

    Attributes
    ----------
    n_bits_ : int
    n_features_in_ : int
    """

    def __init__(self, meta: dict, contents: dict[str, np.ndarray]):
        def array(key: str, dtype=None) -> np.ndarray:
            if key not in contents or not np.issubdtype(contents[key].dtype, np.number):
                raise ValueError(f"{key}: missing from the file, or not numeric")
            return contents[key] if dtype is None else contents[key].astype(dtype)

        self.n_bits_ = int(meta["n_bits"])
        self.n_features_in_ = int(meta["n_features_in"])
        selector, hasher = meta["selector"], meta["hasher"]
        self._selected = None
        if selector is not None:
            if selector["class"] not in _SELECTORS:
                raise ValueError(f"selector: unknown class {selector['class']!r}")
            ranking = array("selector.ranking_", np.int64)
            n = selector["params"].get("n_features") or self.n_features_in_
            if ranking.shape != (self.n_features_in_,) or not 0 < n <= ranking.size:
                raise ValueError(f"selector.ranking_: expected {self.n_features_in_} entries and keeping "
                                 f"at most that many, found {ranking.shape} keeping {n}")
            self._selected = ranking[:n]
        width = self.n_features_in_ if self._selected is None else len(self._selected)
        kind, params = hasher["class"], hasher["params"]
        if kind in _THRESHOLD_HASHERS:
            rule = params["threshold"]
            thresholds = array("hasher.thresholds_") if "thresholds_" in hasher.get("arrays", ()) else None
            self._bits = lambda X: threshold_bits(X, rule, thresholds)
            made = width
        elif kind == "ITQHasher":
            mean, comp, rot = (array(f"hasher.{a}") for a in ("mean_", "components_", "rotation_"))
            if mean.shape != (width,) or comp.shape != (self.n_bits_, width) or rot.shape != (self.n_bits_,) * 2:
                raise ValueError(f"hasher: ITQ arrays of shapes {mean.shape}, {comp.shape}, {rot.shape} do not "
                                 f"map {width} features to {self.n_bits_} bits")
            self._bits = lambda X: itq_project(X, mean, comp, rot) >= 0
            made = self.n_bits_
        elif kind == "LinearHasher":
            coef, intercept = array("hasher.coef_", np.float32), array("hasher.intercept_", np.float32)
            if coef.shape != (width, self.n_bits_) or intercept.shape != (self.n_bits_,):
                raise ValueError(f"hasher: coef_ {coef.shape} and intercept_ {intercept.shape} do not map "
                                 f"{width} features to {self.n_bits_} bits")
            self._bits = lambda X: linear_project(X, coef, intercept) >= 0
            made = self.n_bits_
        else:
            raise ValueError(f"hasher: unknown class {kind!r}")
        if made != self.n_bits_:
            raise ValueError(f"hasher: makes {made} bits, the encoder records {self.n_bits_}")

    @classmethod
    def load(cls, path: str | os.PathLike) -> FrozenEncoder:
        """Read an encoder file written by :meth:`Encoder.save <dfsnet.hashing.Encoder.save>`.

        Raises
        ------
        FileNotFoundError
        ValueError
            Not a dfsnet encoder file, damaged, or inconsistent; the message names the path.
        """
        meta, contents = read_encoder_file(path)
        try:
            return cls(meta, contents)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ValueError(f"{path}: invalid dfsnet encoder file: {exc}") from None

    def transform(self, X) -> np.ndarray:
        """Packed codes of ``X``.

        Parameters
        ----------
        X : array-like of float, shape (n, n_features_in_)

        Returns
        -------
        ndarray of uint8, shape (n, ceil(n_bits_ / 8))
        """
        X = check_array(X, name="X")
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"X: expected {self.n_features_in_} columns (the features seen in fit), "
                             f"got {X.shape[1]}")
        if self._selected is not None:
            X = np.take(X, self._selected, axis=1)  # many times faster than X[:, idx]
        return np.packbits(self._bits(X), axis=1, bitorder="big")
