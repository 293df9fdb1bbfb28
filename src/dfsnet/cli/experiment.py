"""`dfsnet experiment CONFIG` and `dfsnet demo`: the paper's evaluation as one command.

Every key of the experiment config is also a flag (``--epochs 5``, ``--bits 16 32 64``,
``--data-root cifar10=/data/cifar10``, ``--no-pretrained``); flags override the file. Flag
values are text, typed by the same coercion as TOML values (:mod:`dfsnet.experiments.config`).
"""
from __future__ import annotations

import argparse
import typing

from dfsnet.cli._common import add_progress_arg, progress_enabled

_CONFIG_EPILOG = ("CONFIG is a TOML file or the name of a bundled config (demo, cifar10_cpu, "
                  "paper_cifar10, paper_caltech256). Outputs: OUT_DIR/NAME/{results.json, "
                  "report.md, *.png}; re-running the same config resumes from its cached stages.")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    from dfsnet.experiments.config import config_fields

    group = parser.add_argument_group("config keys (override the file)")
    for f in config_fields():
        common = dict(dest=f.name, default=argparse.SUPPRESS, help=f.help)
        origin = typing.get_origin(f.type)
        if f.type is bool:
            group.add_argument(*f.flags, action=argparse.BooleanOptionalAction, **common)
        elif origin is list:
            group.add_argument(*f.flags, nargs="*", metavar=f.name.upper().rstrip("S"), **common)
        elif origin is dict:
            metavar = "KEY=VALUE" if not f.bare_key else "[KEY=]VALUE"
            group.add_argument(*f.flags, action="append", metavar=metavar, **common)
        else:
            group.add_argument(*f.flags, metavar=f.name.upper(), **common)


def config_from_args(args: argparse.Namespace, config: str):
    """The :class:`~dfsnet.experiments.ExperimentConfig` of CONFIG with the parsed flags applied."""
    from dfsnet.experiments.config import config_fields, load_config, parse_flag_values

    flags = {f.name: getattr(args, f.name) for f in config_fields() if hasattr(args, f.name)}
    return load_config(config, parse_flag_values(flags))


def _run(args: argparse.Namespace, config: str) -> int:
    from dfsnet.experiments import run_experiment
    from dfsnet.experiments.report import scheme_table

    cfg = config_from_args(args, config)
    results = run_experiment(cfg, progress=progress_enabled(args))
    print(scheme_table(results))
    print(f"\nreport: {results['report']}")
    print(f"results: {results['results_path']}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "experiment", help="train Ori and DFS-Net, evaluate the paper's schemes, write a report",
        description="Train Ori and DFS-Net (or reuse checkpoints), extract features and evaluate "
        "Schemes 1, 1h, 2 and 3 and the engine's ablations; write results.json, report.md and "
        "figures.", epilog=_CONFIG_EPILOG)
    p.add_argument("config", metavar="CONFIG", help="TOML file or bundled config name")
    add_progress_arg(p)
    _add_config_flags(p)
    p.set_defaults(func=lambda args: _run(args, args.config))

    d = subparsers.add_parser(
        "demo", help="the embedded offline demo: Lite0 on digits, all schemes, report (~2 min on CPU)",
        description="Run the bundled 'demo' experiment: EfficientNet-Lite0 with its packaged "
        "ImageNet weights on scikit-learn's digits, head-only training of Ori and DFS-Net, every "
        "scheme, report.md and figures. Same as `dfsnet experiment demo`.", epilog=_CONFIG_EPILOG)
    add_progress_arg(d)
    _add_config_flags(d)
    d.set_defaults(func=lambda args: _run(args, "demo"))
