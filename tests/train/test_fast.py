"""The fast path on CPU: what applies, what falls back (said once), selective checkpointing, and a whole training run
with the fast path on giving the plain path's losses."""

from __future__ import annotations

import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model

from tests.helpers import load_fp32, tiny_checkpoint, tiny_model_dir
from tests.train.conftest import ALPACA, write_recipe
from zhtune.config import ModelConfig, load_recipe
from zhtune.errors import ConfigError
from zhtune.train import fast
from zhtune.train.fast import apply_fast_path, choose_attention, select_checkpointed_layers


def _peft(tmp_path, arch="qwen2"):
    torch.manual_seed(0)
    return get_peft_model(
        load_fp32(tiny_model_dir(tmp_path / arch, arch)),
        LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
    )


def test_cpu_fallback_is_clean_and_said_once(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(fast, "_said", set())
    caplog.set_level(logging.WARNING, logger="zhtune.train.fast")
    first = apply_fast_path(_peft(tmp_path))
    second = apply_fast_path(_peft(tmp_path / "again"))
    assert first.applied == ["fused LoRA linear (14 layers)"] and second.applied == first.applied
    assert "CUDA" in first.skipped["liger"]
    liger_lines = [r for r in caplog.records if "liger" in r.getMessage()]
    assert len(liger_lines) == 1, [r.getMessage() for r in caplog.records]
    model = _peft(tmp_path / "attn")
    assert choose_attention(model, "auto", packed=True) == "sdpa"  # flex attention cannot train on CPU
    assert choose_attention(model, "eager", packed=True) == "eager"
    assert sum("flex attention" in r.getMessage() for r in caplog.records) == 1
    choose_attention(model, "auto", packed=True)
    assert sum("flex attention" in r.getMessage() for r in caplog.records) == 1


def test_selective_checkpointing_keeps_gradients(tmp_path):
    model = _peft(tmp_path, "llama")
    model.train()
    ids = torch.randint(1, 256, (2, 20), generator=torch.Generator().manual_seed(3))

    def grads():
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    reference = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert select_checkpointed_layers(model, 0.5) == 1
    layers = model.get_base_model().model.layers
    assert [layer.gradient_checkpointing for layer in layers] == [True, False]
    for name, g in grads().items():
        torch.testing.assert_close(g, reference[name], rtol=1e-5, atol=1e-7)


def test_qlora_needs_a_gpu_and_says_so():
    from zhtune.model.load import quantization_config

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        quantization_config(ModelConfig(path="x", quantization="4bit"))


def test_checkpoint_fraction_is_validated(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {path: m, checkpoint_fraction: 1.5}\ndata: {paths: [d.json]}\n")
    with pytest.raises(ConfigError, match="checkpoint_fraction"):
        load_recipe(recipe)


def test_training_with_the_fast_path_gives_the_plain_losses(shared, tmp_path):
    """A whole ``train()`` run (fp32, LoRA dropout, checkpointing on half the layers): per-step losses equal."""
    from zhtune.cli import main
    from zhtune.train.metrics import read_metrics

    base = tiny_checkpoint(tmp_path / "base", "qwen2", shared, "qwen2.5-0.5b-instruct")
    losses = {}
    for on in (False, True):
        out = tmp_path / f"run-{on}"
        recipe = write_recipe(tmp_path / f"r{on}.yaml", base, shared / ALPACA, out, "qwen")
        overrides = [
            f"train.fast_path={str(on).lower()}",
            "train.max_steps=6",
            "train.eval_every=0",
            "lora.dropout=0.1",
            "model.gradient_checkpointing=true",
            "model.checkpoint_fraction=0.5",
        ]
        assert main(["train", str(recipe), *overrides]) == 0
        losses[on] = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses[True]) == 6
    for plain, quick in zip(losses[False], losses[True]):
        assert abs(plain - quick) <= 1e-6 * abs(plain), losses


def test_generation_switches_flex_attention_to_sdpa_and_back(tmp_path):
    from zhtune.train.fast import attention_for_generation

    model = _peft(tmp_path)
    base = model.get_base_model()
    base.set_attn_implementation("flex_attention")
    ids = torch.randint(1, 256, (1, 8))
    with attention_for_generation(model):
        assert base.config._attn_implementation == "sdpa"
        with torch.no_grad():
            model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert base.config._attn_implementation == "flex_attention"
    base.set_attn_implementation("sdpa")
    with attention_for_generation(model):  # nothing to switch
        assert base.config._attn_implementation == "sdpa"


def test_module_patches_are_scoped_to_the_patched_model(monkeypatch):
    """liger also swaps the modeling module's classes and RoPE; afterwards new models are plain again and the RoPE
    patch only takes CUDA tensors (a CPU merge verification after GPU training must not reach a Triton kernel)."""
    from transformers.models.qwen2 import modeling_qwen2

    from zhtune.train.fast import scoped_module_patch

    norm, rope = modeling_qwen2.Qwen2RMSNorm, modeling_qwen2.apply_rotary_pos_emb
    monkeypatch.setattr(modeling_qwen2, "apply_rotary_pos_emb", rope)  # restored after the test either way
    monkeypatch.setattr(modeling_qwen2, "Qwen2RMSNorm", norm)

    def fake_liger():
        modeling_qwen2.Qwen2RMSNorm = object
        modeling_qwen2.apply_rotary_pos_emb = lambda *a, **k: "triton"

    scoped_module_patch(modeling_qwen2, fake_liger)
    assert modeling_qwen2.Qwen2RMSNorm is norm
    q = k = torch.randn(1, 2, 3, 8)
    cos, sin = torch.ones(1, 3, 8), torch.zeros(1, 3, 8)
    out_q, out_k = modeling_qwen2.apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(out_q, q)  # the original function ran (cos 1, sin 0: identity)
