"""Benchmark: head-only training time per epoch on 5,000 CIFAR-10 images at 128 px, after caching.

Data: ``/work/shared/datasets/cifar10/train`` (JPEG folders), ``--per-class`` (500) training images
per class and ``--val-per-class`` (50) validation images per class, drawn with a fixed seed from
the training folder, evaluation transform at ``--image-size`` (128) px.

Model: EfficientNet-Lite0 with its offline ImageNet weights, frozen. ``dfsnet.train.train_model``
(``mode="head"``) first computes the backbone's feature maps of both sets into a float16 cache
(timed separately: ``cache_seconds``), then trains for ``--epochs`` epochs on them.

Measured: the training time per epoch (``train_seconds`` of each epoch, validation excluded; the
first epoch also pays one-off kernel warm-up, so the median is reported) of the DFS-Net head
(DFS module + GAP + dropout + FC) and of the named baseline, the paper's "Ori" head (GAP + dropout +
FC), trained on the same cached maps in the same run. Ratio: DFS epoch time / Ori epoch time.

Usage: .venv/bin/python benchmarks/bench_head_epoch.py [--epochs 3] [--per-class 500]
       [--val-per-class 50] [--image-size 128] [--batch-size 64] [--num-workers 2] [--cache-dir DIR]
Writes benchmarks/results/bench_head_epoch.json. Skips (exit 0, a message) without the dataset.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "bench_head_epoch.json"
CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=CIFAR10, help="CIFAR-10 image folders (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per head (default: %(default)s)")
    parser.add_argument("--per-class", type=int, default=500, help="training images per class (default: %(default)s)")
    parser.add_argument("--val-per-class", type=int, default=50, help="validation images per class "
                        "(default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=128, help="(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")
    parser.add_argument("--num-workers", type=int, default=2, help="image-reading workers while caching "
                        "(default: %(default)s)")
    parser.add_argument("--cache-dir", type=Path, help="feature-map cache (default: a temporary folder, so "
                        "the caching time is measured)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON output (default: %(default)s)")
    args = parser.parse_args()
    if not (args.data / "train").is_dir():
        print(f"skipped: CIFAR-10 image folders not found at {args.data / 'train'}")
        return 0

    import torch

    from dfsnet._io import atomic_write_text
    from dfsnet.data import ImageFolder, Subset, build_transforms
    from dfsnet.models import DFSNet, create_backbone
    from dfsnet.train import train_model

    torch.manual_seed(0)
    backbone = create_backbone("efficientnet_lite0", pretrained=True)
    pool = ImageFolder(args.data / "train",
                       transform=build_transforms(backbone.meta, train=False, image_size=args.image_size))
    gen = np.random.default_rng(0)
    train_idx, val_idx = [], []
    for c in range(len(pool.classes)):
        members = gen.permutation(np.flatnonzero(pool.targets == c))
        train_idx.append(members[: args.per_class])
        val_idx.append(members[args.per_class: args.per_class + args.val_per_class])
    train_set = Subset(pool, np.sort(np.concatenate(train_idx)))
    val_set = Subset(pool, np.sort(np.concatenate(val_idx)))

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or Path(tmp) / "cache"
        # DFS first: it pays for the caching; Ori then reads the same maps from the cache.
        for name, dfs in (("dfs", True), ("ori", False)):
            torch.manual_seed(0)
            model = DFSNet(backbone, len(pool.classes), dfs=dfs)
            result = train_model(model, train_set, val_set, mode="head", epochs=args.epochs, lr=1e-3,
                                 batch_size=args.batch_size, out_dir=Path(tmp) / name, cache_dir=cache,
                                 patience=None, num_workers=args.num_workers, progress=False)
            train_s = [e["train_seconds"] for e in result.history]
            runs[name] = {
                "cache_seconds": result.cache_seconds,
                "epoch_train_seconds": train_s,
                "epoch_seconds_with_val": [e["seconds"] for e in result.history],
                "median_epoch_train_seconds": statistics.median(train_s),
                "images_per_s": len(train_set) / statistics.median(train_s),
                "val_acc": [e["val_acc"] for e in result.history],
                "best_val_acc": result.best_val_acc,
            }
            print(f"{name}: epochs {', '.join(f'{s:.2f}' for s in train_s)} s "
                  f"(median {runs[name]['median_epoch_train_seconds']:.2f} s, "
                  f"{runs[name]['images_per_s']:.0f} images/s); best val acc {result.best_val_acc:.4f}")

    caching = runs["dfs"]["cache_seconds"]
    n_cached = len(train_set) + len(val_set)
    ratio = runs["dfs"]["median_epoch_train_seconds"] / runs["ori"]["median_epoch_train_seconds"]
    result = {
        "benchmark": "bench_head_epoch",
        "data": f"CIFAR-10 train folder, {len(train_set)} train + {len(val_set)} val images, "
                f"{args.image_size} px",
        "backbone": "efficientnet_lite0 (offline ImageNet weights), frozen",
        "baseline": "Ori head (GAP + dropout + FC) on the same cached maps",
        "epochs": args.epochs, "batch_size": args.batch_size, "num_workers": args.num_workers,
        "cache_seconds": caching, "cache_images_per_s": n_cached / caching if caching else None,
        "cache_reused": caching == 0.0,
        "runs": runs,
        "ratio_dfs_over_ori_epoch_time": ratio,
        "machine": {"cpu_count": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    if caching:
        print(f"caching {n_cached} images: {caching:.1f} s ({n_cached / caching:.1f} images/s)")
    else:
        print("caching: maps reused from --cache-dir")
    print(f"head epoch on {len(train_set)} cached images: DFS {runs['dfs']['median_epoch_train_seconds']:.2f} s, "
          f"Ori (baseline) {runs['ori']['median_epoch_train_seconds']:.2f} s; ratio DFS / Ori {ratio:.2f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
