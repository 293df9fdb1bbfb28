"""The stage cache of an experiment run: stage keys, cache-hit records and wall times.

Each stage (split, training of each network, features, evaluation) stores its output in the
run folder beside a key: a hash of everything the output depends on. A later run with the same
key resumes from it instead of recomputing, and records the hit in ``cached_stages``.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from dfsnet._io import json_digest

__all__ = ["StageLog", "stage_key"]

logger = logging.getLogger(__name__)


def stage_key(**parts) -> str:
    """16 hex digits hashing the named JSON-serialisable ``parts`` (others by ``str``)."""
    return json_digest(parts, length=16)


class StageLog:
    """Wall time and cache hits of the stages of one setting, for ``results.json``.

    Attributes
    ----------
    seconds : dict of str to float
        Accumulated wall time per stage name.
    cached : list of str
        Stages resumed from the cache, in order.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cached: list[str] = []

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Add the wall time of the ``with`` block to stage ``name``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def hit(self, name: str, what: str) -> None:
        """Record that stage ``name`` was resumed from the cache (``what``: where from)."""
        self.cached.append(name)
        logger.info("stage %s: resumed from cache (%s)", name, what)
