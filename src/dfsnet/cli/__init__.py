"""The ``dfsnet`` command line: one module per command group, each command a thin call into the
library. ``dfsnet.cli.main`` holds the dispatcher."""
from dfsnet.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
