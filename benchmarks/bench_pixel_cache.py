"""Benchmark: feature extraction from the pixel cache against decoding the image files again.

Data: ``--n-images`` (6,000) CIFAR-10 images from ``/work/shared/datasets/cifar10`` (JPEG folders;
the train and test folders as the experiment's pool), the evaluation preprocessing at
``--image-size`` (128) px. Model: EfficientNet-Lite0 with its offline ImageNet weights (Ori),
exported once and run in ONNX Runtime (what extraction runs on a CPU), batch ``--batch-size``
(128), no decoding workers (the experiment's setting, ``num_workers = 0``).

Measured in the same run, images/s of ``extract_features_with_mask``:

* ``baseline``: decoding and preprocessing the files in every pass (no pixel cache);
* ``fill``: the first pass with ``pixel_cache_dir``, which decodes and writes the cache;
* ``cached``: later passes, reading the memory-mapped cache.

Baseline and cached passes alternate for ``--repeats``; best and median are reported, with the
ratio cached / baseline of the best passes, and a check that all passes give the same features
bit for bit.

Usage: OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_pixel_cache.py [--n-images 6000]
       [--repeats 2] [--threads 2]
Writes benchmarks/results/bench_pixel_cache.json. Skips (exit 0, a message) without the dataset.
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

RESULTS = Path(__file__).resolve().parent / "results" / "bench_pixel_cache.json"
CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", type=Path, default=CIFAR10, help="CIFAR-10 image folders")
    parser.add_argument("--n-images", type=int, default=6000)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="alternating baseline / cached passes")
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime threads")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON output")
    args = parser.parse_args()
    if not (args.data / "train").is_dir():
        print(f"skipped: CIFAR-10 image folders not found at {args.data / 'train'}")
        return 0

    import numpy as np
    import torch

    from dfsnet.data import Subset, build_transforms, load_pool
    from dfsnet.features import extract_features_with_mask
    from dfsnet.models import create_backbone
    from dfsnet.train.workflow import build_network

    torch.set_num_threads(args.threads)
    net = build_network(create_backbone("efficientnet_lite0", pretrained=True), 10, dfs=False)
    pool = load_pool("cifar10", root=args.data,
                     transform=build_transforms(net.meta.backbone, train=False, image_size=args.image_size))
    part = Subset(pool, np.arange(len(pool) - args.n_images, len(pool)))
    common = dict(batch_size=args.batch_size, num_workers=0, runtime="onnx")
    extract_features_with_mask(net, Subset(part, np.arange(args.batch_size)), **common)  # exports the graph

    def rate(**kw):
        start = time.perf_counter()
        features, _ = extract_features_with_mask(net, part, **common, **kw)
        return len(part) / (time.perf_counter() - start), features

    rates: dict[str, list[float]] = {"baseline": [], "fill": [], "cached": []}
    with tempfile.TemporaryDirectory() as cache:
        base_rate, reference = rate()
        rates["baseline"].append(base_rate)
        fill_rate, filled = rate(pixel_cache_dir=cache)
        rates["fill"].append(fill_rate)
        same = np.array_equal(filled, reference)
        for _ in range(args.repeats):
            r, f = rate(pixel_cache_dir=cache)
            rates["cached"].append(r)
            same &= np.array_equal(f, reference)
            r, f = rate()
            rates["baseline"].append(r)
            same &= np.array_equal(f, reference)
        cache_bytes = sum(p.stat().st_size for p in Path(cache).iterdir())
    for name, values in rates.items():
        print(f"{name:8s} best {max(values):6.1f} images/s, median {statistics.median(values):6.1f} "
              f"({len(values)} pass(es))")
    ratio = max(rates["cached"]) / max(rates["baseline"])
    print(f"cached / baseline = {ratio:.2f}x; features identical in every pass: {same}; "
          f"cache {cache_bytes / 1e6:.0f} MB")
    out = {"benchmark": "bench_pixel_cache",
           "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                       "load_average": list(os.getloadavg()), "torch": torch.__version__},
           "images_per_s": rates, "ratio_cached_over_baseline": ratio, "identical": bool(same),
           "cache_bytes": cache_bytes}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
