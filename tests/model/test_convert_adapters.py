"""``zhtune convert --adapter``: a peft LoRA trained on an original ChatGLM checkpoint gives the same output on the
converted model, and ``zhtune merge`` folds it in.

The original-layout adapters are made with peft on the original code (``reference.py``), ``lora_B`` away from zero,
and saved as that era saved them: ``adapter_model.bin`` and an ``adapter_config.json`` with its old keys.
"""

from __future__ import annotations

import json

import peft
import pytest
import torch

from tests.model.reference import reference, sample_ids
from zhtune.cli import main
from zhtune.errors import ConfigError
from zhtune.model.convert import chatglm as layouts
from zhtune.model.convert import convert_checkpoint
from zhtune.model.convert.adapters import convert_adapter

TARGETS = {
    # the BELLE LoRA for ChatGLM-6B: r=8, alpha=32, query_key_value
    "chatglm-belle": ("chatglm", ["query_key_value"], False),
    "chatglm3-all-modules": ("chatglm3", ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"], False),
    "chatglm3-dora": ("chatglm3", ["query_key_value", "dense_h_to_4h"], True),
}


def original_adapter(shared, case, config, src, out, targets, dora=False):
    """A LoRA on the original model, saved as ``adapter_model.bin``; returns the original model with it (fp32)."""
    model = reference(shared, case, config, src, torch.float32)
    lora = peft.LoraConfig(r=8, lora_alpha=32, target_modules=targets, lora_dropout=0.0, use_dora=dora)
    model = peft.get_peft_model(model, lora)
    gen = torch.Generator().manual_seed(3)
    for name, param in model.named_parameters():
        if "lora_" in name:  # B away from zero: a zero B would make any conversion look right
            param.data = 0.05 * torch.randn(param.shape, generator=gen)
    model.save_pretrained(out)
    from safetensors.torch import load_file

    torch.save(load_file(out / "adapter_model.safetensors"), out / "adapter_model.bin")
    (out / "adapter_model.safetensors").unlink()
    cfg = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**cfg, "enable_lora": None, "merge_weights": False}))
    return model.eval()


def converted_with_adapter(native, adapter):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(native, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(base, adapter).eval()


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_converted_adapter_gives_the_same_logits(name, original, shared, tmp_path):
    case, targets, dora = TARGETS[name]
    src, config = original(case, dtype=torch.float32, shards=2)
    reference_model = original_adapter(shared, case, config, src, tmp_path / "adapter", targets, dora)
    convert_checkpoint(src, tmp_path / "native")
    summary = convert_adapter(tmp_path / "adapter", src, tmp_path / "converted")
    assert (tmp_path / "converted" / "adapter_model.safetensors").exists()
    assert "q_proj" in summary["target_modules"] and "query_key_value" not in summary["target_modules"]
    ids = sample_ids(case, config, (24, 15) if case == "chatglm" else (30,))
    with torch.no_grad():
        want = reference_model(input_ids=ids).logits
        got = converted_with_adapter(tmp_path / "native", tmp_path / "converted")(input_ids=ids).logits
        base = reference(shared, case, config, src, torch.float32)(input_ids=ids).logits
    assert (got - want).abs().max() <= 1e-5
    assert (want - base).abs().max() > 1e-2  # the adapter changes the model, so the check above can fail


def test_wrongly_split_lora_b_fails_the_check(original, shared, tmp_path, monkeypatch):
    src, config = original("chatglm", dtype=torch.float32, shards=1)
    reference_model = original_adapter(shared, "chatglm", config, src, tmp_path / "adapter", ["query_key_value"])
    convert_checkpoint(src, tmp_path / "native")
    rows = layouts.qkv_rows
    monkeypatch.setattr(layouts, "qkv_rows", lambda family, dims: rows("glm", dims))  # ignores v1's interleaving
    convert_adapter(tmp_path / "adapter", src, tmp_path / "converted")
    ids = sample_ids("chatglm", config, (24, 15))
    with torch.no_grad():
        want = reference_model(input_ids=ids).logits
        got = converted_with_adapter(tmp_path / "native", tmp_path / "converted")(input_ids=ids).logits
    assert (got - want).abs().max() > 1e-3


def test_zhtune_merge_folds_a_converted_adapter_into_the_original_base(original, shared, tmp_path, capsys):
    src, config = original("chatglm", dtype=torch.float32, shards=2)
    reference_model = original_adapter(shared, "chatglm", config, src, tmp_path / "adapter", ["query_key_value"])
    args = ["convert", "--adapter", str(tmp_path / "adapter"), "--base", str(src), "--out", str(tmp_path / "conv")]
    assert main(args) == 0
    assert "target_modules k_proj, q_proj, v_proj" in capsys.readouterr().out
    merge = ["merge", "--base", str(src), "--adapter", str(tmp_path / "conv"), "--out", str(tmp_path / "merged")]
    assert main(merge + ["--dtype", "fp32"]) == 0
    assert json.loads((tmp_path / "merged" / "merge_report.json").read_text())["passed"] is True
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    ids = sample_ids("chatglm", config, (24, 15))
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - reference_model(input_ids=ids).logits).abs().max() <= 1e-4


class Payload:
    """Any object a pickle may hold."""


def test_unsupported_adapters_are_refused(original, shared, tmp_path):
    src, config = original("chatglm3", dtype=torch.float32, shards=1)
    adapter = tmp_path / "adapter"
    original_adapter(shared, "chatglm3", config, src, adapter, ["query_key_value"])
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "enable_lora": [True, False, True]}))
    with pytest.raises(ConfigError, match="enable_lora"):
        convert_adapter(adapter, src, tmp_path / "a")
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    state = torch.load(adapter / "adapter_model.bin", weights_only=True)
    torch.save({**state, "hook": Payload()}, adapter / "adapter_model.bin")
    with pytest.raises(ConfigError, match="holds objects other than plain tensors"):
        convert_adapter(adapter, src, tmp_path / "b")
    key = next(k for k in state if "lora_A" in k)
    torch.save({**state, key.replace("query_key_value", "rotary_pos_emb"): state[key]}, adapter / "adapter_model.bin")
    with pytest.raises(ConfigError, match="no counterpart in the converted model"):
        convert_adapter(adapter, src, tmp_path / "c")
    assert not any((tmp_path / d).exists() for d in "abc")
