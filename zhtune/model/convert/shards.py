"""Read a checkpoint's weights shard by shard (safetensors, or pickle holding plain tensors only) and write
converted shards as safetensors, one tensor in memory at a time.

Original ChatGLM checkpoints ship ``pytorch_model-*.bin`` pickles. They are read with
``torch.load(weights_only=True)`` (memory-mapped when the file allows it), which unpickles tensors and plain
containers only; a file that holds anything else, or is not a flat ``name -> tensor`` dictionary, is refused with
an error that names it. Safetensors shards are read lazily.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator
from pathlib import Path

import torch

from zhtune.errors import ConfigError
from zhtune.model.safetensors_io import SAFETENSORS_DTYPES, write_safetensors

ST_INDEX, BIN_INDEX = "model.safetensors.index.json", "pytorch_model.bin.index.json"


def load_plain_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A pickled ``{name: tensor}`` file, unpickling plain tensors only.

    Raises:
        ConfigError: the file holds other objects (refused by ``weights_only``), or is not a flat tensor dict.
    """
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # legacy (pre-zip) serialization cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"{path}: holds objects other than plain tensors, which zhtune does not unpickle because pickle can run "
            f"code (torch.load(weights_only=True) refused: {reason}); convert it with code you trust first"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise ConfigError(f"{path}: not a readable PyTorch checkpoint ({exc})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        bad = (
            type(state).__name__
            if not isinstance(state, dict)
            else next(
                f"{k!r}: {type(v).__name__}"
                for k, v in state.items()
                if not (isinstance(k, str) and torch.is_tensor(v))
            )
        )
        raise ConfigError(f"{path}: not a flat name -> tensor dictionary ({bad}); zhtune reads plain state dicts only")
    return state


def source_shards(folder: Path, prefix: str = "model") -> list[str]:
    """Weight files of ``folder`` in order: safetensors if present, else the pickle ``.bin`` shards.

    Raises:
        ConfigError: no weights at all.
    """
    for index, single in ((ST_INDEX, f"{prefix}.safetensors"), (BIN_INDEX, "pytorch_model.bin")):
        if (folder / index).exists():
            weight_map = json.loads((folder / index).read_text())["weight_map"]
            return list(dict.fromkeys(weight_map[k] for k in weight_map))
        if (folder / single).exists():
            return [single]
    raise ConfigError(f"{folder} has no weights (model.safetensors[.index.json] or pytorch_model[-*].bin[.index.json])")


class ShardReader:
    """The tensors of one shard: names and shapes up front, data one tensor at a time."""

    def __init__(self, path: Path):
        self.path = path
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            self._handle = safe_open(path, "pt")
            self._state = None
            self.names = list(self._handle.keys())
        else:
            self._handle = None
            self._state = load_plain_tensors(path)
            self.names = list(self._state)

    def shape(self, name: str) -> list[int]:
        if self._state is not None:
            return list(self._state[name].shape)
        return list(self._handle.get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        if self._state is not None:
            return self._state[name].dtype
        return SAFETENSORS_DTYPES[self._handle.get_slice(name).get_dtype()]

    def get(self, name: str) -> torch.Tensor:
        return self._state[name] if self._state is not None else self._handle.get_tensor(name)

    def close(self) -> None:
        self._state, self._handle = None, None


class TensorIndex:
    """Random access by name across the safetensors shards of a folder (for gathering q/k/v on the way back)."""

    def __init__(self, folder: Path):
        self.shards = source_shards(folder)
        if any(not s.endswith(".safetensors") for s in self.shards):
            raise ConfigError(f"{folder}: the way back reads a converted (safetensors) checkpoint")
        self.readers = {s: ShardReader(folder / s) for s in self.shards}
        self.where = {n: s for s, r in self.readers.items() for n in r.names}

    def shape(self, name: str) -> list[int]:
        return self.readers[self.where[name]].shape(name)

    def get(self, name: str) -> torch.Tensor:
        return self.readers[self.where[name]].get(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.readers[self.where[name]].dtype(name)

    def names_in(self, shard: str) -> list[str]:
        return self.readers[shard].names


def shard_name(i: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def write_shard(path: Path, pieces: list, fetch, dtype_of) -> None:
    """Write the pieces (see :class:`zhtune.model.convert.chatglm.Piece`) to one safetensors file, making each
    piece only when it is written. ``fetch(name)`` returns a source tensor and ``dtype_of(name)`` its dtype; every
    piece keeps the dtype of its first source.
    """
    by_name = {p.name: p for p in pieces}

    def produce(name, _dtype):
        piece = by_name[name]
        tensor = piece.make([fetch(s) for s in piece.sources])
        if list(tensor.shape) != list(piece.shape):
            raise ConfigError(f"{name}: made shape {tuple(tensor.shape)}, planned {tuple(piece.shape)}")
        return tensor

    write_safetensors(path, [(p.name, dtype_of(p.sources[0]), p.shape) for p in pieces], produce)


def write_index(folder: Path, weight_map: dict[str, str]) -> None:
    """``model.safetensors.index.json`` for the shards of ``weight_map`` (none needed for a single file)."""
    shards = sorted(set(weight_map.values()))
    if len(shards) == 1 and shards[0] != "model.safetensors":
        (folder / shards[0]).rename(folder / "model.safetensors")
        for name in weight_map:
            weight_map[name] = "model.safetensors"
    elif len(shards) > 1:
        total = sum((folder / s).stat().st_size for s in shards)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / ST_INDEX).write_text(json.dumps(index, indent=2))


def iter_shards(folder: Path) -> Iterator[tuple[int, int, ShardReader]]:
    """``(i, n, reader)`` for each weight file of ``folder``, one open at a time."""
    shards = source_shards(folder)
    for i, shard in enumerate(shards):
        reader = ShardReader(folder / shard)
        try:
            yield i, len(shards), reader
        finally:
            reader.close()
