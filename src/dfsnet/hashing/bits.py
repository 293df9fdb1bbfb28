"""Packed binary codes: packing, unpacking and exact Hamming distances.

Bit order (used everywhere in dfsnet): numpy ``packbits`` big-endian, i.e. bit ``i`` of a code
lives in byte ``i // 8`` under mask ``0x80 >> (i % 8)``; unused trailing bits of the last byte are
0. This is also the layout faiss binary indexes read.
"""
from __future__ import annotations

import numpy as np

from dfsnet._validation import check_array, check_codes, check_positive_int
from dfsnet.errors import InputError

__all__ = ["code_words", "hamming_distances", "n_bytes", "pack_bits", "popcount", "unpack_bits"]

# Cap on the (rows x columns) uint64 XOR block in hamming_distances, in bytes.
_BLOCK_BYTES = 64 << 20


def n_bytes(n_bits: int) -> int:
    """Bytes per packed code of ``n_bits`` bits: ``ceil(n_bits / 8)``.

    Parameters
    ----------
    n_bits : int

    Returns
    -------
    int
    """
    return (int(n_bits) + 7) // 8


def pack_bits(bits: np.typing.ArrayLike) -> np.ndarray:
    """Pack a boolean matrix into codes.

    Parameters
    ----------
    bits : array-like of bool (or 0/1 integers), shape (n, b)

    Returns
    -------
    ndarray of uint8, shape (n, ceil(b / 8))
        Bit ``i`` in byte ``i // 8`` at mask ``0x80 >> (i % 8)``; padding bits are 0.
    """
    arr = check_array(bits, name="bits", dtype=None)
    if arr.dtype != np.bool_:
        if not np.all((arr == 0) | (arr == 1)):
            raise InputError(f"bits: expected booleans or 0/1 values, got dtype {arr.dtype} with other values")
        arr = arr.astype(bool)
    return np.packbits(arr, axis=1, bitorder="big")


def unpack_bits(codes: np.ndarray, n_bits: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`.

    Parameters
    ----------
    codes : ndarray of uint8, shape (n, ceil(n_bits / 8))
    n_bits : int
        Code length in bits; the trailing padding bits are dropped.

    Returns
    -------
    ndarray of bool, shape (n, n_bits)
    """
    codes = check_codes(codes, name="codes", min_rows=0)
    n_bits = check_positive_int(n_bits, name="n_bits")
    if codes.shape[1] != n_bytes(n_bits):
        raise InputError(
            f"codes: expected {n_bytes(n_bits)} bytes per code for n_bits={n_bits}, got {codes.shape[1]}"
        )
    return np.unpackbits(codes, axis=1, count=n_bits, bitorder="big").astype(bool)


def code_words(codes: np.ndarray) -> np.ndarray:
    """Packed codes as uint64 words, word-major.

    Zero padding to whole words leaves every Hamming distance unchanged (0 XOR 0 = 0), and
    word-major order makes each word one contiguous row.

    Parameters
    ----------
    codes : ndarray of uint8, shape (n, B)

    Returns
    -------
    ndarray of uint64, shape (ceil(B / 8), n)
    """
    n, width = codes.shape
    n_words = -(-width // 8)
    padded = np.zeros((n, n_words * 8), dtype=np.uint8)
    padded[:, :width] = codes
    return np.ascontiguousarray(padded.view(np.uint64).T)


_POPCOUNT8 = np.array([i.bit_count() for i in range(256)], dtype=np.uint8)


def _popcount_table(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Bits set per uint64 of ``x`` (B, n) into ``out`` (B, n), via a byte lookup table."""
    return _POPCOUNT8[x.view(np.uint8)].reshape(*x.shape, 8).sum(axis=-1, dtype=out.dtype, out=out)


def _popcount_native(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    return np.bitwise_count(x, out=out)


#: ``popcount(x uint64 (B, n), out (B, n)) -> out``: bits set per word. numpy >= 2.0 has a
#: hardware popcount (``numpy.bitwise_count``), ~10x the lookup table older numpy falls back to.
popcount = _popcount_native if hasattr(np, "bitwise_count") else _popcount_table


def hamming_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """All pairwise Hamming distances between two sets of packed codes, exactly.

    XOR of 64-bit words and a popcount (:data:`popcount`), in row blocks of ``a`` so that
    memory stays bounded.

    Parameters
    ----------
    a : ndarray of uint8, shape (na, B)
    b : ndarray of uint8, shape (nb, B)

    Returns
    -------
    ndarray of int32, shape (na, nb)
    """
    a = check_codes(a, name="a", min_rows=0)
    b = check_codes(b, name="b", min_rows=0)
    if a.shape[1] != b.shape[1]:
        raise InputError(f"b: expected codes of {a.shape[1]} bytes like a, got {b.shape[1]}")
    wa, wb = code_words(a), code_words(b)
    out = np.zeros((a.shape[0], b.shape[0]), dtype=np.int32)
    rows = max(1, _BLOCK_BYTES // max(1, b.shape[0] * 8))
    count = np.empty((min(rows, a.shape[0]), b.shape[0]), dtype=np.uint8)
    for i in range(0, a.shape[0], rows):
        block = out[i : i + rows]
        # One word at a time: popcount(XOR) into uint8, accumulated in int32; a single
        # (rows, nb, words) reduction is several times slower.
        for w in range(wa.shape[0]):
            block += popcount(np.bitwise_xor(wa[w, i : i + rows, None], wb[w][None, :]), out=count[: len(block)])
    return out
