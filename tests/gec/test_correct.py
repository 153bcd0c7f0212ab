"""`zhtune correct` -> `zhtune score` end to end on a tiny random model, and CGEC evaluation inside training."""

from __future__ import annotations

import json

from tests.helpers import tiny_checkpoint
from tests.train.conftest import write_recipe
from zhtune.cli import main
from zhtune.gec.correct import bad_output, split_long
from zhtune.train.metrics import read_metrics


def test_split_and_fallback_rules():
    text = "第一句话很长。" * 10 + "最后一句！"
    pieces = split_long(text, 30)
    assert "".join(pieces) == text and all(len(p) <= 30 for p in pieces)
    assert bad_output("我爱北京。", "") == "empty"
    assert bad_output("我爱北京。", "我" * 60) == "runaway"
    assert bad_output("我爱北京。", "我爱北京北京北京北京北京。") == "repeated"
    assert bad_output("我爱北京。", "我爱北京天安门。") is None


def test_correct_then_score_on_tiny_model(shared, tmp_path, capsys):
    model = tiny_checkpoint(tmp_path / "m", "qwen2", shared, "qwen2.5-0.5b-instruct")
    cgec = shared / "data" / "cgec"
    rows = (cgec / "mucgec/MuCGEC_dev.txt").read_text(encoding="utf-8").splitlines()[:12]
    inp = tmp_path / "in.txt"
    inp.write_text("\n".join("\t".join(r.split("\t")[:2]) for r in rows) + "\n", encoding="utf-8")
    ref = tmp_path / "ref.para"
    ref.write_text("\n".join(rows) + "\n", encoding="utf-8")
    hyp = tmp_path / "hyp.para"
    assert (
        main(
            [
                "correct",
                "--model",
                str(model),
                "--input",
                str(inp),
                "--output",
                str(hyp),
                "--template",
                "qwen",
                "--batch-size",
                "4",
                "--max-chars",
                "40",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "corrected 12 sentences" in out and "fell back to the source" in out
    lines = [line.split("\t") for line in hyp.read_text().splitlines()]
    assert len(lines) == 12 and all(len(c) == 3 and c[2] for c in lines)
    assert main(["score", "--hyp", str(hyp), "--ref", str(ref), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["sentences"] == 12 and {"tp", "fp", "fn", "f0.5"} <= set(result)
    assert main(["correct", "--model", str(model), "--input", str(inp), "--output", str(hyp)]) == 2  # no overwrite


def test_cgec_evaluation_during_training(shared, tmp_path):
    model = tiny_checkpoint(tmp_path / "m", "llama", shared, "llama-2-7b")
    cgec = shared / "data" / "cgec"
    recipe = write_recipe(
        tmp_path / "r.yaml",
        model,
        shared / "data/instruct/cgec/text_correct.json",
        tmp_path / "run",
        "llama2",
        train={"max_steps": 4, "eval_every": 0},
        eval={"cgec": {"data": str(cgec / "mucgec/MuCGEC_dev.txt"), "every": 2, "limit": 6, "batch_size": 6}},
    )
    assert main(["train", str(recipe)]) == 0
    rows = [r for r in read_metrics(tmp_path / "run") if "cgec_f0.5" in r]
    assert [r["step"] for r in rows] == [2, 4]
    assert (tmp_path / "run" / "cgec_eval" / "step-0000004.para").exists()
    best = json.loads((tmp_path / "run" / "best_adapter" / "zhtune_adapter.json").read_text())["best"]
    assert best["cgec_f0.5"] == max(r["cgec_f0.5"] for r in rows)
