"""Benchmark: HammingIndex exact search against bare faiss, FloatIndex, and IVF recall and speed-up.

1. Flat: HammingIndex(kind="flat") searching 1,000 queries x 1,000,000 uniformly random 64-bit
   codes for k=100, against bare ``faiss.IndexBinaryFlat`` on the same codes, measured in the
   same run and interleaved (target: at least 0.9x its throughput), with 1 and with 2 OpenMP
   threads for both. The wrapper's results are checked to equal faiss's. Wall-clock and
   process CPU time are both recorded; the target is judged on the 1-thread CPU time, which
   other processes on a shared machine cannot inflate, and the wrapper's own work per call
   is timed alone.
2. Float: FloatIndex (squared L2, exact) on 1280-d float32 features against HammingIndex on
   64-bit codes of the same items (the paper's per-vector mean-threshold rule on 64 of the
   features). 1M x 1280 float32 is 5 GB, so this part uses --n-float items (200,000 by default,
   1 GB) and both indexes hold exactly those items; the float time at --n-db items is also
   given, extrapolated linearly (flat search is linear in the database size) and labelled so.
   Features are synthetic but shaped like pooled CNN features: ReLU of Gaussian noise plus one
   of 10 class means.
3. IVF: HammingIndex(kind="ivf") on --n-db clustered codes (1,000 random centres, 10% of the
   bits flipped; queries drawn the same way): training time, and per nprobe the recall@k
   against the exact flat result (id-based, ties in ascending id on both sides, and tie-aware:
   the share of returned codes within the exact k-th distance) and the speed-up over flat.

Timings are wall-clock on a shared machine: the ratios, measured in the same run, are what
matter. Usage: .venv/bin/python benchmarks/bench_index.py [--n-db 1000000] [--n-queries 1000]
[--k 100] [--quick]. Writes benchmarks/results/bench_index.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import faiss
import numpy as np

from dfsnet._io import atomic_write_text
from dfsnet.index import FloatIndex, HammingIndex

TARGET_RATIO = 0.9
RESULTS = Path(__file__).resolve().parent / "results" / "bench_index.json"


def timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def timed_cpu(fn, *args) -> tuple[float, float, object]:
    """Wall-clock and process CPU seconds of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu, out


def bench_flat(db: np.ndarray, q: np.ndarray, k: int, threads: list[int], repeats: int) -> dict:
    bare = faiss.IndexBinaryFlat(64)
    bare.add(db)
    out = {}
    for n_threads in threads:
        index = HammingIndex(64, n_threads=n_threads)
        index.add(db)
        index.search(q[:1], 1)  # one-time per process: faiss's tie order is checked
        previous = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(n_threads)
        try:
            bare_t, wrap_t, bare_c, wrap_c = [], [], [], []
            for _ in range(repeats):  # interleaved, so load changes hit both alike
                t, c, (bare_d, bare_i) = timed_cpu(bare.search, q, k)
                bare_t.append(t)
                bare_c.append(c)
                t, c, (wrap_d, wrap_i) = timed_cpu(index.search, q, k)
                wrap_t.append(t)
                wrap_c.append(c)
        finally:
            faiss.omp_set_num_threads(previous)
        identical = bool(np.array_equal(bare_d, wrap_d) and np.array_equal(bare_i, wrap_i))
        ratio_best = min(bare_t) / min(wrap_t)
        ratio_median = statistics.median(b / w for b, w in zip(bare_t, wrap_t))
        ratio_cpu = min(bare_c) / min(wrap_c)
        out[str(n_threads)] = {
            "faiss_seconds": bare_t, "wrapper_seconds": wrap_t,
            "faiss_cpu_seconds": bare_c, "wrapper_cpu_seconds": wrap_c,
            "faiss_queries_per_second": len(q) / min(bare_t),
            "wrapper_queries_per_second": len(q) / min(wrap_t),
            "throughput_ratio_best": ratio_best, "throughput_ratio_median_of_pairs": ratio_median,
            "cpu_time_ratio_best": ratio_cpu, "results_identical_to_faiss": identical,
        }
        print(f"flat, {n_threads} thread(s): faiss.IndexBinaryFlat best {min(bare_t):.3f} s, HammingIndex best "
              f"{min(wrap_t):.3f} s -> throughput ratio {ratio_best:.3f} (median of pairs {ratio_median:.3f}; "
              f"CPU time {min(bare_c):.3f} / {min(wrap_c):.3f} s = {ratio_cpu:.3f}); "
              f"results identical: {identical}")
    # The wrapper's own work per call (input checks, position -> id mapping), timed alone.
    index = HammingIndex(64)
    index.add(db)
    _, pos = bare.search(q, k)
    start = time.perf_counter()
    for _ in range(20):
        index._check_codes(q, "q")
        index._ids[pos]
    own = out["wrapper_own_seconds_per_call"] = (time.perf_counter() - start) / 20
    print(f"flat: the wrapper's own work (input checks, id mapping) {own * 1e3:.2f} ms per call")
    return out


def make_features(gen: np.random.Generator, n: int, dim: int, means: np.ndarray) -> np.ndarray:
    x = gen.standard_normal((n, dim), dtype=np.float32)
    x += means[gen.integers(0, len(means), n)]
    return np.maximum(x, 0, out=x)


def mean_threshold_codes(x: np.ndarray, n_bits: int) -> np.ndarray:
    """The paper's rule on the first n_bits features: bit = value >= the vector's own mean."""
    sub = x[:, :n_bits]
    return np.packbits(sub >= sub.mean(axis=1, keepdims=True), axis=1)


def bench_float(args, gen: np.random.Generator, flat_1m_seconds: float | None) -> dict:
    means = gen.standard_normal((10, args.dim)).astype(np.float32)
    float_index = FloatIndex(args.dim, metric="l2")
    codes = []
    for start in range(0, args.n_float, 20_000):  # never hold the features twice
        x = make_features(gen, min(20_000, args.n_float - start), args.dim, means)
        float_index.add(x)
        codes.append(mean_threshold_codes(x, 64))
    ham_index = HammingIndex(64)
    ham_index.add(np.concatenate(codes))
    q = make_features(gen, args.n_queries, args.dim, means)
    q_codes = mean_threshold_codes(q, 64)
    float_t, _ = timed(float_index.search, q, args.k)
    ham_t = min(timed(ham_index.search, q_codes, args.k)[0] for _ in range(args.repeats))
    speedup = float_t / ham_t
    out = {"n_items": args.n_float, "dim": args.dim, "float_seconds": float_t, "hamming_seconds": ham_t,
           "speedup_same_items": speedup, "bytes_per_item": {"float": 4 * args.dim, "hamming": 8}}
    print(f"float: FloatIndex(l2) on {args.n_float} x {args.dim} float32 {float_t:.2f} s vs HammingIndex on "
          f"the same items' 64-bit codes {ham_t:.3f} s -> Hamming {speedup:.0f}x faster")
    if flat_1m_seconds is not None and args.n_db != args.n_float:
        extrapolated = float_t * args.n_db / args.n_float
        out["float_seconds_extrapolated_to_n_db"] = extrapolated
        out["speedup_at_n_db_float_extrapolated"] = extrapolated / flat_1m_seconds
        print(f"float at {args.n_db} items (EXTRAPOLATED linearly from {args.n_float}): {extrapolated:.1f} s vs "
              f"HammingIndex measured {flat_1m_seconds:.3f} s -> {extrapolated / flat_1m_seconds:.0f}x")
    return out


def clustered_codes(gen: np.random.Generator, centres: np.ndarray, n: int, flip: float) -> np.ndarray:
    out = np.empty((n, centres.shape[1] // 8), dtype=np.uint8)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        flips = gen.random((stop - start, centres.shape[1])) < flip
        out[start:stop] = np.packbits(centres[gen.integers(0, len(centres), stop - start)] ^ flips, axis=1)
    return out


def bench_ivf(args, gen: np.random.Generator) -> dict:
    centres = gen.random((1000, 64)) < 0.5
    db = clustered_codes(gen, centres, args.n_db, 0.1)
    q = clustered_codes(gen, centres, args.n_queries, 0.1)
    flat = HammingIndex(64)
    flat.add(db)
    flat_t = min(timed(flat.search, q, args.k)[0] for _ in range(args.repeats))
    ref_d, ref_i = flat.search(q, args.k)
    ivf = HammingIndex(64, kind="ivf")
    train_t, _ = timed(ivf.train, db)
    add_t, _ = timed(ivf.add, db)
    print(f"ivf: {args.n_db} clustered codes, nlist {ivf.nlist_}: trained in {train_t:.1f} s, added in "
          f"{add_t:.2f} s; flat search {flat_t:.3f} s")
    sweep = []
    for nprobe in sorted(set(args.nprobe) | {16}):
        ivf.nprobe = nprobe
        t = min(timed(ivf.search, q, args.k)[0] for _ in range(args.repeats))
        d, i = ivf.search(q, args.k)
        recall = float(np.mean([np.intersect1d(a, b).size for a, b in zip(i, ref_i)]) / args.k)
        recall_ties = float(np.mean(((d <= ref_d[:, -1:]) & (i >= 0)).sum(1)) / args.k)
        sweep.append({"nprobe": nprobe, "default": nprobe == 16, "seconds": t, "speedup_vs_flat": flat_t / t,
                      f"recall_at_{args.k}": recall, "recall_tie_aware": recall_ties})
        print(f"  nprobe {nprobe:3d}{' (default)' if nprobe == 16 else '          '}: {t:.3f} s, "
              f"{flat_t / t:5.1f}x flat, recall@{args.k} {recall:.4f} (tie-aware {recall_ties:.4f})")
    return {"n_db": args.n_db, "centres": 1000, "bit_flip": 0.1, "nlist": ivf.nlist_, "train_seconds": train_t,
            "add_seconds": add_t, "flat_seconds": flat_t, "sweep": sweep}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-db", type=int, default=1_000_000, help="codes in the flat and IVF databases")
    parser.add_argument("--n-queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--n-float", type=int, default=200_000, help="items in the float comparison")
    parser.add_argument("--dim", type=int, default=1280, help="float feature length")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--nprobe", type=int, nargs="+", default=[1, 4, 16, 64], help="IVF nprobe sweep")
    parser.add_argument("--repeats", type=int, default=7, help="timed searches per measurement (best reported)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["flat", "float", "ivf"])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 100k codes, 200 queries, 20k float items, 2 repeats")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.n_db, args.n_queries, args.n_float, args.repeats = 100_000, 200, 20_000, 2

    gen = np.random.default_rng(args.seed)
    load_before = os.getloadavg()[0]
    print(f"faiss {faiss.__version__}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, "
          f"load average {load_before:.2f} on {os.cpu_count()} CPUs")
    out = {"benchmark": "bench_index", "target_throughput_ratio": TARGET_RATIO}
    flat_seconds = None
    if "flat" not in args.skip:
        db = gen.integers(0, 256, size=(args.n_db, 8), dtype=np.uint8)
        q = gen.integers(0, 256, size=(args.n_queries, 8), dtype=np.uint8)
        out["flat"] = bench_flat(db, q, args.k, args.threads, args.repeats)
        one = out["flat"].get("1")
        if one:
            # Judged on CPU time: with one thread it is the wall time the search takes when no
            # other process preempts it, which wall-clock cannot show on a shared machine.
            out["meets_target"] = one["cpu_time_ratio_best"] >= TARGET_RATIO
            flat_seconds = min(one["wrapper_seconds"])
            print(f"target: HammingIndex at least {TARGET_RATIO}x bare faiss throughput (1 thread, CPU time): "
                  f"{'met' if out['meets_target'] else 'NOT met'} ({one['cpu_time_ratio_best']:.3f}; "
                  f"wall-clock {one['throughput_ratio_best']:.3f})")
        del db, q
    if "float" not in args.skip:
        out["float"] = bench_float(args, gen, flat_seconds)
    if "ivf" not in args.skip:
        out["ivf"] = bench_ivf(args, gen)
    out.update({
        "config": vars(args) | {"out": str(args.out)},
        "environment": {"python": sys.version.split()[0], "numpy": np.__version__, "faiss": faiss.__version__,
                        "platform": platform.platform(), "cpu_count": os.cpu_count(),
                        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                        "load_average_at_start": load_before, "load_average_at_end": os.getloadavg()[0]},
    })
    atomic_write_text(args.out, json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
