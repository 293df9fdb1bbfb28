"""Evaluation: retrieval metrics (mAP with tie handling, precision/recall) and retrieval_eval.

Importing this package loads numpy and scipy only; :func:`retrieval_eval` imports the hashing
and index modules (faiss) when called.
"""
from dfsnet.eval.metrics import (
    TIES,
    MapResult,
    average_precision,
    euclidean_map,
    hamming_map,
    leave_one_out_map,
    mean_average_precision,
    precision_at_k,
    precision_recall_curve,
    recall_at_k,
    search_map,
)
from dfsnet.eval.retrieval import ROW_KEYS, retrieval_eval

__all__ = [
    "TIES",
    "MapResult",
    "average_precision",
    "mean_average_precision",
    "precision_at_k",
    "recall_at_k",
    "precision_recall_curve",
    "hamming_map",
    "euclidean_map",
    "search_map",
    "leave_one_out_map",
    "retrieval_eval",
    "ROW_KEYS",
]
