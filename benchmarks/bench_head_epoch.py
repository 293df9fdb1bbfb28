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
FC), trained on the same cached maps in the same run, in each of ``--precisions`` (fp32, and bf16
autocast + channels_last: ``train_model(precision=...)``; each precision caches its own maps).
Ratios: DFS epoch time / Ori epoch time per precision, and DFS fp32 / DFS bf16.

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
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"],
                        help="precisions to time each head in (default: %(default)s)")
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

    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or Path(tmp) / "cache"
        for precision in args.precisions:
            # DFS first: it pays for the caching (one cache per precision); Ori then reads the same maps.
            for name, dfs in (("dfs", True), ("ori", False)):
                torch.manual_seed(0)
                model = DFSNet(backbone, len(pool.classes), dfs=dfs)
                result = train_model(model, train_set, val_set, mode="head", epochs=args.epochs, lr=1e-3,
                                     batch_size=args.batch_size, out_dir=Path(tmp) / f"{name}-{precision}",
                                     cache_dir=cache, patience=None, num_workers=args.num_workers,
                                     precision=precision, progress=False)
                train_s = [e["train_seconds"] for e in result.history]
                key = f"{name}_{result.precision}"
                runs[key] = {
                    "head": name, "precision": result.precision,
                    "cache_seconds": result.cache_seconds,
                    "epoch_train_seconds": train_s,
                    "epoch_seconds_with_val": [e["seconds"] for e in result.history],
                    "median_epoch_train_seconds": statistics.median(train_s),
                    "images_per_s": len(train_set) / statistics.median(train_s),
                    "val_acc": [e["val_acc"] for e in result.history],
                    "best_val_acc": result.best_val_acc,
                }
                print(f"{key}: epochs {', '.join(f'{s:.2f}' for s in train_s)} s "
                      f"(median {runs[key]['median_epoch_train_seconds']:.2f} s, "
                      f"{runs[key]['images_per_s']:.0f} images/s); best val acc {result.best_val_acc:.4f}; "
                      f"caching {result.cache_seconds:.1f} s", flush=True)

    n_cached = len(train_set) + len(val_set)
    median = {k: r["median_epoch_train_seconds"] for k, r in runs.items()}
    ratios = {f"dfs_over_ori_{p}": median[f"dfs_{p}"] / median[f"ori_{p}"]
              for p in ("fp32", "bf16") if f"dfs_{p}" in median and f"ori_{p}" in median}
    if "dfs_fp32" in median and "dfs_bf16" in median:
        ratios["dfs_fp32_over_dfs_bf16"] = median["dfs_fp32"] / median["dfs_bf16"]
    caching = {r["precision"]: r["cache_seconds"] for r in runs.values() if r["head"] == "dfs"}
    result = {
        "benchmark": "bench_head_epoch",
        "data": f"CIFAR-10 train folder, {len(train_set)} train + {len(val_set)} val images, "
                f"{args.image_size} px",
        "backbone": "efficientnet_lite0 (offline ImageNet weights), frozen",
        "baseline": "Ori head (GAP + dropout + FC) on the same cached maps, and the fp32 run of each head",
        "epochs": args.epochs, "batch_size": args.batch_size, "num_workers": args.num_workers,
        "cache_seconds": caching,
        "cache_images_per_s": {p: n_cached / s for p, s in caching.items() if s},
        "runs": runs,
        "ratios": ratios,
        "machine": {"cpu_count": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    for p, s in caching.items():
        print(f"caching {n_cached} images in {p}: {s:.1f} s" + (f" ({n_cached / s:.1f} images/s)" if s else
                                                                 " (maps reused from --cache-dir)"))
    for name, value in ratios.items():
        print(f"ratio {name}: {value:.2f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
