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

Roofline: the floating-point operations of one training step per image of each head (forward and
backward, counted by ``torch.utils.flop_counter.FlopCounterMode`` on the cached maps' shape) and
this CPU's best dense matrix product (2048 x 2048, fp32 and bf16, best of ``--gemm-repeats``,
measured in the same run), so that each epoch's achieved GFLOP/s can be read against what the
CPU does at best, and the DFS epoch the target "<= 3x the Ori epoch" allows against the shortest
DFS epoch this CPU could run at its matrix-product peak.

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
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "bench_head_epoch.json"
CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10"


def step_flops_per_image(model, fmap_shape: tuple[int, int, int], batch_size: int) -> float:
    """FLOPs of one head-only training step (forward, cross-entropy, backward) per image.

    ``fmap_shape`` is one cached map's (D, h, w). The maps themselves need no gradient, as in
    training on the cache; the optimiser's update is left out (elementwise, not counted).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    fmap = torch.randn(batch_size, *fmap_shape)
    target = torch.zeros(batch_size, dtype=torch.long)
    model.train()
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(model.head_forward(fmap), target).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch_size


def gemm_gflops(dtype, *, n: int = 2048, repeats: int = 7) -> float:
    """Best GFLOP/s of an (n, n) @ (n, n) matrix product in ``dtype`` on this CPU (2 warm-ups)."""
    import torch

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


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
    parser.add_argument("--gemm-repeats", type=int, default=7, help="timed matrix products per precision "
                        "for the roofline (default: %(default)s)")
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

    # Roofline, after the timed epochs so that nothing else runs beside them.
    with torch.inference_mode():
        fmap_shape = tuple(backbone(train_set[0][0].unsqueeze(0)).shape[1:])
    flops = {name: step_flops_per_image(DFSNet(backbone, len(pool.classes), dfs=dfs), fmap_shape, args.batch_size)
             for name, dfs in (("dfs", True), ("ori", False))}
    peak = {"fp32": gemm_gflops(torch.float32, repeats=args.gemm_repeats),
            "bf16": gemm_gflops(torch.bfloat16, repeats=args.gemm_repeats)}
    for r in runs.values():
        r["achieved_gflops"] = flops[r["head"]] * len(train_set) / r["median_epoch_train_seconds"] / 1e9
    roofline: dict = {"map_shape": list(fmap_shape), "step_mflops_per_image": {k: v / 1e6 for k, v in flops.items()},
                      "flops_ratio_dfs_over_ori": flops["dfs"] / flops["ori"], "gemm_peak_gflops": peak}
    for p in ("fp32", "bf16"):
        if f"ori_{p}" not in runs:
            continue
        allowed = 3 * runs[f"ori_{p}"]["median_epoch_train_seconds"]
        roofline[f"target_{p}"] = {
            "allowed_dfs_epoch_seconds": allowed,
            "needed_gflops": flops["dfs"] * len(train_set) / allowed / 1e9,
            "dfs_epoch_seconds_at_peak": flops["dfs"] * len(train_set) / (peak[p] * 1e9),
        }
        roofline[f"target_{p}"]["needed_over_peak"] = roofline[f"target_{p}"]["needed_gflops"] / peak[p]

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
        "roofline": roofline,
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
    print(f"training step per image: DFS {flops['dfs'] / 1e6:.1f} MFLOP, Ori {flops['ori'] / 1e6:.3f} MFLOP "
          f"({flops['dfs'] / flops['ori']:.0f}x); matrix-product peak fp32 {peak['fp32']:.0f}, "
          f"bf16 {peak['bf16']:.0f} GFLOP/s")
    for key, r in runs.items():
        print(f"{key}: {r['achieved_gflops']:.0f} GFLOP/s achieved")
    for p in ("fp32", "bf16"):
        if f"target_{p}" in roofline:
            t = roofline[f"target_{p}"]
            print(f"target {p}: a DFS epoch of <= {t['allowed_dfs_epoch_seconds']:.2f} s needs "
                  f"{t['needed_gflops']:.0f} GFLOP/s, {t['needed_over_peak']:.2f}x this CPU's {p} matrix-product "
                  f"peak (at the peak: {t['dfs_epoch_seconds_at_peak']:.2f} s)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
