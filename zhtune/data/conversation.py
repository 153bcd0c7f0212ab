"""The one conversation type every data format is turned into, and the rules a valid one follows.

A :class:`Conversation` is an optional system prompt, optional tool schemas (a JSON string, as ShareGPT stores
them), and a list of :class:`Message` turns. Roles: ``user``, ``assistant``, ``function_call`` (an assistant
turn that calls a tool; its content is ``{"name": ..., "arguments": ...}`` as JSON) and ``observation`` (a tool
result). Turn order is checked here, once, so templates can trust it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ROLES = ("user", "assistant", "function_call", "observation")
ASSISTANT_ROLES = ("assistant", "function_call")

# role -> roles allowed to follow it
_NEXT = {
    None: ("user", "observation"),
    "user": ("assistant", "function_call"),
    "assistant": ("user",),
    "function_call": ("observation",),
    "observation": ("assistant", "function_call"),
}


@dataclass(frozen=True)
class Message:
    """One turn: ``role`` is one of :data:`ROLES`."""

    role: str
    content: str


@dataclass(frozen=True)
class Conversation:
    """A validated conversation; ``origin`` is ``file:line`` of the record it came from (for messages)."""

    messages: tuple[Message, ...]
    system: str | None = None
    tools: str | None = None
    origin: str = ""
    meta: dict = field(default_factory=dict, compare=False)


def order_problem(messages: list[Message]) -> tuple[int, str] | None:
    """Return ``(index, reason)`` for the first turn out of order, or None when the order is valid.

    A valid conversation starts with a user (or observation) turn, alternates as tool use allows, and ends
    with an assistant or function_call turn.
    """
    if not messages:
        return 0, "the conversation is empty"
    prev = None
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            return i, f"unknown role {m.role!r} (known: {', '.join(ROLES)})"
        if m.role not in _NEXT[prev]:
            after = f"after a '{prev}' turn" if prev else "as the first turn"
            return i, f"role '{m.role}' cannot come {after} (expected one of {list(_NEXT[prev])})"
        prev = m.role
    if prev not in ASSISTANT_ROLES:
        return len(messages) - 1, "the conversation must end with an assistant turn"
    return None
