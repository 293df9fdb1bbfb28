"""QueryBatcher: concurrent queries share forwards and get exactly the unbatched answers."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

from dfsnet.store import ImageIndex
from dfsnet.web.batcher import QueryBatcher


@pytest.fixture(scope="module")
def index(web_index) -> ImageIndex:
    return ImageIndex.load(web_index["index"], device="cpu")


def _queries(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(7)
    sizes = [(32, 32), (48, 40), (64, 64), (20, 60), (100, 75)]
    return [Image.fromarray(rng.integers(0, 256, (*sizes[i % len(sizes)][::-1], 3), dtype=np.uint8))
            for i in range(n)]


def test_concurrent_queries_of_mixed_sizes_get_the_unbatched_answers(index):
    queries = _queries(24)
    params = [(1 + i % 7, i % 3 == 0) for i in range(len(queries))]
    expected = [index.search(q, k=k, rerank=r) for q, (k, r) in zip(queries, params)]
    batcher = QueryBatcher(index, max_batch=8, max_wait=0.05)
    results: dict[int, list] = {}
    start = threading.Barrier(len(queries))

    def client(i: int) -> None:
        start.wait()
        k, rerank = params[i]
        results[i] = batcher.submit(queries[i], k=k, rerank=rerank).result(timeout=60)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(queries))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    batcher.close()
    for i, want in enumerate(expected):
        got = results[i]
        # Ids, ranks and Hamming distances exactly; a batched forward may round the float
        # features differently in the last bits (measured: 3e-8), so re-rank scores are close.
        assert [(h.rank, h.id, h.distance, h.path, h.label) for h in got] == \
            [(h.rank, h.id, h.distance, h.path, h.label) for h in want]
        if params[i][1]:
            assert [h.score for h in got] == pytest.approx([h.score for h in want], rel=1e-5, abs=1e-7)
        else:
            assert all(h.score is None for h in got)
    assert batcher.batches < len(queries)  # the forwards were shared


def test_a_request_error_reaches_only_its_request(web_index):
    plain = ImageIndex.load(web_index["plain"], device="cpu")  # no stored features: rerank fails
    batcher = QueryBatcher(plain, max_batch=4, max_wait=0.05)
    good = batcher.submit(_queries(1)[0], k=3)
    bad = batcher.submit(_queries(2)[1], k=3, rerank=True)
    assert len(good.result(timeout=60)) == 3
    with pytest.raises(ValueError, match="rerank"):
        bad.result(timeout=60)
    batcher.close()
    assert len(batcher.submit(_queries(1)[0], k=2).result(timeout=60)) == 2  # restarts after close
    batcher.close()


def test_settings_are_checked():
    with pytest.raises(ValueError, match="max_wait"):
        QueryBatcher(object(), max_wait=5)
