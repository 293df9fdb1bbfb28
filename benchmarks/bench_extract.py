"""Benchmark: feature-extraction throughput of ``dfsnet.features.extract_features`` on CPU.

Model: EfficientNet-Lite0 with its offline ImageNet weights (``create_backbone("efficientnet_lite0",
pretrained=True)``), as the "Ori" DFSNet (``dfs=False``: backbone + global average pooling), so the
network computes exactly what the baseline computes.

Baseline, measured in the same run on the same in-memory tensors: a bare timm loop, a fresh
``timm.create_model("tf_efficientnet_lite0", num_classes=0)`` holding the same weights, in eval mode
under ``torch.inference_mode``, calling ``forward_features`` and average pooling on slices of one
preloaded tensor. The pipeline reads the same tensors through a ``TensorDataset``, a DataLoader,
its index-tracking collate and ``DFSNet.features``, and writes into a preallocated float32 array.

Runs alternate (baseline, pipeline, baseline, ...) so that load changes on a shared machine hit
both alike; the ratio uses each side's best repeat (the least disturbed one) and the medians are
reported too. Target: pipeline / baseline >= 0.9 (pipeline overhead at most 10%).

Second part, precision and runtime, at each ``--sizes``, on the same tensors, against the fp32
eager NCHW baseline ``extract_features(precision="fp32", runtime="torch")``:
- ``bf16``: ``extract_features(precision="auto", runtime="torch")`` (bf16 autocast +
  channels_last where the CPU has AMX / AVX512-BF16, see ``dfsnet.precision``);
- ``onnx``: the network exported once (``dfsnet.runtime.export_features``, its time reported
  apart) and run by ``extract_features`` in ONNX Runtime, fp32: what an index build, ``add``,
  search and serve run by default on a CPU.
With the agreement of the pooled features with the baseline's (minimum cosine, relative error).
Target: >= 2.5x the baseline at 224 px.

Usage: .venv/bin/python benchmarks/bench_extract.py [--n-images 512] [--batch-size 64]
       [--image-size 128] [--sizes 128 224] [--repeats 3] [--threads N]
Writes benchmarks/results/bench_extract.json.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import timm
import torch
from torch.utils.data import TensorDataset

from dfsnet._io import atomic_write_text
from dfsnet.features import extract_features
from dfsnet.models import DFSNet, create_backbone

TARGET_RATIO = 0.9
TARGET_PRECISION_RATIO = 2.5  # at 224 px
RESULTS = Path(__file__).resolve().parent / "results" / "bench_extract.json"


def bare_timm(model: torch.nn.Module, images: torch.Tensor, batch_size: int) -> np.ndarray:
    out = np.empty((images.shape[0], model.num_features), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, images.shape[0], batch_size):
            fmap = model.forward_features(images[start:start + batch_size])
            out[start:start + batch_size] = fmap.mean(dim=(2, 3)).numpy()
    return out


def compare_precisions(net: DFSNet, size: int, args) -> dict:
    """fp32 torch (the baseline), bf16 torch and ONNX Runtime at ``size`` px, alternating, same tensors."""
    from dfsnet.precision import resolve_precision
    from dfsnet.runtime import OnnxFeatures, export_features

    torch.manual_seed(1)
    images = torch.randn(args.n_images, 3, size, size)
    dataset = TensorDataset(images, torch.zeros(args.n_images, dtype=torch.int64))
    warm = TensorDataset(images[: args.batch_size], torch.zeros(args.batch_size, dtype=torch.int64))
    t = time.perf_counter()
    graph = OnnxFeatures(export_features(net, (3, size, size)), threads=torch.get_num_threads())
    export_seconds = time.perf_counter() - t
    sides = {"fp32": (net, "fp32"), "bf16": (net, "auto"), "onnx": (graph, "fp32")}

    def run(side, data):
        model, precision = sides[side]
        return extract_features(model, data, batch_size=args.batch_size, device="cpu", precision=precision,
                                runtime="onnx" if side == "onnx" else "torch")

    for side in sides:
        run(side, warm)
    times = {side: [] for side in sides}
    outputs = {}
    for _ in range(args.repeats):
        for side in sides:
            t = time.perf_counter()
            outputs[side] = run(side, dataset)
            times[side].append(time.perf_counter() - t)
    a = outputs["fp32"]
    best = {k: args.n_images / min(v) for k, v in times.items()}
    median = {k: args.n_images / statistics.median(v) for k, v in times.items()}
    agreement = {}
    for side in ("bf16", "onnx"):
        b = outputs[side]
        cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        agreement[side] = {"min_cosine": float(cosine.min()),
                           "relative_error": float(np.linalg.norm(a - b) / np.linalg.norm(a))}
    return {
        "image_size": size, "auto_resolves_to": resolve_precision("auto", "cpu").name,
        "baseline": "extract_features(precision='fp32', runtime='torch'): fp32, NCHW, eager", "seconds": times,
        "onnx_export_seconds": export_seconds,
        "images_per_s_best": best, "images_per_s_median": median,
        "ratio_best": {k: best[k] / best["fp32"] for k in ("bf16", "onnx")},
        "ratio_median": {k: median[k] / median["fp32"] for k in ("bf16", "onnx")},
        "agreement_with_fp32": agreement,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-images", type=int, default=512, help="images per timed run (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=128, help="input side in pixels (default: %(default)s)")
    parser.add_argument("--sizes", type=int, nargs="*", default=[128, 224],
                        help="input sides of the precision comparison (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side (default: %(default)s)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON output (default: %(default)s)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    backbone = create_backbone("efficientnet_lite0", pretrained=True)
    net = DFSNet(backbone, num_classes=10, dfs=False).eval()
    bare = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0).eval()
    bare.load_state_dict(backbone.model.state_dict())

    images = torch.randn(args.n_images, 3, args.image_size, args.image_size)
    dataset = TensorDataset(images, torch.zeros(args.n_images, dtype=torch.int64))

    # Warm-up: first calls pay for kernel selection and allocator growth.
    warm = images[: args.batch_size]
    bare_timm(bare, warm, args.batch_size)
    extract_features(net, TensorDataset(warm, torch.zeros(len(warm), dtype=torch.int64)),
                     batch_size=args.batch_size, device="cpu", precision="fp32")

    times = {"baseline": [], "pipeline": []}
    outputs = {}
    for _ in range(args.repeats):
        t = time.perf_counter()
        outputs["baseline"] = bare_timm(bare, images, args.batch_size)
        times["baseline"].append(time.perf_counter() - t)
        t = time.perf_counter()
        # fp32, like the bare loop: this part measures the pipeline's overhead, not the precision.
        outputs["pipeline"] = extract_features(net, dataset, batch_size=args.batch_size, device="cpu",
                                               precision="fp32")
        times["pipeline"].append(time.perf_counter() - t)
    max_diff = float(np.abs(outputs["baseline"] - outputs["pipeline"]).max())

    best = {k: args.n_images / min(v) for k, v in times.items()}
    median = {k: args.n_images / statistics.median(v) for k, v in times.items()}
    ratio = best["pipeline"] / best["baseline"]
    ratio_median = median["pipeline"] / median["baseline"]
    precision = {str(size): compare_precisions(net, size, args) for size in args.sizes}
    result = {
        "benchmark": "bench_extract",
        "model": "efficientnet_lite0 (tf_efficientnet_lite0, offline ImageNet weights), dfs=False",
        "baseline": "bare timm forward_features + mean pool under torch.inference_mode, same tensors",
        "n_images": args.n_images, "batch_size": args.batch_size, "image_size": args.image_size,
        "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
        "seconds": times,
        "images_per_s_best": best, "images_per_s_median": median,
        "ratio_best": ratio, "ratio_median": ratio_median, "target_ratio": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO,
        "max_abs_feature_diff": max_diff,
        "precision": precision,
        "target_precision_ratio_224": TARGET_PRECISION_RATIO,
        "machine": {"cpu_count": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], "torch": torch.__version__,
                    "timm": timm.__version__, "onnxruntime": importlib.metadata.version("onnxruntime"),
                    "python": platform.python_version()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"bare timm loop : {best['baseline']:.1f} images/s (best of {args.repeats}; median "
          f"{median['baseline']:.1f})")
    print(f"extract_features: {best['pipeline']:.1f} images/s (best of {args.repeats}; median "
          f"{median['pipeline']:.1f})")
    print(f"ratio pipeline / bare timm: {ratio:.3f} (median {ratio_median:.3f}; target >= {TARGET_RATIO}); "
          f"max |feature difference| {max_diff:.2e}")
    for size, row in precision.items():
        speed = row["images_per_s_best"]
        print(f"{size} px: baseline torch fp32 eager NCHW {speed['fp32']:.1f} images/s")
        for side, what in (("bf16", f"torch {row['auto_resolves_to']} + channels_last"),
                           ("onnx", "ONNX Runtime fp32")):
            agree = row["agreement_with_fp32"][side]
            print(f"  {what}: {speed[side]:.1f} images/s, ratio {row['ratio_best'][side]:.2f} (median "
                  f"{row['ratio_median'][side]:.2f}); features vs baseline: min cosine {agree['min_cosine']:.6f}, "
                  f"relative error {agree['relative_error']:.2e}")
        print(f"  (ONNX export, once: {row['onnx_export_seconds']:.1f} s)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
