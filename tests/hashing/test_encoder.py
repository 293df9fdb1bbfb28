"""Encoder: the paper's Scheme 3, make_encoder by name, save/load round trip and refusals."""
from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from sklearn.exceptions import NotFittedError

from dfsnet.hashing import (
    Encoder,
    ITQHasher,
    ThresholdHasher,
    make_encoder,
    unpack_bits,
)
from dfsnet.selection import GainRatioSelector, RandomSelector


@pytest.fixture
def data(rng):
    n = 240
    y = rng.integers(0, 4, n)
    X = rng.standard_normal((n, 40)).astype(np.float32)
    X[:, :10] += 0.7 * y[:, None] * rng.random(10).astype(np.float32)
    return X, y


def test_scheme3_is_gain_ratio_selection_then_own_mean(data):
    X, y = data
    enc = make_encoder("gain_ratio", "sample_mean", n_bits=16).fit(X, y)
    assert enc.n_bits_ == 16 and enc.n_features_in_ == 40
    scores = GainRatioSelector().fit(X, y).scores_
    top = np.argsort(-scores, kind="stable")[:16]
    selected = X[:, top]
    want = selected >= selected.mean(axis=1, keepdims=True, dtype=np.float64)
    codes = enc.transform(X)
    assert codes.dtype == np.uint8 and codes.shape == (240, 2)
    np.testing.assert_array_equal(unpack_bits(codes, 16), want)
    np.testing.assert_array_equal(enc.fit_transform(X, y), codes)


COMBINATIONS = [
    ("gain_ratio", "sample_mean", 12, {}),
    ("gain_ratio", "feature_median", 12, {"discretizer": "c45"}),
    ("random", "feature_mean", 9, {"random_state": 5}),
    (None, "zero", None, {}),
    ("gain_ratio", "itq", 8, {"n_features": 20, "n_iter": 10}),
    (None, "itq", 16, {"random_state": 2}),
]


@pytest.mark.parametrize("selector, hasher, n_bits, kw", COMBINATIONS)
def test_save_load_round_trip(tmp_path, data, selector, hasher, n_bits, kw):
    X, y = data
    enc = make_encoder(selector, hasher, n_bits, **kw).fit(X, y)
    path = tmp_path / "sub" / "encoder.npz"
    enc.save(path)
    loaded = Encoder.load(path)
    np.testing.assert_array_equal(loaded.transform(X), enc.transform(X))
    assert loaded.get_params(deep=True).keys() == enc.get_params(deep=True).keys()
    assert repr(loaded) == repr(enc)
    assert loaded.n_bits_ == enc.n_bits_ == (40 if n_bits is None else n_bits)
    # Plain numpy can read it without pickle.
    with np.load(path, allow_pickle=False) as f:
        assert str(f["format"]) == "dfsnet.encoder"
        assert json.loads(str(f["meta"]))["n_bits"] == enc.n_bits_


def test_encoder_with_given_estimators(data):
    X, y = data
    enc = Encoder(selector=RandomSelector(n_features=8), hasher=ITQHasher(n_bits=4, n_iter=3)).fit(X)
    assert enc.transform(X).shape == (240, 1)
    with pytest.raises(TypeError, match="hasher: expected an estimator with fit and transform"):
        Encoder(selector=None, hasher="itq").fit(X, y)


def test_transform_uses_a_selector_subclass_own_transform(data):
    # Encoder.transform runs the selector's own transform, a subclass's override included.
    class Shifted(RandomSelector):
        def transform(self, X):
            return super().transform(X) + 100

    X, y = data
    enc = Encoder(selector=Shifted(n_features=8), hasher=ThresholdHasher(threshold="zero")).fit(X)
    assert (unpack_bits(enc.transform(X), 8) == 1).all()
    plain = Encoder(selector=RandomSelector(n_features=8), hasher=ThresholdHasher(threshold="zero")).fit(X)
    np.testing.assert_array_equal(plain.transform(X), ThresholdHasher(threshold="zero").fit(
        X[:, plain.selector_.selected_features_]).transform(X[:, plain.selector_.selected_features_]))


def test_encoder_clones_and_runs_in_a_pipeline(data):
    from sklearn.base import clone
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = data
    enc = make_encoder("gain_ratio", "sample_mean", 8, discretizer="uniform")
    copy = clone(enc)
    assert copy.selector is not enc.selector and copy.get_params(deep=True).keys() == enc.get_params(deep=True).keys()
    assert copy.get_params()["selector__discretizer"] == "uniform"
    pipe = make_pipeline(StandardScaler(), copy).fit(X, y)
    scaled = StandardScaler().fit(X).transform(X)
    np.testing.assert_array_equal(pipe.transform(X), enc.fit(scaled, y).transform(scaled))
    assert pipe.transform(X).shape == (len(X), 1)


def test_make_encoder_errors():
    with pytest.raises(ValueError, match=r"selector: expected one of \['gain_ratio', 'random', None\], got 'pca'"):
        make_encoder("pca", "sample_mean", 8)
    with pytest.raises(ValueError, match=r"hasher: expected one of \['sample_mean', .*'csq', 'orthohash'\], got"):
        make_encoder("gain_ratio", "lsh", 8)
    with pytest.raises(ValueError, match="n_bits: hasher='sample_mean' without a selector makes one bit per input"):
        make_encoder(None, "sample_mean", 8)
    with pytest.raises(TypeError, match="n_bits: expected a positive integer, got None"):
        make_encoder("gain_ratio", "sample_mean")
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['n_iter'\]"):
        make_encoder("gain_ratio", "sample_mean", 8, n_iter=3)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['n_features'\]"):
        make_encoder(None, "itq", 8, n_features=3)


def test_encoder_bad_input(tmp_path, data):
    X, y = data
    enc = make_encoder("gain_ratio", "sample_mean", 8)
    with pytest.raises(NotFittedError):
        enc.transform(X)
    with pytest.raises(NotFittedError):
        enc.save(tmp_path / "e.npz")
    with pytest.raises(ValueError, match="y: GainRatioSelector needs class labels"):
        enc.fit(X)
    with pytest.raises(ValueError, match="n_features: expected at most 40, got 64"):
        make_encoder("gain_ratio", "sample_mean", 64).fit(X, y)
    enc.fit(X, y)
    with pytest.raises(ValueError, match="X: expected 40 columns .* got 39"):
        enc.transform(X[:, 1:])
    with pytest.raises(TypeError, match="random_state: expected an int or None, got Generator"):
        Encoder(selector=RandomSelector(n_features=4, random_state=np.random.default_rng(0)),
                hasher=ThresholdHasher()).fit(X)
    enc = Encoder(selector=RandomSelector(n_features=4), hasher=ThresholdHasher()).fit(X)
    enc.selector_.set_params(random_state=np.random.default_rng(0))
    with pytest.raises(TypeError, match="selector.random_state: only None, bool, int, float or str can be saved"):
        enc.save(tmp_path / "g.npz")
    assert not (tmp_path / "g.npz").exists()


@pytest.fixture
def saved(tmp_path, data):
    X, y = data
    path = tmp_path / "encoder.npz"
    make_encoder("gain_ratio", "feature_mean", 8).fit(X, y).save(path)
    return path


def _rewrite(path, **changes):
    with np.load(path, allow_pickle=False) as f:
        contents = {k: f[k] for k in f.files}
    contents.update(changes)
    with open(path, "wb") as fh:
        np.savez(fh, **contents)


def test_load_refuses_missing_truncated_or_foreign_files(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Encoder.load(tmp_path / "nope.npz")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(saved.read_bytes()[: saved.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.npz: not a readable dfsnet encoder file"):
        Encoder.load(truncated)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not an archive at all" * 10)
    with pytest.raises(ValueError, match="not a readable dfsnet encoder file"):
        Encoder.load(garbage)
    plain = tmp_path / "plain.npy"
    np.save(plain, np.zeros(3))
    with pytest.raises(ValueError, match="not a readable dfsnet encoder file"):
        Encoder.load(plain)
    other = tmp_path / "other.npz"
    np.savez(other, a=np.zeros(3))
    with pytest.raises(ValueError, match="format: expected 'dfsnet.encoder'"):
        Encoder.load(other)


def test_load_refuses_corrupted_member(tmp_path, saved):
    data = bytearray(saved.read_bytes())
    with zipfile.ZipFile(saved) as zf:
        info = zf.getinfo("selector.scores_.npy")
    # Flip a byte inside the stored array data: the zip CRC no longer matches.
    data[info.header_offset + 30 + len(info.filename) + info.file_size - 3] ^= 0xFF
    saved.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="not a readable dfsnet encoder file .*CRC"):
        Encoder.load(saved)


def test_load_refuses_inconsistent_contents(saved):
    with np.load(saved, allow_pickle=False) as f:
        meta = json.loads(str(f["meta"]))
        ranking = f["selector.ranking_"]
        thresholds = f["hasher.thresholds_"]
    _rewrite(saved, format_version=np.array(2))
    with pytest.raises(ValueError, match="format_version: this dfsnet reads version 1, the file has version 2"):
        Encoder.load(saved)
    _rewrite(saved, format_version=np.array(1), **{"selector.ranking_": np.zeros_like(ranking)})
    with pytest.raises(ValueError, match="ranking_: expected a permutation"):
        Encoder.load(saved)
    _rewrite(saved, **{"selector.ranking_": ranking, "hasher.thresholds_": np.zeros(3)})
    with pytest.raises(ValueError, match=r"thresholds_: expected shape \(8,\), got \(3,\)"):
        Encoder.load(saved)
    _rewrite(saved, **{"hasher.thresholds_": np.array(["a"] * 8)})
    with pytest.raises(ValueError, match="hasher.thresholds_: expected a numeric array, found dtype <U1"):
        Encoder.load(saved)
    bad = dict(meta, hasher=dict(meta["hasher"], **{"class": "Pickler"}))
    _rewrite(saved, meta=np.array(json.dumps(bad)), **{"hasher.thresholds_": thresholds})
    with pytest.raises(ValueError, match="hasher: unknown class 'Pickler'"):
        Encoder.load(saved)
    bad = dict(meta, n_bits=16)
    _rewrite(saved, meta=np.array(json.dumps(bad)))
    with pytest.raises(ValueError, match="hasher: expects 8 inputs and makes 8 bits; .* records 16 bits"):
        Encoder.load(saved)
    _rewrite(saved, meta=np.array("{not json"))
    with pytest.raises(ValueError, match="invalid dfsnet encoder file"):
        Encoder.load(saved)


def test_files_naming_mean_threshold_hasher_still_load(tmp_path, data):
    # Encoder files written before the rename name the hasher class MeanThresholdHasher.
    X, y = data
    enc = make_encoder("gain_ratio", "feature_mean", 8).fit(X, y)
    enc.save(tmp_path / "new.npz")
    with np.load(tmp_path / "new.npz", allow_pickle=False) as f:
        contents = {key: f[key] for key in f.files}
    meta = json.loads(str(contents["meta"]))
    assert meta["hasher"]["class"] == "ThresholdHasher"
    meta["hasher"]["class"] = "MeanThresholdHasher"
    contents["meta"] = np.array(json.dumps(meta, sort_keys=True))
    np.savez(tmp_path / "old.npz", **contents)
    loaded = Encoder.load(tmp_path / "old.npz")
    assert type(loaded.hasher_) is ThresholdHasher
    np.testing.assert_array_equal(loaded.transform(X), enc.transform(X))
    loaded.save(tmp_path / "again.npz")
    with np.load(tmp_path / "again.npz", allow_pickle=False) as f:
        assert json.loads(str(f["meta"]))["hasher"]["class"] == "ThresholdHasher"


def test_fit_leaves_the_step_parameters_unfitted(data):
    X, y = data
    enc = make_encoder("gain_ratio", "feature_median", 8)
    enc.fit(X, y)
    assert not hasattr(enc.selector, "ranking_") and not hasattr(enc.hasher, "n_bits_")
    assert enc.selector_.n_features == 8 and enc.hasher_.n_bits_ == 8


@pytest.mark.parametrize("selector, hasher, kw", [("gain_ratio", "sample_mean", {}),
                                                  ("gain_ratio", "feature_mean", {}),
                                                  ("random", "feature_median", {"random_state": 3}),
                                                  ("gain_ratio", "zero", {}),
                                                  ("gain_ratio", "itq", {"n_iter": 5}),
                                                  (None, "itq", {"n_iter": 5})])
def test_with_n_bits_equals_fitting_that_length(data, selector, hasher, kw):
    X, y = data
    wide = make_encoder(selector, hasher, 24, **kw).fit(X, y)
    for b in (1, 7, 16, 24):
        short = wide.with_n_bits(b, X)
        alone = make_encoder(selector, hasher, b, **kw).fit(X, y)
        assert short.n_bits_ == b and short.n_features_in_ == 40
        np.testing.assert_array_equal(short.transform(X), alone.transform(X))
        assert repr(short) == repr(alone)
    assert wide.n_bits_ == 24  # not modified


def test_with_n_bits_refusals(data):
    X, y = data
    enc = make_encoder("gain_ratio", "feature_mean", 8).fit(X, y)
    with pytest.raises(ValueError, match=r"n_bits: expected at most 8, got 9 \(a prefix"):
        enc.with_n_bits(9)
    with pytest.raises(ValueError, match="n_bits: a ThresholdHasher without a selector makes one bit per input"):
        make_encoder(None, "zero").fit(X).with_n_bits(4)
    with pytest.raises(ValueError, match="X: ITQHasher must be refitted for n_bits=4; pass the training features"):
        make_encoder(None, "itq", 8).fit(X).with_n_bits(4)
    with pytest.raises(NotFittedError):
        make_encoder("gain_ratio", "sample_mean", 8).with_n_bits(4)
