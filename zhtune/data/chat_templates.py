"""Every registered template as a Jinja ``chat_template``, so a merged model renders prompts as training did.

A zhtune-merged model carries the template its adapter was trained with as the tokenizer's ``chat_template``; then
``apply_chat_template`` in transformers, vLLM or Ollama gives the very text (and, for ``joined`` templates, the very
token ids) that :mod:`zhtune.data.templates` rendered in training — the fix for "the merged model behaves like the
base". The training system prompt (``template.system`` of the recipe) becomes the Jinja template's default system
prompt. Each string here is tested against :meth:`Template.render` on multi-turn conversations with and without a
system prompt (``tests/data/test_chat_templates.py``).

The ChatGLM templates (``pieces`` tokenization) come from :mod:`zhtune.data.chat_templates_chatglm`: they give the
ids of the pieces rendering with the converted tokenizers of ``zhtune convert``. These templates render plain
user/assistant conversations. Tool schemas and function calls are not expressed here:
where a base tokenizer already carries a template that renders like ours (the official Qwen ones, with tools),
``zhtune merge`` keeps that one (:func:`zhtune.merge.merge` checks the two agree on probe conversations).
"""

from __future__ import annotations

import json

from zhtune.data.chat_templates_chatglm import CHATGLM_JINJA
from zhtune.data.conversation import Conversation, Message
from zhtune.data.templates import TEMPLATES, RenderOptions, SpecialTokens, Template, get_template
from zhtune.errors import ConfigError

# Splits ``messages`` into ``system`` (or the default) and ``loop_messages``; ``{default}`` is a Jinja literal.
_SYSTEM = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set system = {default} -%}{%- set loop_messages = messages -%}{%- endif -%}"
)
_ONLY_CHAT = (
    "{%- for m in loop_messages -%}{%- if m['role'] not in ('user', 'assistant') -%}"
    "{{- raise_exception('this chat template renders user and assistant turns only, not ' + m['role']) -}}"
    "{%- endif -%}{%- endfor -%}"
)

_CHATML = (
    "{%- if system -%}{{- '<|im_start|>system\\n' + system + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- for m in loop_messages -%}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Qwen3: reasoning is kept only in assistant turns after the last user turn (the last one always gets a block, an
# empty one with thinking off); the generation prompt with thinking off ends with an empty block.
_QWEN3 = (
    "{%- if system -%}{{- '<|im_start|>system\\n' + system + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- set ns = namespace(last_query=loop_messages|length - 1) -%}"
    "{%- for m in loop_messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_query = loop.index0 -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- for m in loop_messages -%}"
    "{%- if m['role'] == 'user' -%}{{- '<|im_start|>user\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{%- set content = m['content'] -%}{%- set reasoning = '' -%}"
    "{%- if '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}{%- endif -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if loop.index0 > ns.last_query and (loop.last or reasoning) -%}"
    "{{- '<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') -}}"
    "{%- else -%}{{- content -}}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if not enable_thinking is defined or not enable_thinking -%}{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}{%- endif -%}"
)

_LLAMA3 = (
    "{{- '<|begin_of_text|>' -}}"
    "{%- if system is not none -%}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system|trim + '<|eot_id|>' -}}{%- endif -%}"
    "{%- for m in loop_messages -%}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content']|trim + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

# Llama-2-chat as Meta's template writes it: BOS before every [INST], the system block inside the first one.
_LLAMA2 = (
    "{%- for m in loop_messages -%}"
    "{%- if m['role'] == 'user' -%}"
    "{%- set content = m['content'] -%}"
    "{%- if loop.first and system -%}"
    "{%- set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + content -%}{%- endif -%}"
    "{{- (bos_token or '') + '[INST] ' + content|trim + ' [/INST]' -}}"
    "{%- else -%}{{- ' ' + m['content']|trim + ' ' + (eos_token or '') -}}{%- endif -%}"
    "{%- endfor -%}"
)

# GLM-4: no turn separator but the next role token; after a final answer the finetune code's EOS, <|user|>.
_GLM4 = (
    "{{- '[gMASK]<sop>' -}}"
    "{%- if system -%}{{- '<|system|>\\n' + system -}}{%- endif -%}"
    "{%- for m in loop_messages -%}{%- if m['content'] -%}"
    "{{- ('<|user|>' if m['role'] == 'user' else '<|assistant|>') + '\\n' + m['content'] -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if loop_messages and loop_messages[-1]['role'] == 'assistant' and loop_messages[-1]['content'] -%}"
    "{{- '<|user|>' -}}{%- endif -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)


def _instruction(user: str, answer_sep: str, round_sep: str) -> str:
    """The round-based prompts (Alpaca and friends); ``user`` holds ``{}`` where the question goes."""
    before, after = (json.dumps(part) for part in user.split("{}"))
    return (
        "{{- bos_token or '' -}}"
        "{%- if system -%}{{- system + '\\n\\n' -}}{%- endif -%}"
        "{%- set ns = namespace(rounds=0) -%}"
        "{%- for m in loop_messages -%}"
        "{%- if m['role'] == 'user' -%}"
        f"{{{{- ({json.dumps(round_sep)} if ns.rounds else '') + {before} + m['content'] + {after} -}}}}"
        "{%- set ns.rounds = ns.rounds + 1 -%}"
        f"{{%- else -%}}{{{{- {json.dumps(answer_sep)} + m['content'] + (eos_token or '') -}}}}{{%- endif -%}}"
        "{%- endfor -%}"
    )


_BODIES = {
    "qwen": _CHATML,
    "qwen3": _QWEN3,
    "llama3": _LLAMA3,
    "llama2": _LLAMA2,
    "chinese-alpaca-2": _LLAMA2,
    "glm4": _GLM4,
    "alpaca": _instruction("### Instruction:\n{}\n\n### Response:\n", "", "\n\n"),
    "chinese-alpaca": _instruction("### Instruction:\n{}\n\n### Response:", " ", "\n\n"),
    "default": _instruction("Human: {}\nAssistant:", " ", "\n"),
}


# The ChatGLM templates read the system prompt from the messages; a default is put in front when none is given.
_DEFAULT_SYSTEM_MESSAGE = (
    "{%- if not (messages and messages[0]['role'] == 'system') -%}"
    "{%- set messages = [{'role': 'system', 'content': {default}}] + messages -%}{%- endif -%}"
)


def chat_template_for(name: str, system: str | None = None) -> str:
    """The Jinja chat template that renders like the registered template ``name``.

    Args:
        name: a registered template name.
        system: the system prompt training used (``template.system``); None means the template's own default.

    Returns:
        A Jinja string for a tokenizer's ``chat_template``.

    Raises:
        ConfigError: unknown template, or one with no Jinja form yet.
    """
    template = get_template(name)
    default = system if system is not None else template.default_system
    # json.dumps gives a double-quoted literal with \\u escapes, which Jinja reads back as the same string
    literal = "none" if default is None else json.dumps(default)
    if name in CHATGLM_JINJA:
        prefix = _DEFAULT_SYSTEM_MESSAGE.replace("{default}", literal) if default is not None else ""
        return prefix + CHATGLM_JINJA[name]
    body = _BODIES.get(name)
    if body is None:
        raise ConfigError(
            f"template {name!r} has no Jinja chat_template yet (known: {', '.join(sorted(_BODIES))}); "
            "the merged model's tokenizer keeps the base's"
        )
    return _SYSTEM.replace("{default}", literal) + _ONLY_CHAT + body


def templates_with_jinja() -> list[str]:
    """Registered template names that :func:`chat_template_for` can export."""
    return [name for name in TEMPLATES if name in _BODIES or name in CHATGLM_JINJA]


# Probe conversations: one and several turns, with and without a system prompt, whole and as generation prompts.
_PROBE_TURNS = (
    ("你好，请介绍一下你自己。", "你好！我是一个助手。"),
    ("把“天气很好”翻译成英文。", "The weather is nice."),
)


def probe_conversations() -> list[tuple[Conversation, bool]]:
    """``(conversation, add_generation_prompt)`` pairs that tell chat templates apart."""
    msgs = tuple(Message(role, text) for q, a in _PROBE_TURNS for role, text in (("user", q), ("assistant", a)))
    return [
        (Conversation(msgs[:2]), False),
        (Conversation(msgs), False),
        (Conversation(msgs[:1]), True),
        (Conversation(msgs[:3], system="请简洁地回答。"), True),
        (Conversation(msgs, system="请简洁地回答。"), False),
    ]


def chat_template_problems(tokenizer, template: Template, system: str | None = None) -> list[str]:
    """Where ``tokenizer.apply_chat_template`` does not give the ids ``template`` renders (with training system
    prompt ``system``) on the probe conversations; an empty list when they agree everywhere.

    Messages carry a system turn only where the conversation has one, so a template's default system prompt (or the
    training one) must be the chat template's default too.
    """
    from zhtune.data.tokenize import encode_segments

    if not getattr(tokenizer, "chat_template", None):
        return ["the tokenizer has no chat_template"]
    problems = []
    for conv, gen in probe_conversations():
        options = RenderOptions(system=system, add_generation_prompt=gen)
        segments = template.render(conv, SpecialTokens.of(tokenizer), options)
        want, _owner = encode_segments(tokenizer, segments, template.tokenization)
        messages = ([{"role": "system", "content": conv.system}] if conv.system is not None else []) + [
            {"role": m.role, "content": m.content} for m in conv.messages
        ]
        try:
            out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
        except Exception as exc:  # noqa: BLE001 - a template that cannot render plain chat is a disagreement too
            problems.append(f"{len(conv.messages)} turns: the chat_template fails ({type(exc).__name__}: {exc})")
            continue
        got = list(out["input_ids"] if hasattr(out, "keys") else out)
        if got != want:
            at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            where = f"{len(conv.messages)} turns" + (", system" if conv.system else "") + (", prompt" if gen else "")
            problems.append(
                f"{where}: ids differ from token {at} "
                f"({tokenizer.decode(got[at : at + 8])!r} vs {tokenizer.decode(want[at : at + 8])!r})"
            )
    return problems
