"""Original ChatGLM checkpoints → checkpoints transformers loads without remote code, and the way back.

:func:`detect_original` reads an original ChatGLM folder's ``config.json`` (and, to tell the releases apart, the text
of the code shipped beside it, which is never run): ChatGLM-6B, ChatGLM2-6B(-32k), ChatGLM3-6B(-32k, -base) or
GLM-4-9B-chat (non ``-hf``). :func:`convert_checkpoint` streams the weights shard by shard into the native layout
(:mod:`zhtune.model.convert.chatglm`), writes ``config.json`` (with a conversion record: the original config and the
buffers it dropped), ``generation_config.json`` and the tokenizer, and appears under its final name only when
complete. :func:`convert_to_original` writes the original layout back (bit for bit for a converted checkpoint).
:func:`resolve_checkpoint` lets every command take an original folder: it is converted once into a cache keyed by
the content of the folder.

Not converted: p-tuning prefixes, quantized (-int4/-int8) weights, configurations the native architectures do not
have (each refused with the setting named).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from zhtune.errors import ConfigError
from zhtune.model.convert import chatglm as layouts
from zhtune.model.convert.shards import (
    TensorIndex,
    iter_shards,
    shard_name,
    source_shards,
    write_index,
    write_shard,
)
from zhtune.model.tokenizer import TOKENIZER_FILES

log = logging.getLogger(__name__)
VARIANTS = ("chatglm", "chatglm2", "chatglm3", "glm4")
CONVERTER_VERSION = 1
ORIGINAL_FILES = "original_chatglm"  # code and tokenizer files of the original, kept for the way back
TOKENIZER_DATA = ("tokenizer.model", "ice_text.model")
CODE_FILES = ("configuration_chatglm.py", "modeling_chatglm.py", "tokenization_chatglm.py", "quantization.py")
SIDE_FILES = CODE_FILES + TOKENIZER_DATA + ("tokenizer_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class OriginalCheckpoint:
    """An original ChatGLM folder: which release it is and what its ``rope_ratio`` means in its code."""

    path: Path
    variant: str  # chatglm, chatglm2, chatglm3, glm4
    config: dict
    rope_semantics: str | None  # "base", "positions", or None without a rope_ratio

    @property
    def family(self) -> str:
        return layouts.family_of(self.variant)


def _read_config(path: Path) -> dict:
    file = path / "config.json"
    if not file.exists():
        raise ConfigError(f"{path} is not a checkpoint folder (no config.json)")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{file}:{exc.lineno}: invalid JSON ({exc.msg})") from None


def is_original_chatglm(path: str | Path) -> bool:
    """True for a folder whose ``config.json`` has the original (remote-code) ``model_type`` ``chatglm``."""
    file = Path(path) / "config.json"
    if not file.exists():
        return False
    try:
        return json.loads(file.read_text(encoding="utf-8")).get("model_type") == "chatglm"
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def has_weights(path: str | Path) -> bool:
    """True when ``path`` holds model weights (safetensors or pickle shards), not only tokenizer files."""
    try:
        source_shards(Path(path))
    except ConfigError:
        return False
    return True


def _code_text(path: Path) -> str:
    return "".join((path / f).read_text(encoding="utf-8", errors="replace") for f in CODE_FILES if (path / f).exists())


def _variant_from_code(path: Path, config: dict) -> str | None:
    if int(config.get("padded_vocab_size", 0)) == 151552:
        return "glm4"
    code = _code_text(path)
    if "build_chat_input" in code:
        return "chatglm3"
    if "build_prompt" in code:
        return "chatglm2"
    return None


def _rope_semantics(path: Path, variant: str, config: dict) -> str | None:
    if float(config.get("rope_ratio", 1) or 1) == 1:
        return None
    code = _code_text(path)
    if re.search(r"base\s*=\s*base\s*\*\s*self\.rope_ratio", code):
        return "base"
    if re.search(r"/\s*self\.rope_ratio", code):
        return "positions"
    return "positions" if variant == "chatglm2" else "base"  # the released code of each family


def detect_original(path: str | Path, variant: str | None = None) -> OriginalCheckpoint:
    """Which original ChatGLM release ``path`` holds.

    Args:
        path: the original checkpoint folder.
        variant: force the release (``chatglm``, ``chatglm2``, ``chatglm3``, ``glm4``) when the folder does not
            say (ChatGLM2 and ChatGLM3 share one architecture and config; their code tells them apart).

    Raises:
        ConfigError: not an original ChatGLM checkpoint, an unknown variant, or ChatGLM2/3 without code to tell.
    """
    path = Path(path)
    config = _read_config(path)
    if config.get("model_type") != "chatglm":
        raise ConfigError(
            f"{path}/config.json: model_type {config.get('model_type')!r} is not an original ChatGLM checkpoint "
            "(model_type 'chatglm'); zhtune convert knows ChatGLM-6B, ChatGLM2-6B(-32k), ChatGLM3-6B(-32k, -base) "
            "and GLM-4-9B-chat"
        )
    if variant is not None and variant not in VARIANTS:
        raise ConfigError(f"unknown ChatGLM variant {variant!r} (known: {', '.join(VARIANTS)})")
    v1 = "padded_vocab_size" not in config and ("position_encoding_2d" in config or "inner_hidden_size" in config)
    if variant is None:
        variant = "chatglm" if v1 else _variant_from_code(path, config)
    if variant is None:
        raise ConfigError(
            f"{path}: cannot tell ChatGLM2-6B from ChatGLM3-6B (same config.json, and no modeling_chatglm.py or "
            "tokenization_chatglm.py beside it); pass --variant chatglm2 or --variant chatglm3"
        )
    if (variant == "chatglm") != v1:
        raise ConfigError(f"{path}/config.json does not look like {variant} (padded_vocab_size, position_encoding_2d)")
    return OriginalCheckpoint(path, variant, config, _rope_semantics(path, variant, config))


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"output directory {out} exists and is not empty; choose another --out or empty it")


def _meta_model_shapes(config) -> dict[str, list[int]]:
    """Tensor names and shapes the native model expects (built on the meta device: no memory, no init)."""
    import torch
    from transformers import AutoModelForCausalLM

    from zhtune.model.auto_register import install

    install()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def _convert_weights(orig: OriginalCheckpoint, tmp: Path, expected: dict[str, list[int]]) -> dict:
    """Stream every shard of ``orig`` into ``tmp``; return the dropped buffers, bit for bit."""
    layout = layouts.LAYOUTS[orig.family]
    dims = layouts.dims_of(orig.family, orig.config)
    weight_map, dropped = {}, {}
    for i, n, reader in iter_shards(orig.path):
        pieces = []
        for name in reader.names:
            made = layouts.forward_pieces(layout, dims, name, reader.shape(name))
            if made is None:
                dropped[name] = layouts.tensor_record(reader.get(name))
            else:
                pieces += made
        if pieces:  # a shard that held only dropped buffers leaves no file
            out = shard_name(i, n)
            write_shard(tmp / out, pieces, reader.get, reader.dtype)
            weight_map.update({p.name: out for p in pieces})
    missing = sorted(set(expected) - set(weight_map))
    if missing:
        raise ConfigError(f"{orig.path}: tensors missing for the converted model: {missing[:6]}")
    extra = sorted(set(weight_map) - set(expected))
    if extra:
        raise ConfigError(f"{orig.path}: tensors the converted model does not have: {extra[:6]}")
    write_index(tmp, weight_map)
    return dropped


def _check_shapes(orig: OriginalCheckpoint, tmp: Path, expected: dict[str, list[int]]) -> None:
    from zhtune.model.checkpoint_files import tensor_headers

    for f in tmp.glob("*.safetensors"):
        for name, (_dtype, shape) in tensor_headers(f).items():
            if list(shape) != expected[name]:
                raise ConfigError(
                    f"{orig.path}: {name} has shape {tuple(shape)} but config.json implies {tuple(expected[name])}"
                )


def _write_tokenizer(src: Path, dst: Path, variant: str) -> str:
    tok_config = src / "tokenizer_config.json"
    remote = tok_config.exists() and "auto_map" in json.loads(tok_config.read_text(encoding="utf-8"))
    if (src / "tokenizer.json").exists() and not remote:
        for f in TOKENIZER_FILES:
            if (src / f).exists():
                shutil.copy(src / f, dst / f)
        return "copied (already a fast tokenizer)"
    if any((src / f).exists() for f in TOKENIZER_DATA):
        try:
            from zhtune.model.convert.tokenizers import convert_tokenizer
        except ImportError as exc:
            raise ConfigError(f"tokenizer conversion is not available in this zhtune build ({exc})") from None
        convert_tokenizer(src, dst, variant)
        return "converted from " + next(f for f in TOKENIZER_DATA if (src / f).exists())
    return "none (no tokenizer.model / ice_text.model beside the weights)"


def convert_checkpoint(src: str | Path, out: str | Path, variant: str | None = None) -> dict:
    """Convert the original ChatGLM checkpoint ``src`` into a native one in ``out``.

    Args:
        src: original checkpoint folder (``pytorch_model*.bin`` or safetensors shards, ``config.json``).
        out: output folder; must not exist or be empty.
        variant: force the release (see :func:`detect_original`).

    Returns:
        A summary: variant, model type, rope, shards, tokenizer.

    Raises:
        ConfigError: bad input (unknown config, pickle with non-tensors, unexpected or missing tensors, a setting
            the native architecture lacks) — nothing is left under ``out``.
    """
    from zhtune.atomic import atomic_dir

    orig = detect_original(src, variant)
    out = Path(out)
    _check_out(out)
    dtype = str(orig.config.get("torch_dtype") or orig.config.get("dtype") or "float16")
    record = {
        "format": CONVERTER_VERSION,
        "variant": orig.variant,
        "rope_ratio_semantics": orig.rope_semantics,
        "config": orig.config,
        "dropped": {},
    }
    config = layouts.native_config(orig.variant, orig.rope_semantics, orig.config, dtype, str(src), record)
    expected = _meta_model_shapes(config)
    with atomic_dir(out) as tmp:
        record["dropped"] = _convert_weights(orig, tmp, expected)
        _check_shapes(orig, tmp, expected)
        setattr(config, layouts.RECORD, record)
        config.save_pretrained(tmp)
        source_gen = orig.path / "generation_config.json"
        gen = json.loads(source_gen.read_text()) if source_gen.exists() else None
        generation = layouts.generation_config(orig.variant, orig.config, gen)
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        tokenizer = _write_tokenizer(orig.path, tmp, orig.variant)
        (tmp / ORIGINAL_FILES).mkdir()
        for f in SIDE_FILES:
            if (orig.path / f).exists():
                shutil.copy(orig.path / f, tmp / ORIGINAL_FILES / f)
    return {
        "variant": orig.variant,
        "model_type": config.model_type,
        "rope": _rope_summary(config),
        "shards": len(list(out.glob("*.safetensors"))),
        "tokenizer": tokenizer,
        "out": str(out),
    }


def _rope_summary(config) -> str:
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": getattr(config, "rope_theta", None)}
    return ", ".join(f"{k}={v}" for k, v in sorted(rope.items()))


def convert_to_original(src: str | Path, out: str | Path, original: str | Path | None = None) -> dict:
    """Write the converted (or any native ``glm`` / ``zhtune_chatglm``) checkpoint ``src`` in the original ChatGLM
    layout, as safetensors; a checkpoint converted by zhtune comes back bit for bit (dropped buffers included).

    Args:
        src: native checkpoint folder (safetensors).
        out: output folder; must not exist or be empty.
        original: an original checkpoint folder to take the code and tokenizer files from (default: the copies
            ``zhtune convert`` kept in ``src/original_chatglm``).

    Raises:
        ConfigError: not a native ChatGLM-family checkpoint, or tensors that do not fit the layout.
    """
    from zhtune.atomic import atomic_dir

    src, out = Path(src), Path(out)
    native = _read_config(src)
    variant, config = layouts.original_config(native)
    family = layouts.family_of(variant)
    layout, dims = layouts.LAYOUTS[family], layouts.dims_of(family, config)
    record = native.get(layouts.RECORD) or {}
    _check_out(out)
    index = TensorIndex(src)
    shapes = {n: index.shape(n) for n in index.where}
    buffers = _buffers(layout, config, record)
    fetch = lambda n: buffers[n] if n in buffers else index.get(n)  # noqa: E731
    dtype_of = lambda n: buffers[n].dtype if n in buffers else index.dtype(n)  # noqa: E731
    with atomic_dir(out) as tmp:
        weight_map = {}
        for i, shard in enumerate(index.shards):
            pieces = [p for n in index.names_in(shard) for p in layouts.backward_pieces(layout, dims, n, shapes)]
            if i == 0:  # the buffers the original stores beside the weights
                pieces += [layouts.Piece(n, list(t.shape), (n,), lambda ts: ts[0]) for n, t in buffers.items()]
            if pieces:  # k/v are written with their q, wherever q is
                name = shard_name(i, len(index.shards))
                write_shard(tmp / name, pieces, fetch, dtype_of)
                weight_map.update({p.name: name for p in pieces})
        write_index(tmp, weight_map)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
        side = Path(original) if original else src / ORIGINAL_FILES
        copied = []
        for f in SIDE_FILES:
            if (side / f).exists():
                shutil.copy(side / f, tmp / f)
                copied.append(f)
    return {"variant": variant, "shards": len(index.shards), "side_files": copied, "out": str(out)}


def _buffers(layout, config: dict, record: dict) -> dict:
    """The buffers the original checkpoint stores (rotary inv_freq): the recorded bits, else the original formula."""
    import torch

    dtype = getattr(torch, str(config.get("torch_dtype") or "float16"))
    recorded = record.get("dropped") or {}
    return {
        name: layouts.tensor_from_record(recorded[name])
        if name in recorded
        else layouts.rotary_inv_freq(layout.family, config, dtype)
        for name in layouts.buffer_names(layout, int(config.get("num_layers", 28)))
    }


def converted_root() -> Path:
    """Where conversions are cached: ``converted/`` under :func:`zhtune.paths.cache_root` (``$ZHTUNE_CACHE``)."""
    from zhtune.paths import cache_root

    return cache_root() / "converted"


def content_fingerprint(path: Path) -> str:
    """A hash of the folder's content: small files in full, weight files by name, size and their first and last
    MiB (reading 12 GB of weights for every command would cost more than the conversion saves)."""
    h = hashlib.sha256(f"zhtune-convert-{CONVERTER_VERSION}".encode())
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        size = f.stat().st_size
        h.update(f"{f.name}:{size};".encode())
        with f.open("rb") as handle:
            if size <= 2 << 20:
                h.update(handle.read())
            else:
                h.update(handle.read(1 << 20))
                handle.seek(size - (1 << 20))
                h.update(handle.read())
    return h.hexdigest()[:20]


@contextlib.contextmanager
def _locked(lock: Path):
    import fcntl

    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # one process converts; the others (torchrun ranks) wait and reuse
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def resolve_checkpoint(path: str | Path) -> Path:
    """The folder to load for ``path``: an original ChatGLM checkpoint is converted once into the cache (one log
    line says so) and the cached folder returned; anything else is returned unchanged.

    Raises:
        ConfigError: the original checkpoint cannot be converted (see :func:`convert_checkpoint`).
    """
    path = Path(path)
    if not is_original_chatglm(path):
        return path
    target = converted_root() / content_fingerprint(path)
    if (target / "config.json").exists():
        return target
    with _locked(target.with_name(target.name + ".lock")):
        if not (target / "config.json").exists():
            summary = convert_checkpoint(path, target)
            log.warning(
                "%s is an original %s checkpoint (remote code): converted once to %s (%s, tokenizer %s)",
                path,
                summary["variant"],
                target,
                summary["model_type"],
                summary["tokenizer"],
            )
    return target
