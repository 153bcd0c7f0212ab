"""The batch encoder gives exactly the ids and labels of the one-at-a-time reference, on real data and tokenizers."""

from __future__ import annotations

import numpy as np
import pytest

from zhtune.config import DataConfig, TokenizeConfig
from zhtune.data.conversation import Conversation, Message
from zhtune.data.formats import load_conversations
from zhtune.data.templates import RenderOptions, get_template
from zhtune.data.tokenize import (
    IGNORE_INDEX,
    BatchEncoder,
    _local_cumsum,
    _owner_keep,
    tokenize_conversation,
    tokenize_dataset,
)

INSTRUCT = "data/instruct"
# (tokenizer in ../shared, template, data files, expected encoder mode)
CASES = {
    "qwen-bytes": (
        "qwen2.5-0.5b-instruct",
        "qwen",
        ["belle/dev1K.json", "sharegpt_zh/sharegpt_zh_1K_format.jsonl"],
        "bytes",
    ),
    "qwen-tools": ("qwen2.5-0.5b-instruct", "qwen", ["sharegpt_toolcall_zh/glaive_toolcall_zh_demo.json"], "bytes"),
    "qwen3-thinking": ("qwen3", "qwen3", ["alpaca_zh/alpaca_zh_demo.json", "firefly/dummy_data.jsonl"], "bytes"),
    "glm4": (
        "glm-4-9b-chat",
        "glm4",
        ["alpaca_zh/alpaca_zh_demo.json", "sharegpt_zh/medical_sft_1K_format.jsonl"],
        "bytes",
    ),
    "llama3": ("llama3-8b-chinese-chat", "llama3", ["belle/dev1K.json", "firefly/dummy_data.jsonl"], "bytes"),
    "llama2-offsets": (
        "llama-2-7b",
        "llama2",
        ["alpaca_zh/alpaca_zh_demo.json", "firefly/dummy_data.jsonl"],
        "offsets",
    ),
    "chinese-alpaca-2": ("chinese-llama-2", "chinese-alpaca-2", ["cgec/text_correct.json"], "offsets"),
    "default-on-qwen": ("qwen2.5-0.5b-instruct", "default", ["guanaco_belle_vicuna/chat_data_sample.jsonl"], "bytes"),
}
OPTIONS = [
    TokenizeConfig(cutoff_len=2048),
    TokenizeConfig(cutoff_len=96, overflow="truncate", mask_history=True),
    TokenizeConfig(cutoff_len=160, overflow="drop", train_on_prompt=True),
]


def reference(convs, tokenizer, template, config, options):
    """The per-sample path with the cutoff policy written out, as zhtune applied it before batch encoding."""
    out = []
    for conv in convs:
        s = tokenize_conversation(conv, tokenizer, template, config, options)
        if len(s.input_ids) > config.cutoff_len:
            if config.overflow == "drop":
                continue
            s.input_ids, s.labels = s.input_ids[: config.cutoff_len], s.labels[: config.cutoff_len]
        if all(label == IGNORE_INDEX for label in s.labels[1:]):
            continue
        out.append(s)
    return out


def load(shared, files, limit=100):
    convs, _ = load_conversations([shared / INSTRUCT / f for f in files], DataConfig(on_error="skip"))
    # every file contributes, long multi-turn conversations included
    per_file = {}
    for c in convs:
        per_file.setdefault(c.origin.rsplit(":", 1)[0], []).append(c)
    return [c for group in per_file.values() for c in group[:limit]]


@pytest.mark.parametrize("case", sorted(CASES))
def test_batch_encoder_equals_reference(case, shared, real_tokenizer):
    tok_name, template_name, files, mode = CASES[case]
    tokenizer, template = real_tokenizer(tok_name), get_template(template_name)
    convs = load(shared, files)
    options = RenderOptions(enable_thinking=template_name == "qwen3")
    for config in OPTIONS:
        expected = reference(convs, tokenizer, template, config, options)
        got, report = tokenize_dataset(convs, tokenizer, template, config, options, batch_size=128)
        assert BatchEncoder(tokenizer, template, config, options).mode == mode
        assert [s.origin for s in got] == [s.origin for s in expected]
        for a, b in zip(got, expected):
            assert a.input_ids == b.input_ids, a.origin
            assert a.labels == b.labels, a.origin
        assert report.kept == len(expected) and report.samples == len(convs)
        assert sum(report.supervised) == sum(sum(x != IGNORE_INDEX for x in s.labels[1:]) for s in expected)


def test_byte_positions_need_the_last_byte_rule(shared, real_tokenizer):
    """Tokens do span segment boundaries in real data (BELLE answers that start with a newline), so a token must
    go to the segment of its last byte; the first-byte rule gives other labels and the parity test would see it."""
    tokenizer, template = real_tokenizer("qwen2.5-0.5b-instruct"), get_template("qwen")
    convs = load(shared, ["belle/dev1K.json"], limit=200)
    encoder = BatchEncoder(tokenizer, template, TokenizeConfig(), RenderOptions())
    rendered = encoder.render(convs)
    ids, counts, supervised = encoder._encode_joined(rendered)
    units = encoder.byte_table[ids]
    local_end, _totals = _local_cumsum(units, counts)
    first_byte = _owner_keep(local_end - units, counts, rendered.run_bytes, [r[1] for r in rendered.runs])
    assert (first_byte != supervised).sum() > 0
    ref = np.concatenate([np.array(tokenize_conversation(c, tokenizer, template).labels) for c in convs])
    np.testing.assert_array_equal(supervised, ref != IGNORE_INDEX)


def test_text_the_byte_sums_cannot_explain_falls_back_to_offsets(real_tokenizer):
    """A decomposed character is normalized (NFC) by the Qwen tokenizer: byte positions would be off, so that batch
    is encoded with offsets and still equals the reference."""
    tokenizer, template = real_tokenizer("qwen2.5-0.5b-instruct"), get_template("qwen")
    convs = [
        Conversation((Message("user", "cafe\u0301 是什么"), Message("assistant", "e\u0301 咖啡")), origin="x:1"),
        Conversation((Message("user", "你好"), Message("assistant", "\n\n你好！")), origin="x:2"),
    ]
    got, _ = tokenize_dataset(convs, tokenizer, template)
    for conv, sample in zip(convs, got):
        assert sample.labels == tokenize_conversation(conv, tokenizer, template).labels
