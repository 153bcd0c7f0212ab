"""`zhtune train` end to end on tiny random models with real tokenizers and real alpaca-zh data."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from tests.helpers import load_fp32, tiny_checkpoint
from tests.train.conftest import ALPACA, write_recipe
from zhtune.cli import main
from zhtune.model.load import load_adapter_model
from zhtune.train.metrics import read_metrics

CASES = {
    # name: (architecture, tokenizer in ../shared, template, base vocabulary (None: the tokenizer's))
    "qwen2": ("qwen2", "qwen2.5-0.5b-instruct", "qwen", None),
    "llama": ("llama", "llama-2-7b", "llama2", None),
    "glm": ("glm", "glm-4-9b-chat", "glm4", None),
    "chinese-llama-extended-vocab": ("llama", "chinese-llama-2", "chinese-alpaca-2", 32000),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_train_40_steps_then_adapter_loads_in_plain_peft(case, shared, tmp_path):
    arch, tokenizer, template, vocab = CASES[case]
    base = tiny_checkpoint(tmp_path / "base", arch, shared, tokenizer, vocab_size=vocab)
    recipe = write_recipe(tmp_path / "r.yaml", base, shared / ALPACA, tmp_path / "run", template)
    assert main(["train", str(recipe)]) == 0
    rows = read_metrics(tmp_path / "run")
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) == 2 and evals[-1] < evals[0], evals
    assert max(r["step"] for r in rows) == 40
    adapter = tmp_path / "run" / "adapter"
    meta = json.loads((adapter / "zhtune_adapter.json").read_text())
    assert meta["template"] == template and meta["base_fingerprint"] and meta["data"][0]["sha256"]
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    assert list((tmp_path / "run" / "tensorboard").iterdir())

    ours = load_adapter_model(base, adapter)
    plain = load_fp32(base)
    if vocab is not None:  # the vocabulary was extended: plain peft needs the base resized first, as always
        assert (
            meta["recipe"]["lora"]["modules_to_save"] == []
            and "embed_tokens" in json.loads((adapter / "adapter_config.json").read_text())["modules_to_save"]
        )
        plain.resize_token_embeddings(ours.get_input_embeddings().weight.shape[0])
    plain = PeftModel.from_pretrained(plain, adapter).eval()
    ids = torch.tensor([[1, 100, 2000, 30, 4000, 5]])
    with torch.no_grad():
        ours_logits = ours(input_ids=ids).logits
        torch.testing.assert_close(plain(input_ids=ids).logits, ours_logits)
        base_logits = load_fp32(base)(input_ids=ids).logits
    cols = base_logits.shape[-1]
    assert not torch.allclose(ours_logits[..., :cols], base_logits, atol=1e-4)  # training changed the model


def test_existing_run_is_not_overwritten(llama_checkpoint, shared, tmp_path, capsys):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        llama_checkpoint,
        shared / ALPACA,
        tmp_path / "run",
        "llama2",
        train={"max_steps": 2, "eval_every": 0},
    )
    assert main(["train", str(recipe)]) == 0
    assert main(["train", str(recipe)]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_unknown_recipe_key_is_an_error(llama_checkpoint, shared, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", llama_checkpoint, shared / ALPACA, tmp_path / "run", "llama2")
    assert main(["train", str(recipe), "train.learning_rate=1e-4"]) == 2
    assert "train: unknown key(s) ['learning_rate']" in capsys.readouterr().err
