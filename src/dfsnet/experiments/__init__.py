"""Experiments: the paper's evaluation as one run, and its report.

- :mod:`~dfsnet.experiments.config`: :class:`ExperimentConfig`, :func:`load_config` (TOML files,
  bundled ones by name) and the coercion shared with the CLI flags;
- :mod:`~dfsnet.experiments.schemes`: the registry of retrieval schemes (:data:`SCHEMES`);
- :mod:`~dfsnet.experiments.runner`: :func:`run_experiment` (training, features, scoring);
- :mod:`~dfsnet.experiments.stages`: the stage cache of a run folder;
- :mod:`~dfsnet.experiments.results`: the ``results.json`` schema;
- :mod:`~dfsnet.experiments.report`, :mod:`~dfsnet.experiments.figures`: ``report.md`` and PNGs;
- :mod:`~dfsnet.experiments.paper`: the paper's printed values.

Importing this package loads numpy and scipy only; torch, matplotlib and faiss load when a run
or a figure needs them.
"""
from dfsnet.experiments.config import (
    ExperimentConfig,
    bundled_configs,
    config_from_dict,
    default_bits,
    load_config,
)
from dfsnet.experiments.results import RESULTS_SCHEMA, read_results, write_results
from dfsnet.experiments.runner import run_experiment
from dfsnet.experiments.schemes import SCHEMES, Scheme

__all__ = [
    "ExperimentConfig",
    "RESULTS_SCHEMA",
    "SCHEMES",
    "Scheme",
    "bundled_configs",
    "config_from_dict",
    "default_bits",
    "load_config",
    "read_results",
    "run_experiment",
    "write_results",
]
