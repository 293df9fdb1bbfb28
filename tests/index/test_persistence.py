"""save/load of both indexes: round trips, and refusal of every kind of bad file."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from dfsnet.index import FloatIndex, HammingIndex
from dfsnet.index._format import FORMAT_VERSION, MAGIC


@pytest.fixture
def flat_file(tmp_path, rng):
    index = HammingIndex(20)
    index.add(rng.integers(0, 256, size=(60, 3), dtype=np.uint8), ids=rng.permutation(1000)[:60])
    path = tmp_path / "codes.hidx"
    index.save(path)
    return index, path


def test_flat_round_trip(flat_file, rng):
    index, path = flat_file
    loaded = HammingIndex.load(path, n_bits=20)
    assert (loaded.n_bits, loaded.kind, len(loaded)) == (20, "flat", 60)
    np.testing.assert_array_equal(loaded.ids, index.ids)
    q = rng.integers(0, 256, size=(10, 3), dtype=np.uint8)
    for a, b in zip(index.search(q, 40), loaded.search(q, 40)):
        np.testing.assert_array_equal(a, b)
    assert not list(path.parent.glob(".*.tmp"))  # atomic write left no temp file


def test_ivf_round_trip(tmp_path, rng):
    index = HammingIndex(64, kind="ivf", nlist=8, nprobe=3)
    index.add(rng.integers(0, 256, size=(500, 8), dtype=np.uint8), ids=np.arange(500) * 2)
    index.save(tmp_path / "ivf.hidx")
    loaded = HammingIndex.load(tmp_path / "ivf.hidx")
    assert (loaded.kind, loaded.nlist, loaded.nprobe, loaded.nlist_, len(loaded)) == ("ivf", 8, 3, 8, 500)
    q = rng.integers(0, 256, size=(10, 8), dtype=np.uint8)
    for a, b in zip(index.search(q, 30), loaded.search(q, 30)):
        np.testing.assert_array_equal(a, b)
    # An untrained, empty IVF index round-trips too, and trains on its first add after loading.
    HammingIndex(64, kind="ivf").save(tmp_path / "empty.hidx")
    empty = HammingIndex.load(tmp_path / "empty.hidx")
    assert not empty.is_trained and len(empty) == 0
    empty.add(rng.integers(0, 256, size=(100, 8), dtype=np.uint8))
    assert empty.is_trained


def test_float_round_trip(tmp_path, rng):
    for metric in ("l2", "cosine"):
        index = FloatIndex(6, metric=metric)
        index.add(rng.standard_normal((50, 6)), ids=np.arange(50)[::-1] + 7)
        index.save(tmp_path / f"{metric}.fidx")
        loaded = FloatIndex.load(tmp_path / f"{metric}.fidx", dim=6)
        assert loaded.metric == metric and len(loaded) == 50
        q = rng.standard_normal((4, 6))
        for a, b in zip(index.search(q, 9), loaded.search(q, 9)):
            np.testing.assert_array_equal(a, b)


def test_truncated_file_is_refused(flat_file, tmp_path):
    _, path = flat_file
    data = path.read_bytes()
    for cut in (0, 5, 12, 40, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{cut}.hidx"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="path: .*(truncated|not a dfsnet index file)"):
            HammingIndex.load(bad)


def test_flipped_byte_is_refused_anywhere(flat_file, tmp_path):
    _, path = flat_file
    data = path.read_bytes()
    bad = tmp_path / "bad.hidx"
    for offset in range(0, len(data), 7):
        flipped = bytearray(data)
        flipped[offset] ^= 0x04
        bad.write_bytes(bytes(flipped))
        with pytest.raises(ValueError, match="path: "):
            HammingIndex.load(bad)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01  # inside the codes: only the checksum can tell
    bad.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="checksum mismatch"):
        HammingIndex.load(bad)


def test_wrong_magic_version_class_and_size(flat_file, tmp_path):
    _, path = flat_file
    data = path.read_bytes()
    (tmp_path / "magic").write_bytes(b"NOTANIDX" + data[8:])
    with pytest.raises(ValueError, match="not a dfsnet index file"):
        HammingIndex.load(tmp_path / "magic")
    (tmp_path / "version").write_bytes(MAGIC + struct.pack("<I", FORMAT_VERSION + 1) + data[12:])
    with pytest.raises(ValueError, match=f"format version {FORMAT_VERSION + 1}.*reads version {FORMAT_VERSION}"):
        HammingIndex.load(tmp_path / "version")
    with pytest.raises(ValueError, match="holds a HammingIndex, not a FloatIndex"):
        FloatIndex.load(path)
    with pytest.raises(ValueError, match="n_bits: expected an index of 64-bit codes, but .* holds 20-bit codes"):
        HammingIndex.load(path, n_bits=64)
    float_path = tmp_path / "f.fidx"
    FloatIndex(3).save(float_path)
    with pytest.raises(ValueError, match="dim: expected an index of 4-d vectors, but .* holds 3-d"):
        FloatIndex.load(float_path, dim=4)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="path: index file not found"):
        HammingIndex.load(tmp_path / "nope.hidx")
    with pytest.raises(FileNotFoundError, match="path: index file not found"):
        FloatIndex.load(tmp_path / "nope.fidx")


def test_well_formed_file_with_sections_of_the_wrong_dtype_is_refused(tmp_path):
    # The checksum proves integrity, not origin: a file written by other code with valid
    # framing but float ids or codes must still be refused.
    from dfsnet.index._format import write_container

    header = {"class": "HammingIndex", "n_bits": 8, "kind": "flat", "nlist": None, "nprobe": None, "count": 2}
    write_container(tmp_path / "float_ids", header, {"ids": np.array([0, 1], np.float32),
                                                     "codes": np.zeros((2, 1), np.uint8)})
    with pytest.raises(ValueError, match="is corrupt .*ids of float32"):
        HammingIndex.load(tmp_path / "float_ids")
    write_container(tmp_path / "float_codes", header, {"ids": np.array([0, 1], np.int64),
                                                       "codes": np.zeros((2, 1), np.float32)})
    with pytest.raises(ValueError, match="is corrupt .*codes of dtype float32"):
        HammingIndex.load(tmp_path / "float_codes")
    header = {"class": "FloatIndex", "dim": 1, "metric": "l2", "count": 2}
    write_container(tmp_path / "byte_vectors", header, {"ids": np.array([0, 1], np.int64),
                                                        "vectors": np.zeros((2, 1), np.uint8)})
    with pytest.raises(ValueError, match="is corrupt"):
        FloatIndex.load(tmp_path / "byte_vectors")
