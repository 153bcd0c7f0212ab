"""Convert a peft LoRA adapter trained on an original ChatGLM checkpoint into one for the converted model.

Adapters of that era target ``query_key_value``, ``dense``, ``dense_h_to_4h`` and ``dense_4h_to_h`` (the BELLE LoRA
the original project published for ChatGLM-6B: r=8, alpha=32, ``query_key_value``). A LoRA update ``B @ A`` of the
fused ``query_key_value`` is exactly three updates, one per projection: ``lora_B`` split by the rows of q, k and v
(:func:`zhtune.model.convert.chatglm.qkv_rows`: contiguous with multi-query groups in ChatGLM2/3, per-head
interleaved in ChatGLM-6B), ``lora_A`` shared. DoRA magnitudes are per output row and split the same way. The other
modules are renamed. The result is a plain peft adapter in safetensors with the same output as the original.

Not converted: peft's old ``enable_lora`` (MergedLinear) adapters, ``rank_pattern`` / ``alpha_pattern``, LoRA on
embeddings: each is refused with a message.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import torch

from zhtune.errors import ConfigError
from zhtune.model.convert import chatglm as layouts

PREFIX = "base_model.model."
KEY = re.compile(r"(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_magnitude_vector)(?:\.default)?(?:\.weight)?")


def _read_weights(adapter: Path) -> dict[str, torch.Tensor]:
    from zhtune.model.convert.shards import load_plain_tensors

    if (adapter / "adapter_model.safetensors").exists():
        from safetensors.torch import load_file

        return load_file(adapter / "adapter_model.safetensors")
    if (adapter / "adapter_model.bin").exists():
        return load_plain_tensors(adapter / "adapter_model.bin")
    raise ConfigError(f"{adapter} has no adapter_model.safetensors or adapter_model.bin")


def _base_of(base: Path) -> tuple[str, dict]:
    """``(variant, original config dict)`` from an original folder or a checkpoint converted by zhtune."""
    from zhtune.model.convert import detect_original, is_original_chatglm

    if is_original_chatglm(base):
        orig = detect_original(base)
        return orig.variant, orig.config
    config_file = base / "config.json"
    record = json.loads(config_file.read_text()).get(layouts.RECORD) if config_file.exists() else None
    if not record:
        raise ConfigError(f"--base {base} is neither an original ChatGLM checkpoint nor one converted by zhtune")
    return record["variant"], record["config"]


def _check_config(adapter: Path, config: dict) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{adapter}: peft_type {config.get('peft_type')!r} is not LORA")
    for key in ("enable_lora", "rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise ConfigError(
                f"{adapter}/adapter_config.json: {key}={config[key]!r} is not supported by zhtune convert --adapter "
                "(plain LoRA on query_key_value/dense/dense_h_to_4h/dense_4h_to_h only)"
            )
    if config.get("fan_in_fan_out"):
        raise ConfigError(f"{adapter}/adapter_config.json: fan_in_fan_out is true, but ChatGLM's layers are nn.Linear")


def _convert_tensor(layout, family: str, dims, key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    if not key.startswith(PREFIX):
        raise ConfigError(f"tensor {key!r} does not start with {PREFIX!r}; not a peft adapter state dict")
    m = KEY.fullmatch(key[len(PREFIX) :])
    if m is None:
        if "lora_" in key:
            raise ConfigError(f"tensor {key!r} is not a LoRA A/B/magnitude tensor of a linear layer")
        name = re.sub(r"\.modules_to_save(\.default)?\.", ".", key[len(PREFIX) :])  # a fully trained module
        pieces = layouts.forward_pieces(layout, dims, name, list(tensor.shape)) or []
        return {PREFIX + p.name: p.make([tensor]) for p in pieces}
    located = layout.layer_of(m.group("module"))
    targets = layouts.ADAPTER_MODULES[family].get(located[1]) if located else None
    if not targets:
        raise ConfigError(
            f"tensor {key!r}: LoRA on {m.group('module')!r} has no counterpart in the converted model "
            f"(known: {', '.join(layouts.ADAPTER_MODULES[family])})"
        )
    part = m.group("part")
    suffix = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}.get(part, "lora_magnitude_vector")
    native = [f"{PREFIX}model.layers.{located[0]}.{t}.{suffix}" for t in targets]
    if len(targets) == 1 or part == "lora_A":  # A reads the layer input, shared by the split projections
        return {n: tensor.clone() for n in native}
    rows = layouts.qkv_rows(family, dims)
    if tensor.shape[0] != sum(len(r) for r in rows):
        raise ConfigError(
            f"tensor {key!r} has {tensor.shape[0]} rows, the base's query_key_value has {sum(map(len, rows))}"
        )
    return {n: tensor.index_select(0, r) for n, r in zip(native, rows)}


def convert_adapter(adapter: str | Path, base: str | Path, out: str | Path) -> dict:
    """Convert ``adapter`` (peft LoRA on the original layout of ``base``) into ``out`` for the converted model.

    Args:
        adapter: peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors`` or ``.bin``).
        base: the original ChatGLM checkpoint it was trained on (or its zhtune conversion). An original is converted
            into the cache (:func:`zhtune.model.convert.resolve_checkpoint`) to record the fingerprint of the model
            the adapter now fits, which ``zhtune merge`` checks; merge needs that conversion anyway.
        out: output folder; must not exist or be empty.

    Returns:
        A summary: variant, tensors in and out, target modules.

    Raises:
        ConfigError: not a LoRA adapter, pickle with non-tensors, an unsupported adapter option, or a tensor that
            does not fit the base (named).
    """
    import peft
    from safetensors.torch import save_file

    from zhtune.atomic import atomic_dir
    from zhtune.model.checkpoint_files import base_fingerprint, file_sha256
    from zhtune.model.convert import _check_out

    adapter, base, out = Path(adapter), Path(base), Path(out)
    if not (adapter / "adapter_config.json").exists():
        raise ConfigError(f"{adapter} is not a peft adapter folder (no adapter_config.json)")
    config = json.loads((adapter / "adapter_config.json").read_text())
    _check_config(adapter, config)
    variant, base_config = _base_of(base)
    family = layouts.family_of(variant)
    layout, dims = layouts.LAYOUTS[family], layouts.dims_of(family, base_config)
    _check_out(out)
    state = _read_weights(adapter)
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        converted.update(_convert_tensor(layout, family, dims, key, tensor))
    targets = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in converted if ".lora_" in k})
    fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    kept = {k: v for k, v in config.items() if k in fields and k not in ("target_modules", "task_type", "peft_type")}
    lora = peft.LoraConfig(**{**kept, "target_modules": targets, "task_type": "CAUSAL_LM"})
    with atomic_dir(out) as tmp:
        save_file({k: v.contiguous() for k, v in converted.items()}, tmp / "adapter_model.safetensors")
        lora.save_pretrained(tmp)
        meta = {
            "converted_from": str(adapter),
            "converted_from_sha256": {f.name: file_sha256(f) for f in adapter.glob("adapter_model.*")},
            "base_model": str(base),
            "base_fingerprint": base_fingerprint(base),
        }
        (tmp / "zhtune_adapter.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))
        for f in ("README.md",):
            if (adapter / f).exists():
                shutil.copy(adapter / f, tmp / f)
    return {"variant": variant, "tensors_in": len(state), "tensors_out": len(converted), "target_modules": targets}
