"""remove, prune, repair, re-pointing moved files, and build over an existing index (issue 13, D7-D9)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from dfsnet.cli import main
from dfsnet.errors import UserError
from dfsnet.store import ImageIndex, prune_index, read_manifest, repair_index, verify_index
from tests.conftest import make_image_folder
from tests.store.test_integrity import BITS, _checkpoint, damage


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("maint") / "model")


@pytest.fixture
def world(ckpt, tmp_path) -> dict:
    images = make_image_folder(tmp_path / "images", n_classes=2, per_class=3, size=32, seed=31)
    index = ImageIndex.build(ckpt, images, tmp_path / "index", bits=BITS, fit_on=images, store_features=True)
    return {"images": images, "index": index, "dir": tmp_path / "index", "tmp": tmp_path}


def test_remove_by_id_and_path_keeps_ids_stable(world):
    index, images = world["index"], world["images"]
    path = index.record(4).path
    report = index.remove([1], paths=[path])
    assert [r.id for r in report.removed] == [1, 4] and len(index) == report.count == 4
    assert index.record(5).id == 5
    with pytest.raises(KeyError):
        index.record(1)
    hits = index.search(images / "class_1" / "001.jpg", k=6, rerank=True)
    assert {h.id for h in hits} == {0, 2, 3, 5} and hits[0].id != 4
    # A re-added image gets a new id, never a removed one; features stay addressed by id.
    report = index.add(images)
    assert report.n_added == 2 and sorted(r.id for r in index._state.metadata.all_records()) == [0, 2, 3, 5, 6, 7]
    assert index.search(path, k=1, rerank=True)[0].path == path
    assert verify_index(world["dir"], files="all").ok
    with pytest.raises(UserError, match="99"):
        index.remove([99])
    assert len(index) == 6


def test_prune_drops_gone_and_changed_files(world, capsys):
    index, images = world["index"], world["images"]
    (images / "class_0" / "000.jpg").unlink()
    Image.new("RGB", (32, 32), "white").save(images / "class_1" / "002.jpg")
    code = main(["index", "prune", str(world["dir"]), "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0 and "would remove 2 stale images (1 gone, 1 changed)" in out
    assert len(ImageIndex.load(world["dir"])) == 6
    report = prune_index(world["dir"])
    assert [r.id for r in report.gone] == [0] and [r.id for r in report.changed] == [5] and report.count == 4
    assert index.refresh() and len(index) == 4 and verify_index(world["dir"], files="all").ok


def test_add_re_points_a_moved_file(world):
    """D9: a moved file's old id stayed forever (404 thumbnail); now add re-points it."""
    index = world["index"]
    old = index.record(2).path
    new = world["tmp"] / "moved" / "class_0" / "renamed.jpg"
    new.parent.mkdir(parents=True)
    shutil.move(old, new)
    report = index.add(world["tmp"] / "moved")
    assert (report.n_added, report.n_moved, report.n_duplicates) == (0, 1, 0)
    assert index.record(2).path == str(new) and len(index) == 6
    assert verify_index(world["dir"], files="all").ok


def test_a_name_that_is_not_utf8_is_skipped_and_counted(world):
    """D8: one such file aborted the whole add without naming it."""
    more = make_image_folder(world["tmp"] / "more", n_classes=1, per_class=2, size=32, seed=32)
    bad = os.fsencode(more / "class_0") + b"/caf\xe9.jpg"
    shutil.copy(more / "class_0" / "000.jpg", os.fsdecode(bad))
    os.unlink(more / "class_0" / "000.jpg")
    report = world["index"].add(more)
    assert (report.n_added, report.n_bad) == (1, 1) and report.bad_paths[0].endswith("caf\\xe9.jpg")


def test_a_fifo_is_never_opened(world):
    """D10: opening a FIFO blocks; the folder scan lists regular files only (it never gets here)."""
    more = make_image_folder(world["tmp"] / "more", n_classes=1, per_class=1, size=32, seed=33)
    os.mkfifo(more / "class_0" / "pipe.jpg")
    report = world["index"].add(more)
    assert (report.n_found, report.n_added, report.n_bad) == (1, 1, 0)


def test_repair_restores_a_deleted_manifest(world, capsys):
    """D7: with manifest.json gone, the advice was `index build`, which deleted the newer generations."""
    world["index"].add(make_image_folder(world["tmp"] / "more", n_classes=1, per_class=2, seed=34))
    (world["dir"] / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="repair"):
        ImageIndex.load(world["dir"])
    code = main(["index", "build", str(world["dir"]), "--model", str(world["dir"] / "model.safetensors"),
                 "--images", str(world["images"]), "--fit-on", str(world["images"]), "--bits", "16"])
    err = capsys.readouterr().err
    assert code == 2 and "remains of an index" in err and "--force" in err
    assert main(["index", "repair", str(world["dir"])]) == 0
    assert "repaired: the index now serves generation 2 (8 images)" in capsys.readouterr().out
    assert len(ImageIndex.load(world["dir"])) == 8 and verify_index(world["dir"], files="all").ok
    assert main(["index", "repair", str(world["dir"])]) == 0 and "nothing to repair" in capsys.readouterr().out


def test_repair_falls_back_to_the_previous_generation_and_says_what_is_lost(world):
    world["index"].add(make_image_folder(world["tmp"] / "more", n_classes=1, per_class=2, seed=35))
    damage(world["dir"] / read_manifest(world["dir"])["files"]["metadata"], "flip_middle")
    report = repair_index(world["dir"])
    assert report.status == "repaired" and (report.generation, report.count) == (1, 6)
    assert len(report.lost) == 1 and "generation 2, +2 images" in report.lost[0] and "metadata" in report.lost[0]
    assert "metadata.000002.sqlite.lost" in report.kept
    assert verify_index(world["dir"], files="all").ok and len(ImageIndex.load(world["dir"])) == 6


def test_repair_without_any_complete_generation_fails_cleanly(world, capsys):
    damage(world["dir"] / "model.safetensors", "half")
    assert repair_index(world["dir"]).status == "failed"
    assert main(["index", "repair", str(world["dir"])]) == 1
    err = capsys.readouterr().err
    assert "no complete generation" in err and "model.safetensors" in err and "Traceback" not in err


def test_build_force_replaces_an_index_and_numbers_its_generations_above(world, ckpt):
    world["index"].add(make_image_folder(world["tmp"] / "more", n_classes=1, per_class=2, seed=36))
    with pytest.raises(UserError, match="already holds an index"):
        ImageIndex.build(ckpt, world["images"], world["dir"], bits=16, fit_on=world["images"])
    index = ImageIndex.build(ckpt, world["images"] / "class_0", world["dir"], bits=16, fit_on=world["images"],
                             force=True)
    assert index.manifest["generation"] == 3 and len(index) == 3 and index.n_bits == 16
    names = sorted(p.name for p in world["dir"].iterdir())
    assert not any("000001" in n or "000002" in n for n in names), names
    assert json.loads((world["dir"] / "manifest.json").read_text())["next_id"] == 3


@pytest.mark.parametrize("command", [["prune"], ["remove", "--path", "x.jpg"], ["repair"], ["export-onnx"]])
def test_maintenance_of_a_folder_that_is_no_index_says_so_and_leaves_it_untouched(tmp_path, capsys, command):
    plain = tmp_path / "photos"
    plain.mkdir()
    (plain / "a.jpg").write_bytes(b"not touched")
    code = main(["index", command[0], str(plain), *command[1:]])
    err = capsys.readouterr().err
    assert code != 0 and ("not a dfsnet index" in err or "no manifest" in err) and "Traceback" not in err
    assert sorted(p.name for p in plain.iterdir()) == ["a.jpg"]  # no .lock left behind
    code = main(["index", command[0], str(tmp_path / "nowhere"), *command[1:]])
    err = capsys.readouterr().err
    assert code != 0 and "no such folder" in err and ".lock" not in err
