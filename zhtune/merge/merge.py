"""Fold one or more LoRA adapters into a base checkpoint, one safetensors shard at a time.

Adapters apply in the order given (an instruction LoRA, then a domain LoRA trained on the merged model): for each
base tensor, adapter 1's update is folded in, then adapter 2's, in fp32, and the result cast to the output dtype.
Each output shard is written before the next input shard is read, so peak memory is about one shard plus the
adapters. ``modules_to_save`` tensors replace base tensors wholesale (a resized vocabulary updates ``vocab_size``;
a replaced ``lm_head`` of a tied model unties it). The output appears under its final name only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from zhtune.atomic import write_text_atomic
from zhtune.errors import ConfigError
from zhtune.memory import peak_rss_mb, reset_peak_rss, rss_mb
from zhtune.merge.adapter import Adapter, apply_delta, lineage_checks, read_adapter
from zhtune.merge.side_files import code_files, copy_side_files, install_training_template
from zhtune.model.checkpoint_files import (
    MERGE_REPORT,
    base_fingerprint,
    embedding_tensor_name,
    model_lineage,
    remember_digests,
    tensor_headers,
    weight_shards,
)
from zhtune.model.convert import resolve_checkpoint
from zhtune.model.load import DTYPES
from zhtune.model.safetensors_io import SAFETENSORS_DTYPES, write_safetensors


@dataclass
class MergeResult:
    out: Path
    adapters: list[dict]
    shards: int = 0
    tensors_changed: int = 0
    seconds: float = 0.0
    peak_rss_growth_mb: float = 0.0
    config_changes: dict = field(default_factory=dict)
    template: str | None = None  # the chat template the last adapter was trained with (zhtune metadata)
    recipe: dict | None = None  # the last adapter's resolved training recipe (zhtune metadata)
    lineage: dict = field(default_factory=dict)  # {"root": fingerprint, "adapters": [sha256, ...]} of the output
    lineage_checks: list = field(default_factory=list)  # per adapter: trained on the model it was applied to?
    fingerprint: str = ""  # content fingerprint of the output
    side_files: dict = field(default_factory=dict)  # chat template source, end-of-turn ids


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"output directory {out} exists and is not empty; choose another --out or empty it")


def _tied_head_source(base: Path, headers: dict) -> dict[str, str]:
    """``{"lm_head.weight": embed_key}`` when the base ties its output head to the embeddings and stores no head."""
    config = json.loads((base / "config.json").read_text())
    embed = embedding_tensor_name(headers)
    if config.get("tie_word_embeddings") and embed and "lm_head.weight" not in headers:
        return {"lm_head.weight": embed}
    return {}


def _check_plan(base: Path, adapters: list[Adapter], shards: dict[str, list[str]]) -> None:
    headers = {}
    for shard in shards:
        headers.update(tensor_headers(base / shard))
    for head, embed in _tied_head_source(base, headers).items():
        headers[head] = headers[embed]  # a LoRA on a tied head starts from the embeddings and unties them
    for ad in adapters:
        for name, delta in ad.deltas.items():
            if name not in headers and not any(name in a.replaced for a in adapters):
                raise ConfigError(f"adapter {ad.path} changes {name}, which the base {base} does not have")
            if name in headers:
                want = [delta.B.shape[0], delta.A.shape[1]]
                if delta.fan_in_fan_out:
                    want = want[::-1]
                if list(headers[name][1]) != want:
                    raise ConfigError(
                        f"adapter {ad.path}: update for {name} has shape {tuple(want)} but the base tensor is "
                        f"{tuple(headers[name][1])}"
                    )


def merge_adapters(
    base: str | Path,
    adapter_paths: list[str | Path],
    out: str | Path,
    dtype: str | None = None,
    allow_base_mismatch: bool = False,
    trust_remote_code: bool = False,
) -> MergeResult:
    """Merge ``adapter_paths`` (in order) into ``base`` and write a Hugging Face checkpoint to ``out``.

    Args:
        base: base checkpoint folder (safetensors, sharded or not).
        adapter_paths: peft LoRA adapter folders, applied in this order.
        out: output folder; must not exist or be empty.
        dtype: ``bf16``/``fp16``/``fp32``; default keeps each tensor's dtype.
        allow_base_mismatch: merge even when an adapter records that it was trained on another model than the one
            it is applied to (the base, then the base plus the adapters before it).
        trust_remote_code: allow the tokenizer's own code when installing the training chat template.

    Returns:
        A :class:`MergeResult` with counts, time and peak RSS growth.

    Raises:
        ConfigError: bad output folder, mismatched base, an inconsistent adapter, or NaN/Inf in a merged tensor
            (each message names the tensor or folder).
    """
    reset_peak_rss()
    start, rss0 = time.perf_counter(), rss_mb()
    base, out = resolve_checkpoint(base), Path(out)  # an original ChatGLM folder: its (cached) conversion
    _check_out(out)
    if not adapter_paths:
        raise ConfigError("give at least one --adapter")
    adapters = [read_adapter(p) for p in adapter_paths]
    shards = weight_shards(base)
    _check_plan(base, adapters, shards)
    base_lineage = model_lineage(base)
    lineage = _check_lineage(base, base_lineage, adapters, allow_base_mismatch)
    code = code_files([base] + [a.path for a in adapters])
    target = DTYPES[dtype] if dtype else None
    last = next((a.meta for a in reversed(adapters) if a.meta.get("template")), {})
    recipe = last.get("recipe")
    partial = out.parent / f".{out.name}.zhtune-partial-{os.getpid()}"
    partial.mkdir(parents=True)

    try:
        weight_map, changed, digests = _write_shards(base, shards, adapters, partial, target)
        if len(shards) > 1:
            total = sum((partial / s).stat().st_size for s in set(weight_map.values()))
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        changes = _write_config(base, partial, adapters, target, weight_map)
        copy_side_files(base, partial, [a.path for a in adapters], code)
        system = ((recipe or {}).get("template") or {}).get("system")
        side = install_training_template(partial, last.get("template"), system, trust_remote_code)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # never leave a half-written checkpoint behind
        raise
    if out.exists():
        out.rmdir()  # an empty folder the user made for us
    partial.rename(out)
    for shard, tensors in digests.items():
        remember_digests(out / shard, tensors)  # hashed while written: the output's fingerprint needs no second read
    result = MergeResult(
        out=out,
        adapters=[
            {"path": str(a.path), "sha256": a.sha256, "lora_modules": len(a.deltas), "replaced": sorted(a.replaced)}
            for a in adapters
        ],
        shards=len(shards),
        tensors_changed=changed,
        seconds=time.perf_counter() - start,
        peak_rss_growth_mb=max(0.0, peak_rss_mb() - rss0),
        config_changes=changes,
        template=last.get("template"),
        recipe=recipe,
        lineage={"root": base_lineage["root"], "adapters": base_lineage["adapters"] + [a.sha256 for a in adapters]},
        lineage_checks=lineage,
        fingerprint=base_fingerprint(out),
        side_files=side,
    )
    write_report(result, None, dtype)
    return result


def _check_lineage(base: Path, base_lineage: dict, adapters: list[Adapter], allow: bool) -> list[dict]:
    """Refuse (unless ``allow``) an adapter that records having been trained on another model than it meets here."""
    checks = lineage_checks(base_lineage, base_fingerprint(base), adapters)
    wrong = [c for c in checks if c["status"] == "mismatch"]
    if wrong and not allow:
        c = wrong[0]
        raise ConfigError(
            f"adapter {c['adapter']} was trained on another model (recorded {c['recorded']}) than the one it is "
            f"applied to here ({c['expected']}: {base} plus the adapters before it); merge the adapters it was "
            "trained on first, or pass --allow-base-mismatch if you are sure"
        )
    return checks


def _write_shards(base: Path, shards: dict, adapters: list[Adapter], out: Path, target) -> tuple[dict, int, dict]:
    """Stream every base shard through the adapters into ``out``, one tensor in memory at a time; return the weight
    map, the number of tensors changed and each written shard's tensor digests."""
    from safetensors import safe_open
    from tqdm.auto import tqdm

    weight_map, changed, seen, digests = {}, 0, set(), {}
    replaced = {k: v for a in adapters for k, v in a.replaced.items()}
    names = sorted(shards)
    located = {n: (s, h) for s in names for n, h in tensor_headers(base / s).items()}
    tied = {h: e for h, e in _tied_head_source(base, located).items() if any(h in a.deltas for a in adapters)}
    for i, shard in enumerate(tqdm(names, desc="merge", unit="shard", disable=len(names) < 2)):
        headers = tensor_headers(base / shard)
        plan = []  # (name, dtype, shape) of each output tensor, known before any data is read
        for name, (dt, shape) in headers.items():
            src = replaced.get(name)
            dtype = target if target is not None and dt in ("BF16", "F16", "F32") else SAFETENSORS_DTYPES[dt]
            if src is not None:
                dtype = target or src.dtype
            plan.append((name, dtype, list(src.shape) if src is not None else shape))
            seen.add(name)
        if i == len(names) - 1:  # tensors the base does not store (the head of a tied model) go last
            for n in sorted((set(replaced) | set(tied)) - seen):
                if n in replaced:
                    plan.append((n, target or replaced[n].dtype, list(replaced[n].shape)))
                else:
                    _shard, (dt, shape) = located[tied[n]]
                    plan.append((n, target or SAFETENSORS_DTYPES[dt], shape))
        out_name = "model.safetensors" if len(names) == 1 else f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
        with safe_open(base / shard, "pt") as f:

            def produce(name, dtype, _f=f, _in_base=frozenset(headers)):
                nonlocal changed
                if name in _in_base:
                    source = _f.get_tensor(name)
                elif name in tied and name not in replaced:
                    with safe_open(base / located[tied[name]][0], "pt") as g:
                        source = g.get_tensor(tied[name])
                else:
                    source = None
                tensor, did = _merged_tensor(name, source, adapters)
                changed += did
                if not torch.isfinite(tensor).all():
                    raise ConfigError(
                        f"merged tensor {name} contains NaN or Inf; the adapter is broken; nothing written"
                    )
                return tensor.to(dtype)

            digests[out_name] = write_safetensors(out / out_name, plan, produce)
        weight_map.update({name: out_name for name, _d, _s in plan})
    return weight_map, changed, digests


def _merged_tensor(name: str, tensor: torch.Tensor | None, adapters: list[Adapter]) -> tuple[torch.Tensor, int]:
    dtype = tensor.dtype if tensor is not None else None
    work, changed = tensor, 0
    for ad in adapters:
        if name in ad.replaced:
            work, changed = ad.replaced[name].float(), 1
            dtype = dtype or ad.replaced[name].dtype
        if name in ad.deltas:
            work, changed = apply_delta(work, ad.deltas[name], name), 1
    return (work.to(dtype) if changed else work), changed


def _write_config(base: Path, out: Path, adapters: list[Adapter], target, weight_map: dict) -> dict:
    config = json.loads((base / "config.json").read_text())
    changes = {}
    embed = embedding_tensor_name(weight_map)
    replaced = {k: v for a in adapters for k, v in a.replaced.items()}
    if embed in replaced and replaced[embed].shape[0] != config.get("vocab_size"):
        changes["vocab_size"] = [config.get("vocab_size"), replaced[embed].shape[0]]
        config["vocab_size"] = replaced[embed].shape[0]
    if config.get("tie_word_embeddings") and "lm_head.weight" in weight_map:
        changes["tie_word_embeddings"] = [True, False]
        config["tie_word_embeddings"] = False
    if target is not None:
        name = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[target]
        for key in ("torch_dtype", "dtype"):
            if key in config:
                config[key] = name
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return changes


def write_report(result: MergeResult, checks: list[dict] | None, dtype: str | None, verify_seconds: float = 0) -> dict:
    """Write ``merge_report.json`` into the merged folder and return it. :func:`merge_adapters` writes one without
    checks (so every merged folder records its lineage); verification writes it again with its checks."""
    report = {
        "out": str(result.out),
        "template": result.template,
        "recipe": result.recipe,
        "adapters": result.adapters,
        "dtype": dtype or "as base",
        "shards": result.shards,
        "tensors_changed": result.tensors_changed,
        "config_changes": result.config_changes,
        "side_files": result.side_files,
        "fingerprint": result.fingerprint,
        "lineage": result.lineage,
        "timings_s": {"merge": round(result.seconds, 3), "verify": round(verify_seconds, 3)},
        "peak_rss_growth_mb": round(result.peak_rss_growth_mb, 1),
        "verified": checks is not None,
        "checks": checks or [],
        "passed": all(c["passed"] or c.get("waived") for c in checks) if checks is not None else None,
    }
    write_text_atomic(result.out / MERGE_REPORT, json.dumps(report, indent=2, ensure_ascii=False))
    return report
