"""Atomic writes: a file or a folder appears complete under its final name, or not at all.

Both write to a hidden sibling ``.NAME.tmp-PID`` first and rename it into place, so a crash mid-write leaves the
previous version (or nothing) under the final name, never a half-written one. Used for checkpoints and their
``latest`` pointer, final adapters, pipeline manifests and written datasets.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def temp_sibling(final: Path) -> Path:
    """The hidden temporary path written before ``final`` is renamed into place."""
    return final.parent / f".{final.name}.tmp-{os.getpid()}"


def write_text_atomic(path: str | Path, text: str, fsync: bool = False) -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8); with ``fsync`` the bytes are on disk before the rename."""
    path = Path(path)
    tmp = temp_sibling(path)
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(text)
        if fsync:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it replaces ``final``, on an exception it is removed."""
    final = Path(final)
    tmp = temp_sibling(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
