"""Shared fixtures: the ``../shared`` folder (skipped with a reason when absent) and real tokenizers."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from tests.tokenizers import load_tokenizer

SHARED = Path(os.environ.get("ZHTUNE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
SHARED_MISSING = f"../shared is absent ({SHARED}): real tokenizers and data are not available on this machine"

# zhtune's caches (fingerprints, converted checkpoints, tokenized data) go to a fresh folder per test session, never to
# the developer's ~/.cache; subprocesses started by tests inherit it.
os.environ.setdefault("ZHTUNE_CACHE", tempfile.mkdtemp(prefix="zhtune-test-cache-"))


@pytest.fixture(scope="session")
def shared() -> Path:
    if not (SHARED / "tokenizers").is_dir():
        pytest.skip(SHARED_MISSING)
    return SHARED


@pytest.fixture(scope="session")
def real_tokenizer(shared, tmp_path_factory):
    """``real_tokenizer(name)`` loads a tokenizer from ../shared/tokenizers (converted once per session)."""
    cache = tmp_path_factory.mktemp("tokenizers")
    loaded = {}

    def get(name: str):
        if name not in loaded:
            loaded[name] = load_tokenizer(name, shared, cache)
        return loaded[name]

    return get
