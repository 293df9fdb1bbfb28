"""Flags every command group spells the same way."""
from __future__ import annotations

import argparse
import sys


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto",
                        help="torch device: auto (cuda when available, else cpu), cpu, cuda, cuda:1 ... "
                             "(default: %(default)s)")


def add_precision_arg(parser: argparse.ArgumentParser) -> None:
    from dfsnet.precision import DEFAULT_PRECISION, PRECISIONS

    parser.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION,
                        help="auto: bf16 autocast (+ channels_last on a CPU) where the hardware has native "
                             "bf16 (AMX / AVX512-BF16, or a CUDA GPU), else fp32; full fine-tuning on a CPU "
                             "runs in fp32 + channels_last, which measured faster there (default: %(default)s)")


def add_runtime_arg(parser: argparse.ArgumentParser) -> None:
    from dfsnet.runtime import DEFAULT_RUNTIME, RUNTIMES

    parser.add_argument("--runtime", choices=RUNTIMES, default=DEFAULT_RUNTIME,
                        help="what runs the network: onnx = the index's model.onnx in ONNX Runtime (fp32, CPU; "
                             "a build exports it; searches need no torch), torch = torch in --precision; auto: "
                             "onnx on a CPU where the index has (or the build can export) the graph and bf16 was "
                             "not asked for, else torch; DFSNET_RUNTIME=torch makes auto mean torch "
                             "(default: %(default)s)")


def add_progress_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars on stderr (default: only when stderr is a terminal)")


def progress_enabled(args: argparse.Namespace) -> bool:
    """``--progress`` / ``--no-progress`` as given, else whether stderr is a terminal."""
    return args.progress if args.progress is not None else sys.stderr.isatty()


def add_loader_args(parser: argparse.ArgumentParser) -> None:
    """Batching and decoding settings of commands that run the network over images."""
    parser.add_argument("--batch-size", type=int, default=64, metavar="N",
                        help="images per forward pass (default: %(default)s)")
    parser.add_argument("--num-workers", type=int, default=None, metavar="N",
                        help="image-decoding worker processes (default: one per core for image files, "
                             "at most 8)")
    add_device_arg(parser)
    add_precision_arg(parser)
    add_runtime_arg(parser)
    add_progress_arg(parser)
