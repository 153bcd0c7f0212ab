"""Jinja chat templates for ChatGLM-6B, ChatGLM2-6B and ChatGLM3-6B that give the ids of zhtune's ``pieces`` rendering.

The official ChatGLM code encodes every piece of a prompt on its own with SentencePiece (``build_single_message``
encodes the ``"\\n"`` after a role token apart from the message; the finetune code encodes prompt and answer
apart), so each piece starts with SentencePiece's dummy prefix ``▁``. A Jinja template renders one string that the
tokenizer encodes at once, so a piece boundary must be visible in the text:

* a boundary at a special token needs nothing: the converted tokenizers (``zhtune.model.convert.tokenizers``)
  normalize every span between special tokens on its own, dummy prefix included;
* a boundary between two text pieces is written as one space, the next piece's dummy prefix made visible
  (``"<|user|>\\n 你好"``, as THUDM's own later ChatGLM3 template writes it). No vocabulary piece of these models
  has ``▁`` after another character, so that space can never merge with the previous piece;
* after the bare-word specials ``sop`` / ``eop`` the following text also gets one space, which the tokenizer's
  ``rstrip`` on those tokens absorbs (they match whole words only, so that ``people`` keeps its ``eop``).

:func:`chat_template_text` is that rule applied to zhtune's rendered segments: it is exactly the text these
templates render, and tests hold the two together. Two ``chatglm2`` cases have no text that encodes as the pieces
do: an earlier answer ending in a space, followed by the next ``\\n\\n[Round N]`` piece (SentencePiece merges the two
``▁`` into one ``▁▁`` token where the pieces have two), and a system prompt that starts with whitespace (the
``rstrip`` of ``sop`` takes it). ChatGLM3 and ChatGLM-6B have none.

This module holds data and one pure function; it does not tokenize and it does not register templates
(``zhtune.data.chat_templates`` imports :data:`CHATGLM_JINJA` into the registry).
"""

from __future__ import annotations

from zhtune.data.templates import Segment

# Special tokens that match only as whole words (and strip the space after them) in the converted tokenizers.
BARE_WORD_SPECIALS = ("sop", "eop")

_UNSUPPORTED = "{{ raise_exception('this ChatGLM template renders system, user and assistant messages only') }}"

_CHATGLM3 = (
    "[gMASK]sop"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}" + _UNSUPPORTED + "{%- endif -%}"
    "{%- if message['role'] != 'system' or message['content'] -%}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{%- if message['content'] -%}{{ ' ' + message['content'] }}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if messages and messages[-1]['role'] == 'assistant' -%}{{ eos_token }}{%- endif -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)

_CHATGLM2 = (
    "[gMASK]sop"
    "{%- set ns = namespace(round=0) -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if message['content'] -%}{{ ' ' + message['content'] + '\\n\\n' }}{%- endif -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ ' ' + ('\\n\\n' if ns.round else '') + '[Round ' + (ns.round + 1)|string + ']\\n\\n问：'"
    " + message['content'] + '\\n\\n答：' }}"
    "{%- set ns.round = ns.round + 1 -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- if message['content'] -%}{{ ' ' + message['content'] }}{%- endif -%}"
    "{%- else -%}" + _UNSUPPORTED + "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if messages and messages[-1]['role'] == 'assistant' -%}{{ eos_token }}{%- endif -%}"
)

# ChatGLM-6B's chat(): a first question is sent bare; with history every round is numbered from 0; then
# [gMASK]<sop> and the answer with <eop> (ptuning/main.py). Every piece boundary is a special token.
_CHATGLM = (
    "{%- set ns = namespace(system='', rounds=[]) -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{%- set ns.system = message['content'] -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{%- set answer = none if loop.last else messages[loop.index0 + 1]['content'] -%}"
    "{%- set ns.rounds = ns.rounds + [[message['content'], answer]] -%}"
    "{%- elif message['role'] != 'assistant' -%}" + _UNSUPPORTED + "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if ns.system -%}{{ ns.system + '\\n' }}{%- endif -%}"
    "{%- if ns.rounds|length == 1 -%}{{ ns.rounds[0][0] }}"
    "{%- elif ns.rounds -%}"
    "{%- for r in ns.rounds[:-1] -%}"
    "{{ '[Round ' + loop.index0|string + ']\\n问：' + r[0] + '\\n答：' + r[1] + '\\n' }}"
    "{%- endfor -%}"
    "{{ '[Round ' + (ns.rounds|length - 1)|string + ']\\n问：' + ns.rounds[-1][0] + '\\n答：' }}"
    "{%- endif -%}"
    "[gMASK]<sop>"
    "{%- if ns.rounds and ns.rounds[-1][1] is not none -%}{{ ns.rounds[-1][1] }}<eop>{%- endif -%}"
)

CHATGLM_JINJA: dict[str, str] = {"chatglm": _CHATGLM, "chatglm2": _CHATGLM2, "chatglm3": _CHATGLM3}


def chat_template_text(segments: list[Segment]) -> str:
    """The text :data:`CHATGLM_JINJA` renders for zhtune's ``pieces`` segments of the same conversation.

    The segments joined, with one space before each text segment that follows another text segment or a
    bare-word special token (:data:`BARE_WORD_SPECIALS`): that piece's SentencePiece dummy prefix, written out
    because no special token separates the two pieces.

    Args:
        segments: what ``get_template("chatglm"|"chatglm2"|"chatglm3").render(...)`` returned.

    Returns:
        The rendered text.
    """
    out, glue = [], False
    for seg in segments:
        if seg.special:
            out.append(seg.text)
            glue = seg.text in BARE_WORD_SPECIALS
        elif seg.text:
            out.append((" " if glue else "") + seg.text)
            glue = True
    return "".join(out)
