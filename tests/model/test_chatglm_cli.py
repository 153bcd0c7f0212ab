"""The ``zhtune convert`` command, and ``zhtune train`` + ``zhtune merge`` run directly on original ChatGLM folders.

Training uses the repository's ChatGLM3 recipe through the real CLI (3 steps, tiny shapes by overrides). The tiny
originals carry the release's real tokenizer files, converted with the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.model.reference import build_original, copy_real_tokenizer, read_state
from zhtune.cli import main

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "chatglm3" / "6b_sft.yaml"
ALPACA = "data/instruct/alpaca_zh/alpaca_zh_demo.json"


def test_convert_and_back_through_the_cli(original, tmp_path, capsys):
    src, _config = original("chatglm3-32k")
    assert main(["convert", str(src), "--out", str(tmp_path / "native")]) == 0
    said = capsys.readouterr().out
    assert "converted chatglm3 -> " in said and "model_type glm" in said and "rope_theta=500000.0" in said
    assert main(["convert", str(tmp_path / "native"), "--out", str(tmp_path / "back"), "--to", "chatglm"]) == 0
    assert "wrote the original chatglm3 layout" in capsys.readouterr().out
    before, after = read_state(src), read_state(tmp_path / "back")
    assert sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before)


def test_cli_errors_are_one_line_without_traceback(original, tmp_path, capsys):
    src, _config = original("chatglm3", shards=1)
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["convert", str(tmp_path / "llama"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zhtune convert: error:") and "not an original ChatGLM checkpoint" in err
    assert "Traceback" not in err
    assert main(["convert", "--adapter", str(tmp_path), "--out", str(tmp_path / "y")]) == 2
    assert "needs --base ORIGINAL" in capsys.readouterr().err


@pytest.mark.parametrize(
    "case,template,dtype",
    [
        ("chatglm", "chatglm", torch.float32),
        ("chatglm3", "chatglm3", torch.float32),
        ("chatglm3", "chatglm3", torch.bfloat16),
    ],
    ids=["chatglm-fp32", "chatglm3-fp32", "chatglm3-bf16"],
)
def test_train_and_merge_on_an_original_checkpoint(case, template, dtype, original, shared, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from zhtune.model.convert import resolve_checkpoint

    # fp32 weights: the merged model equals the live adapter to fp32 rounding; bf16 weights (as users have them): the
    # merged weights are rounded to bf16, so within what that rounding moves the logits (merge measures it)
    src, _config = original(case, dtype=dtype, shards=2)
    copy_real_tokenizer(shared, case, src)  # converted with the checkpoint
    run = tmp_path / "run"
    overrides = [
        f"model.path={src}",
        "model.dtype=fp32",
        "model.gradient_checkpointing=false",
        f"template.name={template}",
        f"data.paths=[{shared / ALPACA}]",
        "tokenize.cutoff_len=96",
        "train.max_steps=3",
        "train.micro_batch_size=2",
        "train.grad_accum=1",
        "train.eval_every=0",
        "train.save_every=0",
        "train.val_size=0",
        "train.progress_bar=false",
        "train.lr=3e-2",
        "lora.dropout=0.0",
        f"output.dir={run}",
    ]
    if case == "chatglm":
        overrides.append("lora.target_modules=auto")  # the recipe lists glm's names; ChatGLM-6B has up_proj
    assert main(["train", str(RECIPE), *overrides]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows if "step" in r) == 3
    merged = tmp_path / "merged"
    assert main(["merge", "--base", str(src), "--adapter", str(run / "adapter"), "--out", str(merged)]) == 0
    assert json.loads((merged / "merge_report.json").read_text())["passed"] is True
    base = AutoModelForCausalLM.from_pretrained(resolve_checkpoint(src), dtype=torch.float32)
    live = PeftModel.from_pretrained(base, run / "adapter").eval()
    gmask, sop = (130001, 130004) if case == "chatglm" else (64790, 64792)
    ids = torch.tensor([[30, 40, 50, 60, gmask, sop, 70, 80, 90]])
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(input_ids=ids).logits
        want = live(input_ids=ids).logits
        plain = live.get_base_model()
        with live.disable_adapter():
            before = plain(input_ids=ids).logits
    report = json.loads((merged / "merge_report.json").read_text())
    live_check = next(c for c in report["checks"] if c["check"] == "logits_match_live_adapter")
    tolerance = 1e-4 if dtype == torch.float32 else 1e-4 + 2 * live_check["dtype_rounding_effect"]
    assert (got - want).abs().max() <= tolerance
    assert (want - before).abs().max() > max(1e-2, 10 * tolerance)  # training changed the model: the check can fail

    # the merged model goes back to the original layout: the original code computes the same logits
    back = ["convert", str(merged), "--out", str(tmp_path / "back"), "--to", "chatglm", "--original", str(src)]
    assert main(back) == 0
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    deployed = build_original(shared, case, config)
    deployed.load_state_dict({k: v.float() for k, v in read_state(tmp_path / "back").items()})
    with torch.no_grad():
        assert (deployed.eval()(input_ids=ids).logits - got).abs().max() <= 1e-5

    # zhtune correct takes the original folder and the adapter too
    (tmp_path / "in.txt").write_text("他昨天去学校了。\n我很喜欢读书。\n", encoding="utf-8")
    correct = ["correct", "--model", str(src), "--adapter", str(run / "adapter"), "--input", str(tmp_path / "in.txt")]
    assert main([*correct, "--output", str(tmp_path / "hyp.para"), "--template", template]) == 0
    assert len((tmp_path / "hyp.para").read_text(encoding="utf-8").splitlines()) == 2
