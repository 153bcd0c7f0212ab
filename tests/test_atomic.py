"""Atomic writes: the final name holds the old version or the new one, never a partial one."""

from __future__ import annotations

import pytest

from zhtune.atomic import atomic_dir, write_text_atomic


def test_write_text_atomic_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "latest"
    write_text_atomic(path, "step-1")
    write_text_atomic(path, "step-2", fsync=True)
    assert path.read_text() == "step-2"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]


def test_atomic_dir_keeps_the_old_folder_when_filling_fails(tmp_path):
    final = tmp_path / "adapter"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("crash while saving")
    assert (final / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    with atomic_dir(final) as tmp:
        (tmp / "b.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
