"""Chat templates: render a :class:`Conversation` into text segments, each marked prompt or supervised.

Every template is registered by name in :data:`TEMPLATES` and renders exactly the text of the model's own chat
template (tested token-for-token against ``tokenizer.apply_chat_template`` where the real tokenizer carries one,
and against the official prompt-building code where it does not, as for ChatGLM-6B/2/3). A supervised
(``target``) segment holds an assistant turn's content plus its end-of-turn token.

Two tokenization styles exist because the model families were trained that way:

* ``joined``: the segments are concatenated and tokenized once, so the ids are exactly those of the tokenizer on
  the rendered text (what ``apply_chat_template(tokenize=True)`` does); offsets map tokens back to segments.
* ``pieces``: each segment is encoded on its own and special tokens are looked up by name, as the official
  ChatGLM code builds its inputs (``build_single_message``, ``build_inputs_with_special_tokens``).

This module does not tokenize; :mod:`zhtune.data.tokenize` does.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from zhtune.data.conversation import ASSISTANT_ROLES, Conversation
from zhtune.errors import ConfigError, DataError

QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
CHINESE_ALPACA_2_SYSTEM = "You are a helpful assistant. 你是一个乐于助人的助手。"


@dataclass(frozen=True)
class Segment:
    """A piece of rendered text.

    Attributes:
        text: the text, or the name of one special token when ``special`` is set.
        target: True for supervised text (an assistant turn and its end-of-turn token).
        special: in ``pieces`` tokenization, ``text`` names one token looked up in the vocabulary.
        turn: index of the assistant turn a target segment belongs to (0-based), -1 for prompt text.
    """

    text: str
    target: bool = False
    special: bool = False
    turn: int = -1


@dataclass(frozen=True)
class SpecialTokens:
    """The tokenizer's own BOS/EOS strings, for templates that use whatever the model calls them."""

    bos: str | None = None
    eos: str | None = None

    @classmethod
    def of(cls, tokenizer) -> SpecialTokens:
        return cls(bos=getattr(tokenizer, "bos_token", None), eos=getattr(tokenizer, "eos_token", None))


@dataclass(frozen=True)
class RenderOptions:
    """``system`` overrides the template's default system prompt; ``add_generation_prompt`` appends the
    assistant header after a conversation that ends with a user turn."""

    system: str | None = None
    enable_thinking: bool = False
    add_generation_prompt: bool = False


class _Builder:
    """Collects segments; ``pending`` is the assistant turn whose end-of-turn token is still to come."""

    def __init__(self) -> None:
        self.segments: list[Segment] = []
        self.pending: int | None = None

    def prompt(self, text: str) -> None:
        if text:
            self.segments.append(Segment(text))

    def target(self, text: str, turn: int) -> None:
        if text:
            self.segments.append(Segment(text, target=True, turn=turn))

    def special(self, name: str, turn: int | None = None) -> None:
        self.segments.append(Segment(name, target=turn is not None, special=True, turn=-1 if turn is None else turn))

    def role_token(self, name: str) -> None:
        """Emit a role token; if an assistant turn is pending, this token is its supervised end-of-turn."""
        self.special(name, self.pending)
        self.pending = None


RenderFn = Callable[[Conversation, SpecialTokens, RenderOptions, "Template"], _Builder]


@dataclass(frozen=True)
class Template:
    """A registered chat template.

    Attributes:
        name: registry key.
        render_fn: builds the segments.
        tokenization: ``joined`` or ``pieces`` (see the module docstring).
        default_system: the system prompt used when the conversation and the recipe give none.
        stop: strings that end generation besides the tokenizer's EOS.
        tools: whether tool schemas, function calls and observations can be rendered.
        tokens: special tokens the tokenizer must know as single tokens (checked before tokenizing, so that a
            template used with the wrong model fails with a clear message).
        description: one line for ``zhtune templates``.
    """

    name: str
    render_fn: RenderFn
    tokenization: str = "joined"
    default_system: str | None = None
    stop: tuple[str, ...] = ()
    tools: bool = False
    tokens: tuple[str, ...] = ()
    description: str = ""

    def render(
        self, conv: Conversation, specials: SpecialTokens = SpecialTokens(), options: RenderOptions = RenderOptions()
    ) -> list[Segment]:
        """Render ``conv`` into segments.

        Raises:
            DataError: the conversation uses tools or roles this template cannot express.
        """
        if not self.tools and (conv.tools or any(m.role in ("function_call", "observation") for m in conv.messages)):
            raise DataError(
                conv.origin or "<conversation>",
                None,
                "tools",
                f"template '{self.name}' cannot render tools or function calls; use one of "
                f"{[n for n, t in TEMPLATES.items() if t.tools]}",
            )
        return self.render_fn(conv, specials, options, self).segments

    def system_for(self, conv: Conversation, options: RenderOptions) -> str | None:
        if conv.system is not None:
            return conv.system
        return options.system if options.system is not None else self.default_system


TEMPLATES: dict[str, Template] = {}
_CHATML = ("<|im_start|>", "<|im_end|>")


def register(name: str, **kwargs) -> Callable[[RenderFn], RenderFn]:
    """Register a render function under ``name`` (and its aliases via ``alias()``)."""

    def wrap(fn: RenderFn) -> RenderFn:
        if name in TEMPLATES:
            raise ValueError(f"template {name!r} registered twice")
        TEMPLATES[name] = Template(name=name, render_fn=fn, **kwargs)
        return fn

    return wrap


def get_template(name: str) -> Template:
    """Look a template up by name.

    Raises:
        ConfigError: unknown name; the message lists the known ones.
    """
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ConfigError(f"unknown template {name!r}; known templates: {', '.join(sorted(TEMPLATES))}") from None


def _turns(conv: Conversation):
    """Yield ``(index, message, assistant_turn_index, is_last)``; assistant_turn_index is -1 for other roles."""
    turn = 0
    n = len(conv.messages)
    for i, m in enumerate(conv.messages):
        if m.role in ASSISTANT_ROLES:
            yield i, m, turn, i == n - 1
            turn += 1
        else:
            yield i, m, -1, i == n - 1


def _tojson(value) -> str:
    # transformers' chat-template ``tojson`` filter: json.dumps with ensure_ascii=False and default separators.
    return json.dumps(value, ensure_ascii=False)


def _tool_calls(content: str) -> list[dict]:
    call = json.loads(content)
    return call if isinstance(call, list) else [call]


def chatml_tools(conv: Conversation) -> list[dict]:
    """Tool schemas as the Qwen templates expect them (``{"type": "function", "function": schema}``)."""
    tools = json.loads(conv.tools) if conv.tools else []
    return [t if "type" in t else {"type": "function", "function": t} for t in tools]


_QWEN_TOOLS_HEAD = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_QWEN_TOOLS_TAIL = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}'
    "\n</tool_call><|im_end|>\n"
)


def _render_chatml(conv: Conversation, options: RenderOptions, tmpl: Template, qwen3: bool) -> _Builder:
    b = _Builder()
    system = tmpl.system_for(conv, options)
    if conv.tools:
        head = (system + "\n\n" if system else "") if qwen3 else (system or QWEN_SYSTEM) + "\n\n"
        tools = "".join("\n" + _tojson(t) for t in chatml_tools(conv))
        b.prompt("<|im_start|>system\n" + head + _QWEN_TOOLS_HEAD + tools + _QWEN_TOOLS_TAIL)
    elif system:
        b.prompt("<|im_start|>system\n" + system + "<|im_end|>\n")
    msgs = conv.messages
    last_query = max((i for i, m in enumerate(msgs) if m.role == "user"), default=len(msgs) - 1)
    for i, m, turn, is_last in _turns(conv):
        if m.role == "user":
            b.prompt("<|im_start|>user\n" + m.content + "<|im_end|>\n")
        elif m.role == "observation":
            if i == 0 or msgs[i - 1].role != "observation":
                b.prompt("<|im_start|>user")
            b.prompt("\n<tool_response>\n" + m.content + "\n</tool_response>")
            if is_last or msgs[i + 1].role != "observation":
                b.prompt("<|im_end|>\n")
        else:
            content = m.content if m.role == "assistant" else ""
            b.prompt("<|im_start|>assistant\n")
            if qwen3:
                reasoning = ""
                if "</think>" in content:
                    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                    content = content.split("</think>")[-1].lstrip("\n")
                if i > last_query and (is_last or reasoning):
                    think = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n"
                    if reasoning or options.enable_thinking:
                        b.target(think, turn)
                    else:
                        b.prompt(think)  # the generation prompt with thinking off ends with this block
                    content = content.lstrip("\n")
            body = content
            if m.role == "function_call":
                for k, call in enumerate(_tool_calls(m.content)):
                    args = call["arguments"]
                    args = args if (qwen3 and isinstance(args, str)) else _tojson(args)
                    sep = "\n" if (k or content) else ""
                    body += (
                        sep + '<tool_call>\n{"name": "' + call["name"] + '", "arguments": ' + args + "}\n</tool_call>"
                    )
            b.target(body + "<|im_end|>", turn)
            b.prompt("\n")
    if options.add_generation_prompt:
        b.prompt("<|im_start|>assistant\n")
        if qwen3 and not options.enable_thinking:
            b.prompt("<think>\n\n</think>\n\n")
    return b


@register(
    "qwen",
    default_system=QWEN_SYSTEM,
    stop=("<|im_end|>", "<|endoftext|>"),
    tools=True,
    tokens=_CHATML,
    description="Qwen2 / Qwen2.5 ChatML, default system prompt, tool calls",
)
def _qwen(conv, specials, options, tmpl):
    return _render_chatml(conv, options, tmpl, qwen3=False)


@register(
    "qwen3",
    stop=("<|im_end|>", "<|endoftext|>"),
    tools=True,
    tokens=_CHATML,
    description="Qwen3 ChatML with <think> blocks (thinking off unless template.enable_thinking)",
)
def _qwen3(conv, specials, options, tmpl):
    return _render_chatml(conv, options, tmpl, qwen3=True)


@register(
    "llama3",
    stop=("<|eot_id|>", "<|end_of_text|>"),
    tokens=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    description="Llama-3 / Llama-3-Chinese header format",
)
def _llama3(conv, specials, options, tmpl):
    b = _Builder()
    b.prompt("<|begin_of_text|>")
    system = tmpl.system_for(conv, options)
    if system is not None:
        b.prompt("<|start_header_id|>system<|end_header_id|>\n\n" + system.strip() + "<|eot_id|>")
    for _i, m, turn, _last in _turns(conv):
        if m.role == "user":
            b.prompt("<|start_header_id|>user<|end_header_id|>\n\n" + m.content.strip() + "<|eot_id|>")
        else:
            b.prompt("<|start_header_id|>assistant<|end_header_id|>\n\n")
            b.target(m.content.strip() + "<|eot_id|>", turn)
    if options.add_generation_prompt:
        b.prompt("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return b


def _render_llama2(conv, specials, options, tmpl):
    # Meta's Llama-2-chat format as the HF chat template writes it: BOS before each [INST], content stripped.
    b = _Builder()
    system = tmpl.system_for(conv, options)
    first = True
    for _i, m, turn, _last in _turns(conv):
        if m.role == "user":
            content = m.content
            if first and system:
                content = "<<SYS>>\n" + system + "\n<</SYS>>\n\n" + content
            first = False
            b.prompt((specials.bos or "") + "[INST] " + content.strip() + " [/INST]")
        else:
            b.target(" " + m.content.strip() + " " + (specials.eos or ""), turn)
    return b


register("llama2", stop=("</s>",), description="LLaMA-2-chat [INST] <<SYS>> format")(_render_llama2)
register(
    "chinese-alpaca-2",
    default_system=CHINESE_ALPACA_2_SYSTEM,
    stop=("</s>",),
    description="Chinese-LLaMA-2 / Chinese-Alpaca-2: LLaMA-2-chat format with its bilingual default system",
)(_render_llama2)


def _render_glm4(conv, specials, options, tmpl):
    b = _Builder()
    b.prompt("[gMASK]<sop>")
    system = tmpl.system_for(conv, options)
    if system:
        b.prompt("<|system|>\n" + system)
    for _i, m, turn, _last in _turns(conv):
        if not m.content:
            continue  # the GLM-4 template skips empty messages entirely
        if m.role == "user":
            b.role_token("<|user|>")
            b.prompt("\n" + m.content)
        elif m.role == "observation":
            b.role_token("<|observation|>")
            b.prompt("\n" + m.content)
        else:
            b.prompt("<|assistant|>")
            b.target("\n" + m.content, turn)
            b.pending = turn
    if b.pending is not None:
        # GLM-4's finetune code appends <|user|> as the end of the last answer; it is also a stop token.
        b.role_token("<|user|>")
    if options.add_generation_prompt:
        b.prompt("<|assistant|>")
    return b


def _glm4(conv, specials, options, tmpl):
    b = _render_glm4(conv, specials, options, tmpl)
    # In ``joined`` mode role tokens are plain text the tokenizer recognises as special tokens.
    b.segments = [Segment(s.text, s.target, False, s.turn) for s in b.segments]
    return b


register(
    "glm4",
    stop=("<|user|>", "<|observation|>", "<|endoftext|>"),
    tokens=("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"),
    description="GLM-4 chat: [gMASK]<sop>, <|role|> headers, next role token ends a turn",
)(_glm4)


@register(
    "chatglm3",
    tokenization="pieces",
    stop=("<|user|>", "<|observation|>", "</s>"),
    description="ChatGLM3-6B: build_single_message pieces, next role token / </s> ends a turn",
)
def _chatglm3(conv, specials, options, tmpl):
    b = _Builder()
    b.special("[gMASK]")
    b.special("sop")
    system = tmpl.system_for(conv, options)
    if system:
        b.special("<|system|>")
        b.prompt("\n")
        b.prompt(system)
    for _i, m, turn, _last in _turns(conv):
        if m.role == "user":
            b.role_token("<|user|>")
            b.prompt("\n")
            b.prompt(m.content)
        else:
            b.special("<|assistant|>")
            b.target("\n", turn)
            b.target(m.content, turn)
            b.pending = turn
    if b.pending is not None:
        b.special(specials.eos or "</s>", b.pending)
    if options.add_generation_prompt:
        b.special("<|assistant|>")
    return b


def _rounds(conv: Conversation) -> list[tuple[str, str | None, int]]:
    """``(question, answer or None, assistant_turn)`` pairs for the round-based formats."""
    out, msgs = [], conv.messages
    for i, m, _turn, _last in _turns(conv):
        if m.role == "user":
            answer = msgs[i + 1].content if i + 1 < len(msgs) else None
            out.append((m.content, answer, len(out)))
    return out


@register(
    "chatglm2",
    tokenization="pieces",
    stop=("</s>",),
    description="ChatGLM2-6B: [gMASK]sop + build_prompt '[Round N]\\n\\n问：…\\n\\n答：'",
)
def _chatglm2(conv, specials, options, tmpl):
    b = _Builder()
    b.special("[gMASK]")
    b.special("sop")
    system = tmpl.system_for(conv, options)
    if system:
        b.prompt(system + "\n\n")  # ChatGLM2 has no system slot; zhtune puts it before round 1
    rounds = _rounds(conv)
    for k, (q, a, turn) in enumerate(rounds):
        b.prompt(("\n\n" if k else "") + f"[Round {k + 1}]\n\n问：{q}\n\n答：")
        if a is not None:
            b.target(a, turn)
    if rounds and rounds[-1][1] is not None:
        b.special(specials.eos or "</s>", rounds[-1][2])
    return b


@register(
    "chatglm",
    tokenization="pieces",
    stop=("<eop>",),
    description="ChatGLM-6B: '[Round N]\\n问：…\\n答：' history, then [gMASK]<sop> answer <eop>",
)
def _chatglm(conv, specials, options, tmpl):
    b = _Builder()
    rounds = _rounds(conv)
    current, history = rounds[-1], rounds[:-1]
    # ChatGLM-6B's chat(): a first question is sent bare; with history every round is numbered from 0.
    if not history:
        prompt = current[0]
    else:
        prompt = "".join(f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a, _t) in enumerate(history))
        prompt += f"[Round {len(history)}]\n问：{current[0]}\n答："
    system = tmpl.system_for(conv, options)
    b.prompt((system + "\n" if system else "") + prompt)
    b.special("[gMASK]")
    b.special("<sop>")
    if current[1] is not None:
        b.target(current[1], current[2])
        b.special("<eop>", current[2])
    return b


def _render_instruction(conv, specials, options, tmpl, *, user: str, answer_sep: str, round_sep: str):
    b = _Builder()
    b.prompt(specials.bos or "")
    system = tmpl.system_for(conv, options)
    if system:
        b.prompt(system + "\n\n")
    for k, (q, a, turn) in enumerate(_rounds(conv)):
        b.prompt((round_sep if k else "") + user.format(q))
        if a is not None:
            b.target(answer_sep + a + (specials.eos or ""), turn)
    return b


@register("alpaca", default_system=ALPACA_SYSTEM, description="Stanford Alpaca '### Instruction / ### Response'")
def _alpaca(conv, specials, options, tmpl):
    return _render_instruction(
        conv, specials, options, tmpl, user="### Instruction:\n{}\n\n### Response:\n", answer_sep="", round_sep="\n\n"
    )


@register(
    "chinese-alpaca",
    default_system=ALPACA_SYSTEM,
    description="Chinese-LLaMA/Alpaca v1: Alpaca prompt ending '### Response: ' (its build_dataset.py)",
)
def _chinese_alpaca(conv, specials, options, tmpl):
    return _render_instruction(
        conv, specials, options, tmpl, user="### Instruction:\n{}\n\n### Response:", answer_sep=" ", round_sep="\n\n"
    )


@register("default", description="base models: 'Human: …\\nAssistant: …' with the tokenizer's BOS/EOS")
def _default(conv, specials, options, tmpl):
    return _render_instruction(
        conv, specials, options, tmpl, user="Human: {}\nAssistant:", answer_sep=" ", round_sep="\n"
    )


def rendered_text(segments: list[Segment]) -> str:
    """The text a list of segments stands for."""
    return "".join(s.text for s in segments)
