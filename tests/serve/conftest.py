"""A tiny Qwen2.5-shaped checkpoint that has memorized a few corrections and one chat answer.

A random model answers gibberish (and a random model with tied embeddings mostly repeats its last token, so a
correction falls back to the source and has no edits). So that the serving tests can check real edits and real
answers, the fixture starts from ``real_checkpoint`` (bf16 shards, the real Qwen2.5 tokenizer and
``generation_config.json``, the padded vocabulary) and trains it until greedy decoding reproduces every answer below
with a logit margin of at least 2 at each token, then saves it as bf16 shards like the original.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import real_checkpoint
from zhtune.gec.corpora import CGEC_INSTRUCTION

# (source, correction): one substitution, one redundant character, one missing character
CORRECTIONS = {
    "我爱北京天按门。": "我爱北京天安门。",
    "他昨天去了学校了。": "他昨天去了学校。",
    "这本书很好看": "这本书很好看。",
}
GREETING = ("你好", "你好！我是小助手。")
TEMPLATE = "qwen"


def _samples(tokenizer):
    from zhtune.data.conversation import Conversation, Message
    from zhtune.data.templates import get_template
    from zhtune.data.tokenize import tokenize_conversation

    pairs = [(f"{CGEC_INSTRUCTION}\n{src}", tgt) for src, tgt in CORRECTIONS.items()] + [GREETING]
    template = get_template(TEMPLATE)
    convs = [Conversation((Message("user", q), Message("assistant", a))) for q, a in pairs]
    return [tokenize_conversation(c, tokenizer, template) for c in convs]


def memorize(folder: Path, out: Path, max_steps: int = 200) -> Path:
    """Train the checkpoint in ``folder`` on the pairs above (fp32, full parameters) and save it to ``out``."""
    from transformers import AutoModelForCausalLM

    from zhtune.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(folder)
    samples = _samples(tokenizer)
    width = max(len(s.input_ids) for s in samples)
    ids = torch.tensor([s.input_ids + [0] * (width - len(s.input_ids)) for s in samples])
    mask = torch.tensor([[1] * len(s.input_ids) + [0] * (width - len(s.input_ids)) for s in samples])
    labels = torch.tensor([s.labels + [-100] * (width - len(s.labels)) for s in samples])
    supervised = labels[:, 1:] != -100
    target = labels[:, 1:][supervised]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _step in range(max_steps):
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1][supervised]
        logits = model.lm_head(hidden).float()
        right = logits.gather(1, target[:, None])[:, 0]
        best_other = logits.scatter(1, target[:, None], -1e9).max(-1).values
        if (right - best_other).min() > 2.0:
            break
        torch.nn.functional.cross_entropy(logits, target).backward()
        opt.step()
        opt.zero_grad()
    else:
        raise AssertionError(f"the tiny model did not memorize its answers in {max_steps} steps")
    model.to(torch.bfloat16).save_pretrained(out, max_shard_size="8MB")
    for f in folder.iterdir():
        if (
            f.name not in ("config.json",)
            and not f.name.endswith(".safetensors")
            and f.name != "model.safetensors.index.json"
        ):
            shutil.copy(f, out / f.name)  # tokenizer files and the real generation_config.json, unchanged
    return out


@pytest.fixture(scope="session")
def random_checkpoint(shared, tmp_path_factory) -> Path:
    return real_checkpoint(tmp_path_factory.mktemp("serve-random") / "model", "qwen2.5", shared)


@pytest.fixture(scope="session")
def corrector(random_checkpoint, tmp_path_factory) -> Path:
    """The memorized checkpoint's folder (template ``qwen``, nothing recorded: pass the template)."""
    return memorize(random_checkpoint, tmp_path_factory.mktemp("serve-model") / "model")


@pytest.fixture(scope="session")
def backend(corrector):
    from zhtune.serve.backend import load_backend

    return load_backend(corrector, template=TEMPLATE, dtype="fp32")
