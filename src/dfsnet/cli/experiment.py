"""`dfsnet experiment CONFIG` and `dfsnet demo`: the paper's evaluation as one command.

Every key of the experiment config is also a flag (``--epochs 5``, ``--bits 16 32 64``,
``--data-root cifar10=/data/cifar10``, ``--no-pretrained``); flags override the file.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing

_CONFIG_EPILOG = ("CONFIG is a TOML file or the name of a bundled config (demo, cifar10_cpu, "
                  "paper_cifar10, paper_caltech256). Outputs: OUT_DIR/NAME/{results.json, "
                  "report.md, *.png}; re-running the same config resumes from its cached stages.")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    from dfsnet.eval.experiment import ExperimentConfig

    hints = typing.get_type_hints(ExperimentConfig)
    group = parser.add_argument_group("config keys (override the file)")
    for f in dataclasses.fields(ExperimentConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        text = f.metadata.get("help", "")
        common = dict(dest=f.name, default=argparse.SUPPRESS, help=text)
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif kind in (int, float, str):
            group.add_argument(flag, type=kind, metavar=f.name.upper(), **common)
        elif typing.get_origin(kind) is list:
            (item,) = typing.get_args(kind)
            group.add_argument(flag, type=item, nargs="*", metavar=f.name.upper().rstrip("S"), **common)
        elif typing.get_origin(kind) is dict:
            group.add_argument(flag, action="append", metavar="KEY=VALUE", **common)
        else:  # a new field type needs a flag form here
            raise AssertionError(f"no CLI form for config field {f.name} of type {kind}")


def _overrides(args: argparse.Namespace) -> dict:
    """Config overrides from the parsed flags; KEY=VALUE lists become tables."""
    from dfsnet.eval.experiment import ExperimentConfig

    hints = typing.get_type_hints(ExperimentConfig)
    out = {}
    for f in dataclasses.fields(ExperimentConfig):
        if not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if typing.get_origin(hints[f.name]) is dict:
            value_type = typing.get_args(hints[f.name])[1]
            table = {}
            for item in value:
                key, sep, raw = item.partition("=")
                if not sep:
                    if f.name == "data_root":  # a bare PATH: the one configured data set's root
                        key, raw = "", item
                    else:
                        raise ValueError(f"--{f.name.replace('_', '-')}: expected KEY=VALUE, got {item!r}")
                table[key] = raw if value_type is str else _scalar(raw, f"--{f.name.replace('_', '-')}")
            value = table
        out[f.name] = value
    return out


def _scalar(raw: str, flag: str):
    """A split parameter as TOML would read it: true/false, an int or a float."""
    if raw in ("true", "false"):
        return raw == "true"
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    raise ValueError(f"{flag}: expected true, false or a number after '=', got {raw!r}")


def _run(args: argparse.Namespace, config: str) -> int:
    from dfsnet.eval.experiment import load_config, run_experiment
    from dfsnet.eval.report import scheme_table

    overrides = _overrides(args)
    bare_root = overrides.get("data_root", {}).pop("", None)
    if bare_root is not None and not overrides["data_root"]:
        del overrides["data_root"]  # keep the file's table for the other data sets
    cfg = load_config(config, overrides)
    if bare_root is not None:
        if len(cfg.datasets) != 1:
            raise ValueError(f"--data-root: a bare PATH needs exactly one data set, got {cfg.datasets}; "
                             "use NAME=PATH")
        cfg.data_root[cfg.datasets[0]] = bare_root
    results = run_experiment(cfg, progress=not args.no_progress)
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
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_config_flags(p)
    p.set_defaults(func=lambda args: _run(args, args.config))

    d = subparsers.add_parser(
        "demo", help="the embedded offline demo: Lite0 on digits, all schemes, report (~2 min on CPU)",
        description="Run the bundled 'demo' experiment: EfficientNet-Lite0 with its packaged "
        "ImageNet weights on scikit-learn's digits, head-only training of Ori and DFS-Net, every "
        "scheme, report.md and figures. Same as `dfsnet experiment demo`.", epilog=_CONFIG_EPILOG)
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_config_flags(d)
    d.set_defaults(func=lambda args: _run(args, "demo"))
