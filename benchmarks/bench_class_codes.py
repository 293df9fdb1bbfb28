"""Benchmark: how much of a learned hash head's mAP is its network's class prediction.

A CSQ head pulls every image's code towards the hash centre of its class, so once trained its
codes collapse onto one code per predicted class. Retrieval then ranks the images the network
puts in the query's predicted class first, in one tie, and everything else after them: the
"class code". Its mAP depends only on the classifier's predictions, not on any hashing. This
benchmark measures, on a finished ``benchmarks/cifar10_cpu.py`` run folder (nothing is trained):

- the **class code** of each network: distance 0 between images with the same argmax of the
  network's own classifier (``model.fc`` on the pooled features), 1 otherwise; its mAP@1000 and
  mAP@all, and the classifier's accuracy on the queries and on the database;
- each CSQ head's codes (the run's hash heads ``hash-<b>.npz``) scored the same way, the named
  baseline being the class code of the same network, measured in the same run (ratio head / class
  code), and how far the codes collapsed: the share of database images whose code is the most
  common code of their predicted class, and the number of distinct database codes.

Every mAP is given under three orders of equal distances (``TIE_RULES``): the database's stored
order, which in the run is grouped by class (so the order inside a tie depends on the labels),
the exact expectation over all orders, and the stored order after one seeded shuffle of the
database (``--shuffle-seed``), which should agree with the expectation to within sampling noise.

Usage: .venv/bin/python benchmarks/bench_class_codes.py --run runs/cifar10_cpu_head
       [--setting efficientnet_lite0-cifar10-head] [--data-root PATH] [--k 1000]
Writes benchmarks/results/bench_class_codes.json (or --out). Skips (exit 0, a message) when the
run folder or the CIFAR-10 folders are missing.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "bench_class_codes.json"
CIFAR10 = REPO.parent / "shared" / "datasets" / "cifar10"
SETTING = "efficientnet_lite0-cifar10-head"
#: How equal distances are ordered: "stable" is the database's stored order (the run's order: the
#: split's indices, sorted, so grouped by class), "expected" the exact mean over all orders, and
#: "stable_shuffled" the stored order of the database after one seeded random permutation.
TIE_RULES = ("stable", "expected", "stable_shuffled")


def predicted_classes(model, features: np.ndarray) -> np.ndarray:
    """int64 (n,): the argmax of the network's classifier on pooled features float32 (n, D)."""
    import torch

    with torch.inference_mode():
        return model.eval().fc(torch.from_numpy(features)).argmax(dim=1).numpy().astype(np.int64)


def class_code_distances(pred_query: np.ndarray, pred_db: np.ndarray) -> np.ndarray:
    """uint8 (nq, n_db): 0 where the two images' predicted classes agree, 1 elsewhere."""
    return (pred_query[:, None] != pred_db[None, :]).astype(np.uint8)


def collapse(codes: np.ndarray, pred: np.ndarray) -> dict:
    """How far packed codes uint8 (n, b/8) collapsed onto one code per predicted class int64 (n,)."""
    in_modal = 0
    for c in np.unique(pred):
        _, counts = np.unique(codes[pred == c], axis=0, return_counts=True)
        in_modal += int(counts.max())
    return {"share_in_modal_code_of_predicted_class": in_modal / codes.shape[0],
            "distinct_codes": int(np.unique(codes, axis=0).shape[0])}


def _maps(yq, ydb, distances, k: int, order: np.ndarray) -> dict:
    """mAP@k and mAP@all of distances (nq, n_db) under each tie rule (see ``TIE_RULES``)."""
    from dfsnet.eval.metrics import mean_average_precision

    out = {}
    for rule, (ties, perm) in {"stable": ("stable", None), "expected": ("expected", None),
                               "stable_shuffled": ("stable", order)}.items():
        d, y = (distances, ydb) if perm is None else (distances[:, perm], ydb[perm])
        out[rule] = {"map_at_k": mean_average_precision(yq, y, distances=d, k=k, ties=ties),
                     "map_all": mean_average_precision(yq, y, distances=d, ties=ties)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished benchmarks/cifar10_cpu.py run folder")
    parser.add_argument("--setting", default=SETTING, help="the setting's folder in the run (default: %(default)s)")
    parser.add_argument("--data-root", type=Path, default=CIFAR10, help="CIFAR-10 image folders "
                        "(default: %(default)s)")
    parser.add_argument("--k", type=int, default=1000, help="mAP cut-off (default: %(default)s)")
    parser.add_argument("--shuffle-seed", type=int, default=0, help="seed of the database shuffle of "
                        "'stable_shuffled' (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON output (default: %(default)s)")
    args = parser.parse_args()
    sdir = args.run / args.setting
    results_file = args.run / "results.json"
    if not results_file.is_file() or not sdir.is_dir():
        print(f"skipped: no finished run at {args.run} (needs results.json and {args.setting}/)")
        return 0
    if not (args.data_root / "train").is_dir():
        print(f"skipped: CIFAR-10 image folders not found at {args.data_root}")
        return 0

    from dfsnet._io import atomic_write_text
    from dfsnet.data import Split, build_transforms, load_pool
    from dfsnet.hashing import Encoder, hamming_distances
    from dfsnet.models import load_checkpoint
    from dfsnet.train.workflow import part_features

    run = json.loads(results_file.read_text())
    setting = next((s for s in run["settings"] if s["key"] == args.setting), None)
    if setting is None:
        print(f"error: setting {args.setting!r} not in {results_file}; it has "
              f"{', '.join(s['key'] for s in run['settings'])}", file=sys.stderr)
        return 2
    split, pool = None, None
    out: dict = {"benchmark": "bench_class_codes", "run": str(args.run), "setting": args.setting, "k": args.k,
                 "baseline": "the class code of the same network (its classifier's argmax as the code)",
                 "tie_rules": list(TIE_RULES), "shuffle_seed": args.shuffle_seed, "networks": {}}
    for net, info in setting["networks"].items():
        model, _ = load_checkpoint(info["checkpoint"])
        if pool is None:  # the run's evaluation transform, so that its cached maps are the ones read
            pool = load_pool(setting["dataset"], root=args.data_root, transform=build_transforms(
                model.meta.backbone, train=False, image_size=setting["image_size"]))
            split = Split.load(setting["split_file"], expect_fingerprint=pool.fingerprint())
        start = time.perf_counter()
        (q, yq), (db, ydb) = (part_features(model, split.subset(pool, part), mode=setting["mode"],
                                            maps_cache_dir=args.run / "cache" / "maps",
                                            runtime=setting["maps_runtime"]) for part in ("query", "database"))
        pred_q, pred_db = predicted_classes(model, q), predicted_classes(model, db)
        order = np.random.default_rng(args.shuffle_seed).permutation(db.shape[0])
        entry = {"query_accuracy": float((pred_q == yq).mean()), "database_accuracy": float((pred_db == ydb).mean()),
                 "class_code": _maps(yq, ydb, class_code_distances(pred_q, pred_db), args.k, order), "heads": {}}
        for b, path in sorted(info.get("hash_heads", {}).items(), key=lambda kv: int(kv[0])):
            encoder = Encoder.load(path)
            cq, cdb = encoder.transform(q), encoder.transform(db)
            head = _maps(yq, ydb, hamming_distances(cq, cdb), args.k, order)
            cc = entry["class_code"]
            head["ratio_map_at_k_over_class_code"] = {r: head[r]["map_at_k"] / cc[r]["map_at_k"] for r in TIE_RULES}
            head.update(collapse(cdb, pred_db))
            entry["heads"][b] = head
        entry["seconds"] = time.perf_counter() - start
        out["networks"][net] = entry
        cc = entry["class_code"]
        print(f"{net}: query accuracy {entry['query_accuracy']:.4f}, database accuracy "
              f"{entry['database_accuracy']:.4f}; class code mAP@{args.k} / mAP@all, ties "
              + ", ".join(f"{r} {cc[r]['map_at_k']:.4f} / {cc[r]['map_all']:.4f}" for r in TIE_RULES), flush=True)
        for b, head in entry["heads"].items():
            ratio = head["ratio_map_at_k_over_class_code"]
            print(f"  CSQ head {b:>4} bits: mAP@{args.k} / mAP@all, ties "
                  + ", ".join(f"{r} {head[r]['map_at_k']:.4f} / {head[r]['map_all']:.4f} "
                              f"({ratio[r]:.2f}x the class code)"
                              for r in TIE_RULES)
                  + f"; {100 * head['share_in_modal_code_of_predicted_class']:.1f} % of the database in its "
                  f"predicted class's most common code, {head['distinct_codes']} distinct codes", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
