"""``report.md`` and the terminal scheme table from an experiment's results dict.

The report follows the paper's order: classification accuracy of Ori against DFS-Net (the
paper's Tables 1 and 4), mAP by scheme with the paper's printed value beside ours, mAP against
the code length b (the paper's Figs. 5-6), then what the paper does not show: what each step
adds, measured on the same features, the effect of the tie mode, and retrieval time and memory.
A cell is "—" where there is no number (the paper gives none we hold, or a scheme was not run).

Which schemes appear, in which order and compared with what comes from the registry
:data:`dfsnet.experiments.schemes.SCHEMES`. Figures are drawn by :mod:`dfsnet.experiments.figures`
(the runner calls both); :func:`write_report` only links the files it is given.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dfsnet._io import atomic_write_text
from dfsnet.experiments.paper import PAPER_TITLE, dataset_title, paper_network, paper_value
from dfsnet.experiments.results import primary_ties, report_bits, rows_for
from dfsnet.experiments.schemes import NETWORKS, SCHEMES, float_schemes, hashed_schemes

__all__ = ["write_report", "render_report", "scheme_table", "summary_rows", "rows_for"]

logger = logging.getLogger(__name__)

DASH = "—"


def _pct(value: float | None) -> str:
    return DASH if value is None else f"{100 * value:.2f}"


def _delta(a: float | None, b: float | None) -> str:
    return DASH if a is None or b is None else f"{100 * (a - b):+.2f}"


def _table(header: list[str], rows: Iterable[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _is_float(sid: str) -> bool:
    scheme = SCHEMES.get(sid)
    return scheme is not None and scheme.metric == "euclidean"


def _one(setting: dict, scheme: str, *, ties: str, bits: int | None = None) -> dict | None:
    rows = rows_for(setting, scheme, ties=ties, bits=bits)
    return rows[0] if rows else None


def _at(setting: dict, sid: str, *, ties: str, bits: int | None) -> dict | None:
    """A float scheme's row, or a hashed scheme's row at ``bits``."""
    return _one(setting, sid, ties=ties) if _is_float(sid) else _one(setting, sid, ties=ties, bits=bits)


def _best(setting: dict, scheme: str, *, ties: str) -> dict | None:
    rows = rows_for(setting, scheme, ties=ties)
    return max(rows, key=lambda r: r["map_all"]) if rows else None


def _get(row: dict | None, key: str):
    return None if row is None else row[key]


def _description(results: dict, sid: str) -> str:
    entry = results.get("schemes", {}).get(sid)
    return entry["description"] if entry else SCHEMES[sid].description


def summary_rows(results: dict) -> list[dict]:
    """One line per setting and scheme: float schemes, and hashed ones at the report's code length."""
    ties = primary_ties(results)
    out = []
    for s in results["settings"]:
        b = report_bits(results, s)
        for sid in SCHEMES:
            row = _at(s, sid, ties=ties, bits=b)
            if row is not None:
                out.append({"setting": s["key"], **row})
    return out


def scheme_table(results: dict) -> str:
    """A fixed-width text table of accuracy and every scheme's scores, for the terminal."""
    ties = primary_ties(results)
    k = results["config"]["k"]
    lines = []
    summary = summary_rows(results)
    for s in results["settings"]:
        acc = {n: s["networks"][n].get("accuracy") for n in ("ori", "dfs")}
        lines.append(f"{s['key']}  (protocol {s['protocol']}: {s['split']['n_query']} queries, "
                     f"{s['split']['n_database']} database; accuracy Ori {_pct(acc['ori'])} %, "
                     f"DFS-Net {_pct(acc['dfs'])} %)")
        lines.append(f"  {'scheme':<10} {'bits':>5} {'mAP@all':>8} {f'mAP@{k}':>9} {f'P@{k}':>8} "
                     f"{'ms/query':>9}  what")
        for row in summary:
            if row["setting"] != s["key"]:
                continue
            bits = "float" if row["bits"] is None else str(row["bits"])
            lines.append(f"  {row['scheme']:<10} {bits:>5} {_pct(row['map_all']):>8} "
                         f"{_pct(row['map_at_k']):>9} {_pct(row['precision_at_k']):>8} "
                         f"{1000 * row['seconds_per_query']:>9.3f}  {_description(results, row['scheme'])}")
        lines.extend(_every_b(s, ties, k))
    lines.append(f"(mAP and precision in %, ties {ties}; the first table at the report's code length)")
    return "\n".join(lines)


def _every_b(setting: dict, ties: str, k: int) -> list[str]:
    """One compact line per hashed scheme: mAP@k at every code length that was evaluated."""
    rows = {scheme.id: rows_for(setting, scheme.id, ties=ties) for scheme in hashed_schemes()}
    rows = {sid: r for sid, r in rows.items() if r}
    if not rows:
        return []
    out = [f"  mAP@{k} at every code length:"]
    for sid, found in rows.items():
        out.append(f"  {sid:<10} " + "  ".join(f"{r['bits']}: {_pct(r['map_at_k'])}" for r in found))
    return out


def render_report(results: dict, figures: dict[str, list[str]] | None = None) -> str:
    """The Markdown report for ``results`` (the ``results.json`` dict).

    Parameters
    ----------
    results : dict
        See :mod:`dfsnet.experiments.results`.
    figures : dict of str to list of str, optional
        ``{title: [file names relative to the report]}``, e.g. from
        :func:`dfsnet.experiments.figures.write_figures`; linked in a "Figures" section.
    """
    cfg = results["config"]
    ties = primary_ties(results)
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
               [[s["key"], s["backbone"], s["dataset"], _mode_text(s), s["protocol"],
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
        parts += [f"### {s['backbone']} on {dataset_title(s['dataset'])}, {_mode_text(s)}", "",
                  _scheme_section(results, s, ties), ""]
    parts += ["## mAP against code length b (cf. the paper's Figs. 5-6)", "",
              f"mAP@{k}; the float schemes 1 and 2 do not depend on b and are given in the heading.",
              ""]
    for s in results["settings"]:
        parts += [_bits_section(s, ties, "map_at_k", f"mAP@{k}"), "",
                  _bits_section(s, ties, "map_all", "mAP@all"), ""]
    parts += ["## What each step adds, measured", "",
              f"Differences in mAP@{k} points (and mAP@all) on the same features and split; positive "
              "means the first term of the comparison retrieves better.", ""]
    for s in results["settings"]:
        parts += [f"### {s['key']}", "", _steps_section(results, s, ties), ""]
    selections = [s for s in results["settings"] if s.get("encoder_selection")]
    if selections:
        parts += ["## The default encoder, chosen on the validation split", "",
                  "What `dfsnet train` keeps by default on DFS-Net: the candidate whose codes of the validation "
                  "images retrieve each other best (each left out of its own ranking, ties in stored order, "
                  "as an index returns them, which favours codes that rarely tie); the queries are never "
                  "looked at. Query figures are those of the matching scheme (fitted on fit + val).", ""]
        for s in selections:
            parts += [f"### {s['key']}", "", _selection_section(s["encoder_selection"]), ""]
    if len(cfg["ties"]) > 1:
        parts += ["## Tie modes", "",
                  "Hamming distances take few values, so many database items tie. *stable* ranks "
                  "tied items by ascending id; *expected* is the mean AP over all orders of each "
                  "tie group. The gap shows how much a reported mAP can owe to tie order. The parts "
                  "are stored in pool order, grouped by class, so ascending id is not a neutral order: "
                  "it ranks the lower classes' images first inside a tie. The tables above use "
                  "*expected* ties whenever they were evaluated.", "",
                  _ties_section(results), ""]
    parts += ["## Retrieval time and memory", "",
              "Exhaustive search over the whole database, all queries; memory per database item.",
              ""]
    for s in results["settings"]:
        parts += [f"### {s['key']}", "", _time_section(s, ties), ""]
    if figures:
        parts += ["## Figures", ""]
        for title, paths in figures.items():
            parts += [f"**{title}**", ""] + [f"![{title}]({p})" for p in paths] + [""]
    parts += ["## Training", "", _training_section(results), ""]
    return "\n".join(parts)


def _mode_text(setting: dict) -> str:
    return "head only (frozen backbone)" if setting["mode"] == "head" else "full fine-tuning"


def _scheme_section(results: dict, s: dict, ties: str) -> str:
    k = results["config"]["k"]
    b = report_bits(results, s)
    entries: list[tuple[str, dict | None, str | None]] = []
    for sid, scheme in SCHEMES.items():
        entries.append((sid, _at(s, sid, ties=ties, bits=b), None))
        if scheme.paper_metric is not None:  # its best code length, beside the paper's best
            entries.append((f"{sid} (best b)", _best(s, sid, ties=ties), scheme.paper_metric))
    lines = []
    for label, row, metric in entries:
        if row is None:
            continue
        paper = paper_value(metric, backbone=s["backbone"], dataset=s["dataset"]) if metric else None
        lines.append([label, _description(results, row["scheme"]),
                      "float" if row["bits"] is None else row["bits"], row["bytes_per_item"],
                      _pct(row["map_all"]), _pct(row["map_at_k"]), _pct(row["precision_at_k"]),
                      _pct(paper) if metric else DASH])
    return _table(["scheme", "what", "b", "bytes/item", "mAP@all", f"mAP@{k}", f"P@{k}",
                   "paper mAP"], lines)


def _bits_section(s: dict, ties: str, key: str, label: str) -> str:
    floats = [f"{sc.label} ({sc.short or sc.description}) {_pct(_get(_one(s, sc.id, ties=ties), key))}"
              for sc in float_schemes()]
    present = [sc for sc in hashed_schemes() if rows_for(s, sc.id, ties=ties)]
    head = f"**{s['key']}**, {label}: " + ", ".join(floats)
    table = _table(["b"] + [sc.label for sc in present],
                   [[b] + [_pct(_get(_one(s, sc.id, ties=ties, bits=b), key)) for sc in present]
                    for b in s["bits"]])
    return head + "\n\n" + table


def _steps_section(results: dict, s: dict, ties: str) -> str:
    b = report_bits(results, s)
    d = s["feature_dim"]

    def pair(a: str, a_bits, c: str, c_bits, key: str) -> str:
        return _delta(_get(_at(s, a, ties=ties, bits=a_bits), key), _get(_at(s, c, ties=ties, bits=c_bits), key))

    steps = []
    for scheme in SCHEMES.values():
        if scheme.step is None:
            continue
        what, a, c = scheme.step
        hashed = not (_is_float(a) and _is_float(c))
        steps.append((what.format(b=b), f"{a} − {c}" + (f" @ {b}" if hashed else ""), (a, b, c, b)))
    steps += [
        (f"selecting and hashing to {b} bits, against float features", f"3 @ {b} − 2", ("3", b, "2", None)),
        (f"hashing all D = {d} features, against float features", f"3 @ {d} − 2", ("3", d, "2", None)),
        (f"learned CSQ hash layer at {b} bits, against float features", f"3-csq @ {b} − 2",
         ("3-csq", b, "2", None)),
        (f"learned CSQ hash layer vs the paper's selection + hash at {b} bits", f"3-csq − 3 @ {b}",
         ("3-csq", b, "3", b)),
        (f"DFS module, with the learned CSQ hash at {b} bits", f"3-csq − 1-csq @ {b}", ("3-csq", b, "1-csq", b)),
    ]
    k = results["config"]["k"]
    rows = [[name, expr, pair(*args, "map_at_k"), pair(*args, "map_all")] for name, expr, args in steps
            if pair(*args, "map_at_k") != DASH]
    return _table(["step", "comparison", f"Δ mAP@{k}", "Δ mAP@all"], rows)


def _selection_section(sel: dict) -> str:
    k = next(iter(sel["validation"].values()))["k"]
    rows = []
    for name, v in sel["validation"].items():
        q = sel["query"].get(name, {})
        rows.append([("**" + name + "** (chosen)") if name == sel["choice"] else name, sel["schemes"][name],
                     _pct(v["map_at_k"]), _pct(v["map_all"]), _pct(q.get("map_at_k")), _pct(q.get("map_all"))])
    gap = sel.get("gap_to_best")
    table = _table(["candidate", "scheme", f"val mAP@{k}", "val mAP@all", "query mAP@k", "query mAP@all"], rows)
    # Selections cached before the query ties were recorded scored the queries in stored order.
    ties = sel.get("query_ties", "stable")
    return table + (f"\n\nAt {sel['bits']} bits; the choice is {100 * gap:.2f} mAP points below the best "
                    f"candidate on the queries (query ties {ties})." if gap is not None else "")


def _ties_section(results: dict) -> str:
    k = results["config"]["k"]
    rows = []
    for s in results["settings"]:
        b = report_bits(results, s)
        for sid, scheme in SCHEMES.items():
            if not scheme.headline:
                continue
            pair = {t: _at(s, sid, ties=t, bits=b) for t in ("stable", "expected")}
            if None in pair.values():
                continue
            rows.append([s["key"], sid, "float" if _is_float(sid) else b,
                         _pct(pair["stable"]["map_at_k"]), _pct(pair["expected"]["map_at_k"]),
                         _delta(pair["stable"]["map_at_k"], pair["expected"]["map_at_k"]),
                         _pct(pair["stable"]["map_all"]), _pct(pair["expected"]["map_all"])])
    return _table(["setting", "scheme", "b", f"mAP@{k} stable", f"mAP@{k} expected", "stable − expected",
                   "mAP@all stable", "mAP@all expected"], rows)


def _time_section(s: dict, ties: str) -> str:
    # Scheme 2 (DFS-Net float features) is the reference of memory and speed.
    euclid = _one(s, "2", ties=ties)
    rows = []
    for scheme in [*float_schemes(), *hashed_schemes()]:
        if not scheme.headline:
            continue
        sid = scheme.id
        for row in ([_one(s, sid, ties=ties)] if _is_float(sid) else rows_for(s, sid, ties=ties)):
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
        for net, n in s["networks"].items():
            rows.append([s["key"], NETWORKS.get(net, net), n.get("source", DASH),
                         n.get("epochs", DASH), _pct(n.get("best_val_acc")), _pct(n.get("accuracy")),
                         f"{n['train_seconds']:.1f}" if n.get("train_seconds") is not None else DASH,
                         "yes" if n.get("cached") else "no"])
    return _table(["setting", "network", "source", "epochs", "best val acc", "query acc",
                   "train s", "reused from cache"], rows)


def write_report(results: dict, run_dir: str | os.PathLike,
                 figures: dict[str, list[str]] | None = None) -> Path:
    """Write ``run_dir/report.md``, linking ``figures`` (already written); return its path."""
    path = Path(run_dir) / "report.md"
    atomic_write_text(path, render_report(results, figures))
    logger.info("report: wrote %s", path)
    return path
