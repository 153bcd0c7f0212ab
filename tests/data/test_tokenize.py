"""Label masks and the cutoff policy, on the real Qwen2.5 tokenizer."""

from __future__ import annotations

import pytest

from zhtune.config import TokenizeConfig
from zhtune.data.conversation import Conversation, Message
from zhtune.data.templates import get_template
from zhtune.data.tokenize import IGNORE_INDEX, tokenize_conversation, tokenize_dataset
from zhtune.errors import ConfigError


def conv(*pairs, origin="f.jsonl:1"):
    msgs = []
    for q, a in pairs:
        msgs += [Message("user", q), Message("assistant", a)]
    return Conversation(tuple(msgs), origin=origin)


def supervised_text(tok, sample):
    return tok.decode([t for t, label in zip(sample.input_ids, sample.labels) if label != IGNORE_INDEX])


@pytest.fixture(scope="module")
def qwen(real_tokenizer):
    return real_tokenizer("qwen2.5-0.5b-instruct")


def test_loss_only_on_assistant_turns(qwen):
    sample = tokenize_conversation(conv(("问一", "答一"), ("问二", "答二")), qwen, get_template("qwen"))
    assert supervised_text(qwen, sample) == "答一<|im_end|>答二<|im_end|>"


def test_mask_history_and_train_on_prompt(qwen):
    c = conv(("问一", "答一"), ("问二", "答二"))
    masked = tokenize_conversation(c, qwen, get_template("qwen"), TokenizeConfig(mask_history=True))
    assert supervised_text(qwen, masked) == "答二<|im_end|>"
    everything = tokenize_conversation(c, qwen, get_template("qwen"), TokenizeConfig(train_on_prompt=True))
    assert everything.labels == everything.input_ids


def test_alpaca_and_default_templates_supervise_eos(qwen):
    c = conv(("你好", "你好！"))
    for name in ("alpaca", "default", "chinese-alpaca"):
        sample = tokenize_conversation(c, qwen, get_template(name))
        assert supervised_text(qwen, sample).strip() == "你好！" + qwen.eos_token


def test_cutoff_truncate_and_drop_are_counted(qwen):
    long_answer = "很长的回答。" * 200
    data = [
        conv(("短问题", "短回答"), origin="f:1"),
        conv(("问", long_answer), origin="f:2"),
        conv(("问" * 300, "答"), origin="f:3"),
    ]
    tmpl = get_template("qwen")
    kept, report = tokenize_dataset(data, qwen, tmpl, TokenizeConfig(cutoff_len=128, overflow="truncate"))
    assert [s.origin for s in kept] == ["f:1", "f:2"]
    assert (report.truncated, report.dropped_no_target, report.kept) == (2, 1, 2)
    assert all(len(s.input_ids) <= 128 for s in kept)
    assert "f:3: no supervised token left" in report.reasons[0]
    kept, report = tokenize_dataset(data, qwen, tmpl, TokenizeConfig(cutoff_len=128, overflow="drop"))
    assert [s.origin for s in kept] == ["f:1"] and report.dropped_too_long == 2
    assert "3 samples → 1 kept" in report.summary()


def test_wrong_template_for_tokenizer_is_a_clear_error(qwen):
    with pytest.raises(ConfigError, match="<|begin_of_text|>|llama3"):
        tokenize_dataset([conv(("a", "b"))], qwen, get_template("llama3"))
