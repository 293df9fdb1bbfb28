"""Hashing: packed binary codes from float features (threshold rules of DFS-Net, ITQ, learned
linear hash layers) and the Encoder.

Codes are uint8 arrays of shape (n, ceil(b / 8)); bit ``i`` of a code is in byte ``i // 8`` at mask
``0x80 >> (i % 8)`` (numpy ``packbits`` big-endian, the layout faiss binary indexes read).
"""
from dfsnet.hashing.bits import hamming_distances, n_bytes, pack_bits, unpack_bits
from dfsnet.hashing.encoder import Encoder, make_encoder
from dfsnet.hashing.itq import ITQHasher
from dfsnet.hashing.learned import LinearHasher, hash_centres
from dfsnet.hashing.threshold import ThresholdHasher

__all__ = [
    "Encoder",
    "ITQHasher",
    "LinearHasher",
    "ThresholdHasher",
    "hamming_distances",
    "hash_centres",
    "make_encoder",
    "n_bytes",
    "pack_bits",
    "unpack_bits",
]
