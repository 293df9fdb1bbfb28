"""`dfsnet dedup`: groups of exact and near-duplicates of a folder or an index, as text, JSON or CSV."""
from __future__ import annotations

import csv
import io
import json
import shutil

from dfsnet.cli import main
from tests.store.test_unsupervised import distinct_images
from tests.test_dedup import plant_copies


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_dedup_a_folder_and_an_index(tmp_path, capsys):
    images = distinct_images(tmp_path / "images", 12, seed=21)
    plant_copies(images, [images / "002.jpg"])
    shutil.copyfile(images / "005.jpg", images / "again.jpg")
    code, out, err = run(capsys, "dedup", "--images", images)
    assert code == 0, err
    assert out.startswith("2 groups of duplicates among 13 images: 1 exact, 1 near")
    assert "group 1 (exact, 2 images)" in out and "again.jpg" in out and "copy0.jpg" in out
    code, out, _ = run(capsys, "dedup", "--images", images, "--json")
    groups = json.loads(out)["groups"]
    assert [(g["kind"], sorted(p.rsplit("/", 1)[1] for p in g["paths"])) for g in groups] == [
        ("exact", ["005.jpg", "again.jpg"]), ("near", ["002.jpg", "copy0.jpg"])]
    code, out, _ = run(capsys, "dedup", "--images", images, "--csv")
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == ["group", "kind", "id", "path", "max_distance"] and len(rows) == 5
    assert main(["index", "build", str(tmp_path / "idx"), "--images", str(images), "--image-size", "32",
                 "--bits", "8", "--device", "cpu"]) == 0
    capsys.readouterr()
    code, out, err = run(capsys, "dedup", tmp_path / "idx", "--json")
    assert code == 0 and [g["kind"] for g in json.loads(out)["groups"]] == ["exact", "near"], err
    exact = json.loads(out)["groups"][0]
    assert exact["ids"][0] >= 0 and exact["ids"][1] == -1


def test_dedup_of_distinct_images_and_user_errors(tmp_path, capsys):
    images = distinct_images(tmp_path / "images", 10, seed=22)
    code, out, _ = run(capsys, "dedup", "--images", images)
    assert code == 0 and out.startswith("0 groups of duplicates among 10 images")
    code, _, err = run(capsys, "dedup")
    assert code == 2 and "exactly one of them" in err
    code, _, err = run(capsys, "dedup", "--images", images, "--max-distance", "3")
    assert code == 2 and "max_distance: expected a number in [0, 2]" in err
    code, _, err = run(capsys, "dedup", tmp_path)
    assert code == 2 and "not a dfsnet index" in err
