"""The scheme registry drives the report and the figures: one entry adds a scheme everywhere."""
from __future__ import annotations

import subprocess
import sys

import pytest

from dfsnet.experiments import schemes
from dfsnet.experiments.figures import map_vs_bits_figure, pr_figure
from dfsnet.experiments.report import render_report, scheme_table, summary_rows
from dfsnet.experiments.schemes import SCHEMES, Scheme, ablation_names, enabled_schemes


def _results(extra_ids=()) -> dict:
    rows = []
    for sid, scheme in SCHEMES.items():
        for bits in ([None] if scheme.metric == "euclidean" else [16, 64]):
            rows.append({"scheme": sid, "network": scheme.network, "bits": bits, "ties": "stable",
                         "map_all": 0.5, "map_at_k": 0.6, "k": 100, "precision_at_k": 0.55,
                         "bytes_per_item": 5120 if bits is None else bits // 8, "search_seconds": 0.1,
                         "seconds_per_query": 0.001})
    setting = {"key": "tiny-folder-head", "backbone": "tiny", "dataset": "folder", "mode": "head",
               "protocol": "per-class", "image_size": 32, "feature_dim": 64, "bits": [16, 64],
               "split": {"n_train": 10, "n_val": 2, "n_query": 6, "n_database": 20, "n_classes": 3},
               "networks": {"ori": {"accuracy": 0.5}, "dfs": {"accuracy": 0.6}}, "rows": rows,
               "pr_curves": {"Scheme 3 @ 64 bits": {"scheme": "3", "bits": 64, "recall": [0.5, 1.0],
                                                    "precision": [0.8, 0.3]}}}
    return {"config": {"name": "t", "ties": ["stable"], "k": 100, "pr_bits": 64},
            "started_at": "a", "finished_at": "b", "wall_seconds": {"total": 1.0}, "seed": 0,
            "environment": {"machine": {"cpu_count": 2, "platform": "x"}, "packages": {}},
            "schemes": schemes.scheme_entries(), "settings": [setting]}


@pytest.fixture
def new_scheme(monkeypatch):
    scheme = Scheme("3-zero", "Scheme 3, zero threshold", "dfs", "gain_ratio", "zero", ablation="zero",
                    color="tab:purple", marker="x", step=("sample-mean vs zero threshold at {b} bits", "3", "3-zero"))
    monkeypatch.setitem(SCHEMES, scheme.id, scheme)
    return scheme


def test_registry_order_and_ablations():
    assert list(SCHEMES) == ["1", "1h", "2", "3", "3-random", "3-fmean", "3-fmedian", "itq", "1-csq", "3-csq",
                             "3h-itq"]
    assert ablation_names() == ["random", "feature_mean", "feature_median", "itq", "itq_hash_features"]
    assert [s.id for s in enabled_schemes([])] == ["1", "1h", "2", "3", "1-csq", "3-csq"]
    assert [s.id for s in enabled_schemes(["itq"])] == ["1", "1h", "2", "3", "itq", "1-csq", "3-csq"]
    assert {s.id for s in SCHEMES.values() if s.learned} == {"1-csq", "3-csq"}
    assert {s.metric for s in SCHEMES.values() if s.hasher is None} == {"euclidean"}
    assert SCHEMES["3"].selector == "gain_ratio" and SCHEMES["3"].hasher == "sample_mean"  # the paper's


def test_a_new_entry_shows_up_in_tables_and_figures(new_scheme):
    from dfsnet.experiments.config import config_from_dict

    assert "zero" in ablation_names() and config_from_dict({"ablations": ["zero"]}).ablations == ["zero"]
    results = _results()
    assert "3-zero" in [r["scheme"] for r in summary_rows(results)]
    table = scheme_table(results)
    line = [ln for ln in table.splitlines() if ln.strip().startswith("3-zero ")]
    assert line and line[0].split()[:2] == ["3-zero", "64"] and "zero threshold" in line[0]
    text = render_report(results)
    assert "| sample-mean vs zero threshold at 64 bits | 3 − 3-zero @ 64 |" in text
    assert "Scheme 3-zero" in text  # a column of the mAP-against-b table
    fig = map_vs_bits_figure(results, results["settings"])
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "Scheme 3-zero" in labels and labels[:2] == ["Scheme 1h", "Scheme 3"]
    line = [ln for ln in fig.axes[0].get_lines() if ln.get_label() == "Scheme 3-zero"][0]
    assert line.get_color() == "tab:purple" and line.get_marker() == "x"


def test_pr_figure_styles_curves_by_scheme():
    results = _results()
    fig = pr_figure(results["settings"])
    (line,) = fig.axes[0].get_lines()
    assert line.get_color() == SCHEMES["3"].color and line.get_label() == "Scheme 3 @ 64 bits"


def test_figures_leave_pyplot_and_the_backend_alone(tmp_path):
    # In a fresh interpreter: nothing dfsnet does may import pyplot or switch the backend.
    code = (
        "import sys, matplotlib\n"
        "matplotlib.use('svg')\n"
        "from dfsnet.experiments.figures import write_figures\n"
        "from tests.experiments.test_schemes import _results\n"
        f"names = write_figures(_results(), {str(tmp_path)!r})\n"
        "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
        "print(sorted(n for v in names.values() for n in v))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(_repo()))
    assert out.returncode == 0, out.stderr
    assert "fig_map_vs_bits_folder_head.png" in out.stdout
    assert (tmp_path / "fig_pr_folder_head.png").read_bytes()[:4] == b"\x89PNG"


def _repo():
    from pathlib import Path

    return Path(__file__).resolve().parents[2]
