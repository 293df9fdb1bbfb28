"""The ``results.json`` schema: writing, reading and validating results, and querying their rows.

A results dict holds every number of a run (see :data:`RESULTS_KEYS` and :data:`SETTING_KEYS`);
the report and the figures read nothing else. Values are strict JSON: NaN and infinities are
stored as null.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from dfsnet._io import atomic_write_text
from dfsnet.errors import InputError

__all__ = [
    "RESULTS_SCHEMA",
    "RESULTS_KEYS",
    "SETTING_KEYS",
    "finite",
    "group_settings",
    "primary_tie_mode",
    "primary_ties",
    "read_results",
    "report_bits",
    "rows_for",
    "validate_results",
    "write_results",
]

#: Version tag of the format, the ``schema`` key of every results.json.
RESULTS_SCHEMA = "dfsnet.experiment/1"
#: Top-level keys of a results.json.
RESULTS_KEYS = ("schema", "name", "config", "config_hash", "seed", "started_at", "finished_at",
                "wall_seconds", "environment", "paper", "schemes", "settings")
#: Keys of each entry of ``settings`` (one backbone x data set x training mode).
SETTING_KEYS = ("key", "backbone", "timm_name", "dataset", "mode", "protocol", "image_size", "feature_dim",
                "bits", "split_file", "split_file_key", "split", "networks", "rows", "pr_curves",
                "wall_seconds", "cached_stages")


def finite(obj: Any) -> Any:
    """``obj`` with NaN and infinities replaced by None (recursively), so it is strict JSON."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def validate_results(results: Any, *, source: str = "results") -> dict[str, Any]:
    """Check the schema tag and the keys of a results dict; return it.

    Raises
    ------
    ValueError
        Naming the missing keys or the unexpected schema.
    """
    if not isinstance(results, dict):
        raise InputError(f"{source}: expected a JSON object, got {type(results).__name__}")
    if results.get("schema") != RESULTS_SCHEMA:
        raise InputError(f"{source}: expected schema {RESULTS_SCHEMA!r}, got {results.get('schema')!r}")
    missing = [k for k in RESULTS_KEYS if k not in results]
    if missing:
        raise InputError(f"{source}: missing keys {missing}")
    for i, setting in enumerate(results["settings"]):
        missing = [k for k in SETTING_KEYS if k not in setting]
        if missing:
            raise InputError(f"{source}: settings[{i}] misses keys {missing}")
    return results


def write_results(results: dict[str, Any], path: str | os.PathLike) -> Path:
    """Validate ``results`` and write it as strict JSON (atomically); return the path."""
    results = validate_results(finite(results))
    path = Path(path)
    atomic_write_text(path, json.dumps(results, indent=1, allow_nan=False) + "\n")
    return path


def read_results(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a ``results.json``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"results: {path} is not valid JSON ({exc})") from None
    return validate_results(data, source=str(path))


# ------------------------------------------------------------------------------ queries

def primary_tie_mode(ties) -> str:
    """Of the evaluated tie modes ``ties``, the one tables and targets read: ``expected`` when
    present, else the first.

    The expectation over all orders of a tie, because the stored order is not neutral: the
    protocols keep each part in pool order, grouped by class, so a tie ranked by id puts the
    lower classes' images first and a query of a high class finds its own class last
    (``benchmarks/bench_class_codes.py``: 8.2 mAP@1000 points of a 64-bit CSQ head on CIFAR-10,
    the same as one random shuffle of the database gives back).
    """
    return "expected" if "expected" in ties else ties[0]


def primary_ties(results: dict) -> str:
    """The tie mode the tables use (:func:`primary_tie_mode` of the run's ``ties``)."""
    return primary_tie_mode(results["config"]["ties"])


def report_bits(results: dict, setting: dict) -> int:
    """The code length of the summary tables: ``pr_bits`` when it was evaluated, else the largest."""
    bits = setting["bits"]
    return results["config"]["pr_bits"] if results["config"]["pr_bits"] in bits else max(bits)


def rows_for(setting: dict, scheme: str, *, ties: str, bits: int | None = None) -> list[dict]:
    """The result rows of one scheme in one setting, ordered by code length."""
    rows = [r for r in setting["rows"] if r["scheme"] == scheme and r["ties"] == ties
            and (bits is None or r["bits"] == bits)]
    return sorted(rows, key=lambda r: r["bits"] or 0)


def group_settings(results: dict) -> dict[tuple[str, str], list[dict]]:
    """Settings grouped by (dataset, mode): one figure each, one panel per backbone."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for s in results["settings"]:
        groups[(s["dataset"], s["mode"])].append(s)
    return dict(groups)
