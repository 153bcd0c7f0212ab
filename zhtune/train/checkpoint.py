"""Atomic training checkpoints and exact resume.

A checkpoint folder ``checkpoints/step-0000040`` holds the adapter (peft format, safetensors), ``trainer_state.pt``
(optimizer, scheduler and RNG states; read back with ``weights_only=True``, so no arbitrary pickle is executed) and
``trainer_state.json`` (step, readable). It is written under a temporary name and renamed into place only when
complete, then ``checkpoints/latest`` is replaced atomically: a crash mid-save leaves the previous checkpoint and
pointer untouched, and the half-written folder is ignored (and removed by the next save).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

from zhtune.atomic import atomic_dir, write_text_atomic
from zhtune.errors import ConfigError

CHECKPOINTS = "checkpoints"
LATEST = "latest"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with f.open("rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(path)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: Path, step: int, model, optimizer, scheduler, info: dict) -> Path:
    """Write checkpoint ``step`` atomically and point ``latest`` at it. Call on the main process only."""
    root = Path(out_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step-*.tmp-*"):  # left by a crash during an earlier save
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step:07d}"
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()}
        torch.save({**state, "step": step}, tmp / "trainer_state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **info}, indent=2))
        _fsync_tree(tmp)
    write_text_atomic(root / LATEST, final.name, fsync=True)
    _fsync_dir(root)
    return final


def find_checkpoint(out_dir: Path, resume_from: str) -> Path:
    """Resolve ``resume_from`` (``latest`` or a folder) to a complete checkpoint folder.

    Raises:
        ConfigError: nothing to resume from.
    """
    if resume_from != "latest":
        path = Path(resume_from)
        if not (path / "trainer_state.pt").exists():
            raise ConfigError(f"train.resume_from {path} is not a zhtune checkpoint (no trainer_state.pt)")
        return path
    root = Path(out_dir) / CHECKPOINTS
    pointer = root / LATEST
    if not pointer.exists():
        raise ConfigError(f"train.resume_from is 'latest' but {root} has no checkpoint yet")
    return root / pointer.read_text().strip()


def load_checkpoint(path: Path, model, optimizer, scheduler) -> int:
    """Restore adapter weights, optimizer, scheduler and RNG states from ``path``; return its step."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(path / "adapter_model.safetensors")
    result = set_peft_model_state_dict(model, weights)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ConfigError(f"checkpoint {path} does not fit this model: unexpected tensors {unexpected[:3]}")
    state = torch.load(path / "trainer_state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return int(state["step"])
