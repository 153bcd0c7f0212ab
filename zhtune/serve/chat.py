"""``zhtune chat``: talk to a model in the terminal, its answers streamed as they are generated.

Each turn is rendered with the model's training template, history included. Commands: ``/system TEXT`` sets the
system prompt (``/system`` alone returns to the template's default) and starts a new conversation, ``/clear`` starts
a new conversation, ``/exit`` (or end of input) leaves. With several models (``--compare``) every question goes to
each, and each keeps its own history of its own answers.

Deliberately simple: no history trimming (a conversation longer than the model's context is the user's to
``/clear``), no markdown rendering.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from zhtune.data.conversation import Conversation, Message
from zhtune.serve.backend import Backend
from zhtune.serve.generation import SamplingParams

PROMPT = ">>> "
HELP = "commands: /system TEXT (new system prompt), /clear (new conversation), /exit"


@dataclass
class Participant:
    """One model in the chat and its own history."""

    label: str
    backend: Backend
    history: list[Message] = field(default_factory=list)


def chat_loop(
    participants: list[Participant],
    params: SamplingParams,
    system: str | None = None,
    read: Callable[[str], str] | None = None,
    out: TextIO | None = None,
) -> int:
    """Read questions and commands until ``/exit`` or end of input; stream each model's answer to ``out``.

    Args:
        participants: the models (one, or the tuned and the base with ``--compare``).
        params: decoding settings for every answer.
        system: the initial system prompt (None: the template's default).
        read: reads one line after showing a prompt (default ``input``).
        out: where answers go (default ``sys.stdout``).

    Returns:
        0 (the exit status).
    """
    read = read or input
    out = out or sys.stdout
    names = ", ".join(f"{p.label}={p.backend.name}" for p in participants)
    out.write(f"zhtune chat with {names}; {HELP}\n")
    while True:
        try:
            line = read(PROMPT).strip()
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return 0
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/clear" or line == "/system" or line.startswith("/system "):
            if line != "/clear":
                system = line[len("/system") :].strip() or None
                out.write(f"(system prompt: {system if system is not None else 'the template default'}) ")
            for p in participants:
                p.history.clear()
            out.write("(new conversation)\n")
            continue
        if line.startswith("/"):
            out.write(f"unknown command {line.split()[0]}; {HELP}\n")
            continue
        for p in participants:
            answer(p, line, system, params, out, labelled=len(participants) > 1)


def answer(p: Participant, question: str, system: str | None, params: SamplingParams, out: TextIO, labelled: bool):
    """Stream ``p``'s answer to ``question`` and add the turn to its history (not when interrupted)."""
    if labelled:
        out.write(f"[{p.label}] ")
    turns = tuple(p.history) + (Message("user", question),)

    def show(delta: str) -> None:
        out.write(delta)
        out.flush()

    try:
        completion = p.backend.chat(Conversation(turns, system=system), params, show)
    except KeyboardInterrupt:
        out.write("\n(interrupted)\n")
        return
    out.write("\n")
    out.flush()
    p.history += [Message("user", question), Message("assistant", completion.text)]
