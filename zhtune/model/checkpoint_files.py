"""Read a Hugging Face checkpoint folder's safetensors layout without loading tensors, and fingerprint it.

Only safetensors are read: a checkpoint or adapter stored as pickle (``*.bin``) is refused with a message that says
how to convert it, because loading pickle can run arbitrary code.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from zhtune.errors import ConfigError

SHAPE_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "padded_vocab_size",
    "ffn_hidden_size",
    "num_layers",
    "tie_word_embeddings",
)


def weight_shards(model_dir: str | Path) -> dict[str, list[str]]:
    """Map each safetensors shard file name of ``model_dir`` to the tensor names it holds.

    Raises:
        ConfigError: no safetensors weights (only pickle ``.bin`` files, or nothing).
    """
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        shards: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(shard, []).append(name)
        return shards
    single = model_dir / "model.safetensors"
    if single.exists():
        from safetensors import safe_open

        with safe_open(single, "pt") as f:
            return {"model.safetensors": list(f.keys())}
    if list(model_dir.glob("*.bin")):
        raise ConfigError(
            f"{model_dir} holds only pickle (.bin) weights, which zhtune does not load because pickle can run code; "
            "convert once with transformers (from_pretrained then save_pretrained(safe_serialization=True))"
        )
    raise ConfigError(f"{model_dir} has no model.safetensors or model.safetensors.index.json")


def tensor_headers(path: Path) -> dict[str, tuple[str, list[int]]]:
    """``name -> (dtype, shape)`` from a safetensors header, without reading the data."""
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"]) for k, v in header.items()}


def base_fingerprint(model_dir: str | Path) -> str:
    """A short hash of a checkpoint's shape-defining config and its tensor names, dtypes and shapes.

    Two folders get the same fingerprint when they hold the same architecture and tensor layout; it is cheap (headers
    only), so ``train`` records it and ``merge`` checks it. An original ChatGLM folder has the fingerprint of its
    conversion (:func:`zhtune.model.convert.resolve_checkpoint`), the model that is actually trained and merged.
    """
    from zhtune.model.convert import resolve_checkpoint

    model_dir = resolve_checkpoint(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    h = hashlib.sha256(json.dumps({k: config.get(k) for k in SHAPE_KEYS}, sort_keys=True).encode())
    for shard in sorted(weight_shards(model_dir)):
        for name, (dtype, shape) in sorted(tensor_headers(model_dir / shard).items()):
            h.update(f"{name}:{dtype}:{shape};".encode())
    return h.hexdigest()[:16]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
