"""Gathering concurrent queries into one forward pass.

One worker thread owns the network: it takes the first waiting query, collects more for at most
``max_wait`` seconds (or until ``max_batch``), embeds them in one forward and answers each with
its own Hamming search. While a forward runs, new queries queue up and form the next batch, so
under load batches fill by themselves and an idle server answers a lone query after at most
``max_wait``. Per query the answer is what :meth:`ImageIndex.search` returns for that image.
"""
from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from concurrent.futures import Future

from dfsnet._validation import check_positive_int
from dfsnet.errors import InputError

__all__ = ["QueryBatcher"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class _Query:
    image: object
    k: int
    rerank: bool
    future: Future


class QueryBatcher:
    """Embed concurrent queries of one :class:`dfsnet.store.ImageIndex` in shared forwards.

    Parameters
    ----------
    index : dfsnet.store.ImageIndex
    max_batch : int
        Most queries in one forward.
    max_wait : float
        Seconds the worker waits for more queries after the first one of a batch.
    """

    def __init__(self, index, *, max_batch: int = 16, max_wait: float = 0.005):
        self.index = index
        self.max_batch = check_positive_int(max_batch, name="max_batch")
        if not 0 <= max_wait <= 1:
            raise InputError(f"max_wait: expected seconds in [0, 1], got {max_wait!r}")
        self.max_wait = float(max_wait)
        self.batches = 0  # forwards run, for tests and logs
        self._queue: queue.Queue[_Query | None] = queue.Queue()
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None

    def submit(self, image, *, k: int = 10, rerank: bool = False) -> Future:
        """Queue one decoded query image; the future's result is its list of SearchHit.

        The worker thread starts with the first query (again after :meth:`close`), so an app
        served several times (a test client per test, say) keeps working.
        """
        future: Future = Future()
        with self._lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._run, name="dfsnet-query-batcher", daemon=True)
                self._worker.start()
            self._queue.put(_Query(image, k, rerank, future))
        return future

    def close(self, timeout: float = 10.0) -> None:
        """Answer what is queued, then stop the worker."""
        with self._lock:
            worker, self._worker = self._worker, None
            if worker is None:
                return
            self._queue.put(None)
        worker.join(timeout)

    def _collect(self, first: _Query) -> tuple[list[_Query], bool]:
        batch, deadline = [first], time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, stop = self._collect(first)
            self._answer(batch)
            if stop:
                return

    def _answer(self, batch: list[_Query]) -> None:
        try:
            features = self.index.embed([q.image for q in batch])
        except Exception as exc:  # noqa: BLE001 - handed to every waiting request, not swallowed
            for q in batch:
                q.future.set_exception(exc)
            return
        self.batches += 1
        logger.debug("embedded a batch of %d queries", len(batch))
        for q, row in zip(batch, features):
            try:
                q.future.set_result(self.index.search_features(row, q.k, rerank=q.rerank))
            except Exception as exc:  # noqa: BLE001 - the request's own error (e.g. rerank without features)
                q.future.set_exception(exc)
