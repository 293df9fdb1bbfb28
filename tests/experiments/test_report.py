"""report.md and figures from a results dict: every table reads the right rows."""
from __future__ import annotations

from pathlib import Path

from dfsnet.experiments.figures import write_figures
from dfsnet.experiments.report import render_report, scheme_table, summary_rows, write_report
from dfsnet.experiments.schemes import SCHEMES


def _results(ties=("stable", "expected")) -> dict:
    rows = []
    maps = {"1": 0.40, "2": 0.60, "1h": 0.30, "3": 0.58, "3-random": 0.50, "3-fmean": 0.55,
            "3-fmedian": 0.54, "itq": 0.57, "1-csq": 0.45, "3-csq": 0.66, "3h-itq": 0.65}
    for sid, scheme in SCHEMES.items():
        for t in ties:
            for bits in ([None] if scheme.metric == "euclidean" else [16, 64, 1280]):
                bonus = 0.0 if bits in (None, 64) else (-0.05 if bits == 16 else 0.01)
                value = maps[sid] + bonus - (0.01 if t == "expected" and bits else 0.0)
                rows.append({"scheme": sid, "network": scheme.network, "bits": bits, "ties": t,
                             "map_all": value - 0.02, "map_at_k": value, "k": 1000,
                             "precision_at_k": value - 0.1,
                             "bytes_per_item": 5120 if bits is None else bits // 8,
                             "search_seconds": 0.8 if bits is None else 0.02,
                             "seconds_per_query": 0.0008 if bits is None else 0.00002})
    setting = {"key": "efficientnet_lite0-cifar10-head", "backbone": "efficientnet_lite0",
               "dataset": "cifar10", "mode": "head", "protocol": "cifar10", "image_size": 128,
               "feature_dim": 1280, "bits": [16, 64, 1280],
               "split": {"n_train": 5000, "n_val": 500, "n_query": 1000, "n_database": 54000, "n_classes": 10},
               "networks": {"ori": {"accuracy": 0.80, "source": "trained", "epochs": 20, "train_seconds": 10.0},
                            "dfs": {"accuracy": 0.86, "source": "trained", "epochs": 20, "train_seconds": 30.0,
                                    "cached": True}},
               "rows": rows,
               "pr_curves": {"Scheme 2 (DFS-Net, Euclidean)": {"scheme": "2", "bits": None, "recall": [0.1, 1.0],
                                                                "precision": [0.9, 0.1]}}}
    return {"config": {"name": "t", "ties": list(ties), "k": 1000, "pr_bits": 64},
            "started_at": "s", "finished_at": "f", "wall_seconds": {"total": 12.0}, "seed": 0,
            "environment": {"machine": {"cpu_count": 2, "platform": "x"}, "packages": {"dfsnet": "0.1.0"}},
            "schemes": {sid: {"description": s.description} for sid, s in SCHEMES.items()},
            "settings": [setting]}


def _line(text: str, start: str) -> list[str]:
    (line,) = [ln for ln in text.splitlines() if ln.startswith(start)]
    return [c.strip() for c in line.strip("|").split("|")]


def test_summary_uses_float_rows_and_hashed_rows_at_pr_bits():
    rows = summary_rows(_results())
    assert [r["scheme"] for r in rows] == ["1", "1h", "2", "3", "3-random", "3-fmean", "3-fmedian", "itq",
                                           "1-csq", "3-csq", "3h-itq"]
    assert all(r["ties"] == "expected" for r in rows)  # order-free ties first, when evaluated
    assert all(r["ties"] == "stable" for r in summary_rows(_results(ties=("stable",))))
    assert {r["bits"] for r in rows if r["scheme"] not in ("1", "2")} == {64}


def test_scheme_table_lists_accuracy_and_every_scheme():
    text = scheme_table(_results())
    assert "accuracy Ori 80.00 %, DFS-Net 86.00 %" in text
    assert "1000 queries, 54000 database" in text
    line = [ln for ln in text.splitlines() if ln.strip().startswith("3 ")][0].split()
    assert line[:5] == ["3", "64", "55.00", "57.00", "47.00"]


def test_steps_and_memory_tables_compute_the_differences():
    text = render_report(_results())
    assert _line(text, "| DFS module, float features |")[2:] == ["+20.00", "+20.00"]
    assert _line(text, "| gain ratio vs random selection at 64 bits |")[2] == "+8.00"
    assert _line(text, "| selecting and hashing to 64 bits, against float features |")[2] == "-3.00"
    mem = [ln for ln in text.splitlines() if ln.startswith("| 3 | 64 |")][0]
    assert "| 8 | 1/640 |" in mem and "40.0×" in mem
    ties = _line(text, "| efficientnet_lite0-cifar10-head | 3 | 64 |")
    assert ties[3:6] == ["58.00", "57.00", "+1.00"]
    best = _line(text, "| 3 (best b) |")
    assert best[2] == "1280" and best[5] == "58.00" and best[-1] == "—"


def test_single_tie_mode_has_no_tie_section():
    text = render_report(_results(ties=("stable",)))
    assert "## Tie modes" not in text and "## What each step adds" in text


def test_write_report_links_the_pngs_written_beside_it(tmp_path: Path):
    results = _results()
    path = write_report(results, tmp_path, write_figures(results, tmp_path))
    text = path.read_text()
    for name in ("fig_map_vs_bits_cifar10_head.png", "fig_pr_cifar10_head.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
        assert f"]({name})" in text
    assert "reused from cache" in text and _line(text, "| efficientnet_lite0-cifar10-head | DFS-Net |")[-1] == "yes"


def test_scheme_table_shows_every_code_length_evaluated():
    text = scheme_table(_results())
    lines = text.splitlines()
    start = lines.index("  mAP@1000 at every code length:")
    compact = {ln.split()[0]: ln.split(None, 1)[1] for ln in lines[start + 1:] if ln.startswith("  ")}
    assert compact["3"] == "16: 52.00  64: 57.00  1280: 58.00"  # expected ties
    assert set(compact) == {s.id for s in SCHEMES.values() if s.metric == "hamming"}
