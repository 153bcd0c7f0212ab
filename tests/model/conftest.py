"""Fixtures for the ChatGLM conversion tests: tiny original checkpoints saved like the released ones, and a private
conversion cache per test."""

from __future__ import annotations

import pytest
import torch

from tests.model.reference import build_original, randomize, save_original, tiny_config


@pytest.fixture(autouse=True)
def conversion_cache(tmp_path, monkeypatch):
    """Every test converts into its own cache (``$ZHTUNE_CACHE``), never the user's."""
    monkeypatch.setenv("ZHTUNE_CACHE", str(tmp_path / "zhtune-cache"))
    return tmp_path / "zhtune-cache"


@pytest.fixture
def original(shared, tmp_path):
    """``original(case, **options)`` -> ``(folder, config)``: a tiny random original checkpoint of ``case``
    (bf16 ``pytorch_model-*.bin`` shards with an index, the model code beside them, by default)."""

    def make(
        case: str,
        dtype=torch.bfloat16,
        shards: int = 3,
        fmt: str = "bin",
        code: bool = True,
        seed: int = 0,
        name: str | None = None,
        **changes,
    ):
        config = tiny_config(shared, case, **changes)
        state = randomize(build_original(shared, case, config), seed)
        folder = tmp_path / (name or f"{case}-original")
        save_original(folder, shared, case, config, state, dtype=dtype, shards=shards, fmt=fmt, code=code)
        return folder, config

    return make
