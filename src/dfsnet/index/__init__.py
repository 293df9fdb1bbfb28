"""Nearest-neighbour indexes on faiss: Hamming search over packed codes, float search over features.

Both share one interface: ``add(x, ids=None)``, ``search(q, k) -> (distances, ids)`` padded
with -1 and with ties in ascending id, ``len()``, ``.ids``, ``save(path)`` and ``Cls.load(path)``.
"""
from dfsnet.index.floating import FloatIndex
from dfsnet.index.hamming import HammingIndex

__all__ = ["FloatIndex", "HammingIndex"]
