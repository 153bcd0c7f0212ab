"""The chat-level generator: its prompts are the tokenizer's own ``apply_chat_template`` ids, its stop tokens the
template's end of turn and the EOS, and its completions — drafting from the sentence being corrected — are the
plain argmax loop's over those ids, for bf16 checkpoints of the Qwen2.5 and GLM-4 families (loaded in fp32)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import REAL_FAMILIES, real_checkpoint
from tests.infer.reference import argmax_loop, sharpen_checkpoint
from zhtune.data.conversation import Conversation, Message
from zhtune.data.templates import get_template
from zhtune.infer.engine import Generator

SENTENCES = ["我爱北京天按门。", "学生大概做飞机去北京，然后他们坐火车回家了。", "这个问题很难。"]


@pytest.mark.parametrize("family", ["qwen2.5", "glm4"])
def test_generator_equals_argmax_loop_over_apply_chat_template(family, shared, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = sharpen_checkpoint(real_checkpoint(tmp_path / family, family, shared), 6.0)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    generator = Generator(model, tokenizer, get_template(REAL_FAMILIES[family][3]))
    stops = set(generator.stop_ids())
    assert set(model.generation_config.eos_token_id) <= stops  # the checkpoint's end-of-turn ids all stop
    prompts, sources = [], []
    for s in SENTENCES:
        text = f"改正：\n{s}"
        ours = generator.prompt_ids(Conversation((Message("user", text),)))
        theirs = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        assert ours == list(theirs["input_ids"] if hasattr(theirs, "keys") else theirs)
        prompts.append(ours)
        sources.append(generator.source_ids(s))
    budgets = [9, 25, 14]
    reference = [argmax_loop(model, p, b, stops) for p, b in zip(prompts, budgets)]
    for batch_size in (1, 3):
        done = generator.complete(prompts, budgets, sources, batch_size)
        assert [(c.tokens, c.stopped) for c in done] == reference
    generator.close()
