"""FrozenEncoder: a saved Encoder's codes with numpy alone, bit for bit, and its refusals."""
from __future__ import annotations

import subprocess
import sys
import zipfile

import numpy as np
import pytest

from dfsnet.hashing import Encoder, make_encoder
from dfsnet.hashing.frozen import FrozenEncoder, read_encoder_file

N_FEATURES = 24

THRESHOLDS = ("sample_mean", "feature_mean", "feature_median", "zero")
CASES = (
    [(sel, h, 8, {}) for h in THRESHOLDS for sel in ("gain_ratio", "random")]
    + [(None, h, None, {}) for h in THRESHOLDS]
    + [("gain_ratio", "itq", 6, {"n_features": 12, "n_iter": 5}),
       ("random", "itq", 6, {"n_features": 10, "random_state": 3}),
       ("gain_ratio", "itq", 8, {}),
       (None, "itq", 8, {"random_state": 1})]
    + [("gain_ratio", "csq", 8, {"n_features": 12, "epochs": 3}),
       ("random", "csq", 8, {"epochs": 3, "random_state": 2}),
       (None, "csq", 8, {"epochs": 3}),
       (None, "orthohash", 8, {"epochs": 3})]
)


def _data(seed: int, n: int = 90):
    gen = np.random.default_rng(seed)
    y = gen.integers(0, 3, n)
    X = gen.standard_normal((n, N_FEATURES)).astype(np.float32)
    X[:, :8] += 0.8 * y[:, None]
    return X, y


@pytest.fixture(scope="module")
def fresh():
    """Data the encoders never saw, with a constant column, ties and large values."""
    X, _ = _data(99, n=57)
    X[:, 3] = 0.0
    X[::4, 5] = X[::4, 6]
    X[1] *= 1e4
    return X


@pytest.mark.parametrize("selector, hasher, n_bits, kw", CASES,
                         ids=[f"{s}-{h}-{b}-{i}" for i, (s, h, b, _) in enumerate(CASES)])
def test_frozen_codes_equal_the_encoders(tmp_path, fresh, selector, hasher, n_bits, kw):
    X, y = _data(0)
    encoder = make_encoder(selector, hasher, n_bits, **kw).fit(X, y)
    path = tmp_path / "encoder.npz"
    encoder.save(path)
    frozen = FrozenEncoder.load(path)
    assert frozen.n_bits_ == encoder.n_bits_ and frozen.n_features_in_ == N_FEATURES
    want = Encoder.load(path).transform(fresh)
    got = frozen.transform(fresh)
    assert got.dtype == np.uint8 and got.shape == want.shape == (len(fresh), -(-encoder.n_bits_ // 8))
    assert np.array_equal(got, want)
    assert np.array_equal(frozen.transform(X), encoder.transform(X))
    # other accepted inputs: float64, a list, one row
    assert np.array_equal(frozen.transform(fresh.astype(np.float64)), want)
    assert np.array_equal(frozen.transform(fresh[:1].tolist()), want[:1])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    X, y = _data(0)
    path = tmp_path_factory.mktemp("frozen") / "encoder.npz"
    make_encoder("gain_ratio", "sample_mean", 8).fit(X, y).save(path)
    return path


def test_wrong_column_count_names_the_expected_one(saved):
    frozen = FrozenEncoder.load(saved)
    with pytest.raises(ValueError, match=f"expected {N_FEATURES} columns.*got 23"):
        frozen.transform(np.zeros((2, N_FEATURES - 1), dtype=np.float32))
    with pytest.raises(ValueError):
        frozen.transform(np.zeros(N_FEATURES, dtype=np.float32))  # 1-D


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_input_is_refused(saved, bad):
    X = np.zeros((3, N_FEATURES), dtype=np.float32)
    X[1, 2] = bad
    with pytest.raises(ValueError, match="X"):
        FrozenEncoder.load(saved).transform(X)


def _flipped(data: bytes) -> bytes:
    """``data`` with a byte in the middle of the first member's contents changed."""
    damaged = bytearray(data)
    damaged[len(data) // 3] ^= 0xFF
    return bytes(damaged)


def _other_formats(saved, folder):
    np.save(folder / "array.npy", np.zeros(3))
    (folder / "text.npz").write_text("not an archive\n")
    np.savez(folder / "plain.npz", a=np.arange(3))
    np.savez(folder / "other.npz", format=np.array("dfsnet.hamming_index"), meta=np.array("{}"))
    with np.load(saved) as data:
        contents = {k: data[k] for k in data.files}
    np.savez(folder / "future.npz", **(contents | {"format_version": np.array(99)}))
    np.savez(folder / "meta_list.npz", **(contents | {"meta": np.array("[1, 2]")}))
    np.savez(folder / "meta_broken.npz", **(contents | {"meta": np.array("{not json")}))
    no_ranking = {k: v for k, v in contents.items() if k != "selector.ranking_"}
    np.savez(folder / "no_ranking.npz", **no_ranking)
    np.savez(folder / "bad_ranking.npz", **(contents | {"selector.ranking_": np.arange(5)}))
    (folder / "truncated.npz").write_bytes(saved.read_bytes()[: saved.stat().st_size // 2])
    (folder / "flipped.npz").write_bytes(_flipped(saved.read_bytes()))
    (folder / "empty.npz").write_bytes(b"")
    return sorted(p for p in folder.iterdir() if p.is_file())


def test_damaged_and_foreign_files_are_value_errors_naming_the_path(saved, tmp_path):
    assert zipfile.is_zipfile(saved)
    for path in _other_formats(saved, tmp_path):
        with pytest.raises(ValueError) as info:
            FrozenEncoder.load(path)
        assert str(path) in str(info.value), (path.name, str(info.value))
        # the full estimator refuses the same files
        with pytest.raises(ValueError):
            Encoder.load(path)
    with pytest.raises(FileNotFoundError, match="nothing.npz"):
        FrozenEncoder.load(tmp_path / "nothing.npz")
    with pytest.raises(FileNotFoundError):
        read_encoder_file(tmp_path)  # a folder is no file


def test_read_encoder_file_returns_meta_and_arrays(saved):
    meta, arrays = read_encoder_file(saved)
    assert meta["n_bits"] == 8 and meta["n_features_in"] == N_FEATURES
    assert meta["selector"]["class"] == "GainRatioSelector"
    assert arrays["selector.ranking_"].shape == (N_FEATURES,)


def test_importing_and_using_it_needs_no_sklearn_scipy_or_torch(saved):
    code = (
        "import sys, numpy as np\n"
        "from dfsnet.hashing.frozen import FrozenEncoder\n"
        f"codes = FrozenEncoder.load({str(saved)!r}).transform(np.ones((2, {N_FEATURES}), np.float32))\n"
        "assert codes.shape == (2, 1), codes.shape\n"
        "print(sorted(m for m in ('sklearn', 'scipy', 'torch') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
