"""Hashing: packed binary codes from float features (threshold rules of DFS-Net, ITQ, learned
linear hash layers) and the Encoder.

Codes are uint8 arrays of shape (n, ceil(b / 8)); bit ``i`` of a code is in byte ``i // 8`` at mask
``0x80 >> (i % 8)`` (numpy ``packbits`` big-endian, the layout faiss binary indexes read).

The estimators are imported on first use: they need scikit-learn, which costs about a second
to import, while the bit helpers (``dfsnet.hashing.bits``) serve the metrics and the command
line's start-up with numpy alone.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dfsnet.hashing.bits import hamming_distances, n_bytes, pack_bits, unpack_bits

# name -> module that defines it
_LAZY = {
    "Encoder": "dfsnet.hashing.encoder",
    "make_encoder": "dfsnet.hashing.encoder",
    "ITQHasher": "dfsnet.hashing.itq",
    "LinearHasher": "dfsnet.hashing.learned",
    "hash_centres": "dfsnet.hashing.learned",
    "ThresholdHasher": "dfsnet.hashing.threshold",
}

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

if TYPE_CHECKING:
    from dfsnet.hashing.encoder import Encoder, make_encoder
    from dfsnet.hashing.itq import ITQHasher
    from dfsnet.hashing.learned import LinearHasher, hash_centres
    from dfsnet.hashing.threshold import ThresholdHasher


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module 'dfsnet.hashing' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
