"""Converted ChatGLM checkpoints on a GPU: bf16 logits within bf16 rounding of the original code (fp32, CPU),
cached generation equal to full recomputation (fp32), and ``zhtune train`` (fast path) + ``zhtune merge`` on CUDA.
Skipped without CUDA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.model.reference import copy_real_tokenizer, sample_ids
from tests.model.test_convert_chatglm import original_logits
from zhtune.cli import main
from zhtune.model.convert import convert_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "chatglm3" / "6b_sft.yaml"
ALPACA = "data/instruct/alpaca_zh/alpaca_zh_demo.json"


@pytest.mark.parametrize("case", ["chatglm", "chatglm3", "glm4"])
def test_bf16_on_gpu_within_bf16_rounding_of_the_original(case, original, shared, tmp_path):
    from transformers import AutoModelForCausalLM

    src, config = original(case)
    convert_checkpoint(src, tmp_path / "native")
    ids = sample_ids(case, config, (300, 200) if case == "chatglm" else (300,))
    exact = original_logits(shared, case, config, src, ids, torch.float32)
    original_bf16 = (original_logits(shared, case, config, src, ids, torch.bfloat16) - exact).abs().max()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "native", dtype=torch.bfloat16).cuda().eval()
    with torch.no_grad():
        got = model(input_ids=ids.cuda()).logits.float().cpu()
        assert (got - exact).abs().max() <= 2 * original_bf16
        model = model.float()  # cached vs recomputed greedy in fp32: bf16 rounding could flip near-ties
        prompt = ids[:1, :120].cuda()
        cached = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None)
        seq = prompt
        for _ in range(12):  # greedy by full recomputation, same device and dtype
            seq = torch.cat([seq, model(input_ids=seq).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(cached, seq)


@pytest.mark.parametrize("case,template", [("chatglm", "chatglm"), ("chatglm3", "chatglm3")])
def test_train_on_gpu_then_merge(case, template, original, shared, tmp_path, capsys):
    src, _config = original(case, shards=2)  # bf16, as users have them
    copy_real_tokenizer(shared, case, src)  # converted with the checkpoint
    run = tmp_path / "run"
    overrides = [
        f"model.path={src}",
        "model.attn_implementation=auto",
        f"template.name={template}",
        f"data.paths=[{shared / ALPACA}]",
        "tokenize.cutoff_len=512",
        "train.max_steps=20",
        "train.grad_accum=1",
        "train.eval_every=10",
        "train.save_every=0",
        "train.val_size=16",
        "train.progress_bar=false",
        "train.lr=5e-3",
        f"output.dir={run}",
    ]
    if case == "chatglm":
        overrides.append("lora.target_modules=auto")
    assert main(["train", str(RECIPE), *overrides]) == 0
    print(capsys.readouterr().out)  # the fast-path line: attention and kernels applied
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in evals if "eval_loss" in r]
    assert evals[-1] < evals[0], evals
    merged = tmp_path / "merged"
    assert main(["merge", "--base", str(src), "--adapter", str(run / "adapter"), "--out", str(merged)]) == 0
