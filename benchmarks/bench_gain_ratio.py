"""Benchmark: gain ratio of 2,048 features x 50,000 samples (10 classes) with GainRatioSelector.

Baseline, measured in the same run: a straightforward implementation that loops over the features
in Python and, per feature, sorts for the quantile edges, bins with ``searchsorted`` and sums the
entropies of equations (1)-(5) bin by bin. It is timed on the first ``--baseline-features`` columns
and extrapolated linearly to all of them (its cost is the same for every column); its scores are
checked against the vectorised ones on those columns.

Data: synthetic but structured like pooled CNN features: ReLU of Gaussian noise plus class means
on a quarter of the features (strengths varying per feature), so many values tie at 0.

Usage: .venv/bin/python benchmarks/bench_gain_ratio.py [--n-samples 50000] [--n-features 2048] ...
Writes benchmarks/results/bench_gain_ratio.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

from dfsnet._io import atomic_write_text
from dfsnet.selection import GainRatioSelector

TARGET_SECONDS = 5.0
RESULTS = Path(__file__).resolve().parent / "results" / "bench_gain_ratio.json"


def make_data(n: int, d: int, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    gen = np.random.default_rng(seed)
    y = gen.integers(0, n_classes, n)
    informative = gen.random(d) < 0.25
    means = gen.standard_normal((n_classes, d)).astype(np.float32) * (informative * gen.random(d)).astype(np.float32)
    X = gen.standard_normal((n, d), dtype=np.float32)
    X += means[y]
    np.maximum(X, 0, out=X)
    return X, y


def _entropy(counts: np.ndarray) -> float:
    total = counts.sum()
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum())


def baseline_scores(X: np.ndarray, y: np.ndarray, n_bins: int) -> np.ndarray:
    """Per-feature Python loop: quantile edges, searchsorted, then equations (1)-(5) bin by bin."""
    n = X.shape[0]
    n_classes = int(y.max()) + 1
    h_d = _entropy(np.bincount(y, minlength=n_classes))
    positions = (np.arange(1, n_bins) * n) // n_bins
    out = np.empty(X.shape[1])
    for j in range(X.shape[1]):
        x = X[:, j]
        edges = np.sort(x)[positions]
        codes = np.searchsorted(edges, x, side="right")
        h_d_a = 0.0
        sizes = []
        for b in range(n_bins):
            labels = y[codes == b]
            if labels.size:
                h_d_a += labels.size / n * _entropy(np.bincount(labels, minlength=n_classes))
                sizes.append(labels.size)
        split = _entropy(np.asarray(sizes, dtype=np.float64))
        out[j] = (h_d - h_d_a) / split if len(sizes) > 1 else 0.0
    return out


def time_fit(X, y, discretizer: str, n_bins: int, repeats: int) -> tuple[list[float], np.ndarray]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sel = GainRatioSelector(discretizer=discretizer, n_bins=n_bins).fit(X, y)
        times.append(time.perf_counter() - start)
    return times, sel.scores_


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-samples", type=int, default=50_000)
    parser.add_argument("--n-features", type=int, default=2048)
    parser.add_argument("--n-classes", type=int, default=10)
    parser.add_argument("--n-bins", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="timed fits per discretizer (best and median reported)")
    parser.add_argument("--baseline-features", type=int, default=64,
                        help="columns the per-feature loop baseline is timed on (extrapolated to all)")
    parser.add_argument("--discretizers", nargs="+", default=["quantile", "uniform", "c45"],
                        choices=["quantile", "uniform", "c45"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    X, y = make_data(args.n_samples, args.n_features, args.n_classes, args.seed)
    load_before = os.getloadavg()[0]
    print(f"data: {args.n_samples} samples x {args.n_features} features, {args.n_classes} classes, "
          f"{X.nbytes / 2**20:.0f} MiB float32; load average {load_before:.2f} on {os.cpu_count()} CPUs")

    results = {}
    for disc in args.discretizers:
        times, scores = time_fit(X, y, disc, args.n_bins, args.repeats)
        results[disc] = {"seconds_best": min(times), "seconds_median": statistics.median(times),
                         "seconds_all": times, "scores": scores}
        print(f"GainRatioSelector(discretizer={disc!r}): best {min(times):.3f} s, "
              f"median {statistics.median(times):.3f} s over {args.repeats} fits")

    m = min(args.baseline_features, args.n_features)
    start = time.perf_counter()
    base = baseline_scores(X[:, :m], y, args.n_bins)
    base_seconds = (time.perf_counter() - start) * args.n_features / m
    out = {"baseline": {"name": "per-feature Python loop (sort, searchsorted, entropies per bin), quantile bins",
                        "timed_features": m, "seconds_extrapolated": base_seconds}}
    print(f"baseline per-feature loop: {base_seconds:.2f} s (timed on {m} features, extrapolated to "
          f"{args.n_features})")
    if "quantile" in results:
        diff = float(np.max(np.abs(results["quantile"]["scores"][:m] - base)))
        best = results["quantile"]["seconds_best"]
        out["baseline"]["max_abs_score_difference"] = diff
        out["speedup_vs_baseline"] = base_seconds / best
        out["target_seconds"] = TARGET_SECONDS
        out["meets_target"] = best <= TARGET_SECONDS
        print(f"speed-up of quantile over the baseline: {base_seconds / best:.1f}x "
              f"(max |score difference| {diff:.2e}); target {TARGET_SECONDS} s: "
              f"{'met' if best <= TARGET_SECONDS else 'NOT met'} ({best:.3f} s)")

    # Peak memory of one fit per discretizer beyond X itself (numpy allocations are traced).
    peaks = {}
    for disc in args.discretizers:
        tracemalloc.start()
        GainRatioSelector(discretizer=disc, n_bins=args.n_bins).fit(X, y)
        peaks[disc] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    print("peak extra memory per fit: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in peaks.items()))

    out.update({
        "benchmark": "bench_gain_ratio",
        "config": vars(args) | {"out": str(args.out)},
        "environment": {"python": sys.version.split()[0], "numpy": np.__version__,
                        "platform": platform.platform(), "cpu_count": os.cpu_count(),
                        "load_average_at_start": load_before},
        "fit": {k: {kk: vv for kk, vv in v.items() if kk != "scores"} for k, v in results.items()},
        "peak_extra_memory_mib": peaks,
    })
    atomic_write_text(args.out, json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
