"""Prove a merge numerically and write ``merge_report.json``.

The reference is what peft computes: the base model with the adapters applied in order (each but the last merged
with ``merge_and_unload``, the last kept as a live adapter). The merged checkpoint must give the same logits on
probe prompts within a tolerance suited to its dtype and the same greedy continuation, must differ from the base
(a merge that did nothing is the failure users report most), must hold no LoRA tensors, and must carry the
tokenizer and chat template unchanged. Models are loaded one at a time to keep memory to one model.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import torch

from zhtune.merge.adapter import read_adapter
from zhtune.merge.merge import MergeResult
from zhtune.model.checkpoint_files import tensor_headers, weight_shards

# max |logit difference| allowed, relative to max |reference logit|, by the dtype the merged weights are stored in
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}
PROBES = ["请把下面的句子改正：我昨天去了图书馆看书了。", "你好，请介绍一下你自己。", "The capital of China is"]


def _probe_ids(model_dir: Path, vocab_size: int) -> torch.Tensor:
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        rows = [tok(p, add_special_tokens=False)["input_ids"][:16] for p in PROBES]
        width = min(len(r) for r in rows)
        if width >= 4 and max(max(r) for r in rows) < vocab_size:
            return torch.tensor([r[:width] for r in rows], dtype=torch.long)
    except Exception:  # noqa: BLE001 - no usable tokenizer here; random ids exercise the weights just as well
        pass
    return torch.randint(0, vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _run(model, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, list[list[int]]]:
    logits = model(input_ids=ids).logits.float()
    seq = ids
    for _ in range(new_tokens):  # greedy, explicit, so no generation_config setting can change it
        nxt = model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    return logits, seq[:, ids.shape[1] :].tolist()


def _load(path: Path, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, trust_remote_code=trust_remote_code, local_files_only=True
    ).eval()


def verify_merge(
    base: Path,
    adapter_paths: list[Path],
    out: Path,
    dtype: str = "fp32",
    new_tokens: int = 6,
    trust_remote_code: bool = False,
) -> list[dict]:
    """Run every check; return ``[{"check", "passed", ...}]``."""
    from peft import PeftModel

    model = _load(base, trust_remote_code)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = _probe_ids(out, vocab)
    base_logits, _ = _run(model, ids, 0)
    for i, path in enumerate(adapter_paths):
        replaced = read_adapter(path).replaced
        embed = next((t for n, t in replaced.items() if n.endswith("embed_tokens.weight")), None)
        if embed is not None and embed.shape[0] != model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(embed.shape[0])
        model = PeftModel.from_pretrained(model, str(path))
        if i < len(adapter_paths) - 1:
            model = model.merge_and_unload()
    ref_logits, ref_tokens = _run(model.eval(), ids, new_tokens)
    del model
    gc.collect()
    merged = _load(out, trust_remote_code)
    merged_logits, merged_tokens = _run(merged, ids, new_tokens)
    del merged
    gc.collect()

    tol = TOLERANCE[dtype]
    scale = ref_logits.abs().max().item()
    diff = (ref_logits - merged_logits).abs().max().item()
    cols = min(base_logits.shape[-1], merged_logits.shape[-1])
    moved = (base_logits[..., :cols] - merged_logits[..., :cols]).abs().max().item()
    lora_keys = [n for s in weight_shards(out) for n in tensor_headers(out / s) if "lora_" in n]
    checks = [
        {
            "check": "logits_match_peft",
            "passed": diff <= tol * scale,
            "max_abs_diff": diff,
            "tolerance": tol * scale,
            "relative_tolerance": tol,
        },
        {
            "check": "greedy_continuation_matches",
            "passed": ref_tokens == merged_tokens,
            "reference": ref_tokens,
            "merged": merged_tokens,
        },
        {"check": "differs_from_base", "passed": moved > tol * scale, "max_abs_diff_from_base": moved},
        {"check": "no_lora_tensors", "passed": not lora_keys, "found": lora_keys[:5]},
        _tokenizer_check(base, adapter_paths, out),
    ]
    return checks


def _tokenizer_check(base: Path, adapter_paths: list[Path], out: Path) -> dict:
    from zhtune.merge.merge import TOKENIZER_FILES, tokenizer_source

    source = tokenizer_source(base, adapter_paths)
    missing = [f for f in TOKENIZER_FILES if (source / f).exists() and not (out / f).exists()]
    differ = [
        f
        for f in TOKENIZER_FILES
        if (source / f).exists() and (out / f).exists() and (source / f).read_bytes() != (out / f).read_bytes()
    ]
    template = None
    cfg = out / "tokenizer_config.json"
    if cfg.exists():
        template = "chat_template" in json.loads(cfg.read_text()) or (out / "chat_template.jinja").exists()
    return {
        "check": "tokenizer_and_chat_template_round_trip",
        "passed": not missing and not differ,
        "source": str(source),
        "missing": missing,
        "differ": differ,
        "has_chat_template": template,
    }


def write_report(result: MergeResult, checks: list[dict] | None, dtype: str | None, verify_seconds: float) -> dict:
    """Write ``merge_report.json`` into the merged folder and return it."""
    report = {
        "out": str(result.out),
        "template": result.template,
        "adapters": result.adapters,
        "dtype": dtype or "as base",
        "shards": result.shards,
        "tensors_changed": result.tensors_changed,
        "config_changes": result.config_changes,
        "timings_s": {"merge": round(result.seconds, 3), "verify": round(verify_seconds, 3)},
        "peak_rss_growth_mb": round(result.peak_rss_growth_mb, 1),
        "verified": checks is not None,
        "checks": checks or [],
        "passed": all(c["passed"] for c in checks) if checks is not None else None,
    }
    (result.out / "merge_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    return report
