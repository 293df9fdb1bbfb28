"""benchmarks/bench_class_codes.py: the class code and the collapse measure on small cases."""
from __future__ import annotations

import importlib.util

import numpy as np

from dfsnet.eval.metrics import mean_average_precision
from dfsnet.hashing import pack_bits
from tests.conftest import REPO


def _bench():
    spec = importlib.util.spec_from_file_location("bench_class_codes", REPO / "benchmarks" / "bench_class_codes.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_class_code_of_a_perfect_classifier_retrieves_perfectly_and_of_a_wrong_one_not():
    bench = _bench()
    yq, ydb = np.array([0, 1, 2]), np.array([0, 0, 1, 1, 2, 2])
    d = bench.class_code_distances(yq, ydb)
    assert d.dtype == np.uint8 and d.shape == (3, 6)
    assert mean_average_precision(yq, ydb, distances=d) == 1.0
    # Query 0 predicted as class 1: its tie at distance 0 holds no relevant image.
    wrong = bench.class_code_distances(np.array([1, 1, 2]), ydb)
    assert mean_average_precision(yq, ydb, distances=wrong) < 1.0


def test_collapse_counts_the_modal_code_of_each_predicted_class():
    bench = _bench()
    bits = np.array([[0] * 8, [0] * 8, [1] + [0] * 7, [1] * 8, [1] * 8])
    pred = np.array([0, 0, 0, 1, 1])
    out = bench.collapse(pack_bits(bits), pred)
    assert out == {"share_in_modal_code_of_predicted_class": 4 / 5, "distinct_codes": 3}
