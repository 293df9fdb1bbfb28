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

from dfsnet import __version__
from dfsnet.errors import UserError

COMMAND_MODULES = ("train", "experiment", "index", "serve", "dedup")
# Commands that run Lightning, whose logging is tamed before they start (see _quiet_lightning).
LIGHTNING_COMMANDS = ("train", "experiment", "demo")
_LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning")

logger = logging.getLogger("dfsnet.cli")

# What a user's mistake raises: dfsnet's own error types, and OS errors about the paths given
# (missing, a folder where a file belongs, no permission). Anything else is a bug and keeps its
# traceback. (scikit-learn's NotFittedError is one too; see _is_user_error.)
USER_ERRORS = (UserError, OSError)


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


class _DropAdverts(logging.Filter):
    """Drops Lightning's "Tip: ... try installing litmodels/litlogger" lines, which are adverts."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.msg)


def _quiet_lightning(verbose: int) -> None:
    """One copy of each Lightning log line, in the CLI's format, at WARNING unless ``-v``, no adverts.

    ``import lightning`` attaches its own stderr handler to the "lightning" logger while also
    propagating to the root, so every line came out twice (bare and timestamped); it also sets
    INFO on its loggers, bypassing the CLI's levels. Importing it here (the command imports it
    anyway) lets the dispatcher undo both before the command runs.
    """
    import lightning  # noqa: F401  (for its import-time handlers)

    for name in _LIGHTNING_LOGGERS:
        log = logging.getLogger(name)
        for handler in list(log.handlers):
            log.removeHandler(handler)
        log.propagate = True
        log.setLevel(logging.NOTSET if verbose else logging.WARNING)
    for handler in logging.getLogger().handlers:  # a logger's filter misses its children's records
        handler.addFilter(_DropAdverts())


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
    if args.command in LIGHTNING_COMMANDS:
        _quiet_lightning(args.verbose)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if not _is_user_error(exc):
            raise
        if args.verbose:
            logger.error("traceback of the error below", exc_info=exc)
        print(f"dfsnet {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a user's mistake (:data:`USER_ERRORS`, or an estimator used before fit).

    scikit-learn is looked up, not imported: a command that never imported it cannot have raised
    its error, and importing it would cost a second of every command's start-up.
    """
    sk = sys.modules.get("sklearn.exceptions")
    return isinstance(exc, USER_ERRORS) or (sk is not None and isinstance(exc, sk.NotFittedError))
