"""Benchmark: do codes agree between precisions? fp32 against bf16 (``precision="auto"`` here).

Data: the first ``--per-class`` CIFAR-10 test images of each class (``../shared/datasets/cifar10``),
at ``--image-size`` px through EfficientNet-Lite0 with its offline ImageNet weights (pooled
features, ``DFSNet(dfs=False)``), extracted once in fp32 (the baseline) and once in bf16 autocast
+ channels_last, in the same run. Encoders fitted on the fp32 features of the even-numbered
images: the paper's 64-bit gain ratio + sample-mean hash, and 64-bit ITQ. Measured on the odd
ones: the share of codes identical between the two precisions, the mean number of differing
bits, and mAP@100 of bf16 queries against an fp32 database (an index built in one precision and
searched in the other) against fp32 / fp32.

Usage: .venv/bin/python benchmarks/bench_precision_codes.py [--per-class 200] [--image-size 128]
Writes benchmarks/results/bench_precision_codes.json. Skips (exit 0) without the dataset.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "bench_precision_codes.json"
CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=CIFAR10)
    parser.add_argument("--per-class", type=int, default=200, help="test images per class (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=128, help="(default: %(default)s)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not (args.data / "test").is_dir():
        print(f"skipped: CIFAR-10 image folders not found at {args.data / 'test'}")
        return 0

    from dfsnet._io import atomic_write_text
    from dfsnet.data import ImageFolder, Subset, build_transforms
    from dfsnet.eval import hamming_map
    from dfsnet.features import extract_features
    from dfsnet.hashing import make_encoder
    from dfsnet.models import DFSNet, create_backbone
    from dfsnet.precision import resolve_precision

    net = DFSNet(create_backbone("efficientnet_lite0", pretrained=True), 10, dfs=False).eval()
    folder = ImageFolder(args.data / "test", transform=build_transforms(net.meta, train=False,
                                                                        image_size=args.image_size))
    picks = np.concatenate([np.flatnonzero(folder.targets == c)[: args.per_class] for c in range(10)])
    data = Subset(folder, np.sort(picks))
    labels = data.targets
    feats = {p: extract_features(net, data, precision=p, device="cpu") for p in ("fp32", "auto")}
    fit, held = np.arange(0, len(data), 2), np.arange(1, len(data), 2)
    rows = {}
    for name, enc in (("paper", make_encoder("gain_ratio", "sample_mean", n_bits=64)),
                      ("itq", make_encoder(None, "itq", n_bits=64))):
        enc.fit(feats["fp32"][fit], labels[fit])
        a, b = enc.transform(feats["fp32"][held]), enc.transform(feats["auto"][held])
        diff = np.unpackbits(a ^ b, axis=1).sum(axis=1)
        same = hamming_map(a, a, labels[held], labels[held], k=100).map
        cross = hamming_map(b, a, labels[held], labels[held], k=100).map
        rows[name] = {"codes_identical": float((diff == 0).mean()), "mean_bits_differing": float(diff.mean()),
                      "map_at_100_fp32_queries_fp32_db": same, "map_at_100_bf16_queries_fp32_db": cross}
        print(f"{name}: {100 * rows[name]['codes_identical']:.1f} % of 64-bit codes identical between fp32 and "
              f"{resolve_precision('auto', 'cpu').name}, {diff.mean():.3f} bits differ on average; mAP@100 "
              f"fp32/fp32 {same:.4f}, bf16 queries against fp32 codes {cross:.4f}")
    result = {"benchmark": "bench_precision_codes", "baseline": "fp32 features and codes, same run",
              "auto_resolves_to": resolve_precision("auto", "cpu").name, "images": int(len(data)),
              "held_out": int(len(held)), "image_size": args.image_size, "rows": rows,
              "load_average": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
