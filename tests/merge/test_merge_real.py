"""`zhtune merge` on checkpoints as users have them: bf16, several shards, the real tokenizer and generation config.

The adapters are trained by `zhtune train` (so they carry zhtune's metadata: template, recipe, the model trained on),
and the default `zhtune merge` (no --dtype) must pass its own verification and equal peft's bf16 `merge_and_unload`.
Each check of the verification is also shown to fail on a broken merge: an all-zero adapter, a merge that lost one
tensor, an adapter trained on another base.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from tests.helpers import REAL_FAMILIES, real_checkpoint, tiny_checkpoint
from tests.train.conftest import ALPACA, write_recipe
from zhtune.cli import main
from zhtune.data.chat_templates import chat_template_problems
from zhtune.data.templates import get_template
from zhtune.errors import ConfigError
from zhtune.merge.merge import merge_adapters
from zhtune.merge.verify import verify_merge
from zhtune.model.checkpoint_files import weight_shards


def train_adapter(base, shared, tmp_path, template, name="run", **sections):
    """Three steps of `zhtune train` in bf16, LoRA-B moved away from zero by a high learning rate."""
    recipe = write_recipe(
        tmp_path / f"{name}.yaml",
        base,
        shared / ALPACA,
        tmp_path / name,
        template,
        train={"max_steps": 3, "eval_every": 0, "lr": 5e-2, "val_size": 0},
        **sections,
    )
    assert main(["train", str(recipe), "model.dtype=bf16"]) == 0
    return tmp_path / name / "adapter"


def checks_by_name(report_or_checks) -> dict:
    checks = report_or_checks["checks"] if isinstance(report_or_checks, dict) else report_or_checks
    return {c["check"]: c for c in checks}


@pytest.mark.parametrize("family", ["qwen2.5", "glm4"])
def test_default_merge_of_bf16_checkpoint_passes_and_equals_peft_bf16(family, shared, tmp_path, capsys):
    base = real_checkpoint(tmp_path / "base", family, shared)
    assert len(weight_shards(base)) >= 2
    template = REAL_FAMILIES[family][3]
    adapter = train_adapter(base, shared, tmp_path, template)
    out = tmp_path / "merged"
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out)]) == 0
    report = json.loads((out / "merge_report.json").read_text())
    assert report["passed"] is True and report["dtype"] == "as base"
    checks = checks_by_name(report)
    assert "bfloat16" in checks["logits_match_live_adapter"]["compared"]
    assert checks["adapter_effect_present"]["relative_error"] < 0.5

    merged = load_file_all(out)
    peft_merged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16), adapter
    ).merge_and_unload()
    for name, tensor in peft_merged.state_dict().items():
        if name not in merged:  # a tied head is stored once
            continue
        ours, theirs = merged[name].float(), tensor.float()
        assert merged[name].dtype == torch.bfloat16
        # peft adds the bf16-rounded update to the bf16 weight; zhtune rounds W + update once: one ulp apart at most
        assert ((ours - theirs).abs() <= 2.0**-7 * torch.maximum(ours.abs(), theirs.abs()) + 1e-30).all(), name

    # the merged model carries its training template and stops at its end of turn
    tok = AutoTokenizer.from_pretrained(out)
    assert chat_template_problems(tok, get_template(template)) == []
    generation = GenerationConfig.from_pretrained(out)
    stop = {"qwen": "<|im_end|>", "glm4": "<|user|>"}[template]
    assert tok.convert_tokens_to_ids(stop) in generation.eos_token_id
    assert generation.temperature == GenerationConfig.from_pretrained(base).temperature  # the rest is kept


def load_file_all(folder) -> dict:
    out = {}
    for shard in weight_shards(folder):
        out.update(load_file(folder / shard))
    return out


@pytest.fixture(scope="module")
def qwen_run(shared, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qwen-run")
    base = real_checkpoint(tmp / "base", "qwen2.5", shared)
    return base, train_adapter(base, shared, tmp, "qwen")


def test_all_zero_adapter_fails_verification(qwen_run, tmp_path):
    base, _trained = qwen_run
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "zero")
    merge_adapters(base, [tmp_path / "zero"], tmp_path / "merged")
    checks = checks_by_name(verify_merge(base, [tmp_path / "zero"], tmp_path / "merged"))
    assert checks["adapter_effect_present"]["passed"] is False
    assert "changes nothing" in checks["adapter_effect_present"]["reason"]


def test_merge_with_one_tensor_left_out_names_it(qwen_run, tmp_path):
    base, adapter = qwen_run
    out = merge_adapters(base, [adapter], tmp_path / "merged").out
    lost = "model.layers.1.self_attn.v_proj.weight"
    shard = out / json.loads((out / "model.safetensors.index.json").read_text())["weight_map"][lost]
    base_shard = base / json.loads((base / "model.safetensors.index.json").read_text())["weight_map"][lost]
    state = load_file(shard)
    state[lost] = load_file(base_shard)[lost]  # as a merge that skipped this tensor would have written it
    save_file(state, shard, metadata={"format": "pt"})
    checks = checks_by_name(verify_merge(base, [adapter], out))
    assert checks["tensors_match_reference"]["passed"] is False
    problems = checks["tensors_match_reference"]["problems"]
    assert problems == [f"{lost}: equals the base; the adapter's update is missing"]
    assert checks["logits_match_reference"]["passed"] is False
    assert checks["logits_match_live_adapter"]["passed"] is False


def test_adapter_for_another_base_is_refused_then_reported_when_allowed(qwen_run, shared, tmp_path, capsys):
    _base, adapter = qwen_run
    other = real_checkpoint(tmp_path / "other", "qwen2.5", shared, seed=5)  # same shapes, other weights
    with pytest.raises(ConfigError, match="trained on another model"):
        merge_adapters(other, [adapter], tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    out = tmp_path / "allowed"
    args = ["merge", "--base", str(other), "--adapter", str(adapter), "--out", str(out), "--allow-base-mismatch"]
    assert main(args) == 0
    lineage = checks_by_name(json.loads((out / "merge_report.json").read_text()))["adapter_lineage"]
    assert lineage["passed"] is False and lineage["waived"] is True and "trained on" in lineage["problems"][0]
    assert "WAIVED adapter_lineage" in capsys.readouterr().out


def test_chain_of_two_adapters_is_checked_against_the_stage_they_were_trained_on(qwen_run, shared, tmp_path):
    base, first = qwen_run
    stage1 = merge_adapters(base, [first], tmp_path / "stage1").out  # its merge_report.json records the lineage
    second = train_adapter(stage1, shared, tmp_path, "qwen", name="second")
    assert json.loads((second / "zhtune_adapter.json").read_text())["base_lineage"]["adapters"] != []
    with pytest.raises(ConfigError, match="trained on another model"):  # the second alone does not fit the base
        merge_adapters(base, [second], tmp_path / "wrong")
    out = merge_adapters(base, [first, second], tmp_path / "chain").out
    checks = checks_by_name(verify_merge(base, [first, second], out))
    assert all(c["passed"] for c in checks.values()), {k: c for k, c in checks.items() if not c["passed"]}
    assert [a["status"] for a in checks["adapter_lineage"]["adapters"]] == ["match", "match"]


# template -> (architecture, tokenizer in ../shared): each family's merged tokenizer must render like zhtune render
FAMILIES = {
    "qwen": ("qwen2", "qwen2.5-0.5b-instruct"),
    "glm4": ("glm", "glm-4-9b-chat"),
    "llama2": ("llama", "llama-2-7b"),
    "chinese-alpaca-2": ("llama", "chinese-llama-2"),
    "llama3": ("llama", "llama-3-70b-instruct"),
    "qwen3": ("qwen2", "qwen3"),
    "default": ("llama", "llama-2-7b"),
}


@pytest.mark.parametrize("template", sorted(FAMILIES))
def test_merged_tokenizer_renders_the_training_template(template, shared, tmp_path):
    arch, tokenizer = FAMILIES[template]
    base = tiny_checkpoint(tmp_path / "base", arch, shared, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "ad")
    system = "你是一个中文纠错助手。"
    meta = {"template": template, "recipe": {"template": {"name": template, "system": system}}}
    (tmp_path / "ad" / "zhtune_adapter.json").write_text(json.dumps(meta, ensure_ascii=False))
    result = merge_adapters(base, [tmp_path / "ad"], tmp_path / "merged")
    tok = AutoTokenizer.from_pretrained(result.out)
    assert chat_template_problems(tok, get_template(template), system) == []
    assert result.side_files["chat_template_source"] == "zhtune"  # the training system prompt differs from any base's
    eos = GenerationConfig.from_pretrained(result.out).eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    named = [n for n in get_template(template).stop if tok.convert_ids_to_tokens(tok.convert_tokens_to_ids(n)) == n]
    stops = [tok.convert_tokens_to_ids(n) for n in named] or [tok.eos_token_id]
    assert stops and all(s in eos for s in stops), (stops, eos)  # every end-of-turn token the vocabulary has
    checks = checks_by_name(verify_merge(base, [tmp_path / "ad"], result.out))
    assert checks["chat_template_matches_training"]["passed"] is True
    # without the training template, the base tokenizer's own template does not render like training did
    assert chat_template_problems(AutoTokenizer.from_pretrained(base), get_template(template), system)


def test_remote_code_files_are_copied_or_the_merge_is_refused_before_writing(shared, tmp_path):
    base = real_checkpoint(tmp_path / "base", "qwen2.5", shared)
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig"}
    (base / "config.json").write_text(json.dumps(config))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)).save_pretrained(
        tmp_path / "ad"
    )
    with pytest.raises(ConfigError, match="configuration_custom.py is missing"):
        merge_adapters(base, [tmp_path / "ad"], tmp_path / "merged")
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".merged*"))
    (base / "configuration_custom.py").write_text("# the checkpoint's own code\n")
    (base / "helpers_custom.py").write_text("# imported by it\n")
    out = merge_adapters(base, [tmp_path / "ad"], tmp_path / "merged").out
    assert (out / "configuration_custom.py").read_text() == "# the checkpoint's own code\n"
    assert (out / "helpers_custom.py").exists()


def test_merge_then_new_adapter_records_the_merged_base_it_trained_on(qwen_run, shared, tmp_path):
    base, first = qwen_run
    init = {"init_adapter": {"path": str(first), "mode": "merge_then_new"}}
    second = train_adapter(base, shared, tmp_path, "qwen", name="second", lora=init)
    meta = json.loads((second / "zhtune_adapter.json").read_text())
    first_meta = json.loads((first / "zhtune_adapter.json").read_text())
    assert meta["base_fingerprint"] is None  # base + first merged in memory: no folder holds that model
    assert meta["base_lineage"]["root"] == first_meta["base_lineage"]["root"]
    assert len(meta["base_lineage"]["adapters"]) == 1
    with pytest.raises(ConfigError, match="trained on another model"):
        merge_adapters(base, [second], tmp_path / "alone")
    out = merge_adapters(base, [first, second], tmp_path / "chain").out
    checks = checks_by_name(verify_merge(base, [first, second], out))
    assert all(c["passed"] for c in checks.values()), {k: c for k, c in checks.items() if not c["passed"]}
