"""``report.md`` and its figures from an experiment's ``results.json``.

The report follows the paper's order: classification accuracy of Ori against DFS-Net (the
paper's Tables 1 and 4), mAP by scheme with the paper's printed value beside ours, mAP against
the code length b (the paper's Figs. 5-6), then what the paper does not show: what each step
adds, measured on the same features, the effect of the tie mode, and retrieval time and memory.
A cell is "—" where there is no number (the paper gives none we hold, or a scheme was not run).
"""
from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from dfsnet._io import atomic_write_text
from dfsnet.eval.paper import PAPER_TITLE, dataset_title, paper_network, paper_value

__all__ = ["write_report", "render_report", "scheme_table", "summary_rows", "rows_for"]

logger = logging.getLogger(__name__)

DASH = "—"
HASHED_ORDER = ("1h", "3", "3-random", "3-fmean", "3-fmedian", "itq")
FLOAT_ORDER = ("1", "2")


def _pct(value: float | None) -> str:
    return DASH if value is None else f"{100 * value:.2f}"


def _delta(a: float | None, b: float | None) -> str:
    return DASH if a is None or b is None else f"{100 * (a - b):+.2f}"


def _table(header: list[str], rows: Iterable[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _primary_ties(results: dict) -> str:
    ties = results["config"]["ties"]
    return "stable" if "stable" in ties else ties[0]


def rows_for(setting: dict, scheme: str, *, ties: str, bits: int | None = None) -> list[dict]:
    """The result rows of one scheme in one setting, ordered by code length."""
    rows = [r for r in setting["rows"] if r["scheme"] == scheme and r["ties"] == ties
            and (bits is None or r["bits"] == bits)]
    return sorted(rows, key=lambda r: r["bits"] or 0)


def _one(setting: dict, scheme: str, *, ties: str, bits: int | None = None) -> dict | None:
    rows = rows_for(setting, scheme, ties=ties, bits=bits)
    return rows[0] if rows else None


def _best(setting: dict, scheme: str, *, ties: str) -> dict | None:
    rows = rows_for(setting, scheme, ties=ties)
    return max(rows, key=lambda r: r["map_all"]) if rows else None


def _get(row: dict | None, key: str):
    return None if row is None else row[key]


def summary_rows(results: dict) -> list[dict]:
    """One line per setting and scheme: float schemes, and hashed ones at ``pr_bits`` bits."""
    ties = _primary_ties(results)
    out = []
    for s in results["settings"]:
        b = _report_bits(results, s)
        for scheme in ("1", "1h", "2", "3", *[x for x in HASHED_ORDER if x not in ("1h", "3")]):
            row = _one(s, scheme, ties=ties) if scheme in FLOAT_ORDER else _one(s, scheme, ties=ties, bits=b)
            if row is not None:
                out.append({"setting": s["key"], **row})
    return out


def _report_bits(results: dict, setting: dict) -> int:
    # The code length the summary tables use: pr_bits when it was evaluated, else the largest.
    bits = setting["bits"]
    return results["config"]["pr_bits"] if results["config"]["pr_bits"] in bits else max(bits)


def scheme_table(results: dict) -> str:
    """A fixed-width text table of accuracy and every scheme's scores, for the terminal."""
    ties = _primary_ties(results)
    k = results["config"]["k"]
    lines = []
    for s in results["settings"]:
        acc = {n: s["networks"][n].get("accuracy") for n in ("ori", "dfs")}
        lines.append(f"{s['key']}  (protocol {s['protocol']}: {s['split']['n_query']} queries, "
                     f"{s['split']['n_database']} database; accuracy Ori {_pct(acc['ori'])} %, "
                     f"DFS-Net {_pct(acc['dfs'])} %)")
        lines.append(f"  {'scheme':<10} {'bits':>5} {'mAP@all':>8} {f'mAP@{k}':>9} {f'P@{k}':>8} "
                     f"{'ms/query':>9}  what")
        for row in summary_rows(results):
            if row["setting"] != s["key"]:
                continue
            bits = "float" if row["bits"] is None else str(row["bits"])
            lines.append(f"  {row['scheme']:<10} {bits:>5} {_pct(row['map_all']):>8} "
                         f"{_pct(row['map_at_k']):>9} {_pct(row['precision_at_k']):>8} "
                         f"{1000 * row['seconds_per_query']:>9.3f}  {results['schemes'][row['scheme']]['description']}")
    lines.append(f"(mAP and precision in %, ties {ties}; hashed schemes at the report's code length)")
    return "\n".join(lines)


def render_report(results: dict, figures: dict[str, list[str]] | None = None) -> str:
    """The Markdown report for ``results`` (the ``results.json`` dict)."""
    cfg = results["config"]
    ties = _primary_ties(results)
    k = cfg["k"]
    env = results["environment"]
    parts = [
        f"# DFS-Net experiment `{cfg['name']}`",
        "",
        f"Paper: *{PAPER_TITLE}*. Paper columns hold the values printed there; "
        f"{DASH} where the paper gives no number for that backbone or data set. "
        f"All mAP, precision and accuracy values are in %. Unless stated otherwise, mAP uses "
        f"**{ties}** tie-breaking and selectors/hashers are fitted on the train split only.",
        "",
        f"Run: {results['started_at']} to {results['finished_at']}, "
        f"{results['wall_seconds']['total']:.0f} s wall time, seed {results['seed']}, "
        f"{env['machine']['cpu_count']} CPU(s) ({env['machine']['platform']}), "
        f"dfsnet {env['packages'].get('dfsnet', '?')}, torch {env['packages'].get('torch', '?')}.",
        "",
        "## Settings and split protocol",
        "",
        _table(["setting", "backbone", "dataset", "training", "protocol", "train", "val", "query",
                "database", "classes", "image px", "D"],
               [[s["key"], s["backbone"], s["dataset"], _mode_text(s, cfg), s["protocol"],
                 s["split"]["n_train"], s["split"]["n_val"], s["split"]["n_query"],
                 s["split"]["n_database"], s["split"]["n_classes"], s["image_size"],
                 s["feature_dim"]] for s in results["settings"]]),
        "",
        "## Classification accuracy, Ori against DFS-Net (cf. the paper's Tables 1 and 4)",
        "",
        "Accuracy of each trained network on the query images (the test split).",
        "",
        _table(["backbone", "dataset", "training", "Ori", "DFS-Net", "DFS-Net − Ori",
                "paper network", "DFS-Net (paper)"],
               [[s["backbone"], dataset_title(s["dataset"]), s["mode"],
                 _pct(s["networks"]["ori"].get("accuracy")), _pct(s["networks"]["dfs"].get("accuracy")),
                 _delta(s["networks"]["dfs"].get("accuracy"), s["networks"]["ori"].get("accuracy")),
                 paper_network(s["backbone"]) or DASH,
                 _pct(paper_value("accuracy_dfs", backbone=s["backbone"], dataset=s["dataset"]))]
                for s in results["settings"]]),
        "",
        "## mAP by scheme",
        "",
        f"Hashed schemes at b = {cfg['pr_bits']} bits (or the largest evaluated), and Scheme 3 "
        "at its best b. The paper column is the paper's best Scheme 3 mAP; choosing the best b "
        "looks at the query results, so it is shown for comparison with the paper only.",
        "",
    ]
    for s in results["settings"]:
        parts += [f"### {s['backbone']} on {dataset_title(s['dataset'])}, {_mode_text(s, cfg)}", "",
                  _scheme_section(results, s, ties), ""]
    parts += ["## mAP against code length b (cf. the paper's Figs. 5-6)", "",
              f"mAP@{k}; the float schemes 1 and 2 do not depend on b and are given in the heading.",
              ""]
    for s in results["settings"]:
        parts += [_bits_section(results, s, ties, "map_at_k", f"mAP@{k}"), "",
                  _bits_section(results, s, ties, "map_all", "mAP@all"), ""]
    parts += ["## What each step adds, measured", "",
              f"Differences in mAP@{k} points (and mAP@all) on the same features and split; positive "
              "means the first term of the comparison retrieves better.", ""]
    for s in results["settings"]:
        parts += [f"### {s['key']}", "", _steps_section(results, s, ties), ""]
    if len(cfg["ties"]) > 1:
        parts += ["## Tie modes", "",
                  "Hamming distances take few values, so many database items tie. *stable* ranks "
                  "tied items by ascending id; *expected* is the mean AP over all orders of each "
                  "tie group. The gap shows how much a reported mAP can owe to tie order.", "",
                  _ties_section(results), ""]
    parts += ["## Retrieval time and memory", "",
              "Exhaustive search over the whole database, all queries; memory per database item.",
              ""]
    for s in results["settings"]:
        parts += [f"### {s['key']}", "", _time_section(results, s, ties), ""]
    if figures:
        parts += ["## Figures", ""]
        for title, paths in figures.items():
            parts += [f"**{title}**", ""] + [f"![{title}]({p})" for p in paths] + [""]
    parts += ["## Training", "", _training_section(results), ""]
    return "\n".join(parts)


def _mode_text(setting: dict, cfg: dict) -> str:
    return "head only (frozen backbone)" if setting["mode"] == "head" else "full fine-tuning"


def _scheme_section(results: dict, s: dict, ties: str) -> str:
    k = results["config"]["k"]
    b = _report_bits(results, s)
    paper_map = paper_value("map_scheme3_best", backbone=s["backbone"], dataset=s["dataset"])
    lines = []
    entries = [(sid, _one(s, sid, ties=ties) if sid in FLOAT_ORDER else _one(s, sid, ties=ties, bits=b))
               for sid in ("1", "1h", "2", "3")]
    entries.append(("3 (best b)", _best(s, "3", ties=ties)))
    entries += [(sid, _one(s, sid, ties=ties, bits=b)) for sid in HASHED_ORDER[2:]]
    for label, row in entries:
        if row is None:
            continue
        sid = row["scheme"]
        lines.append([label, results["schemes"][sid]["description"],
                      "float" if row["bits"] is None else row["bits"], row["bytes_per_item"],
                      _pct(row["map_all"]), _pct(row["map_at_k"]), _pct(row["precision_at_k"]),
                      _pct(paper_map) if label == "3 (best b)" else DASH])
    return _table(["scheme", "what", "b", "bytes/item", "mAP@all", f"mAP@{k}", f"P@{k}",
                   "paper mAP"], lines)


def _bits_section(results: dict, s: dict, ties: str, key: str, label: str) -> str:
    floats = {sid: _get(_one(s, sid, ties=ties), key) for sid in FLOAT_ORDER}
    present = [sid for sid in HASHED_ORDER if rows_for(s, sid, ties=ties)]
    head = (f"**{s['key']}**, {label}: Scheme 1 (Ori, Euclidean) {_pct(floats['1'])}, "
            f"Scheme 2 (DFS-Net, Euclidean) {_pct(floats['2'])}")
    table = _table(["b"] + [f"Scheme {sid}" for sid in present],
                   [[b] + [_pct(_get(_one(s, sid, ties=ties, bits=b), key)) for sid in present]
                    for b in s["bits"]])
    return head + "\n\n" + table


def _steps_section(results: dict, s: dict, ties: str) -> str:
    b = _report_bits(results, s)
    d = s["feature_dim"]

    def pair(a, a_bits, c, c_bits, key):
        ra = _one(s, a, ties=ties) if a_bits is None else _one(s, a, ties=ties, bits=a_bits)
        rc = _one(s, c, ties=ties) if c_bits is None else _one(s, c, ties=ties, bits=c_bits)
        return _delta(_get(ra, key), _get(rc, key))

    steps = [
        ("DFS module, float features", "2 − 1", ("2", None, "1", None)),
        (f"DFS module, hashed at {b} bits", f"3 − 1h @ {b}", ("3", b, "1h", b)),
        (f"gain ratio vs random selection at {b} bits", f"3 − 3-random @ {b}", ("3", b, "3-random", b)),
        (f"sample-mean vs feature-mean threshold at {b} bits", f"3 − 3-fmean @ {b}", ("3", b, "3-fmean", b)),
        (f"sample-mean vs feature-median threshold at {b} bits", f"3 − 3-fmedian @ {b}", ("3", b, "3-fmedian", b)),
        (f"gain ratio + hash vs ITQ at {b} bits", f"3 − itq @ {b}", ("3", b, "itq", b)),
        (f"selecting and hashing to {b} bits, against float features", f"3 @ {b} − 2", ("3", b, "2", None)),
        (f"hashing all D = {d} features, against float features", f"3 @ {d} − 2", ("3", d, "2", None)),
    ]
    k = results["config"]["k"]
    rows = [[name, expr, pair(*args, "map_at_k"), pair(*args, "map_all")] for name, expr, args in steps
            if pair(*args, "map_at_k") != DASH]
    return _table(["step", "comparison", f"Δ mAP@{k}", "Δ mAP@all"], rows)


def _ties_section(results: dict) -> str:
    k = results["config"]["k"]
    rows = []
    for s in results["settings"]:
        b = _report_bits(results, s)
        for sid in ("1", "1h", "2", "3", "itq"):
            pair = {t: (_one(s, sid, ties=t) if sid in FLOAT_ORDER else _one(s, sid, ties=t, bits=b))
                    for t in ("stable", "expected")}
            if None in pair.values():
                continue
            rows.append([s["key"], sid, "float" if sid in FLOAT_ORDER else b,
                         _pct(pair["stable"]["map_at_k"]), _pct(pair["expected"]["map_at_k"]),
                         _delta(pair["stable"]["map_at_k"], pair["expected"]["map_at_k"]),
                         _pct(pair["stable"]["map_all"]), _pct(pair["expected"]["map_all"])])
    return _table(["setting", "scheme", "b", f"mAP@{k} stable", f"mAP@{k} expected", "stable − expected",
                   "mAP@all stable", "mAP@all expected"], rows)


def _time_section(results: dict, s: dict, ties: str) -> str:
    euclid = _one(s, "2", ties=ties)
    rows = []
    for sid in ("1", "2", "1h", "3", "itq"):
        for row in ([_one(s, sid, ties=ties)] if sid in FLOAT_ORDER else rows_for(s, sid, ties=ties)):
            if row is None:
                continue
            mem = (f"1/{euclid['bytes_per_item'] / row['bytes_per_item']:.0f}"
                   if euclid and row["bits"] is not None else "1")
            speed = (f"{euclid['search_seconds'] / row['search_seconds']:.1f}×"
                     if euclid and row["search_seconds"] > 0 else DASH)
            rows.append([sid, "float" if row["bits"] is None else row["bits"], row["bytes_per_item"], mem,
                         f"{row['search_seconds']:.3f}", f"{1000 * row['seconds_per_query']:.3f}", speed])
    return _table(["scheme", "b", "bytes/item", "memory vs float", "search s (all queries)",
                   "ms/query", "speed vs Scheme 2"], rows)


def _training_section(results: dict) -> str:
    rows = []
    for s in results["settings"]:
        for net in ("ori", "dfs"):
            n = s["networks"][net]
            rows.append([s["key"], "Ori" if net == "ori" else "DFS-Net", n.get("source", DASH),
                         n.get("epochs", DASH), _pct(n.get("best_val_acc")), _pct(n.get("accuracy")),
                         f"{n['train_seconds']:.1f}" if n.get("train_seconds") is not None else DASH,
                         "yes" if n.get("cached") else "no"])
    return _table(["setting", "network", "source", "epochs", "best val acc", "query acc",
                   "train s", "reused from cache"], rows)


def write_report(results: dict, run_dir: str | Path) -> Path:
    """Write ``report.md`` and its PNG figures into ``run_dir``; return the report's path."""
    from dfsnet.eval.figures import write_figures

    run_dir = Path(run_dir)
    figures = write_figures(results, run_dir)
    path = run_dir / "report.md"
    atomic_write_text(path, render_report(results, figures))
    logger.info("report: wrote %s", path)
    return path


def group_settings(results: dict) -> dict[tuple[str, str], list[dict]]:
    """Settings grouped by (dataset, mode): one figure each, one panel per backbone."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for s in results["settings"]:
        groups[(s["dataset"], s["mode"])].append(s)
    return dict(groups)
