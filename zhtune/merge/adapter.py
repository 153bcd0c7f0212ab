"""Read a peft-format LoRA adapter (written by peft or by zhtune) into plain tensors keyed by base tensor name.

Checks everything that can be checked without the base: the file is safetensors, every ``lora_A`` has its
``lora_B`` and the ranks agree with the config, DoRA magnitudes fit, and no unknown tensor is present. Errors name
the tensor. What the adapter does to the base (which base tensors it changes and how) is kept as data for
:mod:`zhtune.merge.merge`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from zhtune.errors import ConfigError
from zhtune.model.checkpoint_files import file_sha256

PREFIX = "base_model.model."
ZHTUNE_META = "zhtune_adapter.json"


@dataclass
class LoraDelta:
    """One LoRA module: ``W' = W + scale * B @ A`` (DoRA: then rescaled row-wise to ``magnitude``)."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    magnitude: torch.Tensor | None = None
    fan_in_fan_out: bool = False


@dataclass
class Adapter:
    """An adapter as merge needs it; keys are base checkpoint tensor names (``model.layers.0...q_proj.weight``)."""

    path: Path
    config: dict
    deltas: dict[str, LoraDelta] = field(default_factory=dict)
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)  # modules_to_save, wholesale
    sha256: str = ""
    meta: dict = field(default_factory=dict)  # zhtune metadata (base fingerprint, ...), empty for plain peft


def _pattern_value(patterns: dict, module: str, default):
    # peft matches rank_pattern / alpha_pattern keys as a suffix of the module name, separated by a dot.
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?{pattern}$", module):
            return value
    return default


def read_adapter(path: str | Path) -> Adapter:
    """Load the adapter folder ``path``.

    Raises:
        ConfigError: not a LoRA adapter, pickle weights, or an inconsistent tensor (named in the message).
    """
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_file.exists():
        raise ConfigError(f"{path} is not a peft adapter folder (no adapter_config.json)")
    config = json.loads(cfg_file.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA; only LoRA adapters merge")
    if not weights.exists():
        hint = (
            " (only adapter_model.bin: pickle is not loaded; re-save it with peft)"
            if (path / "adapter_model.bin").exists()
            else ""
        )
        raise ConfigError(f"{path} has no adapter_model.safetensors{hint}")
    state = load_file(weights)
    meta_file = path / ZHTUNE_META
    adapter = Adapter(
        path, config, sha256=file_sha256(weights), meta=json.loads(meta_file.read_text()) if meta_file.exists() else {}
    )
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if not key.startswith(PREFIX):
            raise ConfigError(f"{path}: tensor {key!r} does not start with {PREFIX!r}; not a peft state dict")
        # peft saves modules_to_save copies under the base name, or (some versions, untied heads) with a
        # ".modules_to_save" infix; both mean "replace this base tensor". Some versions also save the frozen
        # ".original_module" beside a resized copy: that is the base tensor itself, not part of the update.
        if ".original_module." in key:
            continue
        name = re.sub(r"\.modules_to_save(\.default)?\.", ".", key[len(PREFIX) :])
        m = re.fullmatch(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)", name)
        if m:
            groups.setdefault(m.group(1), {})[m.group(2).split(".")[0]] = tensor
        elif "lora_" in name:
            raise ConfigError(f"{path}: tensor {key!r} is not a LoRA A/B/magnitude tensor zhtune can merge")
        else:
            adapter.replaced[name] = tensor  # a modules_to_save copy, saved under the base tensor's name
    for module, parts in groups.items():
        adapter.deltas[module + ".weight"] = _delta(path, config, module, parts)
    return adapter


def _delta(path: Path, config: dict, module: str, parts: dict[str, torch.Tensor]) -> LoraDelta:
    name = f"{PREFIX}{module}"
    for part in ("lora_A", "lora_B"):
        if part not in parts:
            raise ConfigError(f"{path}: {name}.{part}.weight is missing")
    a, b = parts["lora_A"], parts["lora_B"]
    r = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r"))
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[0] != r:
        raise ConfigError(
            f"{path}: {name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not form a rank-{r} update"
        )
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", r))
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    magnitude = parts.get("lora_magnitude_vector")
    if config.get("use_dora") and magnitude is None:
        raise ConfigError(f"{path}: {name}.lora_magnitude_vector is missing but use_dora is true")
    if magnitude is not None and magnitude.numel() != b.shape[0]:
        raise ConfigError(f"{path}: {name}.lora_magnitude_vector has {magnitude.numel()} values, expected {b.shape[0]}")
    return LoraDelta(a, b, float(scale), magnitude, bool(config.get("fan_in_fan_out")))


def lineage_checks(base_lineage: dict, base_fingerprint: str, adapters: list[Adapter]) -> list[dict]:
    """For every adapter of a chain: was it trained on the model it is applied to?

    Adapter ``k`` applies to the base plus adapters ``0..k-1``; its ``zhtune_adapter.json`` records the lineage of
    the model it was trained on (``base_lineage``; older adapters record only ``base_fingerprint``). Returns one
    ``{"adapter", "status", "expected", "recorded"}`` per adapter, status ``match``, ``mismatch`` or ``unrecorded``
    (a plain peft adapter: nothing to compare).
    """
    out = []
    for k, ad in enumerate(adapters):
        before = [a.sha256 for a in adapters[:k]]
        expected = {"root": base_lineage["root"], "adapters": base_lineage["adapters"] + before}
        recorded = ad.meta.get("base_lineage")
        if recorded is not None:
            status = "match" if recorded == expected else "mismatch"
        elif ad.meta.get("base_fingerprint") and k == 0:
            expected, recorded = base_fingerprint, ad.meta["base_fingerprint"]
            status = "match" if recorded == expected else "mismatch"
        else:
            status = "unrecorded"
        out.append({"adapter": str(ad.path), "status": status, "expected": expected, "recorded": recorded})
    return out


def apply_delta(weight: torch.Tensor, delta: LoraDelta, name: str) -> torch.Tensor:
    """Return ``weight`` with ``delta`` folded in, computed in fp32.

    Raises:
        ConfigError: the update's shape does not match the base tensor ``name``.
    """
    w = weight.float()
    update = (delta.B.float() @ delta.A.float()) * delta.scale
    if delta.fan_in_fan_out:
        update = update.T
    if update.shape != w.shape:
        raise ConfigError(
            f"adapter update for {name} has shape {tuple(update.shape)} but the base tensor is {tuple(w.shape)}; "
            "was the adapter trained on this base?"
        )
    merged = w + update
    if delta.magnitude is not None:
        # DoRA (Liu et al. 2024): W' = m * (W + sBA) / ||W + sBA||, the norm taken per output row, as peft does.
        norm = (merged.T if delta.fan_in_fan_out else merged).norm(p=2, dim=1)
        factor = (delta.magnitude.float() / norm).view(-1, 1)
        merged = merged * (factor.T if delta.fan_in_fan_out else factor)
    return merged
