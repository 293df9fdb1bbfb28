"""The paper's printed values, held once as a fixed table, and the report's paper columns."""
from __future__ import annotations

import pytest

from dfsnet.experiments.paper import PAPER_TITLE, PAPER_VALUES, paper_network, paper_value
from dfsnet.experiments.report import render_report


def test_fixed_table_holds_exactly_the_printed_values():
    printed = {(v.dataset, v.network, v.metric): v.value for v in PAPER_VALUES}
    assert printed == {
        ("cifar10", "DFS-Net-I", "map_scheme3_best"): 0.8793,
        ("cifar10", "DFS-Net-R", "map_scheme3_best"): 0.8460,
        ("cifar10", "DFS-Net-M", "map_scheme3_best"): 0.7774,
        ("cifar10", "DFS-Net-I", "accuracy_dfs"): 0.888,
        ("cifar10", "DFS-Net-R", "accuracy_dfs"): 0.871,
        ("cifar10", "DFS-Net-M", "accuracy_dfs"): 0.834,
        ("caltech256", "DFS-Net-I", "map_scheme3_best"): 0.8391,
        ("caltech256", "DFS-Net-R", "map_scheme3_best"): 0.7674,
        ("caltech256", "DFS-Net-M", "map_scheme3_best"): 0.7420,
    }
    assert "information gain rate" in PAPER_TITLE


def test_lookup_by_backbone_alias_or_timm_name():
    assert paper_network("mobilenetv2") == paper_network("mobilenetv2_100") == "DFS-Net-M"
    assert paper_value("map_scheme3_best", backbone="inception_v3", dataset="cifar10") == 0.8793
    assert paper_value("accuracy_dfs", backbone="resnet50", dataset="caltech256") is None
    assert paper_value("map_scheme3_best", backbone="efficientnet_lite0", dataset="cifar10") is None
    with pytest.raises(ValueError, match="metric: expected one of"):
        paper_value("map_at_16_bits", backbone="resnet50", dataset="cifar10")


def _setting(backbone, dataset):
    rows = []
    for sid, bits in (("1", None), ("2", None), ("1h", 64), ("3", 16), ("3", 64)):
        rows.append({"scheme": sid, "bits": bits, "ties": "stable", "map_all": 0.5, "map_at_k": 0.6,
                     "precision_at_k": 0.55, "bytes_per_item": 5120 if bits is None else bits // 8,
                     "search_seconds": 0.2, "seconds_per_query": 0.001})
    return {"key": f"{backbone}-{dataset}-head", "backbone": backbone, "dataset": dataset, "mode": "head",
            "protocol": "cifar10", "image_size": 128, "feature_dim": 1280, "bits": [16, 64],
            "split": {"n_train": 5000, "n_val": 500, "n_query": 1000, "n_database": 54000, "n_classes": 10},
            "networks": {"ori": {"accuracy": 0.8}, "dfs": {"accuracy": 0.85}}, "rows": rows}


def test_report_paper_columns_equal_the_printed_values():
    results = {
        "config": {"name": "t", "ties": ["stable"], "k": 1000, "pr_bits": 64},
        "started_at": "a", "finished_at": "b", "wall_seconds": {"total": 1.0}, "seed": 0,
        "environment": {"machine": {"cpu_count": 2, "platform": "x"}, "packages": {}},
        "schemes": {sid: {"description": sid} for sid in ("1", "1h", "2", "3")},
        "settings": [_setting("inception_v3", "cifar10"), _setting("efficientnet_lite0", "cifar10")],
    }
    text = render_report(results)
    acc_rows = [line for line in text.splitlines() if line.startswith("| inception_v3 | CIFAR-10")]
    assert acc_rows and acc_rows[0].rstrip(" |").endswith("DFS-Net-I | 88.80")
    lite_rows = [line for line in text.splitlines() if line.startswith("| efficientnet_lite0 | CIFAR-10")]
    assert lite_rows[0].rstrip(" |").endswith("— | —")
    best = [line for line in text.splitlines() if line.startswith("| 3 (best b) |")]
    assert best[0].rstrip(" |").endswith("87.93")  # inception_v3 section comes first
    assert best[1].rstrip(" |").endswith("—")
    assert "protocol" in text and "cifar10" in text
