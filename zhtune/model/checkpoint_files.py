"""Read a Hugging Face checkpoint folder's safetensors layout without loading tensors, and fingerprint its content.

Only safetensors are read: a checkpoint or adapter stored as pickle (``*.bin``) is refused with a message that says
how to convert it, because loading pickle can run arbitrary code.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from zhtune.atomic import write_text_atomic
from zhtune.errors import ConfigError
from zhtune.paths import cache_root

MERGE_REPORT = "merge_report.json"
# config.json keys that say nothing about what the model computes (who saved it, with which library version)
COSMETIC_KEYS = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache", "architectures")


# how the input embedding tensor ends in the checkpoints zhtune knows (Llama/Qwen/GLM/Mistral/Phi-3, ChatGLM, GPT-2)
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "word_embeddings.weight", "wte.weight")


def embedding_tensor_name(names) -> str | None:
    """The input embedding among checkpoint tensor ``names`` (None when there is none)."""
    return next((n for n in sorted(names) if n.endswith(EMBEDDING_SUFFIXES)), None)


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


def tensor_digests(path: Path) -> dict[str, str]:
    """``name -> sha256`` of each tensor's dtype, shape and data bytes in the safetensors file ``path``.

    The digests depend on the tensors alone, not on the file's header layout or on how a model is sharded. They are
    cached under ``cache_root()/fingerprints`` keyed by the file's absolute path, size and modification time, so an
    unchanged file is read once; a file rewritten in place (new mtime or size) is hashed again.
    """
    path = Path(path).resolve()
    cache_file, stamp = _digest_cache(path)
    if cache_file.exists():
        try:
            cached = json.loads(cache_file.read_text())
            if {k: cached.get(k) for k in stamp} == stamp:
                return cached["tensors"]
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache entry is rebuilt
    digests = {}
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        start = 8 + size
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            begin, end = info["data_offsets"]
            h = tensor_hasher(info["dtype"], info["shape"])
            f.seek(start + begin)
            remaining = end - begin
            while remaining:
                block = f.read(min(remaining, 1 << 20))
                if not block:
                    raise ConfigError(f"{path}: tensor {name} is cut short (the file is truncated)")
                h.update(block)
                remaining -= len(block)
            digests[name] = h.hexdigest()
    remember_digests(path, digests)
    return digests


def tensor_hasher(dtype: str, shape: list[int]):
    """The sha256 object a tensor's digest starts from (its safetensors dtype name and shape); feed it the bytes."""
    return hashlib.sha256(f"{dtype}:{list(shape)};".encode())


def remember_digests(path: Path, digests: dict[str, str]) -> None:
    """Store ``digests`` as the tensor digests of the file ``path`` as it is now (a writer that hashed the bytes
    while writing them spares the next fingerprint a read)."""
    cache_file, stamp = _digest_cache(Path(path).resolve())
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(cache_file, json.dumps({**stamp, "tensors": digests}))


def _digest_cache(path: Path) -> tuple[Path, dict]:
    stat = path.stat()
    key = hashlib.sha256(str(path).encode()).hexdigest()[:32]
    return cache_root() / "fingerprints" / f"{key}.json", {
        "path": str(path),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
    }


def base_fingerprint(model_dir: str | Path) -> str:
    """A short hash of what a checkpoint computes: its config (without cosmetic keys) and every tensor's bytes.

    Two folders get the same fingerprint exactly when they hold the same tensors (names, dtypes, shapes and values,
    however they are sharded) under the same configuration; a base and its -Instruct sibling, or weights updated in
    place, differ. Tensor digests are cached per shard file (:func:`tensor_digests`), so ``train``, ``merge`` and the
    pipeline can fingerprint a model repeatedly at the cost of one read. An original ChatGLM folder has the
    fingerprint of its conversion (:func:`zhtune.model.convert.resolve_checkpoint`), the model actually trained and
    merged.
    """
    from zhtune.model.convert import resolve_checkpoint

    model_dir = resolve_checkpoint(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    h = hashlib.sha256(json.dumps({k: v for k, v in config.items() if k not in COSMETIC_KEYS}, sort_keys=True).encode())
    digests = {}
    for shard in weight_shards(model_dir):
        digests.update(tensor_digests(model_dir / shard))
    for name in sorted(digests):
        h.update(f"{name}={digests[name]};".encode())
    return h.hexdigest()[:16]


def model_lineage(model_dir: str | Path) -> dict:
    """How a model was made: ``{"root": fingerprint, "adapters": [sha256, ...]}``.

    A zhtune-merged model whose ``merge_report.json`` still describes it (its recorded fingerprint equals the folder's
    own) is the root model plus the adapters merged into it, in order; any other model (or a merged one changed since)
    is its own root. Training records the lineage of the model an adapter was trained on, so that ``zhtune merge`` can
    check every adapter of a chain against the model it is applied to.
    """
    fingerprint = base_fingerprint(model_dir)
    report = Path(model_dir) / MERGE_REPORT
    if report.exists():
        try:
            recorded = json.loads(report.read_text())
        except ValueError:
            recorded = {}
        lineage = recorded.get("lineage")
        if lineage and recorded.get("fingerprint") == fingerprint:
            return {"root": lineage["root"], "adapters": list(lineage["adapters"])}
    return {"root": fingerprint, "adapters": []}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
