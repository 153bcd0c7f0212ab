"""`zhtune correct` is greedy decoding over the model's own chat template (issue 11), on checkpoints shaped like
users' ones (bf16 shards, the real tokenizer and generation_config.json): at batch 1 and in mixed-length batches,
with and without speculative drafts, with the recorded or the given instruction / system prompt / template; a
budget cut is counted as ``truncated``; and `zhtune score`, in-training and pipeline evaluation run on it."""

from __future__ import annotations

import gc
import json
import shutil
import weakref

import pytest
import torch
import yaml

from tests.helpers import real_checkpoint, tiny_checkpoint
from tests.infer.reference import argmax_loop, sharpen_checkpoint
from tests.train.conftest import write_recipe
from zhtune.cli import main
from zhtune.gec.corpora import CGEC_INSTRUCTION
from zhtune.gec.correct import bad_output, first_line, split_long, token_budget
from zhtune.train.metrics import read_metrics

FAMILY_TEMPLATE = {"qwen2.5": "qwen", "glm4": "glm4"}


def test_split_and_fallback_rules():
    text = "第一句话很长。" * 10 + "最后一句！"
    pieces = split_long(text, 30)
    assert "".join(pieces) == text and all(len(p) <= 30 for p in pieces)
    assert bad_output("我爱北京。", "") == "empty"
    assert bad_output("我爱北京。", "我" * 60) == "runaway"
    assert bad_output("我爱北京。", "我爱北京北京北京北京北京。") == "repeated"
    assert bad_output("我爱北京。", "我爱北京天安门。") is None
    assert first_line("  改好了\t的句子\r\n第二行") == "改好了 的句子"


@pytest.fixture(scope="module")
def checkpoints(shared, tmp_path_factory):
    # weights scaled x6: a random model at the real init scale writes one token forever (greedy ties in spirit);
    # sharpened, it writes varied tokens with clear argmax margins, so equal outputs mean something
    root = tmp_path_factory.mktemp("ck")
    return {f: sharpen_checkpoint(real_checkpoint(root / f, f, shared), 6.0) for f in FAMILY_TEMPLATE}


@pytest.fixture(scope="module")
def sentences(shared):
    rows = (shared / "data/cgec/mucgec/MuCGEC_dev.txt").read_text(encoding="utf-8").splitlines()
    picked = [rows[i].split("\t")[1] for i in (0, 3, 4, 10, 2)]  # 11..56 characters: ragged rows in one batch
    return [s for s in picked if len(s) <= 60]


def _write_inputs(path, sentences):
    path.write_text("".join(f"{i}\t{s}\n" for i, s in enumerate(sentences, 1)), encoding="utf-8")
    return path


def _chat_ids(tokenizer, messages):
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _reference(model_dir, sentences, instruction=CGEC_INSTRUCTION, system=None, adapter=None):
    """Per sentence: (first line of the plain argmax loop over the tokenizer's own chat template, truncated)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
    stops = {tokenizer.eos_token_id} | {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|user|>")}
    stops.discard(tokenizer.unk_token_id)
    out = []
    for s in sentences:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": f"{instruction}\n{s}"}
        ]
        budget = token_budget(tokenizer.encode(s, add_special_tokens=False))
        tokens, stopped = argmax_loop(model, _chat_ids(tokenizer, messages), budget, stops)
        out.append((first_line(tokenizer.decode(tokens, skip_special_tokens=True)), not stopped))
    return out


def _correct(capsys, model_dir, inp, out, *flags):
    args = ["correct", "--model", str(model_dir), "--input", str(inp), "--output", str(out), "--force", *flags]
    assert main(args) == 0
    printed = capsys.readouterr().out
    return [line.split("\t")[2] for line in out.read_text(encoding="utf-8").splitlines()], printed


@pytest.mark.parametrize("family", list(FAMILY_TEMPLATE))
def test_correct_equals_argmax_loop_over_the_models_own_chat_template(family, checkpoints, sentences, tmp_path, capsys):
    model_dir, template = checkpoints[family], FAMILY_TEMPLATE[family]
    inp, hyp = _write_inputs(tmp_path / "in.txt", sentences), tmp_path / "hyp.para"
    reference = _reference(model_dir, sentences)
    expected = [h for h, _cut in reference]
    runs = (
        ["--batch-size", "1"],
        ["--batch-size", "4", "--no-batch-invariant"],
        ["--batch-size", "4", "--no-speculative"],
    )
    for flags in runs:
        got, printed = _correct(capsys, model_dir, inp, hyp, "--template", template, "--no-fallback", *flags)
        assert got == expected, flags
        assert "sentences/s" in printed and "tokens/s" in printed and "mean accepted length" in printed
        assert "batch-invariant" not in printed  # a CPU: torch's kernels
    truncated = sum(cut for _h, cut in reference)
    assert truncated > 0  # a random model rarely stops: its outputs are cut by their budgets
    assert f"'truncated': {truncated}" in printed
    # with fallback (the default) every budget-cut output is replaced by its source
    got, printed = _correct(capsys, model_dir, inp, hyp, "--template", template)
    assert got == [s if cut else h for s, (h, cut) in zip(sentences, reference)]
    assert "fell back to the source" in printed and f"'truncated': {truncated}" in printed


def test_the_checkpoints_repetition_penalty_does_not_apply(checkpoints, sentences):
    """Qwen2.5's generation_config.json has repetition_penalty 1.1: plain `generate` with it is not greedy; the
    package's transformers fallback (and so the engine, above) is."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zhtune.infer.completion import Request
    from zhtune.infer.hf import hf_generate

    model_dir = checkpoints["qwen2.5"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert model.generation_config.repetition_penalty == 1.1
    stops = {151643, 151645}
    prompts = [_chat_ids(tokenizer, [{"role": "user", "content": f"{CGEC_INSTRUCTION}\n{s}"}]) for s in sentences]
    greedy = [argmax_loop(model, p, 24, stops)[0] for p in prompts]
    ours = hf_generate(model, [Request(p, 24) for p in prompts], sorted(stops), 151643, batch_size=1)
    assert [c.tokens for c in ours] == greedy
    penalised = []
    for p in prompts:
        out = model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=24)[0, len(p) :].tolist()
        penalised.append([t for t in out if t not in stops])
    assert penalised != greedy


def test_recorded_settings_are_used_and_flags_override_them(checkpoints, sentences, tmp_path, capsys):
    model_dir = tmp_path / "merged"
    shutil.copytree(checkpoints["qwen2.5"], model_dir)
    system, instruction = "你是一个中文语法纠错助手。", "改正这句话："
    recipe = {"template": {"name": "qwen", "system": system}, "data": {"cgec_instruction": instruction}}
    (model_dir / "merge_report.json").write_text(json.dumps({"template": "qwen", "recipe": recipe}))
    inp, hyp = _write_inputs(tmp_path / "in.txt", sentences[:3]), tmp_path / "hyp.para"
    got, _ = _correct(capsys, model_dir, inp, hyp, "--no-fallback")
    assert got == [h for h, _c in _reference(model_dir, sentences[:3], instruction, system)]
    got, _ = _correct(capsys, model_dir, inp, hyp, "--no-fallback", "--instruction", "纠错：", "--system", "助手")
    assert got == [h for h, _c in _reference(model_dir, sentences[:3], "纠错：", "助手")]
    assert got != [h for h, _c in _reference(model_dir, sentences[:3], instruction, system)]
    bare = tmp_path / "bare"
    shutil.copytree(checkpoints["qwen2.5"], bare)
    assert main(["correct", "--model", str(bare), "--input", str(inp), "--output", str(tmp_path / "x.para")]) == 2
    assert "pass --template" in capsys.readouterr().err


def test_an_adapters_recorded_settings_and_weights_are_used(checkpoints, sentences, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = checkpoints["qwen2.5"]
    torch.manual_seed(0)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),  # B away from zero
    )
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    recipe = {"template": {"name": "qwen", "system": "纠错助手"}, "data": {"cgec_instruction": "改："}}
    (adapter / "zhtune_adapter.json").write_text(json.dumps({"template": "qwen", "recipe": recipe}))
    inp, hyp = _write_inputs(tmp_path / "in.txt", sentences[:2]), tmp_path / "hyp.para"
    got, _ = _correct(capsys, base, inp, hyp, "--adapter", str(adapter), "--no-fallback", "--batch-size", "2")
    assert got == [h for h, _c in _reference(base, sentences[:2], "改：", "纠错助手", adapter)]
    assert got != [h for h, _c in _reference(base, sentences[:2], "改：", "纠错助手")]  # the adapter mattered


def test_correct_then_score_on_tiny_model(shared, tmp_path, capsys):
    model = tiny_checkpoint(tmp_path / "m", "qwen2", shared, "qwen2.5-0.5b-instruct")
    cgec = shared / "data" / "cgec"
    rows = (cgec / "mucgec/MuCGEC_dev.txt").read_text(encoding="utf-8").splitlines()[:12]
    inp = tmp_path / "in.txt"
    inp.write_text("\n".join("\t".join(r.split("\t")[:2]) for r in rows) + "\n", encoding="utf-8")
    ref = tmp_path / "ref.para"
    ref.write_text("\n".join(rows) + "\n", encoding="utf-8")
    hyp = tmp_path / "hyp.para"
    args = ["correct", "--model", str(model), "--input", str(inp), "--output", str(hyp), "--template", "qwen"]
    assert main([*args, "--batch-size", "4", "--max-chars", "40"]) == 0
    out = capsys.readouterr().out
    assert "corrected 12 sentences" in out and "fell back to the source" in out
    lines = [line.split("\t") for line in hyp.read_text().splitlines()]
    assert len(lines) == 12 and all(len(c) == 3 and c[2] for c in lines)
    assert main(["score", "--hyp", str(hyp), "--ref", str(ref), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["sentences"] == 12 and {"tp", "fp", "fn", "f0.5"} <= set(result)
    assert main(args) == 2  # no overwrite without --force


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


def test_pipeline_evaluation_holds_one_model_at_a_time(checkpoints, shared, tmp_path, monkeypatch):
    import zhtune.model.load as load

    loaded: list[weakref.ref] = []
    real_load = load.load_for_inference

    def tracking_load(*args, **kwargs):
        gc.collect()
        assert all(ref() is None for ref in loaded), "the previous model is still in memory"
        model = real_load(*args, **kwargs)
        loaded.append(weakref.ref(model))
        return model

    monkeypatch.setattr(load, "load_for_inference", tracking_load)
    dev = tmp_path / "dev.para"  # three MuCGEC rows: aligning the whole set's references would take half a minute
    rows = (shared / "data/cgec/mucgec/MuCGEC_dev.txt").read_text(encoding="utf-8").splitlines()[:3]
    dev.write_text("\n".join(rows) + "\n", encoding="utf-8")
    recipe = tmp_path / "pipeline.yaml"
    stage = {"name": "evaluate", "kind": "eval_cgec", "compare": ["base"], "batch_size": 4}
    stage["sets"] = [{"name": "mucgec", "input": str(dev), "ref": str(dev)}]
    tree = {"base": str(checkpoints["qwen2.5"]), "work_dir": str(tmp_path / "run"), "stages": [stage]}
    recipe.write_text(yaml.safe_dump(tree, allow_unicode=True))
    assert main(["pipeline", str(recipe)]) == 0
    assert len(loaded) == 2
    metrics = json.loads((tmp_path / "run" / "01-evaluate" / "manifest.json").read_text())["metrics"]
    assert set(metrics["cgec"]) == {"final", "base"} and "f0.5" in metrics["cgec"]["final"]["mucgec"]
