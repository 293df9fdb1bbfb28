"""`dfsnet dedup (INDEX_DIR | --images DIR)`: groups of exact and near-duplicate images."""
from __future__ import annotations

import csv
import json
import sys

from dfsnet.cli._common import add_progress_arg, progress_enabled
from dfsnet.dedup import DEFAULT_MARGIN, DEFAULT_MAX_DISTANCE  # numpy only: cheap at start-up
from dfsnet.errors import UserError


def register(subparsers) -> None:
    dedup = subparsers.add_parser(
        "dedup", help="list groups of exact and near-duplicate images of an index or a folder",
        description="Exact duplicates share a content hash. Near-duplicates (re-encoded, resized, cropped, "
                    "rotated or brightened copies) have close perceptual fingerprints (12 x 12 grey, "
                    "standardised) that also stand out from each image's other neighbours. No model is "
                    "loaded and nothing is written.")
    dedup.add_argument("index_dir", metavar="INDEX_DIR", nargs="?", help="index folder (or --images)")
    dedup.add_argument("--images", metavar="DIR|LIST", default=None,
                       help="an image folder or a text file of image paths, instead of an index")
    dedup.add_argument("--max-distance", type=float, default=None, metavar="D",
                       help=f"largest fingerprint distance (1 - cosine) of a near pair (default: "
                            f"{DEFAULT_MAX_DISTANCE})")
    dedup.add_argument("--margin", type=float, default=None, metavar="M",
                       help="how much closer than each image's 4th-nearest neighbour a near pair must be "
                            f"(default: {DEFAULT_MARGIN}; 0 turns the relative test off)")
    fmt = dedup.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print the report as JSON")
    fmt.add_argument("--csv", action="store_true", help="print one CSV row per image: group, kind, id, path")
    add_progress_arg(dedup)
    dedup.set_defaults(func=_dedup)


def _dedup(args) -> int:
    from dfsnet.cli.index import printable
    from dfsnet.dedup import find_duplicates

    if (args.index_dir is None) == (args.images is None):
        raise UserError("INDEX_DIR: expected an index folder or --images DIR, exactly one of them")
    report = find_duplicates(args.index_dir, images=args.images, max_distance=args.max_distance,
                             margin=args.margin, progress=progress_enabled(args))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    if args.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["group", "kind", "id", "path", "max_distance"])
        for g, group in enumerate(report.groups, 1):
            for image_id, path in zip(group.ids, group.paths):
                writer.writerow([g, group.kind, image_id, path, group.max_distance])
        return 0
    n_exact = sum(g.kind == "exact" for g in report.groups)
    unreadable = f"; {report.n_unreadable} unreadable files left out" if report.n_unreadable else ""
    print(f"{len(report.groups)} groups of duplicates among {report.n_images} images: {n_exact} exact, "
          f"{len(report.groups) - n_exact} near (distance <= {report.max_distance}, margin {report.margin})"
          f"{unreadable} [{report.seconds:.2f} s]")
    for g, group in enumerate(report.groups, 1):
        detail = "" if group.kind == "exact" else f", distance <= {group.max_distance}"
        print(f"\ngroup {g} ({group.kind}, {len(group.paths)} images{detail})")
        for image_id, path in zip(group.ids, group.paths):
            print(f"  {image_id if image_id >= 0 else '-':>6}  {printable(path)}")
    return 0
