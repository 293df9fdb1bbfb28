"""Benchmark: do codes agree between precisions and runtimes? torch fp32 against bf16 and ONNX Runtime.

Data: the first ``--per-class`` CIFAR-10 test images of each class (``../shared/datasets/cifar10``),
at ``--image-size`` px through EfficientNet-Lite0 with its offline ImageNet weights (pooled
features, ``DFSNet(dfs=False)``), extracted in torch fp32 (the baseline), in torch bf16 autocast +
channels_last (``precision="auto"``, ``runtime="torch"``) and in ONNX Runtime fp32 (``runtime="onnx"``,
what an index builds and searches with by default on a CPU), in the same run. Encoders fitted on
the fp32 features of the even-numbered images: the paper's 64-bit gain ratio + sample-mean hash,
and 64-bit ITQ. Measured on the odd ones: the share of codes identical with the baseline's, the mean number of differing
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
    feats = {"fp32": extract_features(net, data, precision="fp32", runtime="torch", device="cpu"),
             "auto": extract_features(net, data, precision="auto", runtime="torch", device="cpu"),
             "onnx": extract_features(net, data, runtime="onnx", device="cpu")}
    fit, held = np.arange(0, len(data), 2), np.arange(1, len(data), 2)
    rows = {}
    for name, enc in (("paper", make_encoder("gain_ratio", "sample_mean", n_bits=64)),
                      ("itq", make_encoder(None, "itq", n_bits=64))):
        enc.fit(feats["fp32"][fit], labels[fit])
        a = enc.transform(feats["fp32"][held])
        same = hamming_map(a, a, labels[held], labels[held], k=100).map
        rows[name] = {"map_at_100_fp32_queries_fp32_db": same}
        for side, what in (("auto", f"torch {resolve_precision('auto', 'cpu').name}"), ("onnx", "ONNX Runtime")):
            b = enc.transform(feats[side][held])
            diff = np.unpackbits(a ^ b, axis=1).sum(axis=1)
            cross = hamming_map(b, a, labels[held], labels[held], k=100).map
            label = "bf16" if side == "auto" else "onnx"
            rows[name] |= {f"codes_identical_{label}": float((diff == 0).mean()),
                           f"mean_bits_differing_{label}": float(diff.mean()),
                           f"map_at_100_{label}_queries_fp32_db": cross}
            print(f"{name}: {100 * (diff == 0).mean():.1f} % of 64-bit codes identical between torch fp32 and "
                  f"{what}, {diff.mean():.3f} bits differ on average; mAP@100 fp32/fp32 {same:.4f}, "
                  f"{what} queries against fp32 codes {cross:.4f}")
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
