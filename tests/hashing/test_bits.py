"""pack_bits / unpack_bits bit order and hamming_distances exactness."""
from __future__ import annotations

import numpy as np
import pytest

from dfsnet.hashing import hamming_distances, pack_bits, unpack_bits


def test_documented_bit_order():
    bits = np.zeros((1, 13), dtype=bool)
    bits[0, [0, 9, 12]] = True
    codes = pack_bits(bits)
    # bit 0 -> byte 0 mask 0x80; bit 9 -> byte 1 mask 0x40; bit 12 -> byte 1 mask 0x08; padding 0.
    assert codes.dtype == np.uint8 and codes.tolist() == [[0x80, 0x48]]


@pytest.mark.parametrize("n_bits", [1, 7, 8, 13, 64, 100])
def test_pack_unpack_round_trip(rng, n_bits):
    bits = rng.random((17, n_bits)) < 0.5
    codes = pack_bits(bits)
    assert codes.shape == (17, (n_bits + 7) // 8)
    out = unpack_bits(codes, n_bits)
    assert out.dtype == np.bool_
    np.testing.assert_array_equal(out, bits)
    np.testing.assert_array_equal(pack_bits(bits.astype(np.int64)), codes)


@pytest.mark.parametrize("n_bits", [5, 13, 64, 100])
def test_hamming_distances_match_brute_force(rng, n_bits, monkeypatch):
    import dfsnet.hashing.bits as bits_module

    a = pack_bits(rng.random((23, n_bits)) < 0.5)
    b = pack_bits(rng.random((31, n_bits)) < 0.5)
    ua, ub = unpack_bits(a, n_bits), unpack_bits(b, n_bits)
    want = (ua[:, None, :] != ub[None, :, :]).sum(axis=2)
    got = hamming_distances(a, b)
    assert got.dtype == np.int32 and got.shape == (23, 31)
    np.testing.assert_array_equal(got, want)
    monkeypatch.setattr(bits_module, "_BLOCK_BYTES", 1)  # one query row per block
    np.testing.assert_array_equal(hamming_distances(a, b), want)
    # numpy < 2 has no bitwise_count: the lookup-table popcount must give the same distances.
    monkeypatch.setattr(bits_module, "popcount", bits_module._popcount_table)
    np.testing.assert_array_equal(hamming_distances(a, b), want)


def test_popcount_table_matches_native(rng):
    import dfsnet.hashing.bits as bits_module

    x = rng.integers(0, 2**63, (4, 50), dtype=np.uint64) | np.uint64(1 << 63)
    out = np.empty(x.shape, np.uint8)
    want = [[int(v).bit_count() for v in r] for r in x]
    np.testing.assert_array_equal(bits_module._popcount_table(x, out), want)
    np.testing.assert_array_equal(bits_module.popcount(x, np.empty(x.shape, np.uint8)), want)


def test_bad_input():
    with pytest.raises(ValueError, match="bits: expected booleans or 0/1"):
        pack_bits([[0, 2]])
    with pytest.raises(ValueError, match="bits: expected a 2-D array"):
        pack_bits([True, False])
    with pytest.raises(TypeError, match="codes: expected packed uint8 codes, got dtype int64"):
        unpack_bits(np.zeros((2, 1), dtype=np.int64), 8)
    with pytest.raises(ValueError, match="codes: expected 2 bytes per code for n_bits=9, got 1"):
        unpack_bits(np.zeros((2, 1), dtype=np.uint8), 9)
    with pytest.raises(ValueError, match="n_bits: expected a positive integer"):
        unpack_bits(np.zeros((2, 1), dtype=np.uint8), 0)
    with pytest.raises(ValueError, match="b: expected codes of 2 bytes like a, got 1"):
        hamming_distances(np.zeros((2, 2), np.uint8), np.zeros((2, 1), np.uint8))
    with pytest.raises(TypeError, match="a: expected packed uint8 codes"):
        hamming_distances(np.zeros((2, 2), np.float32), np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match="b: expected a 2-D array"):
        hamming_distances(np.zeros((2, 2), np.uint8), np.zeros(2, np.uint8))
