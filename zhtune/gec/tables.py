"""The two lookup tables ChERRANT's char-level substitution cost uses, found and loaded once.

``cilin.txt`` (GBK) is the extended Tongyici Cilin thesaurus: ``code w1 w2 ...``; a word listed twice keeps its last
code. ``confusion_dict.txt`` (UTF-8) lists visually or phonetically confusable characters: ``ch c1 c2 ...``. Both come
with ChERRANT (HillZhang1999/MuCGEC ``scorers/ChERRANT/data``, Apache-2.0); zhtune does not ship them:
``zhtune tables download`` fetches them from that repository (a pinned commit) into ``cache_root()/cherrant_tables``
and checks their sha256. They are looked for in ``$ZHTUNE_CHERRANT_TABLES``, that cache folder and
``../shared/data/cgec/cherrant_tables`` beside a source checkout.
"""

from __future__ import annotations

import functools
import hashlib
import os
import urllib.request
from pathlib import Path

from zhtune.atomic import temp_sibling
from zhtune.errors import ConfigError
from zhtune.paths import cache_root

FILES = ("cilin.txt", "confusion_dict.txt")
# ChERRANT's data folder at the commit whose tables reproduce the official scores, and the files' known sha256
TABLES_URL = "https://raw.githubusercontent.com/HillZhang1999/MuCGEC/39221934ee4ccf07801879136a75dd7e11319977/scorers/ChERRANT/data"
SHA256 = {
    "cilin.txt": "d4c707f5d895e00f2223547582f1c2cd8f5888a7cc0d0f687fc28a510b77a6bb",
    "confusion_dict.txt": "aafa202dc451fb79a0a2cfc77b965009daa39d0cedd03e25074c1a35b7ac67b2",
}


def default_dir() -> Path:
    """Where ``zhtune tables download`` puts the tables."""
    return cache_root() / "cherrant_tables"


def download_tables(base_url: str | None = None, dest: Path | None = None, timeout: float = 60.0) -> Path:
    """Fetch ``cilin.txt`` and ``confusion_dict.txt`` from ``base_url`` into ``dest`` and check their sha256.

    Each file appears under its final name only once its bytes match the known hash, so a broken download leaves
    nothing half-written.

    Raises:
        ConfigError: a file cannot be fetched, or its bytes are not the known-good ones.
    """
    base_url, dest = base_url or TABLES_URL, Path(dest) if dest else default_dir()
    dest.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        url = f"{base_url.rstrip('/')}/{name}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - a fixed https URL or the user's
                data = response.read()
        except OSError as exc:
            raise ConfigError(f"cannot download {url}: {exc}") from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != SHA256[name]:
            raise ConfigError(f"{url}: sha256 {digest} is not the known-good {SHA256[name]}; nothing was written")
        tmp = temp_sibling(dest / name)
        tmp.write_bytes(data)
        os.replace(tmp, dest / name)
    return dest


def candidate_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("ZHTUNE_CHERRANT_TABLES"):
        dirs.append(Path(os.environ["ZHTUNE_CHERRANT_TABLES"]))
    dirs.append(default_dir())
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
        f"ChERRANT tables {FILES} not found in {[str(d) for d in dirs]}; run `zhtune tables download` to fetch them "
        "(from HillZhang1999/MuCGEC, scorers/ChERRANT/data, checked by sha256), or pass --tables DIR"
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
