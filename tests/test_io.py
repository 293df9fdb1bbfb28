"""dfsnet._io: atomic writes keep the old file on failure and refuse impossible targets up front."""
from __future__ import annotations

import pytest

from dfsnet._io import atomic_write, atomic_write_text, sha256_file


def test_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(path, "w") as fh:
            fh.write("new")
            raise RuntimeError("boom")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_folders_are_created_and_impossible_targets_refused(tmp_path):
    atomic_write_text(tmp_path / "a" / "b" / "f.txt", "x")
    assert sha256_file(tmp_path / "a" / "b" / "f.txt") == (
        "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881")
    # A folder as the target failed only at the final rename, naming the temp file.
    with pytest.raises(IsADirectoryError, match=r"path: expected a file to write, but .*a is a folder"):
        atomic_write_text(tmp_path / "a", "x")
    with pytest.raises(NotADirectoryError, match="a file is in the way of its folder"):
        atomic_write_text(tmp_path / "a" / "b" / "f.txt" / "g.txt", "x")
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["f.txt"]


def test_files_get_the_umask_mode_not_0600(tmp_path):
    import os
    import stat

    from dfsnet._io import new_file_mode

    old = os.umask(0o027)
    try:
        assert new_file_mode() == 0o640
        atomic_write_text(tmp_path / "shared.txt", "x")
        assert stat.S_IMODE((tmp_path / "shared.txt").stat().st_mode) == 0o640
    finally:
        os.umask(old)
    atomic_write_text(tmp_path / "usual.txt", "x")
    assert stat.S_IMODE((tmp_path / "usual.txt").stat().st_mode) == 0o666 & ~old
