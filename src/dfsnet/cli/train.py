"""``dfsnet train`` and ``dfsnet extract``: thin calls into dfsnet.train.workflow and dfsnet.features."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from dfsnet.cli._common import add_device_arg, add_precision_arg, add_progress_arg, progress_enabled
from dfsnet.errors import InputError
from dfsnet.train.workflow import ENCODERS, HASH_HEADS, MODES, MONITORS

# Listed for --help only; the library validates the names and lists the valid ones on error.
_SOURCES = "folder, cifar10, caltech256, digits"
_PROTOCOLS = "paper, cifar10, cifar10-1, per-class"
_SELECTORS = "gain_ratio (the paper), random, none"
_HASHERS = "sample_mean (the paper), feature_mean, feature_median, zero, itq, csq, orthohash"


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
        "OUT/train_summary.json. By default a CSQ hash head trains beside the classifier and the encoder "
        "is the best on the validation images of that head, ITQ and the paper's hash (--encoder paper gives "
        "exactly the paper's Scheme 3). "
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
                   help="efficientnet_lite0, efficientnet_lite1, efficientnet_lite2, resnet50, inception_v3, "
                        "mobilenetv2, or any timm CNN name (default: %(default)s)")
    g.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="start from ImageNet weights (offline for efficientnet_lite0, and for efficientnet_lite1|2 "
                        "with the lite extra; other backbones need the network or --weights) (default: on)")
    g.add_argument("--weights", metavar="PATH", help="local backbone state dict (safetensors or torch.save), "
                   "instead of --pretrained")
    g.add_argument("--init", metavar="CKPT", help="start from a dfsnet checkpoint (e.g. a head-trained "
                   "model.safetensors before full fine-tuning); it must match --backbone, --no-dfs and the classes")
    g.add_argument("--no-dfs", action="store_true", help="train the paper's Ori network (backbone + GAP + FC) "
                   "without the DFS module")

    g = p.add_argument_group("training")
    g.add_argument("--mode", default="head", choices=MODES,
                   help="head: frozen backbone, its feature maps cached once, the head trains on them "
                        "(no backbone pass per epoch, so practical on a CPU; mirrored maps, see --augment); full: "
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
                   help="early stopping after this many epochs without a better monitored value; 0 disables "
                        "(default: %(default)s)")
    g.add_argument("--augment", choices=("none", "flip", "flip_image"),
                   help="head mode: flip mirrors half of each batch of cached maps; flip_image also caches the "
                        "mirrored images' maps and draws from both (default: flip in head mode, none in full "
                        "mode, which augments the images)")
    g.add_argument("--monitor", choices=MONITORS,
                   help="what selects the best epoch and stops early: validation accuracy, or the validation "
                        "images' retrieval mAP against the training images (val_map, head mode only) or "
                        "against each other (val_map_loo) (default: val_map_loo in head mode, val_acc in full mode)")
    g.add_argument("--mixup", type=float, metavar="ALPHA",
                   help="mixup of training inputs and their losses, weight ~ Beta(ALPHA, ALPHA); 0 = off "
                        "(default: 0.4 in head mode with a hash head, else 0)")
    g.add_argument("--refit", action="store_true",
                   help="after selection, train again on the training + validation images for the selected "
                        "number of epochs")
    g.add_argument("--no-resume", action="store_true", help="start over even if OUT has a checkpoint")
    g.add_argument("--cache-dir", metavar="DIR", help="head mode feature-map cache (default: OUT/cache)")
    g.add_argument("--eval-queries", action="store_true",
                   help="also report top-1 accuracy on the query images (the paper's Tables 1 and 4)")

    g = p.add_argument_group("hardware")
    add_device_arg(g)
    g.add_argument("--accelerator", help="Lightning accelerator, e.g. cpu, gpu (default: from --device)")
    g.add_argument("--devices", help="Lightning devices: a count, or a list like 0,1, e.g. with --strategy ddp "
                   "(default: from --device)")
    g.add_argument("--num-nodes", type=int, default=1, help="machines for multi-node DDP (default: %(default)s)")
    g.add_argument("--strategy", default="auto", help="e.g. ddp (default: %(default)s)")
    add_precision_arg(g)

    g = p.add_argument_group("hash encoder")
    g.add_argument("--bits", type=int, help="code length (default: 128; with --encoder custom, --selector none "
                   "and a threshold hasher, one bit per feature, the backbone's feature width)")
    g.add_argument("--encoder", default="auto", choices=ENCODERS,
                   help="auto: the best on the validation images of the learned hash head, ITQ and the paper's "
                        "hash; learned: the hash head; itq; paper: gain ratio + sample-mean hash (Scheme 3, no "
                        "hash head); custom: --selector + --hasher (default: %(default)s)")
    g.add_argument("--hash-head", default="auto", choices=HASH_HEADS + ("auto",),
                   help="hash layer trained beside the classifier: auto = csq with --encoder auto or learned, "
                        "else none (default: %(default)s)")
    g.add_argument("--hash-weight", type=float, default=1.0, metavar="W",
                   help="weight of the hash loss against the cross-entropy (default: %(default)s)")
    g.add_argument("--selector", help=f"{_SELECTORS}; giving --selector or --hasher means --encoder custom "
                   "(default: gain_ratio)")
    g.add_argument("--hasher", help=f"{_HASHERS} (default: sample_mean)")

    add_progress_arg(p)
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
    add_device_arg(p)
    add_precision_arg(p)
    p.add_argument("--cache-dir", metavar="DIR", help="reuse features cached here, keyed by model and data")
    add_progress_arg(p)
    p.add_argument("--out", required=True, metavar="FEATURES.npz", help="output file")
    p.set_defaults(func=_extract)


def _quiet_lightning(args) -> None:
    # Lightning logs hardware and tips at INFO through its own handler; keep them for -vv.
    if getattr(args, "verbose", 0) < 2:
        for name in ("lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _devices(value: str | None):
    if value is None or value == "auto":
        return value
    if "," in value:
        return [int(v) for v in value.split(",") if v.strip()]
    try:
        return int(value)
    except ValueError:
        raise InputError(f"--devices: expected 'auto', a count or a list like 0,1, got {value!r}") from None


def _check_args(args, *, out_is_folder: bool) -> None:
    for name in ("batch_size", "epochs", "bits", "image_size"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')}: expected a positive integer, got {value}")
    if args.num_workers < 0:
        raise InputError(f"--num-workers: expected an integer >= 0, got {args.num_workers}")
    if args.source != "digits" and args.data is None:
        raise InputError(f"--data: source {args.source!r} needs a dataset folder (ROOT)")
    # Checked before any training or extraction, which would otherwise be lost at the final write.
    out = Path(args.out)
    if out_is_folder and out.exists() and not out.is_dir():
        raise InputError(f"--out: expected an output folder, but {out} is a file")
    if not out_is_folder and out.is_dir():
        raise InputError(f"--out: expected the path of an .npz file, but {out} is a folder")


def _train(args) -> int:
    from dfsnet.train.workflow import train_and_fit

    _check_args(args, out_is_folder=True)
    _quiet_lightning(args)
    progress = progress_enabled(args)
    encoder = args.encoder
    if encoder == "auto" and (args.selector or args.hasher):
        encoder = "custom"
    outcome = train_and_fit(
        out_dir=args.out, source=args.source, data=args.data, download=args.download, backbone=args.backbone,
        pretrained=args.pretrained, weights=args.weights, init=args.init, dfs=not args.no_dfs,
        image_size=args.image_size, split=args.split, split_protocol=args.split_protocol,
        val_fraction=args.val_fraction, seed=args.seed, mode=args.mode, epochs=args.epochs, lr=args.lr,
        optimizer=args.optimizer, weight_decay=args.weight_decay, backbone_lr_mult=args.backbone_lr_mult,
        warmup_epochs=args.warmup_epochs, patience=args.patience or None, batch_size=args.batch_size,
        num_workers=args.num_workers, resume=not args.no_resume, cache_dir=args.cache_dir, device=args.device,
        accelerator=args.accelerator, devices=_devices(args.devices), num_nodes=args.num_nodes,
        strategy=args.strategy, precision=args.precision, selector=args.selector or "gain_ratio",
        hasher=args.hasher or "sample_mean", n_bits=args.bits, encoder=encoder, hash_head=args.hash_head,
        hash_weight=args.hash_weight,
        augment=args.augment, monitor=args.monitor, mixup=args.mixup, refit=args.refit, eval_queries=args.eval_queries,
        progress=progress,
    )
    result = outcome.result
    if not result.is_global_zero:  # another DDP process: rank zero reports
        return 0
    print(f"val top-1 accuracy {result.best_val_acc:.4f} (best epoch {outcome.best_epoch} of {result.epochs_run}, "
          f"{result.seconds:.1f} s)")
    print(f"model: {result.checkpoint}")
    record = outcome.summary.get("encoder", {})
    chosen = record.get("choice", args.encoder)
    scores = record.get("candidates") or {}
    how = ("chosen on the validation images: " + ", ".join(
        f"{name} {100 * v['map_at_k']:.2f}" for name, v in scores.items()) + f" mAP@{next(iter(scores.values()))['k']}"
        if scores else "as asked")
    print(f"encoder: {Path(args.out) / 'encoder.npz'} ({chosen}, {outcome.encoder.n_bits_} bits, {how}; fitted on "
          f"{outcome.n_encoder_images} images)")
    if "query_acc" in outcome.summary:
        print(f"query top-1 accuracy {outcome.summary['query_acc']:.4f} on {outcome.split.query.size} images")
    return 0


def _extract(args) -> int:
    import numpy as np

    from dfsnet._io import atomic_write
    from dfsnet.data import ImageList, build_transforms, iter_image_files, load_source
    from dfsnet.features import extract_features_with_mask
    from dfsnet.models import checkpoint_hash, load_checkpoint
    from dfsnet.train.workflow import torch_device

    _check_args(args, out_is_folder=False)
    model, extra = load_checkpoint(args.model)
    size = args.image_size or extra.get("image_size") or model.meta.input_size[-1]
    transform = build_transforms(model.meta, train=False, image_size=int(size))
    if args.unlabeled:
        if args.data is None:
            raise InputError("--data: --unlabeled needs an image folder")
        dataset = ImageList(iter_image_files(args.data), transform=transform)
    else:
        dataset = load_source(args.source, root=args.data, split=args.part, download=args.download,
                              transform=transform)
    features, ok = extract_features_with_mask(model, dataset, batch_size=args.batch_size,
                                              num_workers=args.num_workers, device=torch_device(args.device),
                                              precision=args.precision, cache_dir=args.cache_dir,
                                              progress=progress_enabled(args))
    paths = np.array([str(p) for p, _ in dataset.samples])
    with atomic_write(args.out) as fh:
        np.savez(fh, features=features[ok], labels=np.asarray(dataset.targets, dtype=np.int64)[ok],
                 paths=paths[ok], skipped=paths[~ok], classes=np.array(list(dataset.classes), dtype=str),
                 checkpoint=np.array(checkpoint_hash(args.model)))
    print(f"wrote {int(ok.sum())} features of dimension {features.shape[1]} ({size} px) to {args.out}"
          + (f"; skipped {int((~ok).sum())} unreadable images" if not ok.all() else ""))
    return 0
