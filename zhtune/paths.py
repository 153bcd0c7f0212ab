"""Where zhtune keeps what it can rebuild: ``$ZHTUNE_CACHE`` or ``~/.cache/zhtune``.

Fingerprint caches, converted checkpoints and tokenized data live under this one root, so that one variable moves
them all (and tests point it at a temporary folder). Nothing here is user data: removing the folder only costs time.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The cache folder: ``$ZHTUNE_CACHE`` when set, else ``~/.cache/zhtune`` (not created here)."""
    env = os.environ.get("ZHTUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "zhtune"
