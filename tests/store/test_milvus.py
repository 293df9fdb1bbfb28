"""The Milvus backend (Milvus Lite 2.5): same results as the local backend, shards, refusals."""
from __future__ import annotations

import time

import pytest

pytest.importorskip("milvus_lite", reason="Milvus Lite is not installed (pip install 'milvus-lite==2.5.*')")

from dfsnet.store import ImageIndex  # noqa: E402
from dfsnet.store.milvus import MilvusCodes, MilvusIndex, content_id, in_shard, parse_shard  # noqa: E402
from tests.conftest import make_image_folder  # noqa: E402
from tests.store.test_image_index import _tiny_checkpoint as _checkpoint  # noqa: E402

BITS = 32


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("milvus")
    ckpt = _checkpoint(root / "model")
    images = make_image_folder(root / "images", n_classes=3, per_class=4, size=32, seed=1)
    common = dict(bits=BITS, fit_on=images, precision="fp32", device="cpu", batch_size=8)
    local = ImageIndex.build(ckpt, images, root / "local", **common)
    remote = MilvusIndex.build(ckpt, images, root / "remote", uri=str(root / "codes.db"), collection="world",
                               **common)
    return {"root": root, "ckpt": ckpt, "images": images, "local": local, "remote": remote, "common": common}


def _hits(index, query, k):
    return sorted((h.distance, h.path, h.label) for h in index.search(query, k=k))


def test_search_equals_the_local_backend(world):
    remote = ImageIndex.load(world["root"] / "remote", device="cpu", precision="fp32")
    assert isinstance(remote, MilvusIndex) and len(remote) == 12
    for query in sorted(world["images"].rglob("*.jpg")):
        # Same ids' images and distances: up to the order within a tie, so compare as sets of
        # (distance, path) over the whole index.
        assert _hits(remote, query, 12) == _hits(world["local"], query, 12)
        exact = [h for h in remote.search(query, k=12) if h.distance == 0]
        assert str(query.resolve()) in [h.path for h in exact]
        assert all(h.id == content_id(remote.record(h.id).sha256) for h in exact)
    info = remote.info()
    assert info["backend"]["kind"] == "milvus" and info["backend"]["index_type"] == "BIN_FLAT"
    assert info["count"] == 12 and info["labels"] == {"class_0": 4, "class_1": 4, "class_2": 4}
    assert remote.verify(files="all").ok


def test_add_is_idempotent_remove_and_reopen(world, tmp_path):
    index = MilvusIndex.build(world["ckpt"], world["images"] / "class_0", tmp_path / "idx",
                              uri=str(tmp_path / "c.db"), **world["common"])
    assert len(index) == 4
    report = index.add(world["images"])
    assert (report.n_added, report.n_duplicates) == (8, 4) and len(index) == 12
    assert index.add(world["images"]).n_added == 0
    victim = index.search(world["images"] / "class_1" / "000.jpg", k=1)[0]
    removed = index.remove([victim.id])
    assert [r.path for r in removed.removed] == [victim.path] and removed.count == 11
    index.remove(paths=[world["images"] / "class_2" / "001.jpg"])
    reopened = ImageIndex.load(tmp_path / "idx", device="cpu", precision="fp32")
    assert len(reopened) == 10
    assert all(h.path != victim.path for h in reopened.search(victim.path, k=10))
    with pytest.raises(ValueError, match="no image with id"):
        reopened.remove([12345])


def test_two_shards_equal_one_unsharded_build(world, tmp_path):
    assert parse_shard("1/2") == (1, 2)
    for bad in ("2/2", "x", "1/0", "-1/3"):
        with pytest.raises(ValueError, match="I/N"):
            parse_shard(bad)
    paths = [str(p) for p in sorted(world["images"].rglob("*.jpg"))]
    halves = [[p for p in paths if in_shard(p, (i, 2))] for i in range(2)]
    assert sorted(halves[0] + halves[1]) == paths and not set(halves[0]) & set(halves[1])
    index = MilvusIndex.build(world["ckpt"], world["images"], tmp_path / "idx", uri=str(tmp_path / "s.db"),
                              shard="0/2", **world["common"])
    assert len(index) == len(halves[0])
    assert index.add(world["images"], shard="1/2").n_added == len(halves[1])
    assert index.add(world["images"], shard="0/2").n_added == 0  # re-running a shard adds nothing
    for query in paths[:3]:
        assert _hits(index, query, 12) == _hits(world["local"], query, 12)


def test_refuses_another_model_or_width_a_foreign_schema_and_a_dead_server(world, tmp_path):
    from pymilvus import DataType, MilvusClient

    uri = str(world["root"] / "codes.db")
    other = _checkpoint(tmp_path / "other", seed=3)
    with pytest.raises(ValueError, match="exists"):
        MilvusIndex.build(other, world["images"], tmp_path / "x", uri=uri, collection="world", **world["common"])
    # The folder of another index pointed at this collection: its identity differs.
    clone = MilvusIndex.build(other, world["images"] / "class_0", tmp_path / "y", uri=str(tmp_path / "y.db"),
                              collection="world", **{**world["common"], "bits": 16})
    manifest_path = tmp_path / "y" / "manifest.json"
    manifest_path.write_text(manifest_path.read_text().replace(str(tmp_path / "y.db"), uri))
    del clone
    with pytest.raises(ValueError, match="belongs to another index.*bits"):
        ImageIndex.load(tmp_path / "y", device="cpu")
    client = MilvusClient(str(tmp_path / "foreign.db"))
    schema = MilvusClient.create_schema(auto_id=False, description="someone else's")
    schema.add_field("pk", DataType.INT64, is_primary=True)
    schema.add_field("vec", DataType.FLOAT_VECTOR, dim=4)
    params = client.prepare_index_params()
    params.add_index(field_name="vec", index_type="FLAT", metric_type="L2")
    client.create_collection("theirs", schema=schema, index_params=params)
    client.close()
    identity = ImageIndex.load(world["root"] / "remote", device="cpu")._state.codes.identity
    with pytest.raises(ValueError, match="not a dfsnet collection"):
        MilvusCodes.open(str(tmp_path / "foreign.db"), "theirs", identity)
    started = time.perf_counter()
    with pytest.raises(ValueError, match="http://127.0.0.1:9"):
        MilvusCodes.open("http://127.0.0.1:9", "world", identity, timeout=2.0)
    assert time.perf_counter() - started < 30


def test_more_like_this_paging_and_the_cli(world, tmp_path, capsys):
    import json

    from dfsnet.cli import main

    remote = ImageIndex.load(world["root"] / "remote", device="cpu", precision="fp32")
    first = remote.records(offset=0, limit=5)
    assert [r.id for r in first] == sorted(r.id for r in first) and len(remote.records(offset=10, limit=5)) == 2
    hits = remote.search_id(first[0].id, k=12)
    assert first[0].id in [h.id for h in hits if h.distance == 0]
    out = tmp_path / "cli.idx"
    uri = str(tmp_path / "cli.db")
    code = main(["index", "build", str(out), "--model", str(world["ckpt"]), "--images", str(world["images"]),
                 "--fit-on", str(world["images"]), "--bits", str(BITS), "--backend", "milvus", "--uri", uri,
                 "--shard", "0/2", "--device", "cpu", "--precision", "fp32"])
    assert code == 0 and "Milvus collection 'dfsnet_cli_idx'" in capsys.readouterr().out
    assert main(["index", "add", str(out), "--images", str(world["images"]), "--shard", "1/2",
                 "--device", "cpu", "--precision", "fp32"]) == 0
    capsys.readouterr()
    assert main(["index", "info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 12
    query = sorted(world["images"].rglob("*.jpg"))[0]
    assert main(["search", str(out), str(query), "-k", "3", "--json", "--precision", "fp32"]) == 0
    assert len(json.loads(capsys.readouterr().out)["hits"]) == 3
    assert main(["index", "verify", str(out), "--files", "all"]) == 0
    code = main(["index", "build", str(tmp_path / "z"), "--model", str(world["ckpt"]), "--images",
                 str(world["images"]), "--backend", "milvus"])
    assert code == 2 and "--uri" in capsys.readouterr().err
    code = main(["index", "add", str(world["root"] / "local"), "--images", str(world["images"]), "--shard", "0/2"])
    assert code == 2


def test_dedup_reads_a_milvus_index(world, tmp_path):
    from dfsnet.dedup import find_duplicates
    from tests.store.test_unsupervised import distinct_images
    from tests.test_dedup import plant_copies

    images = distinct_images(tmp_path / "imgs", 12, seed=4)
    (copy,) = plant_copies(images, [images / "005.jpg"])
    MilvusIndex.build(world["ckpt"], images, tmp_path / "idx", uri=str(tmp_path / "d.db"), **world["common"])
    report = find_duplicates(tmp_path / "idx")
    assert report.n_images == 13
    assert [set(g.paths) for g in report.groups if g.kind == "near"] == \
        [{str((images / "005.jpg").resolve()), str(copy.resolve())}]
