"""HammingIndex: exact against brute force, tie order, padding, IVF recall, bad input."""
from __future__ import annotations

import faiss
import numpy as np
import pytest

from dfsnet.index import HammingIndex, _common, hamming


def brute_force(db: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int, n_bits: int):
    """Reference: numpy popcount distances, top-k by (distance, id), padded with -1."""
    bits_q = np.unpackbits(q, axis=1)[:, :n_bits].astype(bool)
    bits_db = np.unpackbits(db, axis=1)[:, :n_bits].astype(bool)
    dist = (bits_q[:, None, :] != bits_db[None, :, :]).sum(-1)
    order = np.lexsort((np.broadcast_to(ids, dist.shape), dist), axis=1)[:, :k]
    d = np.full((q.shape[0], k), -1, dtype=np.int32)
    i = np.full((q.shape[0], k), -1, dtype=np.int64)
    d[:, :order.shape[1]] = np.take_along_axis(dist, order, 1)
    i[:, :order.shape[1]] = ids[order]
    return d, i


def low_entropy_codes(rng, n: int, n_bytes: int) -> np.ndarray:
    """Codes with only a few set bits in a few bytes: distances tie massively."""
    codes = np.zeros((n, n_bytes), dtype=np.uint8)
    codes[:, :2] = rng.choice(np.array([0, 1, 3, 0x80], dtype=np.uint8), size=(n, 2))
    return codes


@pytest.fixture(params=[True, False], ids=["faiss-order", "deeper-search"])
def tie_path(request, monkeypatch):
    """Run a test on the flat fast path and on the general deeper-search path."""
    if not request.param:
        monkeypatch.setattr(hamming, "_flat_ties_by_position", lambda n_threads: False)
    return request.param


def test_flat_matches_brute_force_on_random_codes(rng, tie_path):
    db = rng.integers(0, 256, size=(3000, 8), dtype=np.uint8)
    q = rng.integers(0, 256, size=(40, 8), dtype=np.uint8)
    index = HammingIndex(64)
    index.add(db)
    distances, ids = index.search(q, 25)
    ref_d, ref_i = brute_force(db, np.arange(3000), q, 25, 64)
    assert distances.dtype == np.int32 and ids.dtype == np.int64
    np.testing.assert_array_equal(distances, ref_d)
    np.testing.assert_array_equal(ids, ref_i)


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("n_bits", [64, 13])
def test_ties_come_back_in_ascending_id(rng, tie_path, n_threads, n_bits):
    n_bytes = (n_bits + 7) // 8
    db = low_entropy_codes(rng, 4000, n_bytes)
    ids = rng.permutation(50_000)[:4000]
    q = np.concatenate([db[:10], low_entropy_codes(rng, 10, n_bytes)])
    index = HammingIndex(n_bits, n_threads=n_threads)
    # Three batches, ids out of order across and within them.
    for part in np.array_split(np.arange(4000), 3):
        index.add(db[part], ids=ids[part])
    for k in (1, 7, 300, 2500):
        distances, got = index.search(q, k)
        ref_d, ref_i = brute_force(db, ids, q, k, n_bits)
        np.testing.assert_array_equal(distances, ref_d)
        np.testing.assert_array_equal(got, ref_i)
    np.testing.assert_array_equal(index.ids, np.sort(ids))


def test_deeper_search_chunks_and_expands(rng, monkeypatch):
    # Every code identical: the k-th tie can only be settled by fetching the whole index,
    # in several rounds and several query chunks.
    monkeypatch.setattr(hamming, "_flat_ties_by_position", lambda n_threads: False)
    monkeypatch.setattr(_common, "_RESULT_BUDGET", 5000)
    ids = rng.permutation(2000) * 3
    index = HammingIndex(16)
    index.add(np.zeros((2000, 2), dtype=np.uint8), ids=ids)
    distances, got = index.search(np.zeros((9, 2), dtype=np.uint8), 50)
    assert (distances == 0).all()
    np.testing.assert_array_equal(got, np.broadcast_to(np.sort(ids)[:50], (9, 50)))


def test_padding_when_k_exceeds_count(rng, tie_path):
    index = HammingIndex(32)
    db = rng.integers(0, 256, size=(5, 4), dtype=np.uint8)
    index.add(db, ids=[10, 4, 7, 1, 3])
    distances, ids = index.search(db[:2], 8)
    assert distances.shape == ids.shape == (2, 8)
    assert (ids[:, 5:] == -1).all() and (distances[:, 5:] == -1).all()
    assert sorted(ids[0, :5]) == [1, 3, 4, 7, 10] and (distances[:, :5] >= 0).all()


def test_empty_index_and_empty_queries():
    index = HammingIndex(64)
    distances, ids = index.search(np.zeros((3, 8), dtype=np.uint8), 4)
    assert (distances == -1).all() and (ids == -1).all() and ids.shape == (3, 4)
    index.add(np.zeros((2, 8), dtype=np.uint8))
    distances, ids = index.search(np.zeros((0, 8), dtype=np.uint8), 4)
    assert distances.shape == ids.shape == (0, 4)
    assert len(HammingIndex(64, kind="ivf")) == 0


def test_padding_bits_never_count(rng):
    # 12 bits: the low 4 bits of the second byte are padding, whatever the caller left there.
    clean = rng.integers(0, 256, size=(200, 2), dtype=np.uint8)
    clean[:, 1] &= 0xF0
    dirty = clean | rng.integers(0, 16, size=(200, 2), dtype=np.uint8) * np.array([0, 1], dtype=np.uint8)
    index = HammingIndex(12)
    index.add(dirty)
    distances, ids = index.search(dirty[:20], 10)
    ref_d, ref_i = brute_force(clean, np.arange(200), clean[:20], 10, 12)
    np.testing.assert_array_equal(distances, ref_d)
    np.testing.assert_array_equal(ids, ref_i)
    assert distances.max() <= 12


def test_default_ids_continue_after_largest():
    index = HammingIndex(8)
    index.add(np.zeros((2, 1), dtype=np.uint8))
    index.add(np.zeros((1, 1), dtype=np.uint8), ids=[10])
    index.add(np.ones((2, 1), dtype=np.uint8))
    np.testing.assert_array_equal(index.ids, [0, 1, 10, 11, 12])
    assert len(index) == 5
    with pytest.raises(ValueError):
        index.ids[0] = 5  # read-only view


@pytest.mark.parametrize("ids, exc, match", [
    ([0, 1, 1], ValueError, "appears more than once"),
    ([0, 5, 6], ValueError, "already in the index"),
    ([0, 1], ValueError, r"expected shape \(3,\)"),
    ([7, -2, 8], ValueError, "non-negative"),
    ([7.0, 8.0, 9.0], TypeError, "integer ids"),
])
def test_bad_ids_are_refused(ids, exc, match):
    index = HammingIndex(8)
    index.add(np.zeros((1, 1), dtype=np.uint8), ids=[5])
    with pytest.raises(exc, match=f"ids: .*{match}"):
        index.add(np.zeros((3, 1), dtype=np.uint8), ids=ids)
    assert len(index) == 1


@pytest.mark.parametrize("codes, exc, match", [
    (np.zeros((3, 8), dtype=np.int64), TypeError, "expected packed uint8 codes, got dtype int64"),
    (np.zeros((3, 64), dtype=bool), TypeError, "expected packed uint8 codes, got dtype bool.*pack_bits"),
    (np.zeros((3, 4), dtype=np.uint8), ValueError, r"expected 8 bytes per code.*got shape \(3, 4\)"),
    (np.zeros(8, dtype=np.uint8), ValueError, "expected a 2-D array"),
    (None, TypeError, "expected an array"),
])
def test_bad_codes_are_refused(codes, exc, match):
    index = HammingIndex(64)
    with pytest.raises(exc, match=f"x: {match}"):
        index.add(codes)
    with pytest.raises(exc, match=f"q: {match}"):
        index.search(codes, 3)


@pytest.mark.parametrize("k, exc", [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)])
def test_bad_k_is_refused(k, exc):
    index = HammingIndex(8)
    index.add(np.zeros((4, 1), dtype=np.uint8))
    with pytest.raises(exc, match="k: expected a positive integer"):
        index.search(np.zeros((1, 1), dtype=np.uint8), k)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match=r"kind: expected one of \['flat', 'ivf'\], got 'hnsw'"):
        HammingIndex(64, kind="hnsw")
    with pytest.raises(ValueError, match="n_bits: expected a positive integer"):
        HammingIndex(0)
    with pytest.raises(ValueError, match="nlist: only used with kind='ivf'"):
        HammingIndex(64, nlist=10)
    with pytest.raises(ValueError, match="nprobe: expected a positive integer"):
        HammingIndex(64, kind="ivf", nprobe=0)
    with pytest.raises(ValueError, match="n_threads: expected a positive integer"):
        HammingIndex(64, n_threads=0)


def test_thread_setting_is_restored(rng):
    previous = faiss.omp_get_max_threads()
    try:
        faiss.omp_set_num_threads(2)
        index = HammingIndex(64, n_threads=1)
        index.add(rng.integers(0, 256, size=(100, 8), dtype=np.uint8))
        index.search(rng.integers(0, 256, size=(5, 8), dtype=np.uint8), 3)
        assert faiss.omp_get_max_threads() == 2
    finally:
        faiss.omp_set_num_threads(previous)


def clustered_codes(rng, centres: np.ndarray, n: int, flip: float = 0.1) -> np.ndarray:
    bits = centres[rng.integers(0, len(centres), n)] ^ (rng.random((n, centres.shape[1])) < flip)
    return np.packbits(bits, axis=1)


def test_ivf_recall_at_default_nprobe_on_clustered_codes(rng):
    centres = rng.random((1000, 64)) < 0.5
    db = clustered_codes(rng, centres, 100_000)
    q = clustered_codes(rng, centres, 200)
    flat = HammingIndex(64)
    flat.add(db)
    ivf = HammingIndex(64, kind="ivf")
    ivf.add(db)
    assert ivf.is_trained and ivf.nlist_ == round(4 * np.sqrt(100_000))
    ref_d, ref_i = flat.search(q, 10)
    distances, ids = ivf.search(q, 10)
    recall = np.mean([np.intersect1d(a, b).size / 10 for a, b in zip(ids, ref_i)])
    assert recall >= 0.95, recall
    # Approximate only by missing codes: never a distance below the exact one.
    assert (distances >= ref_d).all()


def test_ivf_probing_every_list_is_exact_with_ties(rng):
    db = low_entropy_codes(rng, 3000, 4)
    db[:1500] = rng.integers(0, 256, size=(1500, 4), dtype=np.uint8)
    ids = rng.permutation(3000) + 100
    index = HammingIndex(32, kind="ivf", nlist=16, nprobe=16)
    index.train(db)
    index.add(db[:1000], ids=ids[:1000])
    index.add(db[1000:], ids=ids[1000:])
    q = np.concatenate([db[1500:1510], db[:10]])
    for k in (5, 200, 1200):
        distances, got = index.search(q, k)
        ref_d, ref_i = brute_force(db, ids, q, k, 32)
        np.testing.assert_array_equal(distances, ref_d)
        np.testing.assert_array_equal(got, ref_i)


def test_ivf_training_rules(rng):
    codes = rng.integers(0, 256, size=(50, 8), dtype=np.uint8)
    with pytest.raises(ValueError, match="x: expected at least nlist=100 training codes, got 50"):
        HammingIndex(64, kind="ivf", nlist=100).add(codes)
    index = HammingIndex(64, kind="ivf", nlist=4)
    index.add(codes)
    with pytest.raises(ValueError, match="already holds 50 codes"):
        index.train(codes)
    HammingIndex(64).train(codes)  # a no-op for flat


def test_faiss_tie_order_check_detects_another_order(monkeypatch):
    class TiesByDescendingPosition(faiss.IndexBinaryFlat):
        """A faiss that would return equal distances in descending position."""

        def search(self, x, k):
            dist, pos = super().search(x, k)
            order = np.lexsort((-pos, dist), axis=1)
            return np.take_along_axis(dist, order, 1), np.take_along_axis(pos, order, 1)

    assert hamming._flat_ties_by_position.__wrapped__(1)
    monkeypatch.setattr(hamming.faiss, "IndexBinaryFlat", TiesByDescendingPosition)
    assert not hamming._flat_ties_by_position.__wrapped__(1)


@pytest.mark.parametrize("n_bits", [16, 64, 77])
def test_counting_top_k_for_large_k_matches_brute_force(rng, monkeypatch, n_bits):
    # k >= 256 takes faiss's counting top-k; whole rankings (k = len) and padding (k > len).
    monkeypatch.setattr(hamming, "_COUNTING_BUDGET", 20_000)  # several query blocks per call
    n_bytes = (n_bits + 7) // 8
    db = low_entropy_codes(rng, 700, n_bytes)
    db[::3] = rng.integers(0, 256, (len(db[::3]), n_bytes), dtype=np.uint8)
    ids = rng.permutation(700) * 2 + 1
    index = HammingIndex(n_bits)
    index.add(db, ids=ids)
    q = np.concatenate([db[:5], low_entropy_codes(rng, 6, n_bytes)])
    stored = index._codes()  # the padding bits of 77-bit codes are cleared inside
    for k in (256, 700, 900):
        got = index.search(q, k)
        want = brute_force(stored, index.ids, index._check_codes(q, "q"), k, 8 * n_bytes)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    assert hamming._flat_counting_ties_by_position(1)
