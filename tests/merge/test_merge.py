"""zhtune merge vs. peft on tiny random models, with LoRA-B started away from zero."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from tests.helpers import load_fp32, tiny_model_dir
from zhtune.cli import main
from zhtune.errors import ConfigError
from zhtune.merge.merge import merge_adapters
from zhtune.merge.verify import verify_merge

IDS = torch.tensor([[5, 17, 42, 99, 3, 150, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8]])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def make_adapter(base_dir, out_dir, seed=1, resize_to=None, **lora):
    torch.manual_seed(seed)
    model = load_fp32(base_dir)
    if resize_to:
        model.resize_token_embeddings(resize_to)
    cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **({"target_modules": "all-linear"} | lora))
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():  # "training" moved everything, including modules_to_save copies
        for _name, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    peft_model.save_pretrained(out_dir)
    return out_dir


def peft_reference(base_dir, adapters, resize_to=None):
    model = load_fp32(base_dir)
    if resize_to:
        model.resize_token_embeddings(resize_to)
    for ad in adapters:
        model = PeftModel.from_pretrained(model, ad)
        live = logits(model)
        model = model.merge_and_unload()
    return live, logits(model)


@pytest.mark.parametrize("arch", ["qwen2", "llama", "glm", "phi3"])
@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_merge_matches_peft(arch, variant, tmp_path):
    base = tiny_model_dir(tmp_path / "base", arch)
    extra = {"rslora": {"use_rslora": True}, "dora": {"use_dora": True}}.get(variant, {})
    ad = make_adapter(base, tmp_path / "ad", **extra)
    result = merge_adapters(base, [ad], tmp_path / "merged")
    merged = load_fp32(result.out)
    live, peft_merged = peft_reference(base, [ad])
    torch.testing.assert_close(logits(merged), peft_merged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(merged), live, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(merged), logits(load_fp32(base)), atol=1e-3)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    checks = verify_merge(base, [ad], result.out)
    assert all(c["passed"] for c in checks), checks


def test_two_adapter_chain_equals_sequential_peft(tmp_path):
    base = tiny_model_dir(tmp_path / "base", "qwen2")
    ad1 = make_adapter(base, tmp_path / "ad1", seed=1)
    stage1 = PeftModel.from_pretrained(load_fp32(base), ad1).merge_and_unload()
    stage1.save_pretrained(tmp_path / "stage1")
    ad2 = make_adapter(
        tmp_path / "stage1", tmp_path / "ad2", seed=2, target_modules=["q_proj", "v_proj"], use_dora=True
    )
    result = merge_adapters(base, [ad1, ad2], tmp_path / "merged")
    _live, reference = peft_reference(base, [ad1, ad2])
    torch.testing.assert_close(logits(load_fp32(result.out)), reference, rtol=1e-5, atol=1e-5)
    assert all(c["passed"] for c in verify_merge(base, [ad1, ad2], result.out))


def test_modules_to_save_with_resized_vocabulary(tmp_path):
    base = tiny_model_dir(tmp_path / "base", "llama", vocab_size=256)
    ad = make_adapter(base, tmp_path / "ad", resize_to=320, modules_to_save=["embed_tokens", "lm_head"])
    result = merge_adapters(base, [ad], tmp_path / "merged")
    assert result.config_changes["vocab_size"] == [256, 320]
    merged = load_fp32(result.out)
    ids = torch.tensor([[300, 5, 310, 17, 2]])  # new Chinese-LLaMA-style tokens included
    live, reference = peft_reference(base, [ad], resize_to=320)
    torch.testing.assert_close(logits(merged), reference, rtol=1e-5, atol=1e-5)
    assert logits(merged, ids).shape[-1] == 320
    assert all(c["passed"] for c in verify_merge(base, [ad], result.out))


def test_tied_embeddings_untied_when_lm_head_replaced(tmp_path):
    base = tiny_model_dir(tmp_path / "base", "qwen2")
    ad = make_adapter(base, tmp_path / "ad", target_modules=["q_proj"], modules_to_save=["lm_head"])
    result = merge_adapters(base, [ad], tmp_path / "merged")
    assert json.loads((result.out / "config.json").read_text())["tie_word_embeddings"] is False
    _live, reference = peft_reference(base, [ad])
    torch.testing.assert_close(logits(load_fp32(result.out)), reference, rtol=1e-5, atol=1e-5)


def test_lora_on_tied_head_unties_and_matches_live_adapter(tmp_path):
    base = tiny_model_dir(tmp_path / "base", "qwen2")
    ad = make_adapter(base, tmp_path / "ad", target_modules=["q_proj", "lm_head"])
    result = merge_adapters(base, [ad], tmp_path / "merged")
    assert json.loads((result.out / "config.json").read_text())["tie_word_embeddings"] is False
    live = logits(PeftModel.from_pretrained(load_fp32(base), ad))
    merged = load_fp32(result.out)
    torch.testing.assert_close(logits(merged), live, rtol=1e-5, atol=1e-5)
    # the embeddings stay the base's: only the head moved
    torch.testing.assert_close(merged.get_input_embeddings().weight, load_fp32(base).get_input_embeddings().weight)


@pytest.fixture()
def base_and_adapter(tmp_path):
    base = tiny_model_dir(tmp_path / "base", "qwen2")
    return base, make_adapter(base, tmp_path / "ad", target_modules=["q_proj", "v_proj"])


def _edit_adapter(ad, fn):
    path = ad / "adapter_model.safetensors"
    state = load_file(path)
    fn(state)
    save_file(state, path)


def test_broken_adapters_are_refused_naming_the_tensor(base_and_adapter, tmp_path):
    base, ad = base_and_adapter
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    _edit_adapter(ad, lambda s: s.pop(key))
    with pytest.raises(ConfigError, match=r"layers\.1\.self_attn\.v_proj\.lora_B\.weight is missing"):
        merge_adapters(base, [ad], tmp_path / "m1")
    _edit_adapter(ad, lambda s: s.__setitem__(key, torch.randn(24, 4)))
    shape_error = r"layers\.1\.self_attn\.v_proj\.weight has shape \(24, 32\) but the base tensor is \(16, 32\)"
    with pytest.raises(ConfigError, match=shape_error):
        merge_adapters(base, [ad], tmp_path / "m2")
    other = tiny_model_dir(tmp_path / "other", "llama")
    wrong = make_adapter(other, tmp_path / "wrong", target_modules=["q_proj"])
    _edit_adapter(wrong, lambda s: [s.__setitem__(k.replace("q_proj", "o_proj_x"), s.pop(k)) for k in list(s)])
    with pytest.raises(ConfigError, match=r"o_proj_x\.weight, which the base .* does not have"):
        merge_adapters(base, [wrong], tmp_path / "m3")


def test_base_fingerprint_mismatch_is_refused(base_and_adapter, tmp_path):
    base, ad = base_and_adapter
    (ad / "zhtune_adapter.json").write_text(json.dumps({"base_fingerprint": "0123456789abcdef"}))
    with pytest.raises(ConfigError, match="fingerprint"):
        merge_adapters(base, [ad], tmp_path / "m")
    assert merge_adapters(base, [ad], tmp_path / "m", allow_base_mismatch=True).tensors_changed == 4


def test_nan_and_nonempty_output_are_refused(base_and_adapter, tmp_path):
    base, ad = base_and_adapter
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("user data")
    with pytest.raises(ConfigError, match="exists and is not empty"):
        merge_adapters(base, [ad], tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "user data"
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    _edit_adapter(ad, lambda s: s[key].__setitem__((0, 0), float("nan")))
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight contains NaN"):
        merge_adapters(base, [ad], tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_cli_merge_writes_report_and_loads_in_transformers(base_and_adapter, tmp_path, capsys):
    base, ad = base_and_adapter
    out = tmp_path / "merged"
    assert main(["merge", "--base", str(base), "--adapter", str(ad), "--out", str(out), "--dtype", "bf16"]) == 0
    report = json.loads((out / "merge_report.json").read_text())
    assert report["passed"] is True and report["dtype"] == "bf16"
    assert {c["check"] for c in report["checks"]} >= {
        "tensors_match_reference",
        "logits_match_reference",
        "logits_match_live_adapter",
        "adapter_effect_present",
        "greedy_continuation_matches",
        "no_lora_tensors",
        "adapter_lineage",
    }
    assert report["adapters"][0]["sha256"] and report["timings_s"]["merge"] > 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16


def test_digests_hashed_while_writing_equal_a_fresh_read(base_and_adapter, tmp_path):
    import shutil

    from zhtune.model.checkpoint_files import base_fingerprint
    from zhtune.paths import cache_root

    base, ad = base_and_adapter
    result = merge_adapters(base, [ad], tmp_path / "m")
    assert result.fingerprint == base_fingerprint(result.out)
    shutil.rmtree(cache_root() / "fingerprints")  # forget everything: hash the written files from disk
    assert base_fingerprint(result.out) == result.fingerprint
