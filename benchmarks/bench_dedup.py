"""Benchmark: near-duplicate detection on planted copies, against imagededup's PHash and DHash.

Quality. 2,000 CIFAR-10 test images (seed 0) plus 1,000 transformed copies of 1,000 of them,
each copy: a rotation of -5..5 degrees, a crop of up to 10 % of each side, a rescale of
0.5-1.5x, brightness x0.8-1.2, then JPEG quality 20-40 (all drawn per copy). Ground truth: the
1,000 (original, copy) pairs. Scored as pairs: a reported group counts every pair inside it.
dfsnet: ``find_duplicates(images=...)`` with its defaults (perceptual fingerprints, see
``dfsnet.dedup``), on the same folder. imagededup:
PHash and DHash, swept over every ``max_distance_threshold`` 0..20 (each one's best is
reported: that favours imagededup, which gets tuned on the test set; dfsnet's defaults do not).

The defaults were calibrated with ``--calibrate`` on CIFAR-10 *training* images (seed 1),
disjoint from the test images above: it prints the precision and recall of a grid of
distances and margins there.

Speed. Grouping of 100,000 synthetic fingerprints (random, plus 5,000 planted copies at cosine
~0.95) on one thread, reading the images excluded.

Usage: .venv/bin/python benchmarks/bench_dedup.py [--threads 1] [--calibrate] [--skip-speed]
Writes benchmarks/results/bench_dedup.json (not with --calibrate).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "bench_dedup.json"
CIFAR10 = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "cifar10"


def transformed_copy(path: Path, rng: random.Random) -> bytes:
    """JPEG bytes of a transformed copy of the image at ``path`` (the issue's transforms)."""
    from PIL import Image, ImageEnhance

    im = Image.open(path).convert("RGB")
    fill = tuple(int(v) for v in np.asarray(im).mean((0, 1)))
    im = im.rotate(rng.uniform(-5, 5), resample=Image.BILINEAR, fillcolor=fill)
    w, h = im.size
    left, right, top, bottom = (rng.uniform(0, 0.1) for _ in range(4))
    im = im.crop((round(left * w / 2), round(top * h / 2), w - round(right * w / 2), h - round(bottom * h / 2)))
    scale = rng.uniform(0.5, 1.5)
    im = im.resize((max(4, round(im.width * scale)), max(4, round(im.height * scale))), Image.BILINEAR)
    im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.8, 1.2))
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=rng.randint(20, 40))
    return out.getvalue()


def planted_set(folder: Path, *, split: str, seed: int, n_originals: int = 2000, n_copies: int = 1000) -> set:
    """Write originals and copies into ``folder``; returns the true pairs (sorted path tuples)."""
    files = sorted((CIFAR10 / split).rglob("*.jpg")) + sorted((CIFAR10 / split).rglob("*.png"))
    rng = random.Random(seed)
    originals = rng.sample(files, n_originals)
    folder.mkdir(parents=True)
    truth = set()
    for i, src in enumerate(originals):
        dst = folder / f"img{i:05d}{src.suffix}"
        shutil.copyfile(src, dst)
        if i < n_copies:
            copy = folder / f"img{n_originals + i:05d}.jpg"
            copy.write_bytes(transformed_copy(src, rng))
            truth.add(tuple(sorted((str(dst), str(copy)))))
    return truth


def score(predicted: set, truth: set) -> dict:
    hits = len(predicted & truth)
    precision = hits / len(predicted) if predicted else 1.0
    recall = hits / len(truth)
    return {"precision": round(precision, 4), "recall": round(recall, 4), "pairs": len(predicted), "true_pairs": hits}


def imagededup_pairs(folder: Path, method_name: str) -> tuple[dict, float]:
    from imagededup import methods

    method = getattr(methods, method_name)(verbose=False)
    started = time.perf_counter()
    encodings = method.encode_images(image_dir=str(folder), num_enc_workers=0)
    encode_seconds = time.perf_counter() - started
    out = {}
    for threshold in range(0, 21):
        found = method.find_duplicates(encoding_map=encodings, max_distance_threshold=threshold,
                                       num_dist_workers=0)
        out[threshold] = {tuple(sorted((str(folder / a), str(folder / b)))) for a, dups in found.items() for b in dups}
    return out, encode_seconds


def dfsnet_quality(folder: Path, truth: set, *, grid: bool) -> dict:
    from dfsnet import dedup

    if not grid:
        started = time.perf_counter()
        report = dedup.find_duplicates(images=folder)
        total = time.perf_counter() - started
        return {"defaults": {"max_distance": report.max_distance, "margin": report.margin,
                             **score(report.pairs(), truth)},
                "seconds": {"total_with_reading": round(total, 1), "grouping": round(report.seconds, 3)}}
    paths = sorted(str(p) for p in folder.iterdir())
    features, _ = dedup.fingerprints(paths)
    rows = []
    for max_distance in (0.1, 0.15, 0.2, 0.25, 0.3):
        for margin in (0.0, 0.04, 0.06, 0.08, 0.1, 0.12):
            pairs, _ = dedup.near_duplicate_pairs(features, max_distance=max_distance, margin=margin)
            predicted = set()
            for g in dedup.connected_groups(len(paths), pairs):
                ps = sorted(paths[i] for i in g)
                predicted.update((a, b) for i, a in enumerate(ps) for b in ps[i + 1:])
            rows.append({"max_distance": max_distance, "margin": margin, **score(predicted, truth)})
            print(rows[-1])
    return {"grid": rows}


def speed(n: int = 100_000, n_copies: int = 5000, seed: int = 0) -> dict:
    """Grouping of ``n`` synthetic fingerprints with ``n_copies`` planted copies (cosine ~0.95)."""
    from dfsnet import dedup

    rng = np.random.default_rng(seed)
    dim = dedup.FINGERPRINT_SIDE ** 2
    features = rng.standard_normal((n, dim), dtype=np.float32)
    src = rng.choice(n - n_copies, n_copies, replace=False)
    features[n - n_copies:] = features[src] + 0.33 * rng.standard_normal((n_copies, dim), dtype=np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    started = time.perf_counter()
    pairs, _ = dedup.near_duplicate_pairs(features)
    groups = dedup.connected_groups(n, pairs)
    seconds = time.perf_counter() - started
    truth = {(int(s), n - n_copies + j) for j, s in enumerate(src)}
    found = {(int(a), int(b)) for a, b in pairs}
    return {"n": n, "planted": n_copies, "seconds": round(seconds, 2), "pairs": int(len(pairs)),
            "groups": len(groups), "planted_found": len(found & truth)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calibrate", action="store_true", help="grid on CIFAR-10 training images; writes nothing")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    import faiss
    import torch

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    result = {"benchmark": "bench_dedup", "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_dedup.py",
              "threads": args.threads, "machine": platform.machine(), "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "planted"
        truth = planted_set(folder, split="train" if args.calibrate else "test", seed=1 if args.calibrate else 0)
        result["dfsnet"] = dfsnet_quality(folder, truth, grid=args.calibrate)
        if args.calibrate:
            return
        print(json.dumps(result["dfsnet"]["defaults"]))
        import imagededup

        result["imagededup_version"] = imagededup.__version__
        for name in ("PHash", "DHash"):
            by_threshold, encode_seconds = imagededup_pairs(folder, name)
            rows = {t: score(p, truth) for t, p in by_threshold.items()}
            best = max(rows, key=lambda t: (2 * rows[t]["precision"] * rows[t]["recall"]
                                           / max(rows[t]["precision"] + rows[t]["recall"], 1e-9)))
            result[name] = {"default_threshold_10": rows[10], "best_f1": {"threshold": best, **rows[best]},
                            "best_recall_at_precision_0.98": max(
                                (r["recall"] for r in rows.values() if r["precision"] >= 0.98), default=0.0),
                            "encode_seconds": round(encode_seconds, 1), "by_threshold": rows}
            print(name, json.dumps(result[name]["best_f1"]))
    if not args.skip_speed:
        result["speed_100k"] = speed()
        print(json.dumps(result["speed_100k"]))
    result["load_average"] = os.getloadavg()
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
