"""``dfsnet train`` and ``dfsnet extract``: thin wrappers over dfsnet.train and dfsnet.features."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

# Listed for --help only; the library validates the names and lists the valid ones on error.
_SOURCES = "folder, cifar10, caltech256, digits"
_PROTOCOLS = "paper, cifar10, cifar10-1, per-class"
_SELECTORS = "gain_ratio (the paper), random, none"
_HASHERS = "sample_mean (the paper), feature_mean, feature_median, zero, itq"


def register(subparsers) -> None:
    _register_train(subparsers)
    _register_extract(subparsers)


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="ROOT", help="dataset folder: ROOT/<class>/<image>, or ROOT/train/... and "
                   "ROOT/test/...; for cifar10 its image folders or torchvision files (not needed for digits)")
    g.add_argument("--source", default="folder", help=f"dataset source: {_SOURCES} (default: %(default)s)")
    g.add_argument("--download", action="store_true",
                   help="let torchvision download cifar10 / caltech256 into ROOT when absent")
    g.add_argument("--image-size", type=int, metavar="PX",
                   help="input side in pixels (default: train: the backbone's native size; extract: the size "
                        "the checkpoint was trained at)")
    g.add_argument("--batch-size", type=int, default=64, metavar="N", help="batch size (default: %(default)s)")
    g.add_argument("--num-workers", type=int, default=0, metavar="N",
                   help="DataLoader worker processes reading images (default: %(default)s)")


def _register_train(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train DFS-Net (or the Ori baseline) and fit its hash encoder",
        description="Fine-tune DFS-Net on a labelled image dataset, write OUT/model.safetensors (the "
        "best epoch on the validation images), OUT/split.json (the split used), OUT/encoder.npz "
        "(feature selector + hasher fitted on the training features, used by `dfsnet index build`) and "
        "OUT/train_summary.json. "
        "The validation images are carved from the training part of the split, never from the queries. "
        "Re-running with the same OUT resumes from OUT/checkpoints/last.ckpt.",
    )
    _add_data_args(p)
    g = p.add_argument_group("split")
    g.add_argument("--split-protocol", default="auto", metavar="NAME",
                   help=f"{_PROTOCOLS}, or auto: paper when the data has a test part, else per-class "
                        "(default: %(default)s)")
    g.add_argument("--split", metavar="FILE", help="reuse a split file written by an earlier run instead of "
                   "drawing one")
    g.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                   help="share of each class of the training part held out for validation (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seed of the split and of training (default: %(default)s)")

    g = p.add_argument_group("model")
    g.add_argument("--backbone", default="efficientnet_lite0", metavar="NAME",
                   help="efficientnet_lite0, resnet50, inception_v3, mobilenetv2, or any timm CNN name "
                        "(default: %(default)s)")
    g.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="start from ImageNet weights (offline for efficientnet_lite0; other backbones need the "
                        "network or --weights) (default: on)")
    g.add_argument("--weights", metavar="PATH", help="local backbone state dict (safetensors or torch.save), "
                   "instead of --pretrained")
    g.add_argument("--init", metavar="CKPT", help="start from a dfsnet checkpoint (e.g. a head-trained "
                   "model.safetensors before full fine-tuning); it must match --backbone, --no-dfs and the classes")
    g.add_argument("--no-dfs", action="store_true", help="train the paper's Ori network (backbone + GAP + FC) "
                   "without the DFS module")

    g = p.add_argument_group("training")
    g.add_argument("--mode", default="head", choices=("head", "full"),
                   help="head: frozen backbone, its feature maps cached once, the head trains on them "
                        "(no backbone pass per epoch, so practical on a CPU; no augmentation); full: "
                        "fine-tune every layer with augmentation, as the paper (default: %(default)s)")
    g.add_argument("--epochs", type=int, default=10, help="total epochs (default: %(default)s)")
    g.add_argument("--lr", type=float, default=1e-3, help="learning rate of the head (default: %(default)s)")
    g.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"),
                   help="AdamW, or SGD with Nesterov momentum 0.9; the learning rate decays on a cosine "
                        "(default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=1e-4,
                   help="weight decay, not applied to biases and norm weights (default: %(default)s)")
    g.add_argument("--backbone-lr-mult", type=float, default=0.1, metavar="M",
                   help="full mode: backbone learning rate = lr * M (default: %(default)s)")
    g.add_argument("--warmup-epochs", type=float, default=0.0, metavar="E",
                   help="linear warm-up before the cosine decay (default: %(default)s)")
    g.add_argument("--patience", type=int, default=5,
                   help="early stopping after this many epochs without a better val accuracy; 0 disables "
                        "(default: %(default)s)")
    g.add_argument("--no-resume", action="store_true", help="start over even if OUT has a checkpoint")
    g.add_argument("--cache-dir", metavar="DIR", help="head mode feature-map cache (default: OUT/cache)")
    g.add_argument("--eval-queries", action="store_true",
                   help="also report top-1 accuracy on the query images (the paper's Tables 1 and 4)")

    g = p.add_argument_group("hardware (passed to Lightning)")
    g.add_argument("--accelerator", default="auto", help="cpu, gpu, ... (default: %(default)s)")
    g.add_argument("--devices", default="auto", help="number of devices, or a list like 0,1 (default: %(default)s)")
    g.add_argument("--num-nodes", type=int, default=1, help="machines for multi-node DDP (default: %(default)s)")
    g.add_argument("--strategy", default="auto", help="e.g. ddp (default: %(default)s)")
    g.add_argument("--precision", help="e.g. 32-true, 16-mixed, bf16-mixed (default: 16-mixed on GPU, else 32-true)")

    g = p.add_argument_group("hash encoder")
    g.add_argument("--bits", type=int, help="code length (default: 128; with --selector none and a threshold "
                   "hasher, one bit per feature, the backbone's feature width)")
    g.add_argument("--selector", default="gain_ratio", help=f"{_SELECTORS} (default: %(default)s)")
    g.add_argument("--hasher", default="sample_mean", help=f"{_HASHERS} (default: %(default)s)")

    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.set_defaults(func=_train)


def _register_extract(subparsers) -> None:
    p = subparsers.add_parser(
        "extract", help="extract deep features of a dataset with a trained model",
        description="Write the pooled deep features of every readable image to an .npz file with arrays "
        "features (float32, n x D), labels (int64, n; -1 when unlabelled), paths (unicode, n), skipped "
        "(unicode paths of unreadable images), classes (unicode) and checkpoint (its hash). Loads with "
        "numpy.load(allow_pickle=False).",
    )
    p.add_argument("--model", required=True, metavar="CKPT", help="a dfsnet checkpoint (model.safetensors)")
    _add_data_args(p)
    p.add_argument("--part", default="all", choices=("train", "test", "all"),
                   help="part of the source to extract (default: %(default)s)")
    p.add_argument("--unlabeled", action="store_true",
                   help="--data is any folder of images (searched recursively), without class sub-folders")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available, else cpu)")
    p.add_argument("--cache-dir", metavar="DIR", help="reuse features cached here, keyed by model and data")
    p.add_argument("--out", required=True, metavar="FEATURES.npz", help="output file")
    p.set_defaults(func=_extract)


def _quiet_lightning(args) -> None:
    # Lightning logs hardware and tips at INFO through its own handler; keep them for -vv.
    if getattr(args, "verbose", 0) < 2:
        for name in ("lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _devices(value: str):
    if value == "auto":
        return value
    if "," in value:
        return [int(v) for v in value.split(",") if v.strip()]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--devices: expected 'auto', a count or a list like 0,1, got {value!r}") from None


def _check_args(args, *, out_is_folder: bool) -> None:
    for name in ("batch_size", "epochs", "bits", "image_size"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive integer, got {value}")
    if args.num_workers < 0:
        raise ValueError(f"--num-workers: expected an integer >= 0, got {args.num_workers}")
    if args.source != "digits" and args.data is None:
        raise ValueError(f"--data: source {args.source!r} needs a dataset folder (ROOT)")
    # Checked before any training or extraction, which would otherwise be lost at the final write.
    out = Path(args.out)
    if out_is_folder and out.exists() and not out.is_dir():
        raise ValueError(f"--out: expected an output folder, but {out} is a file")
    if not out_is_folder and out.is_dir():
        raise ValueError(f"--out: expected the path of an .npz file, but {out} is a folder")


def _make_encoder(args, feature_dim: int):
    """The unfitted encoder of ``--selector``, ``--hasher`` and ``--bits``, validated before training."""
    from dfsnet.hashing import make_encoder

    selector = None if args.selector in ("none", "None") else args.selector
    if selector is None and args.hasher != "itq":
        if args.bits not in (None, feature_dim):
            raise ValueError(f"--bits: with --selector none, hasher {args.hasher!r} makes one bit per feature, "
                             f"i.e. {feature_dim} bits for this backbone; got --bits {args.bits}. Choose a "
                             "selector or --hasher itq for shorter codes")
        return make_encoder(selector=None, hasher=args.hasher, n_bits=None)
    n_bits = 128 if args.bits is None else args.bits
    if n_bits > feature_dim:
        raise ValueError(f"--bits: expected at most the backbone's feature width {feature_dim}, got {n_bits}")
    return make_encoder(selector=selector, hasher=args.hasher, n_bits=n_bits)


def _train(args) -> int:
    import json

    import numpy as np
    import torch

    from dfsnet._io import atomic_write_text
    from dfsnet.data import Split, build_transforms, load_pool, make_split
    from dfsnet.features import cached_feature_maps, extract_features_with_mask, extract_from_maps
    from dfsnet.models import DFSNet, create_backbone, load_checkpoint, read_checkpoint_meta
    from dfsnet.train import evaluate_accuracy, train_model

    _check_args(args, out_is_folder=True)
    _quiet_lightning(args)
    out = Path(args.out)
    if args.init and args.weights:
        raise ValueError("--init, --weights: give one of them; --init already holds the backbone weights")
    # Every DDP process runs this command; seeding first gives them all the same random init.
    torch.manual_seed(args.seed)
    if args.init:
        meta = read_checkpoint_meta(args.init)[0]
        backbone_meta = meta.backbone
    else:
        backbone = create_backbone(args.backbone, pretrained=args.pretrained and args.weights is None,
                                   weights=args.weights)
        backbone_meta = backbone.meta
    encoder = _make_encoder(args, backbone_meta.feature_dim)
    size = args.image_size or backbone_meta.input_size[-1]
    eval_tf = build_transforms(backbone_meta, train=False, image_size=size)
    pool = load_pool(args.source, root=args.data, download=args.download, transform=eval_tf)
    n_classes = len(pool.classes)
    if args.init:
        model, _ = load_checkpoint(args.init, expect={"backbone": args.backbone, "num_classes": n_classes,
                                                      "dfs": not args.no_dfs})
        if model.meta.class_names is not None and list(model.meta.class_names) != list(pool.classes):
            raise ValueError(f"--init: checkpoint {args.init} was made for the classes "
                             f"{list(model.meta.class_names)}, but the data has {list(pool.classes)}")
    else:
        model = DFSNet(backbone, n_classes, dfs=not args.no_dfs, class_names=pool.classes)

    if args.split:
        split = Split.load(args.split, expect_fingerprint=pool.fingerprint())
    else:
        protocol = args.split_protocol
        if protocol == "auto":
            protocol = "paper" if (pool.sources == 1).any() else "per-class"
        split = make_split(protocol, pool.targets, pool_sources=pool.sources, seed=args.seed,
                           val_fraction=args.val_fraction, pool_fingerprint=pool.fingerprint())
    if split.val.size == 0:
        raise ValueError(f"--val-fraction: the {split.protocol} split leaves no validation images "
                         f"({split.sizes()}); raise --val-fraction or use more images per class")
    if args.hasher == "itq" and encoder.hasher.n_bits > split.train.size:
        raise ValueError(f"--bits: ITQ learns {encoder.hasher.n_bits} principal directions from the "
                         f"{split.train.size} training images; expected at most that many bits")
    split.save(out / "split.json")
    train_tf = build_transforms(backbone_meta, train=True, image_size=size) if args.mode == "full" else None
    fit_set = split.subset(pool, "fit", transform=train_tf)
    val_set = split.subset(pool, "val")
    print(f"training {'DFS-Net' if not args.no_dfs else 'Ori'} ({backbone_meta.name}, {args.mode} mode, "
          f"{size} px) on {len(fit_set)} images, validating on {len(val_set)}; split {split.protocol} "
          f"{split.sizes()}")
    result = train_model(
        model, fit_set, val_set, mode=args.mode, epochs=args.epochs, lr=args.lr,
        weight_decay=args.weight_decay, optimizer=args.optimizer, backbone_lr_mult=args.backbone_lr_mult,
        warmup_epochs=args.warmup_epochs, batch_size=args.batch_size, out_dir=out,
        resume=not args.no_resume, patience=args.patience or None, accelerator=args.accelerator,
        devices=_devices(args.devices), num_nodes=args.num_nodes, strategy=args.strategy,
        precision=args.precision, num_workers=args.num_workers, cache_dir=args.cache_dir, progress=True,
        seed=args.seed,
        extra={"image_size": size, "source": args.source, "data": str(args.data) if args.data else None,
               "split_protocol": split.protocol, "split_seed": split.seed},
    )
    if not result.is_global_zero:  # another DDP process: rank zero reports and fits the encoder
        return 0
    best_epoch = max(result.history, key=lambda e: e["val_acc"])["epoch"] + 1 if result.history else 0
    print(f"val top-1 accuracy {result.best_val_acc:.4f} (best epoch {best_epoch} of {result.epochs_run}, "
          f"{result.seconds:.1f} s)")
    print(f"model: {result.checkpoint}")

    # The encoder is fitted on the features of the training part (fit + val), as in the paper.
    if args.mode == "head":
        # The backbone is frozen, so its cached maps are still valid: only the head runs here.
        cache = args.cache_dir or out / "cache"
        feats, labels = [], []
        for part in (fit_set, val_set):
            maps = cached_feature_maps(model.backbone, part, cache_dir=cache, batch_size=args.batch_size,
                                       num_workers=args.num_workers, progress=True)
            # Rows of unreadable images are zero maps: cheaper to pool and drop than to copy the rest.
            feats.append(extract_from_maps(model, maps.maps, batch_size=256)[maps.ok])
            labels.append(maps.labels[maps.ok])
        features, targets = np.concatenate(feats), np.concatenate(labels)
    else:
        train_set = split.subset(pool, "train")
        features, ok = extract_features_with_mask(model, train_set, batch_size=args.batch_size,
                                                  num_workers=args.num_workers, progress=True)
        features, targets = features[ok], train_set.targets[ok]
    encoder.fit(features, targets)
    encoder.save(out / "encoder.npz")
    print(f"encoder: {out / 'encoder.npz'} ({encoder.n_bits_} bits, fitted on {features.shape[0]} images)")

    summary = {"val_acc": result.best_val_acc, "epochs": result.epochs_run, "seconds": result.seconds}
    if args.eval_queries and split.query.size:
        summary["query_acc"] = evaluate_accuracy(model, split.subset(pool, "query"), batch_size=args.batch_size,
                                                 num_workers=args.num_workers, progress=True)
        print(f"query top-1 accuracy {summary['query_acc']:.4f} on {split.query.size} images")
    atomic_write_text(out / "train_summary.json", json.dumps(summary, indent=2) + "\n")
    return 0


def _extract(args) -> int:
    import numpy as np

    from dfsnet._io import atomic_write
    from dfsnet.data import ImageList, build_transforms, iter_image_files, load_source
    from dfsnet.features import extract_features_with_mask
    from dfsnet.models import checkpoint_hash, load_checkpoint

    _check_args(args, out_is_folder=False)
    model, extra = load_checkpoint(args.model)
    size = args.image_size or extra.get("image_size") or model.meta.input_size[-1]
    transform = build_transforms(model.meta, train=False, image_size=int(size))
    if args.unlabeled:
        if args.data is None:
            raise ValueError("--data: --unlabeled needs an image folder")
        dataset = ImageList(iter_image_files(args.data), transform=transform)
    else:
        dataset = load_source(args.source, root=args.data, split=args.part, download=args.download,
                              transform=transform)
    features, ok = extract_features_with_mask(model, dataset, batch_size=args.batch_size,
                                              num_workers=args.num_workers, device=args.device,
                                              cache_dir=args.cache_dir, progress=True)
    paths = np.array([str(p) for p, _ in dataset.samples])
    with atomic_write(args.out) as fh:
        np.savez(fh, features=features[ok], labels=np.asarray(dataset.targets, dtype=np.int64)[ok],
                 paths=paths[ok], skipped=paths[~ok], classes=np.array(list(dataset.classes), dtype=str),
                 checkpoint=np.array(checkpoint_hash(args.model)))
    print(f"wrote {int(ok.sum())} features of dimension {features.shape[1]} ({size} px) to {args.out}"
          + (f"; skipped {int((~ok).sum())} unreadable images" if not ok.all() else ""))
    return 0
