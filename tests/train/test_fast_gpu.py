"""The fast path on a GPU: flex attention + liger + fused LoRA + fused loss give the plain path's loss and gradients
(bf16), and ``zhtune train`` uses it. Skipped without CUDA (run on the H100 of benchmarks/)."""

from __future__ import annotations

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model

from tests.helpers import tiny_checkpoint
from tests.train.conftest import ALPACA, write_recipe
from zhtune.data.packing import collate_packed, collate_padded, pack_samples
from zhtune.data.tokenize import TokenizedSample
from zhtune.model.load import upcast_trainable
from zhtune.train.fast import apply_fast_path, choose_attention
from zhtune.train.loop import disable_lora_input_casting, summed_cross_entropy
from zhtune.train.loss import summed_ce_chunked

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the fast path's kernels)"),
]


def _model(fast: bool):
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=2048,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))
    upcast_trainable(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if fast:
        disable_lora_input_casting(model)
        assert choose_attention(model, "auto", packed=True) == "flex_attention"
        applied = apply_fast_path(model).applied
        assert any("fused LoRA" in a for a in applied), applied
    return model.train()


def _samples():
    g = torch.Generator().manual_seed(1)
    out = []
    for n in (120, 300, 77, 410, 64, 200):
        ids = torch.randint(5, 2000, (n,), generator=g).tolist()
        out.append(TokenizedSample(ids, [-100] * (n // 3) + ids[n // 3 :]))
    return out


def test_fast_path_matches_plain_on_gpu():
    samples = _samples()
    results = {}
    for fast in (False, True):
        model = _model(fast)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if fast:
                b = collate_packed(pack_samples(samples, 1024, 0), None, "cuda")
                loss = summed_ce_chunked(model, {k: v for k, v in b.items() if k != "labels"}, b["labels"])
            else:
                b = {k: v.cuda() for k, v in collate_padded(samples, 0).items()}
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                loss = summed_cross_entropy(logits, b["labels"])
        loss.backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
        results[fast] = (loss.item(), grads)
    (plain_loss, plain_grads), (fast_loss, fast_grads) = results[False], results[True]
    assert abs(fast_loss - plain_loss) / plain_loss < 5e-3, (fast_loss, plain_loss)
    for name, g in plain_grads.items():
        rel = float((fast_grads[name] - g).norm() / g.norm())
        assert rel < 5e-2, (name, rel)


def test_zhtune_train_uses_the_fast_path_on_gpu(shared, tmp_path, capsys):
    from zhtune.cli import main
    from zhtune.train.metrics import read_metrics

    base = tiny_checkpoint(tmp_path / "base", "qwen2", shared, "qwen2.5-0.5b-instruct")
    recipe = write_recipe(
        tmp_path / "r.yaml", base, shared / ALPACA, tmp_path / "run", "qwen", tokenize={"cutoff_len": 512}
    )
    tree = yaml.safe_load(recipe.read_text())
    tree["model"].update(dtype="bf16", gradient_checkpointing=True, attn_implementation="auto")
    recipe.write_text(yaml.safe_dump(tree, allow_unicode=True))
    assert main(["train", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "attention flex_attention" in out and "fused LoRA" in out, out
    evals = [r["eval_loss"] for r in read_metrics(tmp_path / "run") if "eval_loss" in r]
    assert evals[-1] < evals[0], evals
