"""PNG figures of an experiment: mAP against code length (like the paper's Figs. 5-6) and
precision-recall curves. Rendered with matplotlib's Agg backend, so no display is needed."""
from __future__ import annotations

import io
import logging
from pathlib import Path

from dfsnet._io import atomic_write_bytes
from dfsnet.eval.paper import dataset_title

__all__ = ["write_figures"]

logger = logging.getLogger(__name__)

_STYLE = {  # scheme -> (colour, marker, linestyle)
    "1": ("tab:gray", None, "--"),
    "2": ("tab:blue", None, "--"),
    "1h": ("tab:gray", "o", "-"),
    "3": ("tab:blue", "o", "-"),
    "3-random": ("tab:orange", "s", "-"),
    "3-fmean": ("tab:green", "^", "-"),
    "3-fmedian": ("tab:olive", "v", "-"),
    "itq": ("tab:red", "D", "-"),
}


def _figure(n_panels: int):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n_panels, figsize=(4.6 * n_panels, 3.8), squeeze=False)
    return plt, fig, axes[0]


def _save(plt, fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def write_figures(results: dict, run_dir: Path) -> dict[str, list[str]]:
    """Write the figures; return ``{title: [file names relative to run_dir]}``."""
    from dfsnet.eval.report import group_settings, rows_for

    cfg = results["config"]
    ties = "stable" if "stable" in cfg["ties"] else cfg["ties"][0]
    k = cfg["k"]
    out: dict[str, list[str]] = {}
    for (dataset, mode), settings in group_settings(results).items():
        stem = f"{dataset}_{mode}"
        plt, fig, axes = _figure(len(settings))
        for ax, s in zip(axes, settings):
            for sid in ("1h", "3", "3-random", "3-fmean", "3-fmedian", "itq"):
                rows = rows_for(s, sid, ties=ties)
                if not rows:
                    continue
                colour, marker, ls = _STYLE[sid]
                ax.plot([r["bits"] for r in rows], [100 * r["map_at_k"] for r in rows],
                        color=colour, marker=marker, linestyle=ls, markersize=4, label=f"Scheme {sid}")
            for sid in ("1", "2"):
                rows = rows_for(s, sid, ties=ties)
                if rows:
                    colour, _, ls = _STYLE[sid]
                    ax.axhline(100 * rows[0]["map_at_k"], color=colour, linestyle=ls,
                               label=f"Scheme {sid} (float)")
            ax.set_xscale("log", base=2)
            ax.set_xticks(s["bits"], [str(b) for b in s["bits"]], rotation=45)
            ax.set_xlabel("code length b (bits)")
            ax.set_ylabel(f"mAP@{k} (%)")
            ax.set_title(f"{s['backbone']}, {dataset_title(dataset)}")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        name = f"fig_map_vs_bits_{stem}.png"
        _save(plt, fig, run_dir / name)
        out[f"mAP@{k} against code length, {dataset_title(dataset)}, {mode} training"] = [name]

        plt, fig, axes = _figure(len(settings))
        for ax, s in zip(axes, settings):
            for label, curve in s.get("pr_curves", {}).items():
                colour, _, ls = _STYLE.get(curve["scheme"], ("black", None, "-"))
                ax.plot(curve["recall"], [100 * p for p in curve["precision"]], color=colour,
                        linestyle=ls if curve["bits"] is None else "-", label=label)
            ax.set_xlabel("recall")
            ax.set_ylabel("precision (%)")
            ax.set_xlim(0, 1)
            ax.set_title(f"{s['backbone']}, {dataset_title(dataset)}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        name = f"fig_pr_{stem}.png"
        _save(plt, fig, run_dir / name)
        out[f"Precision-recall, {dataset_title(dataset)}, {mode} training"] = [name]
    logger.info("report: wrote %d figures to %s", sum(len(v) for v in out.values()), run_dir)
    return out
