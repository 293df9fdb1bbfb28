"""PNG figures of an experiment: mAP against code length (like the paper's Figs. 5-6) and
precision-recall curves.

Drawn on :class:`matplotlib.figure.Figure` objects with an Agg canvas of their own: no
``pyplot``, no global backend switch, so embedding applications keep their matplotlib state and
no display is needed. Lines, colours and markers come from the scheme registry.
"""
from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from dfsnet._io import atomic_write_bytes
from dfsnet.experiments.paper import dataset_title
from dfsnet.experiments.results import group_settings, primary_ties, rows_for
from dfsnet.experiments.schemes import SCHEMES, float_schemes, hashed_schemes

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["map_vs_bits_figure", "pr_figure", "write_figures"]

logger = logging.getLogger(__name__)


def _figure(n_panels: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.6 * n_panels, 3.8))
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas
    return fig, fig.subplots(1, n_panels, squeeze=False)[0]


def map_vs_bits_figure(results: dict, settings: list[dict]) -> Figure:
    """mAP@k against the code length, one panel per setting (hashed schemes as lines, float ones flat).

    Parameters
    ----------
    results : dict
        The results dict (for the config's ``k`` and tie modes).
    settings : list of dict
        Entries of ``results["settings"]`` of one data set and training mode.
    """
    ties = primary_ties(results)
    k = results["config"]["k"]
    fig, axes = _figure(len(settings))
    for ax, s in zip(axes, settings):
        for scheme in hashed_schemes():
            rows = rows_for(s, scheme.id, ties=ties)
            if rows:
                ax.plot([r["bits"] for r in rows], [100 * r["map_at_k"] for r in rows], markersize=4,
                        label=scheme.label, **scheme.style())
        for scheme in float_schemes():
            rows = rows_for(s, scheme.id, ties=ties)
            if rows:
                ax.axhline(100 * rows[0]["map_at_k"], color=scheme.color, linestyle=scheme.linestyle,
                           label=f"{scheme.label} (float)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(s["bits"], [str(b) for b in s["bits"]], rotation=45)
        ax.set_xlabel("code length b (bits)")
        ax.set_ylabel(f"mAP@{k} (%)")
        ax.set_title(f"{s['backbone']}, {dataset_title(s['dataset'])}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return fig


def pr_figure(settings: list[dict]) -> Figure:
    """Precision against recall of the curves stored with each setting, one panel per setting."""
    fig, axes = _figure(len(settings))
    for ax, s in zip(axes, settings):
        for label, curve in s.get("pr_curves", {}).items():
            scheme = SCHEMES.get(curve["scheme"])
            colour, ls = (scheme.color, scheme.linestyle) if scheme else ("black", "-")
            ax.plot(curve["recall"], [100 * p for p in curve["precision"]], color=colour,
                    linestyle=ls if curve["bits"] is None else "-", label=label)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision (%)")
        ax.set_xlim(0, 1)
        ax.set_title(f"{s['backbone']}, {dataset_title(s['dataset'])}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def _save(fig: Figure, path: Path) -> None:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())


def write_figures(results: dict, run_dir: str | os.PathLike) -> dict[str, list[str]]:
    """Write the PNG figures into ``run_dir``; return ``{title: [file names relative to run_dir]}``."""
    run_dir = Path(run_dir)
    k = results["config"]["k"]
    out: dict[str, list[str]] = {}
    for (dataset, mode), settings in group_settings(results).items():
        stem = f"{dataset}_{mode}"
        name = f"fig_map_vs_bits_{stem}.png"
        _save(map_vs_bits_figure(results, settings), run_dir / name)
        out[f"mAP@{k} against code length, {dataset_title(dataset)}, {mode} training"] = [name]
        name = f"fig_pr_{stem}.png"
        _save(pr_figure(settings), run_dir / name)
        out[f"Precision-recall, {dataset_title(dataset)}, {mode} training"] = [name]
    logger.info("report: wrote %d figures to %s", sum(len(v) for v in out.values()), run_dir)
    return out
