"""Benchmark: retrieval quality of an index built without labels or training (issue 10).

``ImageIndex.build`` with no model on the CIFAR-10 test folder (10,000 images; the folder names
are the labels, used only to score): EfficientNet-Lite0's offline ImageNet weights, pooled and
L2-normalised features, ITQ fitted on the collection itself (no labels), 64-bit codes, features
stored. Queries: 100 images per class drawn with seed 0; each query is searched against the
other 9,999 images (itself left out). Scored in the same run on the same features:

- cosine: exact cosine similarity on the stored float features (the ceiling of the codes);
- hamming: the index's codes, Hamming distance, ties by ascending id;
- rerank: a Hamming shortlist of 10 x 100, re-ordered by cosine (``search(rerank=True)``,
  checked against ``ImageIndex.search_features`` on 20 queries).

Nothing is tuned: the settings are the defaults of ``dfsnet index build --images DIR``.

Usage: .venv/bin/python benchmarks/bench_unsupervised.py [--threads 1] [--image-size 224]
       [--bits 64] [--index /tmp/dfsnet_bench/cifar10_test_unsup.idx]
Writes benchmarks/results/bench_unsupervised.json; keeps the index (reused when present).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "bench_unsupervised.json"
CIFAR10 = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "cifar10"
K = 100
RERANK_FACTOR = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=None, help="default: the backbone's (224)")
    parser.add_argument("--bits", type=int, default=64)
    parser.add_argument("--per-class", type=int, default=100, help="queries per class")
    parser.add_argument("--index", type=Path, default=Path("/tmp/dfsnet_bench/cifar10_test_unsup.idx"))
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from dfsnet.eval import mean_average_precision
    from dfsnet.hashing import hamming_distances
    from dfsnet.store import ImageIndex

    images = CIFAR10 / "test"
    started = time.perf_counter()
    if (args.index / "manifest.json").exists():
        index = ImageIndex.load(args.index, device="cpu")
        build_seconds = None
    else:
        index = ImageIndex.build(images_dir=images, out_dir=args.index, bits=args.bits, image_size=args.image_size,
                                 store_features=True, batch_size=64, num_workers=0, device="cpu")
        build_seconds = time.perf_counter() - started
    state = index._state
    records = state.metadata.all_records()
    ids = np.array([r.id for r in records], dtype=np.int64)
    assert np.array_equal(ids, np.arange(len(ids))), "a fresh build numbers its images 0..n-1"
    classes = sorted({r.label for r in records})
    labels = np.array([classes.index(r.label) for r in records], dtype=np.int64)
    feats = state.features_of(ids)
    codes = index.encoder.transform(feats)

    rng = np.random.default_rng(0)
    queries = np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), args.per_class, replace=False)
                                      for c in range(len(classes))]))
    t = time.perf_counter()
    sims = feats[queries] @ feats.T
    sims[np.arange(len(queries)), queries] = -np.inf  # leave the query itself out
    cos_rank = np.argsort(-sims, axis=1, kind="stable")[:, :K]
    cos_seconds = time.perf_counter() - t

    t = time.perf_counter()
    ham = hamming_distances(codes[queries], codes).astype(np.int64)
    ham[np.arange(len(queries)), queries] = 1 << 20
    ham_order = np.argsort(ham, axis=1, kind="stable")  # ties: ascending id
    ham_rank = ham_order[:, :K]
    ham_seconds = time.perf_counter() - t

    shortlist = ham_order[:, :K * RERANK_FACTOR]
    short_sims = np.take_along_axis(sims, shortlist, axis=1)
    rerank = np.take_along_axis(shortlist, np.argsort(-short_sims, axis=1, kind="stable"), axis=1)[:, :K]
    # the library path gives the same order (its shortlist includes the query itself: drop it)
    for j in range(20):
        hits = index.search_features(feats[queries[j]], K + 1, rerank=True, rerank_factor=RERANK_FACTOR)
        got = [h.id for h in hits if h.id != queries[j]][:K]
        assert len(set(got) ^ set(rerank[j][:K].tolist())) <= 4, f"query {j}: library re-rank differs"

    def score(rankings):
        return float(mean_average_precision(labels[queries], labels, rankings=rankings, k=K))

    result = {
        "benchmark": "bench_unsupervised",
        "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_unsupervised.py --threads 1",
        "data": "CIFAR-10 test folder, 10,000 images (labels used only to score)",
        "index": {"count": len(index), "bits": index.n_bits, "image_size": index.manifest["image_size"],
                  "precision": index.manifest["precision"], "backbone": index.manifest["model"]["backbone"],
                  "encoder": index.manifest["encoder"]["params"]["hasher"],
                  "fit_images": index.manifest["encoder"].get("fit_images")},
        "queries": int(len(queries)), "k": K, "rerank_factor": RERANK_FACTOR,
        "map_at_100": {"cosine": score(cos_rank), "hamming": score(ham_rank), "rerank": score(rerank)},
        "seconds": {"build": build_seconds, "cosine_search": cos_seconds, "hamming_search": ham_seconds},
        "threads": args.threads, "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
    }
    m = result["map_at_100"]
    result["ratio"] = {"hamming_over_cosine": m["hamming"] / m["cosine"],
                       "rerank_over_cosine": m["rerank"] / m["cosine"]}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
