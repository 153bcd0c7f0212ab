"""The two lookup tables ChERRANT's char-level substitution cost uses, found and loaded once.

``cilin.txt`` (GBK) is the extended Tongyici Cilin thesaurus: ``code w1 w2 ...``; a word listed twice keeps its last
code. ``confusion_dict.txt`` (UTF-8) lists visually or phonetically confusable characters: ``ch c1 c2 ...``. Both come
with ChERRANT (HillZhang1999/MuCGEC ``scorers/ChERRANT/data``, Apache-2.0); zhtune does not ship them. They are looked
for in ``$ZHTUNE_CHERRANT_TABLES``, ``~/.cache/zhtune/cherrant_tables`` and ``../shared/data/cgec/cherrant_tables``
beside a source checkout.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from zhtune.errors import ConfigError

FILES = ("cilin.txt", "confusion_dict.txt")


def candidate_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("ZHTUNE_CHERRANT_TABLES"):
        dirs.append(Path(os.environ["ZHTUNE_CHERRANT_TABLES"]))
    dirs.append(Path.home() / ".cache" / "zhtune" / "cherrant_tables")
    repo = Path(__file__).resolve().parents[2]
    dirs.append(repo.parent / "shared" / "data" / "cgec" / "cherrant_tables")
    return dirs


def find_tables(explicit: str | Path | None = None) -> Path:
    """The folder holding both tables.

    Raises:
        ConfigError: not found; the message lists where it looked and where the files come from.
    """
    dirs = [Path(explicit)] if explicit else candidate_dirs()
    for d in dirs:
        if all((d / f).exists() for f in FILES):
            return d
    raise ConfigError(
        f"ChERRANT tables {FILES} not found in {[str(d) for d in dirs]}; copy them from ChERRANT's data/ folder "
        "(HillZhang1999/MuCGEC, scorers/ChERRANT/data) into one of these, or pass --tables DIR"
    )


@functools.lru_cache(maxsize=4)
def load_tables(folder: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """``(semantic_dict, confusion_dict)`` as ChERRANT reads them."""
    semantic: dict[str, str] = {}
    for line in (Path(folder) / "cilin.txt").read_text(encoding="gbk").strip().split("\n"):
        code, *words = line.split(" ")
        for word in words:
            semantic[word] = code
    confusion: dict[str, list[str]] = {}
    with open(Path(folder) / "confusion_dict.txt", encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split(" ")
            confusion[parts[0]] = parts[1:]
    return semantic, confusion


def tables_or_empty(explicit: str | Path | None = None) -> tuple[dict, dict, str | None]:
    """``(semantic, confusion, folder)``; without the tables, empty ones and ``None`` (scores then approximate
    ChERRANT: every substitution gets the unknown-class semantic cost). For in-training and demo evaluation, where a
    missing download should not stop the run; ``zhtune score`` insists on the real tables."""
    try:
        folder = find_tables(explicit)
    except ConfigError:
        return {}, {}, None
    semantic, confusion = load_tables(str(folder))
    return semantic, confusion, str(folder)
