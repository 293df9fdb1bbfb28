"""The experiment config: one dataclass, read from TOML and from CLI flags through one coercion.

Every field of :class:`ExperimentConfig` is a TOML key and a flag of ``dfsnet experiment``. Values
are checked against the field's type hint (``typing.get_type_hints``): strictly for TOML, whose
values are typed already, and after parsing for flags, whose values are text
(:func:`coerce_field` with ``from_text=True``). Both then go through the same validation, so a
file and the equivalent flags give the same config, and the same errors.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import tomllib

from dfsnet.errors import InputError, InputTypeError
from dfsnet.eval.metrics import TIES
from dfsnet.experiments.schemes import ablation_names
from dfsnet.precision import DEFAULT_PRECISION, PRECISIONS
from dfsnet.train.workflow import DEVICE_HELP, MODES, MONITORS

__all__ = [
    "ConfigField",
    "ExperimentConfig",
    "bundled_configs",
    "coerce_field",
    "config_fields",
    "config_from_dict",
    "default_bits",
    "load_config",
    "parse_flag_values",
]

Scalar = int | float | bool  # a value of a split parameter
OPTIMIZERS = ("adamw", "sgd")


def _doc(text: str, *, flags: tuple[str, ...] = (), bare_key: bool = False, **kw) -> Any:
    # flags: CLI spellings when they differ from --FIELD-NAME (the shared CLI conventions);
    # bare_key: a KEY=VALUE table whose flag also takes a bare VALUE (key "" until validated).
    return field(metadata={"help": text, "flags": flags, "bare_key": bare_key}, **kw)


@dataclass
class ExperimentConfig:
    """Everything an experiment depends on; each field is a TOML key and a CLI flag.

    The config is stored in ``results.json`` and hashed into the stage caches, so a change to
    a field re-runs exactly the stages that depend on it.
    """

    name: str = _doc("run name; outputs go to OUT_DIR/NAME", default="experiment")
    out_dir: str = _doc("folder holding run folders", default="runs")
    seed: int = _doc("seed of the split, the initial weights and the training", default=0)
    backbones: list[str] = _doc("backbone names (dfsnet aliases or timm names)",
                                default_factory=lambda: ["efficientnet_lite0"])
    pretrained: bool = _doc("start from the backbone's offline ImageNet weights", default=True)
    datasets: list[str] = _doc("data set sources (see dfsnet.data.list_sources)",
                               default_factory=lambda: ["digits"])
    data_root: dict[str, str] = _doc("data folder per data set, NAME=PATH (a bare PATH: the one data set's)",
                                     default_factory=dict, bare_key=True)
    download: bool = _doc("download data sets that support it when their folder is missing",
                          default=False)
    protocol: str = _doc("split protocol (paper, cifar10, cifar10-1, per-class)", default="per-class",
                         flags=("--split-protocol",))
    split: dict[str, Scalar] = _doc("split protocol parameters, NAME=VALUE (query_per_class, "
                                    "train_fraction, val_fraction, ...)", default_factory=dict,
                                    flags=("--split-params",))
    split_file: str = _doc("a split file (split.json of `dfsnet train` or of another run) to use instead of "
                           "drawing one; it must have been made for the same pool of images", default="",
                           flags=("--split",))
    image_size: int = _doc("input side in pixels; 0 = the backbone's default", default=0)
    modes: list[str] = _doc("training modes: head (frozen backbone, head on cached maps) and/or "
                            "full (fine-tune everything, starting from the head-trained network)",
                            default_factory=lambda: ["head"])
    epochs: int = _doc("head-only training epochs", default=10)
    lr: float = _doc("head-only learning rate", default=1e-3)
    finetune_epochs: int = _doc("full fine-tuning epochs (upper bound under a budget)", default=3)
    finetune_lr: float = _doc("full fine-tuning learning rate", default=1e-4)
    finetune_budget_minutes: float = _doc("wall-time budget per full fine-tuning run; 0 = none",
                                          default=0.0)
    optimizer: str = _doc("optimizer (adamw, sgd)", default="adamw")
    weight_decay: float = _doc("weight decay of training (not on biases and norm weights)", default=1e-4)
    batch_size: int = _doc("training and extraction batch size", default=64)
    patience: int = _doc("early-stopping patience on the monitored validation value (epochs); 0 disables "
                         "early stopping, as in `dfsnet train`", default=3)
    augment: str = _doc("head-only augmentation of DFS-Net's training maps: none, flip (mirror half of each "
                        "batch of cached maps), flip_image (also cache the mirrored images' maps)",
                        default="flip")
    monitor: str = _doc("what selects DFS-Net's head-only epoch: val_map (validation images' retrieval mAP "
                        "against the training images), val_map_loo (against each other) or val_acc; Ori's "
                        "head (GAP + FC, whose features do not train) always uses val_acc", default="val_map_loo")
    mixup: float = _doc("head-only mixup of the hash-head networks' training maps (schemes 1-csq, 3-csq): "
                        "Beta(alpha, alpha) weight, 0 = off; chosen on CIFAR-10's validation split",
                        default=0.4)
    learned_max_bits: int = _doc("longest hash head trained with the networks of schemes 1-csq and 3-csq "
                                 "(one head per code length up to this; 0 = no hash-head networks)", default=256)
    dropout: float = _doc("dropout before the classifier", default=0.2)
    num_workers: int = _doc("data loader workers", default=0)
    pixel_cache: bool = _doc("keep each part's decoded evaluation images in RUN_DIR/cache/pixels (3 x H x W "
                             "bytes per image) so that later networks do not decode them again", default=True)
    threads: int = _doc("torch CPU threads during the run; 0 = torch's default", default=0)
    device: str = _doc(f"training and extraction device: {DEVICE_HELP}", default="auto")
    precision: str = _doc("numeric precision of training and extraction: auto (bf16 where the hardware has "
                          "native bf16; full fine-tuning on a CPU in fp32 + channels_last), fp32 or bf16",
                          default=DEFAULT_PRECISION)
    checkpoints: dict[str, str] = _doc(
        "trained checkpoints to reuse instead of training, KEY=PATH with KEY ori or dfs, or "
        "BACKBONE:DATASET:MODE:NETWORK", default_factory=dict)
    bits: list[int] = _doc("code lengths b; empty = 16, 32, 64, ... below D, and D itself",
                           default_factory=list)
    k: int = _doc("cut-off of mAP@k and precision@k", default=1000, flags=("-k", "--k"))
    ties: list[str] = _doc("tie modes of the mAP (stable, expected)",
                           default_factory=lambda: list(TIES))
    ablations: list[str] = _doc("engine ablations on DFS-Net features (see dfsnet.experiments.schemes: "
                                + ", ".join(ablation_names()) + ")", default_factory=ablation_names)
    itq_max_bits: int = _doc("longest ITQ code evaluated (ITQ's PCA and rotation grow with b^3; "
                             "it is also capped at the number of train images)", default=256)
    pr_bits: int = _doc("code length of the hashed schemes in the precision-recall figure",
                        default=64)

    def __post_init__(self) -> None:
        _validate(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values, as stored in ``results.json``."""
        return dataclasses.asdict(self)

    @property
    def run_dir(self) -> Path:
        """``OUT_DIR/NAME``: the run folder."""
        return Path(self.out_dir) / self.name


@dataclass(frozen=True)
class ConfigField:
    """One config key: its name, type hint, help text and CLI flag spellings."""

    name: str
    type: Any
    help: str
    flags: tuple[str, ...]
    bare_key: bool = False


def config_fields() -> list[ConfigField]:
    """The keys of :class:`ExperimentConfig`, in declaration order (for ``--help`` and the CLI)."""
    hints = typing.get_type_hints(ExperimentConfig)
    return [ConfigField(f.name, hints[f.name], f.metadata.get("help", ""),
                        tuple(f.metadata.get("flags") or ("--" + f.name.replace("_", "-"),)),
                        bool(f.metadata.get("bare_key")))
            for f in dataclasses.fields(ExperimentConfig)]


_HINTS = typing.get_type_hints(ExperimentConfig)
_BARE = {f.name for f in config_fields() if f.bare_key}


# --------------------------------------------------------------------------------------------
# Coercion
# --------------------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return tp.__name__


def _scalar(tp: Any, value: Any, from_text: bool) -> Any:
    """``value`` as the plain type ``tp`` (bool, int, float, str or a union of them), or raise."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if from_text and isinstance(value, str):
            # As TOML would read it: true/false, then an integer, then a float.
            for option in sorted(options, key=(bool, int, float, str).index):
                try:
                    return _scalar(option, value, True)
                except (TypeError, ValueError):
                    pass
            raise TypeError
        if not any(isinstance(value, t) and (t is bool or not isinstance(value, bool)) for t in options):
            raise TypeError
        return value
    if from_text and isinstance(value, str) and tp is not str:
        if tp is bool:
            if value.lower() not in ("true", "false"):
                raise TypeError
            return value.lower() == "true"
        try:
            return tp(value)
        except ValueError:
            raise TypeError from None
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, tp) and not isinstance(value, bool)
    if not ok:
        raise TypeError
    return value


def coerce_field(name: str, value: Any, *, from_text: bool = False) -> Any:
    """``value`` checked against (and converted to) the type hint of config key ``name``.

    Parameters
    ----------
    name : str
        A field of :class:`ExperimentConfig`.
    value
        A TOML value; with ``from_text`` also CLI text: a string for a scalar, a list of
        strings for a list, ``KEY=VALUE`` strings for a table.
    from_text : bool
        Parse strings into the field's type (``"3"`` -> 3); TOML values are not parsed, so
        ``epochs = "3"`` is an error.

    Raises
    ------
    TypeError
        Naming the key, the expected type and the value.
    ValueError
        An unknown key, or a ``KEY=VALUE`` item without ``=``.
    """
    if name not in _HINTS:
        raise _unknown("keys", name, _HINTS)
    tp = _HINTS[name]
    origin = typing.get_origin(tp)
    bad = InputTypeError(f"{name}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            value = [value]  # a single value for a one-element list
        if not isinstance(value, (list, tuple)):
            raise bad
        try:
            return [_scalar(item, v, from_text) for v in value]
        except TypeError:
            raise bad from None
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        if from_text and isinstance(value, (list, tuple)):
            value = _table_from_text(name, value)
        if not isinstance(value, dict):
            raise bad
        out = {}
        for key, v in value.items():
            try:
                out[_scalar(key_type, key, False)] = _scalar(value_type, v, from_text)
            except TypeError:
                raise InputTypeError(f"{name}.{key}: expected {_type_name(value_type)}, got {v!r}") from None
        return out
    try:
        return _scalar(tp, value, from_text)
    except TypeError:
        raise bad from None


def _table_from_text(name: str, items) -> dict[str, str]:
    table = {}
    for item in items:
        key, sep, raw = str(item).partition("=")
        if not sep:
            if name not in _BARE:
                raise InputError(f"{name}: expected KEY=VALUE, got {item!r}")
            key, raw = "", str(item)
        table[key] = raw
    return table


def parse_flag_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """Typed config overrides from CLI text (``{"epochs": "3", "bits": ["8", "16"]}``)."""
    return {name: coerce_field(name, value, from_text=True) for name, value in values.items()}


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

def _unknown(kind: str, name: str, valid, *, where: str = "") -> InputError:
    valid = sorted(valid)
    close = difflib.get_close_matches(str(name), valid, n=3)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    return InputError(f"{kind}: unknown {kind.rstrip('s')} {name!r}{where}{hint}; valid: {', '.join(valid)}")


def _validate(cfg: ExperimentConfig) -> None:
    from dfsnet._validation import check_choice, check_positive_int
    from dfsnet.train.workflow import torch_device

    for name in _HINTS:
        setattr(cfg, name, coerce_field(name, getattr(cfg, name)))
    if not cfg.name or "/" in cfg.name or cfg.name.startswith("."):
        raise InputError(f"name: expected a plain folder name, got {cfg.name!r}")
    for key in ("backbones", "datasets", "modes"):
        if not getattr(cfg, key):
            raise InputError(f"{key}: expected at least one entry, got []")
        if len(set(getattr(cfg, key))) != len(getattr(cfg, key)):
            raise InputError(f"{key}: expected distinct entries, got {getattr(cfg, key)}")
    for mode in cfg.modes:
        if mode not in MODES:
            raise _unknown("modes", mode, MODES)
    for tie in cfg.ties:
        if tie not in TIES:
            raise _unknown("ties", tie, TIES)
    if not cfg.ties:
        raise InputError(f"ties: expected at least one of {list(TIES)}, got []")
    for ablation in cfg.ablations:
        if ablation not in ablation_names():
            raise _unknown("ablations", ablation, ablation_names())
    check_choice(cfg.optimizer, OPTIMIZERS, name="optimizer")
    check_choice(cfg.augment, ("none", "flip", "flip_image"), name="augment")
    check_choice(cfg.monitor, MONITORS, name="monitor")
    check_choice(cfg.precision, PRECISIONS, name="precision")
    torch_device(cfg.device)
    for key in ("epochs", "batch_size", "k", "pr_bits", "itq_max_bits"):
        check_positive_int(getattr(cfg, key), name=key)
    for key in ("finetune_epochs", "image_size", "num_workers", "threads", "patience"):
        if getattr(cfg, key) < 0:
            raise InputError(f"{key}: expected a non-negative integer, got {getattr(cfg, key)}")
    if "full" in cfg.modes and cfg.finetune_epochs == 0:
        raise InputError("finetune_epochs: mode 'full' needs at least 1 epoch, got 0")
    for key in ("lr", "finetune_lr"):
        if not getattr(cfg, key) > 0:
            raise InputError(f"{key}: expected a positive number, got {getattr(cfg, key)}")
    if cfg.finetune_budget_minutes < 0:
        raise InputError(f"finetune_budget_minutes: expected >= 0, got {cfg.finetune_budget_minutes}")
    if not 0 <= cfg.dropout < 1:
        raise InputError(f"dropout: expected a value in [0, 1), got {cfg.dropout}")
    for b in cfg.bits:
        check_positive_int(b, name="bits")
    if len(set(cfg.bits)) != len(cfg.bits):
        raise InputError(f"bits: expected distinct code lengths, got {cfg.bits}")
    if "" in cfg.data_root:  # a bare PATH from the command line
        if len(cfg.datasets) != 1:
            raise InputError(f"data_root: a bare PATH needs exactly one data set, got {cfg.datasets}; "
                             "use NAME=PATH")
        cfg.data_root = {**{k: v for k, v in cfg.data_root.items() if k}, cfg.datasets[0]: cfg.data_root[""]}
    for key in cfg.data_root:
        if key not in cfg.datasets:
            raise InputError(f"data_root: {key!r} is not one of the configured datasets {cfg.datasets}")
    for key in cfg.checkpoints:
        parts = key.split(":")
        if not (parts[-1] in ("ori", "dfs") and len(parts) in (1, 4)):
            raise InputError(f"checkpoints: expected keys 'ori', 'dfs' or "
                             f"'BACKBONE:DATASET:MODE:NETWORK', got {key!r}")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def config_from_dict(data: Mapping[str, Any], *, source: str = "config") -> ExperimentConfig:
    """Build a validated config; unknown keys are an error naming them and the valid keys."""
    if not isinstance(data, Mapping):
        raise InputTypeError(f"{source}: expected a table of keys, got {type(data).__name__}")
    for key in data:
        if key not in _HINTS:
            raise _unknown("keys", key, _HINTS, where=f" in {source}")
    return ExperimentConfig(**data)


def bundled_configs() -> dict[str, Path]:
    """Configs shipped in ``dfsnet/configs``, by name (``demo``, ``cifar10_cpu``, ...)."""
    root = resources.files("dfsnet") / "configs"
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(".toml")}


def load_config(path_or_name: str | os.PathLike, overrides: Mapping[str, Any] | None = None
                ) -> ExperimentConfig:
    """Read a TOML config (a path, or the name of a bundled one) and apply typed ``overrides``.

    Overrides replace whole keys (a table too). CLI text goes through :func:`parse_flag_values`
    first.
    """
    path = Path(path_or_name)
    if not path.is_file():
        bundled = bundled_configs()
        if str(path_or_name) in bundled:
            path = bundled[str(path_or_name)]
        else:
            raise FileNotFoundError(
                f"config: no file {str(path_or_name)!r} and no bundled config of that name; "
                f"bundled: {', '.join(sorted(bundled))}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"config: {path} is not valid TOML ({exc})") from None
    data.update(overrides or {})
    return config_from_dict(data, source=str(path))


def default_bits(feature_dim: int) -> list[int]:
    """16, 32, 64, ... below ``feature_dim``, then ``feature_dim`` itself."""
    bits, b = [], 16
    while b < feature_dim:
        bits.append(b)
        b *= 2
    return bits + [feature_dim]
