"""mAP of Hamming ranking: dfsnet.eval.hamming_map against a DeepHash-pytorch style loop.

Case (defaults): 1,000 queries x 54,000 database codes of 64 bits, 10 classes, one core.
Synthetic codes with class structure: every class has a few prototype codes, and every item is
one of its class's prototypes with each bit flipped with probability ``--flip``, so Hamming
distances are small integers that tie heavily, as with real hash codes.

Measured in the same run:

* ``dfsnet``: ``hamming_map`` for mAP@all and mAP@k with ``ties="stable"`` and
  ``ties="expected"`` (best of ``--repeats`` runs; peak traced memory of one extra run).
* ``baseline``: a per-query loop as in DeepHash-pytorch's ``CalcTopMap``: Hamming distance as
  ``0.5 * (n_bits - B_db @ b_q)`` on +-1 float codes, relevance from one-hot labels by ``np.dot``,
  ``np.argsort`` per query (numpy's default, unstable), AP over the hits in the top k.
* A correctness check: the same loop with a stable argsort must give the ``ties="stable"``
  per-query values of dfsnet.

Prints the speed-up ratios and writes JSON to benchmarks/results/bench_map.json.
"""
from __future__ import annotations

import os

# One core, set before numpy is imported so that BLAS and OpenMP pools start with one thread.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
             "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse
import json
import platform
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from dfsnet._io import atomic_write_text
from dfsnet.eval.metrics import hamming_map

RESULTS = Path(__file__).resolve().parent / "results" / "bench_map.json"
TARGETS = {"map_all_stable_seconds": 1.5, "map_at_k_stable_seconds": 1.0, "peak_memory_gb": 0.5}


def make_codes(n_queries, n_db, n_bits, n_classes, *, prototypes, flip, seed):
    """Packed codes uint8 (n, n_bits/8) and int64 labels for queries and database."""
    rng = np.random.default_rng(seed)
    protos = rng.random((n_classes, prototypes, n_bits)) < 0.5

    def draw(n):
        labels = rng.integers(0, n_classes, n)
        bits = protos[labels, rng.integers(0, prototypes, n)] ^ (rng.random((n, n_bits)) < flip)
        return np.packbits(bits, axis=1), labels

    (q, ql), (db, dl) = draw(n_queries), draw(n_db)
    return q, db, ql, dl


def deephash_topk_map(q_pm, db_pm, q_onehot, db_onehot, topk, *, kind="quicksort"):
    """DeepHash-pytorch's CalcTopMap loop (per-query AP@topk), returning per-query values."""
    n_bits = q_pm.shape[1]
    out = np.zeros(q_pm.shape[0])
    for i in range(q_pm.shape[0]):
        gnd = (db_onehot @ q_onehot[i] > 0).astype(np.float32)
        hamm = 0.5 * (n_bits - db_pm @ q_pm[i])
        ind = np.argsort(hamm, kind=kind)
        tgnd = gnd[ind][:topk]
        tsum = int(tgnd.sum())
        if tsum == 0:
            continue
        count = np.arange(1, tsum + 1)
        tindex = np.flatnonzero(tgnd == 1) + 1.0
        out[i] = np.mean(count / tindex)
    return out


def best_time(fn, repeats):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), float(np.median(times)), result


def peak_traced(fn):
    """Peak traced Python/numpy allocation (bytes) during ``fn``."""
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def max_rss() -> int:
    """Peak resident set size of this process so far, bytes (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--n-queries", type=int, default=1000, help="query codes")
    parser.add_argument("--n-db", type=int, default=54000, help="database codes")
    parser.add_argument("--bits", type=int, default=64, help="code length (multiple of 8)")
    parser.add_argument("--classes", type=int, default=10, help="single-label classes")
    parser.add_argument("--prototypes", type=int, default=4, help="prototype codes per class")
    parser.add_argument("--flip", type=float, default=0.15, help="bit-flip probability around a prototype")
    parser.add_argument("--k", type=int, default=1000, help="cut-off of mAP@k")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per measurement, for dfsnet and the baseline (best is kept)")
    parser.add_argument("--baseline-queries", type=int, default=None,
                        help="queries timed in the per-query baseline (default: all); its time is scaled up")
    parser.add_argument("--check-queries", type=int, default=100,
                        help="queries compared value by value against the stable-argsort baseline")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic codes")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON output")
    args = parser.parse_args(argv)
    if args.bits % 8:
        parser.error("--bits must be a multiple of 8")

    q, db, ql, dl = make_codes(args.n_queries, args.n_db, args.bits, args.classes,
                               prototypes=args.prototypes, flip=args.flip, seed=args.seed)
    print(f"case: {args.n_queries} queries x {args.n_db} codes, {args.bits} bits, {args.classes} classes, "
          f"k={args.k}, one thread")

    with threadpool_limits(limits=1):
        rss_before = max_rss()
        ours = {}
        for label, k in (("all", None), (str(args.k), args.k)):
            for ties in ("stable", "expected"):
                best, median, res = best_time(lambda k=k, ties=ties: hamming_map(q, db, ql, dl, k=k, ties=ties),
                                              args.repeats)
                peak = peak_traced(lambda k=k, ties=ties: hamming_map(q, db, ql, dl, k=k, ties=ties))
                ours[f"{label}_{ties}"] = {"k": k, "ties": ties, "map": res.map, "seconds": best,
                                           "median_seconds": median, "peak_traced_bytes": peak,
                                           "per_query": res.per_query}
                print(f"dfsnet   mAP@{label:<7} ties={ties:<8} {res.map:.4f}  {best:.3f} s "
                      f"(median {median:.3f})  peak traced {peak / 2**20:.1f} MiB")

        rss_growth = max_rss() - rss_before
        print(f"dfsnet   peak RSS growth over all runs above: {rss_growth / 2**20:.1f} MiB")

        # Baseline inputs as DeepHash-pytorch keeps them: +-1 float codes, one-hot float labels.
        q_pm = np.unpackbits(q, axis=1).astype(np.float32) * 2 - 1
        db_pm = np.unpackbits(db, axis=1).astype(np.float32) * 2 - 1
        eye = np.eye(args.classes, dtype=np.float32)
        q_oh, db_oh = eye[ql], eye[dl]
        nb = args.baseline_queries or args.n_queries
        base = {}
        for label, topk in (("all", args.n_db), (str(args.k), args.k)):
            best, median, values = best_time(
                lambda topk=topk: deephash_topk_map(q_pm[:nb], db_pm, q_oh[:nb], db_oh, topk), args.repeats)
            scale = args.n_queries / nb
            base[label] = {"map": float(values.mean()), "seconds": best * scale,
                           "median_seconds": median * scale, "queries_timed": nb}
            print(f"baseline mAP@{label:<7} (argsort quicksort)  {values.mean():.4f}  {best * scale:.3f} s "
                  f"(median {median * scale:.3f})")

        nc = min(args.check_queries, args.n_queries)
        check = {}
        for label, topk in (("all", args.n_db), (str(args.k), args.k)):
            values = deephash_topk_map(q_pm[:nc], db_pm, q_oh[:nc], db_oh, topk, kind="stable")
            diff = float(np.abs(values - ours[f"{label}_stable"]["per_query"][:nc]).max())
            check[label] = {"queries": nc, "max_abs_diff": diff}
            print(f"check    mAP@{label:<7} dfsnet stable vs baseline with stable argsort: "
                  f"max |diff| over {nc} queries = {diff:.2e}")

    ratios = {
        "map_all_stable": base["all"]["seconds"] / ours["all_stable"]["seconds"],
        "map_all_expected": base["all"]["seconds"] / ours["all_expected"]["seconds"],
        f"map_at_{args.k}_stable": base[str(args.k)]["seconds"] / ours[f"{args.k}_stable"]["seconds"],
        f"map_at_{args.k}_expected": base[str(args.k)]["seconds"] / ours[f"{args.k}_expected"]["seconds"],
    }
    for name, ratio in ratios.items():
        print(f"speed-up vs DeepHash-style loop, {name}: {ratio:.1f}x")
    peak_gb = max(v["peak_traced_bytes"] for v in ours.values()) / 1e9
    targets = {
        "map_all_stable_seconds": ours["all_stable"]["seconds"] <= TARGETS["map_all_stable_seconds"],
        "map_at_k_stable_seconds": ours[f"{args.k}_stable"]["seconds"] <= TARGETS["map_at_k_stable_seconds"],
        "peak_memory_gb": peak_gb <= TARGETS["peak_memory_gb"],
    }
    print(f"targets (mAP@all <= 1.5 s, mAP@k <= 1 s, peak <= 0.5 GB; peak {peak_gb:.3f} GB): "
          + ", ".join(f"{k}={'met' if v else 'MISSED'}" for k, v in targets.items()))
    tie_gap = ours["all_expected"]["map"] - ours["all_stable"]["map"]
    print(f"tie effect on mAP@all: expected - stable = {tie_gap:+.4f}; "
          f"baseline (quicksort order) - stable = {base['all']['map'] - ours['all_stable']['map']:+.4f}")

    # Databases stored class by class (image folders) make database order correlate with
    # relevance: stable ties then favour the classes stored first. Averaged over all classes the
    # biases can cancel, so the per-class mAP shows it.
    by_class = np.argsort(dl, kind="stable")
    sorted_db = {ties: hamming_map(q, db[by_class], ql, dl[by_class], ties=ties)
                 for ties in ("stable", "expected")}
    class_gap = np.array([sorted_db["stable"].per_query[ql == c].mean()
                          - sorted_db["expected"].per_query[ql == c].mean() for c in np.unique(ql)])
    sorted_summary = {"map_all_stable": sorted_db["stable"].map, "map_all_expected": sorted_db["expected"].map,
                      "per_class_stable_minus_expected": class_gap.tolist()}
    print(f"database sorted by class: mAP@all stable {sorted_db['stable'].map:.4f}, expected "
          f"{sorted_db['expected'].map:.4f}; per-class stable - expected from {class_gap.min():+.4f} "
          f"to {class_gap.max():+.4f}")

    for v in ours.values():
        del v["per_query"]
    result = {
        "benchmark": "bench_map",
        "config": vars(args) | {"out": str(args.out)},
        "environment": {"python": sys.version.split()[0], "numpy": np.__version__,
                        "machine": platform.machine(), "cpu_count": os.cpu_count(),
                        "threadpools": [{k: p[k] for k in ("internal_api", "num_threads")}
                                        for p in threadpool_info()],
                        "load_average": os.getloadavg()},
        "dfsnet": ours,
        "baseline_deephash_loop": base,
        "stable_check": check,
        "class_sorted_database": sorted_summary,
        "speedup_vs_baseline": ratios,
        "targets": {"limits": TARGETS, "met": targets, "peak_traced_gb": peak_gb,
                    "dfsnet_max_rss_growth_bytes": rss_growth},
    }
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
