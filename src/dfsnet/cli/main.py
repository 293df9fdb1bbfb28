"""The ``dfsnet`` dispatcher.

Each command-group module in ``dfsnet.cli`` exposes ``register(subparsers)``, which adds its
sub-commands and sets ``func`` on them. Heavy imports (torch, faiss) happen inside the
command functions so that ``dfsnet --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from sklearn.exceptions import NotFittedError

from dfsnet import __version__
from dfsnet.errors import UserError

COMMAND_MODULES = ("train", "experiment", "index", "serve")

logger = logging.getLogger("dfsnet.cli")

# What a user's mistake raises: dfsnet's own error types, and OS errors about the paths given
# (missing, a folder where a file belongs, no permission). Anything else is a bug and keeps its
# traceback.
USER_ERRORS = (UserError, OSError, NotFittedError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dfsnet",
        description="Content-based image retrieval with deep feature selection, "
        "information gain rate and hashing (DFS-Net).",
    )
    parser.add_argument("--version", action="version", version=f"dfsnet {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-vv for debug); also the traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"dfsnet.cli.{name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one ``dfsnet`` command; returns its exit code (2 for a user error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # dfsnet's own progress at INFO by default; other libraries' INFO chatter (faiss's loader,
    # Lightning's tips) only with -v, and everything at DEBUG with -vv.
    logging.basicConfig(
        level=(logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)],
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("dfsnet").setLevel(logging.DEBUG if args.verbose >= 2 else logging.INFO)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if args.verbose:
            logger.error("traceback of the error below", exc_info=exc)
        print(f"dfsnet {args.command}: error: {exc}", file=sys.stderr)
        return 2
