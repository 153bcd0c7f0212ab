"""The Jinja chat templates a merged model carries render exactly what ``Template.render`` renders (real tokenizers)."""

from __future__ import annotations

import copy

import pytest

from zhtune.data.chat_templates import chat_template_for, templates_with_jinja
from zhtune.data.conversation import Conversation, Message
from zhtune.data.templates import TEMPLATES, RenderOptions, SpecialTokens, get_template, rendered_text
from zhtune.data.tokenize import encode_segments
from zhtune.errors import ConfigError

TURNS = [
    ("你好，请介绍一下你自己。", "你好！我是一个AI助手。\n可以回答问题、写作和翻译。"),
    ("  把“今天天气很好”翻译成英文。 ", "The weather is very nice today. "),
    ("再写一句关于秋天的诗。", "<think>\n先想韵脚。\n</think>\n\n秋风送爽桂花香。"),
]
# template -> a real tokenizer from ../shared/tokenizers it is used with
CASES = {
    "qwen": "qwen2.5-0.5b-instruct",
    "qwen3": "qwen3",
    "llama3": "llama-3-70b-instruct",
    "llama2": "llama-2-7b",
    "chinese-alpaca-2": "chinese-llama-2",
    "glm4": "glm-4-9b-chat",
    "alpaca": "llama-2-7b",
    "chinese-alpaca": "chinese-llama-2",
    "default": "qwen2.5-0.5b-instruct",
}


def conversations() -> list[tuple[Conversation, bool]]:
    """(conversation, add_generation_prompt): whole multi-turn ones with and without a system prompt, one turn,
    and prompts that end with a user turn."""
    msgs = []
    for q, a in TURNS:
        msgs += [Message("user", q), Message("assistant", a)]
    whole = tuple(msgs)
    return [
        (Conversation(whole, system="你是一个乐于助人的中文助手。"), False),
        (Conversation(whole), False),
        (Conversation(whole[:2]), False),
        (Conversation(whole[:1]), True),
        (Conversation(whole[:3], system="简洁地回答。"), True),
        (Conversation(whole, system=""), False),
    ]


def hf_messages(conv: Conversation) -> list[dict]:
    head = [{"role": "system", "content": conv.system}] if conv.system is not None else []
    return head + [{"role": m.role, "content": m.content} for m in conv.messages]


def assert_renders_like(tok, name: str, jinja: str, system: str | None = None) -> None:
    """(On a copy: the session's shared tokenizer keeps its own chat template for the other tests.)"""
    template = get_template(name)
    tok = copy.deepcopy(tok)
    tok.chat_template = jinja
    for conv, gen in conversations():
        options = RenderOptions(system=system, add_generation_prompt=gen)
        segments = template.render(conv, SpecialTokens.of(tok), options)
        text = tok.apply_chat_template(hf_messages(conv), tokenize=False, add_generation_prompt=gen)
        assert text == rendered_text(segments), (name, conv.system, gen)
        ids, _owner = encode_segments(tok, segments, template.tokenization)
        out = tok.apply_chat_template(hf_messages(conv), tokenize=True, add_generation_prompt=gen)
        assert list(out["input_ids"] if hasattr(out, "keys") else out) == ids


@pytest.mark.parametrize("name", sorted(CASES))
def test_chat_template_renders_like_the_template(name, real_tokenizer):
    tok = real_tokenizer(CASES[name])
    assert_renders_like(tok, name, chat_template_for(name))


@pytest.mark.parametrize("name", ["qwen", "llama3", "chinese-alpaca-2", "glm4", "alpaca"])
def test_training_system_prompt_becomes_the_default(name, real_tokenizer):
    tok = real_tokenizer(CASES[name])
    system = "你是一个中文语法纠错助手。"
    assert_renders_like(tok, name, chat_template_for(name, system=system), system)


def test_a_changed_template_is_caught(real_tokenizer):
    tok = real_tokenizer("qwen2.5-0.5b-instruct")
    broken = chat_template_for("qwen").replace("'<|im_end|>\\n'", "'<|im_end|>'")
    assert broken != chat_template_for("qwen")
    with pytest.raises(AssertionError):
        assert_renders_like(tok, "qwen", broken)
    with pytest.raises(AssertionError):  # a different default system prompt is a different template
        assert_renders_like(tok, "qwen", chat_template_for("qwen", system="别的系统提示。"))


def test_every_joined_template_has_a_jinja_form():
    joined = {n for n, t in TEMPLATES.items() if t.tokenization == "joined"}
    assert joined <= set(templates_with_jinja()) and set(CASES) == set(templates_with_jinja()) & set(CASES)
    with pytest.raises(ConfigError, match="unknown template"):
        chat_template_for("no-such-template")
