"""Atomic training checkpoints and exact resume.

A checkpoint folder ``checkpoints/step-0000040`` holds the adapter (peft format, safetensors, the full fp32 weights
whatever the engine sharded), ``trainer_state.pt`` (the full Adam state keyed by parameter name, the scheduler, and
every rank's RNG state; read back with ``weights_only=True``, so no arbitrary pickle is executed) and
``trainer_state.json`` (step, readable). All ranks take part in gathering the states
(``zhtune.train.distributed``); the main process writes them. It is written under a temporary name and renamed into
place only when complete, then ``checkpoints/latest`` is replaced atomically: a crash mid-save leaves the previous
checkpoint and pointer untouched, and the half-written folder is ignored (and removed by the next save).
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


def save_checkpoint(out_dir: Path, step: int, write_adapter, state: dict, info: dict) -> Path:
    """Write checkpoint ``step`` atomically and point ``latest`` at it. Call on the main process only.

    Args:
        out_dir: the run folder.
        step: the optimizer step just completed.
        write_adapter: ``write_adapter(folder)`` saves the full adapter (peft format) into ``folder``.
        state: ``{"optimizer", "scheduler", "rng"}`` (full states, as :mod:`zhtune.train.distributed` gathers them).
        info: readable extras for ``trainer_state.json``.

    Returns:
        The checkpoint folder.
    """
    root = Path(out_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step-*.tmp-*"):  # left by a crash during an earlier save
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step:07d}"
    with atomic_dir(final) as tmp:
        write_adapter(tmp)
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


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The full trainable weights (keyed like the live peft model's parameters) and the trainer state of ``path``.

    Raises:
        ConfigError: the folder has no adapter weights.
    """
    from safetensors.torch import load_file

    weights_file = path / "adapter_model.safetensors"
    if not weights_file.exists():
        raise ConfigError(f"checkpoint {path} has no adapter_model.safetensors")
    state = torch.load(path / "trainer_state.pt", weights_only=True)
    return load_file(weights_file), state


def peft_to_live_names(saved: dict[str, torch.Tensor], live_names: list[str]) -> dict[str, torch.Tensor]:
    """Map saved peft keys (``...q_proj.lora_A.weight``) to the live parameter names (``...lora_A.default.weight``,
    ``...modules_to_save.default.weight``) of the adapter being trained, undoing what peft's save does to names
    (drops ``modules_to_save.`` and the adapter name); unmatched saved keys keep their name."""
    by_saved = {live.replace("modules_to_save.", "").replace(".default", ""): live for live in live_names}
    return {by_saved.get(k, k): v for k, v in saved.items()}


def restore_rng(state: dict, rank: int) -> None:
    """Restore this rank's RNG state (a checkpoint keeps one per rank)."""
    states = state["rng"]
    if isinstance(states, dict):  # written by one process
        states = [states]
    if rank >= len(states):
        raise ConfigError(f"the checkpoint was written by {len(states)} process(es); resume with the same number")
    set_rng_state(states[rank])
