"""Benchmark: ``dfsnet index build`` throughput (images/s) against bare feature extraction.

Model: EfficientNet-Lite0 with its offline ImageNet weights in a DFSNet (untrained head: the
figures measure throughput, not retrieval quality). Images: the first ``--n-images`` of the
CIFAR-10 test folders when ../shared/datasets/cifar10 exists (32 px JPEGs, labelled by folder),
else generated 64 px JPEGs in class folders. The encoder (gain ratio + sample-mean hashing) is
fitted beforehand on other images and saved beside the checkpoint, as ``dfsnet train`` does.

Baseline, measured in the same run on the same files: ``dfsnet.features.extract_features`` over an
``ImageList`` of the same paths with the same transform, batch size and workers: the floor of any
index build. ``ImageIndex.build`` adds the folder scan, a SHA-256 of every file, encoding, and the
crash-safe writes (model copy, codes, SQLite metadata, manifest, each fsynced). The ratio
build / extraction (images/s) shows that overhead. Runs alternate (extraction, build, ...) after a
warm-up that reads every file once, and each side's best repeat is compared (the least disturbed
one on a shared machine); medians are reported too. Also reported: re-running ``add`` on the
unchanged folder (every file hashed, nothing extracted).

Usage: .venv/bin/python benchmarks/bench_index_build.py [--n-images 1000] [--image-size 128]
       [--batch-size 64] [--repeats 2] [--bits 128] [--store-features]
Writes benchmarks/results/bench_index_build.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "bench_index_build.json"
CIFAR10 = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "cifar10"


def prepare_images(root: Path, n: int, *, split: str = "test", offset: int = 0, seed: int = 0) -> tuple[Path, str]:
    """``n`` labelled images under ``root/<class>/``: CIFAR-10 symlinks when present, else generated."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    if (CIFAR10 / split).is_dir():
        classes = sorted(p.name for p in (CIFAR10 / split).iterdir() if p.is_dir())
        per_class = -(-n // len(classes))
        made = 0
        for name in classes:
            (root / name).mkdir(exist_ok=True)
            for src in sorted((CIFAR10 / split / name).iterdir())[offset:offset + per_class]:
                if made == n:
                    break
                (root / name / src.name).symlink_to(src)
                made += 1
        return root, f"cifar10/{split}"
    rng = np.random.default_rng(seed)
    for i in range(n):
        c = i % 10
        (root / f"class_{c}").mkdir(exist_ok=True)
        base = np.zeros(3)
        base[c % 3] = 60 + 18 * c
        arr = np.clip(base + rng.normal(0, 40, (64, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(root / f"class_{c}" / f"{i:06d}.jpg", quality=90)
    return root, "generated 64 px"


def make_model(work: Path, *, image_size: int, bits: int, fit_images: int, batch_size: int) -> Path:
    """Save a Lite0 DFSNet checkpoint with an encoder.npz beside it; return the checkpoint path."""
    import torch

    from dfsnet.data import ImageFolder, build_transforms
    from dfsnet.features import extract_features
    from dfsnet.hashing import make_encoder
    from dfsnet.models import DFSNet, create_backbone, save_checkpoint

    torch.manual_seed(0)
    net = DFSNet(create_backbone("efficientnet_lite0", pretrained=True), num_classes=10)
    ckpt = save_checkpoint(net, work / "model" / "best.safetensors", extra={"image_size": image_size})
    fit_dir, _ = prepare_images(work / "fit", fit_images, split="train", seed=1)
    data = ImageFolder(fit_dir, transform=build_transforms(net.meta, train=False, image_size=image_size))
    features = extract_features(net, data, batch_size=batch_size)
    make_encoder("gain_ratio", "sample_mean", n_bits=bits).fit(features, data.targets).save(
        work / "model" / "encoder.npz")
    return ckpt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-images", type=int, default=1000, help="images indexed (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=128, help="network input side (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (default: %(default)s)")
    parser.add_argument("--bits", type=int, default=128, help="code length (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per side (default: %(default)s)")
    parser.add_argument("--store-features", action="store_true", help="also store float features in the index")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON output (default: %(default)s)")
    args = parser.parse_args()

    import torch

    from dfsnet._io import atomic_write_text
    from dfsnet.data import ImageList, build_transforms, iter_image_files
    from dfsnet.features import extract_features
    from dfsnet.models import load_checkpoint
    from dfsnet.store import ImageIndex

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_index_build."))
    try:
        images, source = prepare_images(work / "images", args.n_images)
        ckpt = make_model(work, image_size=args.image_size, bits=args.bits, fit_images=200,
                          batch_size=args.batch_size)
        model, _ = load_checkpoint(ckpt)
        paths = [str(p) for p in iter_image_files(images.resolve())]
        transform = build_transforms(model.meta, train=False, image_size=args.image_size)
        for p in paths:  # warm the page cache for both sides
            Path(p).read_bytes()
        extract_features(model, ImageList(paths[: args.batch_size], transform=transform), batch_size=args.batch_size)

        extract_s, build_s, add_s = [], [], []
        for r in range(args.repeats):
            t = time.perf_counter()
            extract_features(model, ImageList(paths, transform=transform), batch_size=args.batch_size,
                             num_workers=args.num_workers)
            extract_s.append(time.perf_counter() - t)
            out = work / f"index{r}"
            t = time.perf_counter()
            pipe = ImageIndex.build(ckpt, images, out, batch_size=args.batch_size, num_workers=args.num_workers,
                                  store_features=args.store_features)
            build_s.append(time.perf_counter() - t)
            assert len(pipe) == len(paths), (len(pipe), len(paths))
            t = time.perf_counter()
            report = pipe.add(images)
            add_s.append(time.perf_counter() - t)
            assert report.n_added == 0 and report.n_duplicates == len(paths)
            print(f"repeat {r + 1}: extraction {extract_s[-1]:.2f} s, build {build_s[-1]:.2f} s, "
                  f"add (unchanged folder) {add_s[-1]:.2f} s", flush=True)
            shutil.rmtree(out)

        n = len(paths)
        best_extract, best_build = n / min(extract_s), n / min(build_s)
        ratio = best_build / best_extract
        result = {
            "benchmark": "bench_index_build",
            "images": n,
            "source": source,
            "backbone": "efficientnet_lite0 (ImageNet weights, untrained DFS head)",
            "image_size": args.image_size,
            "bits": args.bits,
            "batch_size": args.batch_size,
            "num_workers": args.num_workers,
            "store_features": args.store_features,
            "repeats": args.repeats,
            "extraction_seconds": extract_s,
            "build_seconds": build_s,
            "add_unchanged_seconds": add_s,
            "extraction_images_per_s_best": best_extract,
            "build_images_per_s_best": best_build,
            "extraction_images_per_s_median": n / statistics.median(extract_s),
            "build_images_per_s_median": n / statistics.median(build_s),
            "ratio_build_over_extraction": ratio,
            "overhead_seconds_best": min(build_s) - min(extract_s),
            "add_unchanged_images_per_s": n / min(add_s),
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
        print(f"{n} images ({source}), {args.image_size} px, {args.bits} bits, batch {args.batch_size}")
        print(f"bare extraction (baseline): {best_extract:.1f} images/s")
        print(f"index build:                {best_build:.1f} images/s")
        print(f"ratio build / extraction:   {ratio:.3f}  (overhead {min(build_s) - min(extract_s):+.2f} s "
              f"for {n} images)")
        print(f"add on the unchanged folder: {n / min(add_s):.0f} images/s (hash only, nothing extracted)")
        print(f"wrote {args.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
