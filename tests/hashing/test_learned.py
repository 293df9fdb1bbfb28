"""Learned hash layers: CSQ centres, the losses, LinearHasher, and saving it in an encoder file."""
from __future__ import annotations

import numpy as np
import pytest

from dfsnet.errors import InputError
from dfsnet.hashing import Encoder, LinearHasher, hamming_distances, hash_centres, make_encoder, unpack_bits


@pytest.mark.parametrize("n_bits", [8, 16, 64])
def test_hadamard_centres_are_half_the_code_apart(n_bits):
    c = hash_centres(n_bits, n_bits)
    assert c.dtype == np.float32 and set(np.unique(c)) == {-1.0, 1.0}
    d = (c[:, None, :] != c[None, :, :]).sum(axis=2)
    assert (d[~np.eye(n_bits, dtype=bool)] == n_bits // 2).all()


def test_random_centres_only_past_twice_the_bits():
    from scipy.linalg import hadamard

    h = hadamard(16).astype(np.float32)
    assert np.array_equal(hash_centres(32, 16), np.concatenate([h, -h]))  # 2b classes: still Hadamard
    many = hash_centres(33, 16, random_state=0)
    assert many.shape == (33, 16) and not np.array_equal(many[:32], np.concatenate([h, -h]))
    assert np.array_equal(many, hash_centres(33, 16, random_state=0))
    assert hash_centres(5, 12).shape == (5, 12)  # not a power of two: random


def _separable(rng, n_per_class=40, d=12, n_classes=4):
    means = rng.normal(0, 4, size=(n_classes, d))
    y = np.repeat(np.arange(n_classes), n_per_class)
    return (means[y] + rng.normal(0, 1, size=(y.size, d))).astype(np.float32), y


@pytest.mark.parametrize("loss", ["csq", "orthohash"])
def test_linear_hasher_separates_classes(rng, loss):
    X, y = _separable(rng)
    h = LinearHasher(n_bits=16, loss=loss, epochs=30, batch_size=32).fit(X, y)
    codes = h.transform(X)
    assert codes.dtype == np.uint8 and codes.shape == (X.shape[0], 2)
    d = hamming_distances(codes, codes)
    same = y[:, None] == y[None, :]
    assert d[same].mean() < 0.5 * d[~same].mean()
    # Deterministic, and transform is sign(X W + b) >= 0, packed.
    again = LinearHasher(n_bits=16, loss=loss, epochs=30, batch_size=32).fit(X, y)
    assert np.array_equal(again.transform(X), codes)
    np.testing.assert_array_equal(unpack_bits(codes, 16), X @ h.coef_ + h.intercept_ >= 0)


def test_from_weights_and_encoder_file_round_trip(rng, tmp_path):
    w, b = rng.normal(size=(24, 10)).astype(np.float32), rng.normal(size=24).astype(np.float32)
    h = LinearHasher.from_weights(w, b)
    X = rng.normal(size=(7, 10)).astype(np.float32)
    np.testing.assert_array_equal(unpack_bits(h.transform(X), 24), X @ w.T + b >= 0)
    enc = make_encoder(selector=None, hasher="csq", n_bits=8, epochs=2).fit(*_separable(rng, d=10))
    for encoder in (enc,):
        encoder.save(tmp_path / "e.npz")
        loaded = Encoder.load(tmp_path / "e.npz")
        assert isinstance(loaded.hasher_, LinearHasher) and loaded.n_bits_ == 8
        np.testing.assert_array_equal(loaded.transform(X), encoder.transform(X))
    with np.load(tmp_path / "e.npz", allow_pickle=False) as z:
        assert z["hasher.coef_"].dtype == np.float32 and z["hasher.coef_"].shape == (10, 8)
    with pytest.raises(InputError, match="weight, bias"):
        LinearHasher.from_weights(w, b[:3])


def test_with_n_bits_refits_a_learned_hasher_with_labels(rng):
    X, y = _separable(rng)
    enc = make_encoder(selector=None, hasher="csq", n_bits=16, epochs=3).fit(X, y)
    short = enc.with_n_bits(8, X, y)
    assert short.n_bits_ == 8 and short.transform(X).shape == (X.shape[0], 1)
    ref = make_encoder(selector=None, hasher="csq", n_bits=8, epochs=3).fit(X, y)
    np.testing.assert_array_equal(short.transform(X), ref.transform(X))


def test_hash_loss_prefers_the_class_centre():
    import torch

    from dfsnet.hashing.learned import hash_loss

    centres = torch.from_numpy(hash_centres(4, 8))
    y = torch.tensor([0, 1, 2, 3])
    for loss in ("csq", "orthohash"):
        good = hash_loss(5 * centres[y], centres, y, loss=loss)
        bad = hash_loss(5 * centres[(y + 1) % 4], centres, y, loss=loss)
        assert float(good) < float(bad)
    with pytest.raises(InputError, match="loss"):
        hash_loss(centres, centres, y, loss="nope")
