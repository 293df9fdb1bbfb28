"""Benchmark: scoring the Euclidean rows of an experiment - exact float ranking of a whole database.

Case (defaults, the CIFAR-10 protocol's shape): 1,000 queries x 54,000 database items of 1,280
float32 features, 10 classes. Synthetic features with class structure: a non-negative class
centre plus noise per item (pooled ReLU features are non-negative too).

Measured in the same run, best of ``--repeats``:

* ``dfsnet``: what :func:`dfsnet.eval.retrieval.retrieval_eval` runs for a Euclidean row:
  ``search_map(FloatIndex.search, ...)`` for mAP@all and mAP@k in both tie modes (every query
  ranks the whole database exactly, in float64, ties by id), plus the timed
  ``FloatIndex.search(q, k)``.
* ``baseline``: a plain numpy exact ranking: float64 squared distances by the expanded product
  ``|x|^2 - 2 q.x`` in blocks of queries, ``np.argsort(kind="stable")`` per block, then
  :func:`dfsnet.eval.metrics.mean_average_precision` of those rankings (stable ties only).
* A check: both give the same mAP@all and mAP@k (stable ties) to 1e-9 (the two float64
  formulas can order a near tie differently, which moves an AP by far less).

Usage: .venv/bin/python benchmarks/bench_scoring.py [--threads 2] [--n-queries 1000] [--n-db 54000]
       [--dim 1280] [--k 1000] [--repeats 2]
Writes benchmarks/results/bench_scoring.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "bench_scoring.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="BLAS threads")
    parser.add_argument("--n-queries", type=int, default=1000)
    parser.add_argument("--n-db", type=int, default=54000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--k", type=int, default=1000, help="cut-off of mAP@k")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each (best is kept)")
    parser.add_argument("--noise", type=float, default=3.0, help="noise sd around the class centres")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON output")
    args = parser.parse_args()

    import numpy as np
    from threadpoolctl import threadpool_limits

    from dfsnet.eval.metrics import mean_average_precision, search_map
    from dfsnet.index import FloatIndex

    rng = np.random.default_rng(args.seed)
    centres = rng.gamma(2.0, 0.5, size=(args.classes, args.dim)).astype(np.float32)

    def draw(n):
        labels = rng.integers(0, args.classes, n)
        x = centres[labels] + rng.normal(0, args.noise, size=(n, args.dim)).astype(np.float32)
        return np.maximum(x, 0, out=x), labels

    q, ql = draw(args.n_queries)
    db, dl = draw(args.n_db)
    print(f"case: {args.n_queries} queries x {args.n_db} items x {args.dim} dims, {args.classes} classes, "
          f"k={args.k}, {args.threads} thread(s)", flush=True)

    def ours():
        index = FloatIndex(args.dim)
        index.add(db)
        start = time.perf_counter()
        index.search(q, min(args.k, args.n_db))
        search = time.perf_counter() - start
        scores = search_map(index.search, q, ql, dl, ks=[None, args.k], ties=("stable", "expected"))
        return search, scores

    def baseline():
        db64 = db.astype(np.float64)
        sq = np.einsum("ij,ij->i", db64, db64)
        rankings = np.empty((args.n_queries, args.n_db), dtype=np.intp)
        step = max(1, (1 << 21) // args.n_db)
        for start in range(0, args.n_queries, step):
            block = q[start:start + step].astype(np.float64)
            d = sq - 2.0 * (block @ db64.T)
            rankings[start:start + step] = np.argsort(d, axis=1, kind="stable")
        return (float(mean_average_precision(ql, dl, rankings=rankings)),
                float(mean_average_precision(ql, dl, rankings=rankings[:, :args.k], k=args.k)))

    times = {"dfsnet": [], "dfsnet_search_k": [], "baseline": []}
    with threadpool_limits(limits=args.threads):
        for repeat in range(args.repeats):
            start = time.perf_counter()
            search_seconds, scores = ours()
            times["dfsnet"].append(time.perf_counter() - start)
            times["dfsnet_search_k"].append(search_seconds)
            start = time.perf_counter()
            base_all, base_k = baseline()
            times["baseline"].append(time.perf_counter() - start)
            print(f"repeat {repeat}: dfsnet {times['dfsnet'][-1]:.1f} s (of which search k={args.k}: "
                  f"{search_seconds:.1f} s), baseline {times['baseline'][-1]:.1f} s", flush=True)
    ours_all, ours_k = scores["stable"][None].map, scores["stable"][args.k].map
    agree = abs(ours_all - base_all) < 1e-9 and abs(ours_k - base_k) < 1e-9
    best = {name: min(v) for name, v in times.items()}
    ratio = best["baseline"] / best["dfsnet"]
    print(f"dfsnet (both tie modes, mAP@all and @{args.k}, plus the timed search): {best['dfsnet']:.1f} s; "
          f"baseline (stable ties only): {best['baseline']:.1f} s; baseline / dfsnet = {ratio:.2f}x")
    print(f"mAP@all {ours_all:.6f} vs {base_all:.6f}, mAP@{args.k} {ours_k:.6f} vs {base_k:.6f}: "
          f"{'agree' if agree else 'DIFFER'}")
    out = {"benchmark": "bench_scoring",
           "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                       "load_average": list(os.getloadavg())},
           "seconds": times, "best_seconds": best, "ratio_baseline_over_dfsnet": ratio,
           "map": {"dfsnet_all": ours_all, "dfsnet_at_k": ours_k, "baseline_all": base_all,
                   "baseline_at_k": base_k, "dfsnet_expected_all": scores["expected"][None].map},
           "agree": agree}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
