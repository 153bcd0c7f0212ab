"""The fused LoRA linear layers give peft's numbers: loss, every LoRA gradient, and the input gradient."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from tests.helpers import load_fp32, tiny_model_dir
from zhtune.train import fused_lora
from zhtune.train.fused_lora import fuse_lora_layers, unfuse_lora_layers


def _model(tmp_path, arch, **lora):
    torch.manual_seed(0)
    cfg = dict(r=4, target_modules="all-linear", init_lora_weights=False) | lora
    return get_peft_model(load_fp32(tiny_model_dir(tmp_path / arch, arch)), LoraConfig(**cfg))


def _loss_and_grads(model, ids, seed=3, autocast=False):
    model.zero_grad()
    torch.manual_seed(seed)  # the same dropout masks for both paths
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(inputs_embeds=embeds).logits
    loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, embeds.grad.clone()


@pytest.mark.parametrize(
    "arch,lora",
    [
        ("qwen2", {}),
        ("llama", {"lora_dropout": 0.2}),
        ("phi3", {"use_rslora": True}),  # fused qkv_proj / gate_up_proj
        ("glm", {"lora_dropout": 0.1, "use_rslora": True}),
    ],
)
def test_fused_equals_peft_fp32(tmp_path, arch, lora):
    model = _model(tmp_path, arch, **lora)
    model.train()
    ids = torch.randint(1, 256, (1, 24), generator=torch.Generator().manual_seed(1))
    ref = _loss_and_grads(model, ids)
    calls = []
    original = fused_lora._LoraLinear.apply
    fused_lora._LoraLinear.apply = lambda *a: calls.append(1) or original(*a)
    try:
        n = fuse_lora_layers(model)
        got = _loss_and_grads(model, ids)
    finally:
        fused_lora._LoraLinear.apply = original
    assert n > 0 and len(calls) == n  # every LoRA layer took the fused path once
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-6)
    for name, g in ref[1].items():
        torch.testing.assert_close(got[1][name], g, rtol=1e-5, atol=1e-7, msg=name)
    torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-7)
    unfuse_lora_layers(model)
    torch.testing.assert_close(_loss_and_grads(model, ids)[0], ref[0], rtol=0, atol=0)


def test_fused_under_bf16_autocast_is_as_accurate_as_peft(tmp_path):
    """Under bf16 autocast both paths round; the fused one must be no further from the fp32 numbers than peft is."""
    model = _model(tmp_path, "qwen2")
    ids = torch.randint(1, 256, (1, 32), generator=torch.Generator().manual_seed(2))
    truth = _loss_and_grads(model, ids)
    peft_bf16 = _loss_and_grads(model, ids, autocast=True)
    fuse_lora_layers(model)
    fused_bf16 = _loss_and_grads(model, ids, autocast=True)

    def error(run):
        return max(float((run[1][n] - g).norm() / g.norm()) for n, g in truth[1].items())

    assert error(fused_bf16) <= 1.25 * error(peft_bf16) + 1e-3, (error(fused_bf16), error(peft_bf16))
    assert abs(float(fused_bf16[0] - truth[0])) <= 2 * abs(float(peft_bf16[0] - truth[0])) + 1e-2


def test_variants_and_switches_keep_peft_forward(tmp_path):
    """DoRA, disabled adapters, and merged weights are not fused; their outputs stay peft's."""
    ids = torch.randint(1, 256, (1, 16), generator=torch.Generator().manual_seed(4))
    dora = _model(tmp_path, "llama", use_dora=True)
    want = dora(ids).logits
    calls = []
    original = fused_lora._LoraLinear.apply
    fused_lora._LoraLinear.apply = lambda *a: calls.append(1) or original(*a)
    try:
        fuse_lora_layers(dora)
        torch.testing.assert_close(dora(ids).logits, want, rtol=0, atol=0)
        assert not calls
        plain = _model(tmp_path, "qwen2")
        lora_out = plain(ids).logits
        with plain.disable_adapter():
            base_out = plain(ids).logits
        fuse_lora_layers(plain)
        with plain.disable_adapter():
            torch.testing.assert_close(plain(ids).logits, base_out, rtol=0, atol=0)
        assert not calls
        torch.testing.assert_close(plain(ids).logits, lora_out, rtol=1e-5, atol=1e-6)
        assert calls
        calls.clear()
        plain.merge_adapter()
        torch.testing.assert_close(plain(ids).logits, lora_out, rtol=1e-4, atol=1e-5)
        assert not calls
    finally:
        fused_lora._LoraLinear.apply = original
