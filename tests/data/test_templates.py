"""Template parity: our rendering vs. each model's own chat template (real tokenizers from ../shared)."""

from __future__ import annotations

import pytest

from zhtune.data.conversation import Conversation, Message
from zhtune.data.templates import TEMPLATES, RenderOptions, get_template
from zhtune.data.tokenize import IGNORE_INDEX, tokenize_conversation
from zhtune.errors import ConfigError

SYSTEM = "你是一个乐于助人的中文助手。"
TURNS = [
    ("你好，请介绍一下你自己。", "你好！我是一个AI助手，可以回答问题、写作和翻译。"),
    ("把“今天天气很好”翻译成英文。", "The weather is very nice today."),
    ("再写一句关于秋天的诗，不超过20个字。", "秋风送爽桂花香，\n落叶满地映斜阳。"),
]

# Meta's Llama-2-chat template as published in the Llama-2-chat tokenizer_config.json (the LLaMA-2 and
# Chinese-LLaMA-2 tokenizers in ../shared carry none, so the official one is written out here).
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

# (template, tokenizer in ../shared/tokenizers, end-of-turn text after the content, set the Llama-2 template)
CASES = [
    ("qwen", "qwen2.5-0.5b-instruct"),
    ("qwen3", "qwen3"),
    ("glm4", "glm-4-9b-chat"),
    ("llama3", "llama-3-70b-instruct"),
    ("llama3", "llama3-8b-chinese-chat"),
    ("llama2", "llama-2-7b"),
    ("chinese-alpaca-2", "chinese-llama-2"),
]
END_OF_TURN = {
    "qwen": "<|im_end|>",
    "qwen3": "<|im_end|>",
    "glm4": "<|user|>",
    "llama3": "<|eot_id|>",
    "llama2": "</s>",
    "chinese-alpaca-2": "</s>",
}


def conversation() -> Conversation:
    msgs = []
    for q, a in TURNS:
        msgs += [Message("user", q), Message("assistant", a)]
    return Conversation(tuple(msgs), system=SYSTEM)


def hf_messages(conv: Conversation) -> list[dict]:
    return [{"role": "system", "content": conv.system}] + [
        {"role": m.role, "content": m.content} for m in conv.messages
    ]


def chat_ids(tok, messages, **kwargs) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def supervised_spans(labels: list[int]) -> list[tuple[int, int]]:
    spans, start = [], None
    for i, label in enumerate(labels + [IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    return spans


@pytest.mark.parametrize(("name", "tokenizer_name"), CASES)
def test_parity_with_model_chat_template(name, tokenizer_name, real_tokenizer):
    tok = real_tokenizer(tokenizer_name)
    if name in ("llama2", "chinese-alpaca-2"):
        tok.chat_template = LLAMA2_CHAT_TEMPLATE
    template = get_template(name)
    conv = conversation()
    sample = tokenize_conversation(conv, tok, template)
    messages = hf_messages(conv)

    full = chat_ids(tok, messages)
    if name == "glm4":
        # GLM-4's finetune code appends <|user|> as the end of the last answer; the chat template stops before.
        assert sample.input_ids[-1] == tok.convert_tokens_to_ids("<|user|>")
        assert sample.input_ids[:-1] == full
    else:
        assert sample.input_ids == full

    spans = supervised_spans(sample.labels)
    assert len(spans) == len(TURNS)
    for k, ((start, end), (_q, answer)) in enumerate(zip(spans, TURNS)):
        upto = messages[: 2 + 2 * k]  # system + k rounds + the question of round k
        kwargs = {}
        if name == "qwen3":
            # history turns render without <think>; the last one with the empty block of thinking-off mode
            kwargs["enable_thinking"] = k < len(TURNS) - 1
        prompt = chat_ids(tok, upto, add_generation_prompt=name not in ("llama2", "chinese-alpaca-2"), **kwargs)
        assert sample.input_ids[:start] == prompt, f"prompt of turn {k} differs from the model's generation prompt"
        decoded = tok.decode(sample.input_ids[start:end], skip_special_tokens=False)
        expected = ("\n" if name == "glm4" else "") + answer + END_OF_TURN[name]
        if name in ("llama2", "chinese-alpaca-2"):  # SentencePiece decoding drops the leading space
            decoded, expected = "".join(decoded.split()), "".join(expected.split())
        assert decoded == expected
        assert sample.labels[start:end] == sample.input_ids[start:end]


def test_qwen_default_system_prompt(real_tokenizer):
    tok = real_tokenizer("qwen2.5-0.5b-instruct")
    conv = Conversation((Message("user", "你好"), Message("assistant", "你好！")))
    sample = tokenize_conversation(conv, tok, get_template("qwen"))
    assert sample.input_ids == chat_ids(
        tok, [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]
    )
    assert "You are Qwen, created by Alibaba Cloud." in tok.decode(sample.input_ids)


def test_qwen3_thinking_on_supervises_think_block(real_tokenizer):
    tok = real_tokenizer("qwen3")
    conv = Conversation((Message("user", "1+1=?"), Message("assistant", "<think>\n简单加法。\n</think>\n\n等于2。")))
    opts = RenderOptions(enable_thinking=True)
    sample = tokenize_conversation(conv, tok, get_template("qwen3"), options=opts)
    msgs = [{"role": "user", "content": "1+1=?"}, {"role": "assistant", "content": conv.messages[1].content}]
    assert sample.input_ids == chat_ids(tok, msgs)
    ((start, end),) = supervised_spans(sample.labels)
    assert sample.input_ids[:start] == chat_ids(tok, msgs[:1], add_generation_prompt=True, enable_thinking=True)
    assert tok.decode(sample.input_ids[start:end]) == "<think>\n简单加法。\n</think>\n\n等于2。<|im_end|>"


def test_qwen_tool_calls_match_template(real_tokenizer):
    import json

    tok = real_tokenizer("qwen2.5-0.5b-instruct")
    tools = [
        {
            "name": "get_weather",
            "description": "查询天气",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        }
    ]
    call = {"name": "get_weather", "arguments": {"city": "北京"}}
    conv = Conversation(
        (
            Message("user", "北京天气怎么样？"),
            Message("function_call", json.dumps(call, ensure_ascii=False)),
            Message("observation", '{"temp": 20}'),
            Message("assistant", "北京今天20度。"),
        ),
        tools=json.dumps(tools, ensure_ascii=False),
    )
    sample = tokenize_conversation(conv, tok, get_template("qwen"))
    msgs = [
        {"role": "user", "content": "北京天气怎么样？"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call}]},
        {"role": "tool", "content": '{"temp": 20}'},
        {"role": "assistant", "content": "北京今天20度。"},
    ]
    wrapped = [{"type": "function", "function": t} for t in tools]
    assert sample.input_ids == chat_ids(tok, msgs, tools=wrapped)
    assert len(supervised_spans(sample.labels)) == 2


def test_unknown_template_lists_known_names():
    with pytest.raises(ConfigError) as err:
        get_template("chatglm4")
    for name in (
        "qwen",
        "glm4",
        "chatglm",
        "chatglm2",
        "chatglm3",
        "llama2",
        "chinese-alpaca-2",
        "chinese-alpaca",
        "alpaca",
        "llama3",
        "default",
        "qwen3",
    ):
        assert name in str(err.value)


def test_registry_has_every_required_template():
    required = {
        "qwen",
        "qwen3",
        "glm4",
        "chatglm3",
        "chatglm2",
        "chatglm",
        "llama2",
        "chinese-alpaca-2",
        "chinese-alpaca",
        "alpaca",
        "llama3",
        "default",
    }
    assert required <= set(TEMPLATES)
