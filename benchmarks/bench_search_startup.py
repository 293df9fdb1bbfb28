"""Benchmark: ``dfsnet search`` wall time from start-up to the first result, on a 10,000-image index.

Index: the CIFAR-10 test folder (``../shared/datasets/cifar10/test``, 10,000 images) built without
a model (``dfsnet index build --images ... --store-features``: EfficientNet-Lite0's pooled features,
64-bit ITQ, 224 px), which also writes the index's ONNX graph. It is built once into ``--index``
(reused when present) and its build time recorded.

Timed, each as a fresh process (``dfsnet search INDEX QUERY -k 10``), alternating so that load
changes hit both alike, ``--repeats`` times:
- ``--runtime onnx``: the shipped default on a CPU (the graph in ONNX Runtime, no torch import);
- ``--runtime torch``: the baseline, the path every search took before (torch + timm, bf16).
Also one call with ``--queries`` images (``dfsnet search INDEX Q1 ... Qn --json``) per runtime.
Target: the first result in under 2 s (median wall time of ``--runtime onnx``).

Usage: .venv/bin/python benchmarks/bench_search_startup.py [--index DIR] [--repeats 5] [--queries 100]
Writes benchmarks/results/bench_search_startup.json. Skips (exit 0) without the dataset.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from dfsnet._io import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results" / "bench_search_startup.json"
CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10"
DFSNET = [sys.executable, "-m", "dfsnet.cli"]
TARGET_SECONDS = 2.0


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall and user+system CPU seconds of one run of ``cmd`` (which must succeed)."""
    before = os.times()
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - t
    after = os.times()
    return wall, (after.children_user - before.children_user) + (after.children_system - before.children_system)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=CIFAR10)
    parser.add_argument("--index", type=Path, default=Path("/tmp/dfsnet_bench/cifar10_test_onnx.idx"))
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per runtime (default: %(default)s)")
    parser.add_argument("--queries", type=int, default=100, help="images of the batch call (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    test = args.data / "test"
    if not test.is_dir():
        print(f"skipped: CIFAR-10 image folders not found at {test}")
        return 0
    env_note = os.environ.get("DFSNET_RUNTIME")
    if env_note:
        print(f"note: DFSNET_RUNTIME={env_note} is set; the commands below name their runtime explicitly")

    build_seconds = None
    if not (args.index / "manifest.json").is_file():
        args.index.parent.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        subprocess.run([*DFSNET, "index", "build", str(args.index), "--images", str(test), "--store-features",
                        "--runtime", "onnx", "--no-progress"], check=True)
        build_seconds = time.perf_counter() - t
    manifest = json.loads((args.index / "manifest.json").read_text())
    if not manifest.get("onnx"):
        print(f"error: {args.index} has no ONNX graph; remove it and run again", file=sys.stderr)
        return 1
    queries = sorted(str(p) for p in (test / "cat").iterdir())[: args.queries]
    runs = {"onnx": {"wall": [], "cpu": []}, "torch": {"wall": [], "cpu": []}}
    for _ in range(args.repeats):
        for runtime in runs:
            wall, cpu = timed([*DFSNET, "search", str(args.index), queries[0], "-k", "10", "--runtime", runtime])
            runs[runtime]["wall"].append(wall)
            runs[runtime]["cpu"].append(cpu)
    batch = {runtime: timed([*DFSNET, "search", str(args.index), *queries, "-k", "10", "--json",
                             "--runtime", runtime]) for runtime in runs}
    median = {r: statistics.median(v["wall"]) for r, v in runs.items()}
    result = {
        "benchmark": "bench_search_startup", "index": str(args.index), "count": manifest["count"],
        "image_size": manifest["image_size"], "bits": manifest["bits"], "index_build_seconds": build_seconds,
        "baseline": "dfsnet search --runtime torch (torch + timm, precision auto), same index, same run",
        "runs": runs, "median_wall_seconds": median,
        "ratio_torch_over_onnx": median["torch"] / median["onnx"],
        "batch_call": {"queries": len(queries), **{r: {"wall": w, "cpu": c} for r, (w, c) in batch.items()}},
        "target_seconds": TARGET_SECONDS, "meets_target": median["onnx"] < TARGET_SECONDS,
        "load_average": os.getloadavg(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    if build_seconds is not None:
        print(f"built {args.index}: {manifest['count']} images in {build_seconds:.1f} s")
    for r, v in runs.items():
        print(f"dfsnet search --runtime {r}: median {median[r]:.2f} s wall (min {min(v['wall']):.2f}, max "
              f"{max(v['wall']):.2f}), {statistics.median(v['cpu']):.2f} s CPU, {args.repeats} runs")
    print(f"ratio torch / onnx: {result['ratio_torch_over_onnx']:.2f}; target: onnx under {TARGET_SECONDS} s: "
          f"{'met' if result['meets_target'] else 'missed'}")
    for r, (w, c) in batch.items():
        print(f"{len(queries)} queries in one call, --runtime {r}: {w:.2f} s wall, {c:.2f} s CPU")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
