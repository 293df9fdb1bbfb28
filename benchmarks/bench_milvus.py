"""Benchmark: the Milvus Lite backend against the local faiss backend on the same binary codes.

For each ``--sizes`` (100,000 and 1,000,000 by default) uniformly random 64-bit codes with
metadata rows, measured in the same run:

- insert throughput: ``MilvusCodes.insert`` (the Milvus backend's write path: rows with the code,
  content hash, path, label, size and mtime, flushed) against the baseline, the local backend's
  code store: ``HammingIndex.add`` + ``save`` (its metadata goes to SQLite, not timed here, so
  the baseline is favoured);
- exact search throughput: ``MilvusCodes.search`` (``BIN_FLAT``, ``HAMMING``; the only index
  Milvus Lite offers) against ``HammingIndex.search`` (faiss ``IndexBinaryFlat``), ``--queries``
  queries at ``k``, one query per call as a server sees them;
- agreement: the same ids up to the order within a tie, and exactly the same distances, for
  every query.

Milvus Lite runs in a subprocess of its own (started by pymilvus); a Milvus server or cluster
was not run here. Usage: .venv/bin/python benchmarks/bench_milvus.py [--sizes 100000 1000000]
[--queries 200] [--k 10] [--bits 64]. Writes benchmarks/results/bench_milvus.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "bench_milvus.json"


def agree(d_a, i_a, d_b, i_b) -> dict:
    """Distances equal exactly; ids equal up to tie order (as sets per distance below the k-th,
    and only the count at the k-th distance, where either side may cut a tie differently)."""
    same_distances = bool(np.array_equal(d_a, d_b))
    same_ids = True
    for q in range(d_a.shape[0]):
        last = d_a[q, -1]
        inner_a = set(i_a[q][d_a[q] < last].tolist())
        inner_b = set(i_b[q][d_b[q] < last].tolist())
        same_ids &= inner_a == inner_b
    return {"distances_equal": same_distances, "ids_equal_up_to_ties": bool(same_ids)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=200, help="queries per size (default: %(default)s)")
    parser.add_argument("--k", type=int, default=10, help="(default: %(default)s)")
    parser.add_argument("--bits", type=int, default=64, help="(default: %(default)s)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON output (default: %(default)s)")
    args = parser.parse_args()

    import pymilvus

    from dfsnet._io import atomic_write_text
    from dfsnet.index import HammingIndex
    from dfsnet.store.milvus import Identity, MilvusCodes

    rng = np.random.default_rng(0)
    work = Path(tempfile.mkdtemp(prefix="bench_milvus."))
    rows_out = []
    try:
        for size in args.sizes:
            codes = rng.integers(0, 256, (size, args.bits // 8), dtype=np.uint8)
            ids = np.arange(size, dtype=np.int64)
            records = [(f"/photos/{i:08d}.jpg", f"c{i % 10}", f"{i:064x}", 1000 + i % 977, 1.7e9 + i)
                       for i in range(size)]
            queries = rng.integers(0, 256, (args.queries, args.bits // 8), dtype=np.uint8)

            t = time.perf_counter()
            local = HammingIndex(args.bits)
            local.add(codes, ids=ids)
            local.save(work / f"codes{size}.hidx")
            local_insert = time.perf_counter() - t

            identity = Identity(checkpoint_hash="bench", bits=args.bits, encoder_sha256="bench", feature_dim=1,
                                store_features=False)
            store = MilvusCodes.create(str(work / f"m{size}.db"), "bench", identity, nlist=1024)
            t = time.perf_counter()
            store.insert(ids, codes, records, None)
            milvus_insert = time.perf_counter() - t
            assert store.count() == size

            def run(search, queries=queries) -> tuple[float, np.ndarray, np.ndarray]:
                d_all, i_all = [], []
                t0 = time.perf_counter()
                for q in queries:
                    d, i = search(q[None, :], args.k)
                    d_all.append(d[0])
                    i_all.append(i[0])
                return time.perf_counter() - t0, np.array(d_all), np.array(i_all)

            run(local.search)  # warm-ups
            run(store.search)
            local_s, d_l, i_l = run(local.search)
            milvus_s, d_m, i_m = run(store.search)
            row = {
                "size": size,
                "insert_rows_per_s": {"local_faiss": size / local_insert, "milvus_lite": size / milvus_insert},
                "search_queries_per_s": {"local_faiss": args.queries / local_s, "milvus_lite": args.queries / milvus_s},
                "ratio_insert_milvus_over_local": local_insert / milvus_insert,
                "ratio_search_milvus_over_local": local_s / milvus_s,
                **agree(d_l, i_l, d_m.astype(d_l.dtype), i_m),
            }
            rows_out.append(row)
            print(f"{size:>9} codes: insert local {row['insert_rows_per_s']['local_faiss']:,.0f} rows/s, Milvus Lite "
                  f"{row['insert_rows_per_s']['milvus_lite']:,.0f} rows/s "
                  f"(ratio {row['ratio_insert_milvus_over_local']:.3f})"
                  f" | search local {row['search_queries_per_s']['local_faiss']:.1f} q/s, Milvus Lite "
                  f"{row['search_queries_per_s']['milvus_lite']:.1f} q/s (ratio "
                  f"{row['ratio_search_milvus_over_local']:.3f}) | distances equal {row['distances_equal']}, ids "
                  f"equal up to ties {row['ids_equal_up_to_ties']}", flush=True)
            store.client.drop_collection("bench")
            store.client.close()
        result = {"benchmark": "bench_milvus", "baseline": "local backend: dfsnet.index.HammingIndex (faiss)",
                  "bits": args.bits, "k": args.k, "queries": args.queries, "rows": rows_out,
                  "pymilvus": pymilvus.__version__, "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
                  "python": platform.python_version()}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
