"""``zhtune chat`` in a pseudo-terminal: streamed answers equal to the backend's, history across turns, ``/clear``,
``/system``, ``/exit``."""

from __future__ import annotations

import sys

import pytest

from tests.helpers import subprocess_env
from tests.serve.conftest import GREETING, TEMPLATE
from zhtune.data.conversation import Conversation, Message
from zhtune.serve.chat import PROMPT
from zhtune.serve.generation import SamplingParams

pexpect = pytest.importorskip("pexpect")
MAX_TOKENS = 12
SYSTEM = "你是一个乐于助人的助手。"
FOLLOW_UP = "今天天气怎么样？"


def _answer(backend, turns: list[tuple[str, str]], system: str | None = None) -> tuple[str, list[str]]:
    conv = Conversation(tuple(Message(r, c) for r, c in turns), system=system)
    deltas: list[str] = []
    text = backend.chat(conv, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), deltas.append).text
    return text, deltas


def _reply(child, line: str) -> str:
    """Send ``line``; return what the program printed before its next prompt (echo removed, newlines normalised)."""
    child.sendline(line)
    child.expect_exact(PROMPT)
    out = child.before.replace("\r\n", "\n")
    assert out.startswith(line + "\n"), out  # the terminal echoes the line typed
    return out[len(line) + 1 :]


def test_chat_in_a_terminal(corrector, backend):
    first, deltas = _answer(backend, [("user", GREETING[0])])
    assert first == GREETING[1] and len(deltas) > 3  # the answer streams in pieces
    second, _ = _answer(backend, [("user", GREETING[0]), ("assistant", first), ("user", FOLLOW_UP)])
    fresh, _ = _answer(backend, [("user", FOLLOW_UP)])
    with_system, _ = _answer(backend, [("user", FOLLOW_UP)], SYSTEM)
    assert len({second, fresh, with_system}) == 3  # history and system prompt change the answer: the test can tell

    env = subprocess_env(TERM="dumb")
    args = ["-m", "zhtune.cli", "chat", "--model", str(corrector), "--template", TEMPLATE, "--temperature", "0"]
    child = pexpect.spawn(
        sys.executable,
        args + ["--max-tokens", str(MAX_TOKENS)],
        env=env,
        encoding="utf-8",
        timeout=120,
        dimensions=(40, 200),
    )
    try:
        child.expect_exact(PROMPT)
        assert "zhtune chat with" in child.before
        assert _reply(child, GREETING[0]) == first + "\n"
        assert _reply(child, FOLLOW_UP) == second + "\n"  # the history of the first turn is in the prompt
        assert "new conversation" in _reply(child, "/clear")
        assert _reply(child, FOLLOW_UP) == fresh + "\n"
        assert SYSTEM in _reply(child, f"/system {SYSTEM}")
        assert _reply(child, FOLLOW_UP) == with_system + "\n"
        assert "unknown command" in _reply(child, "/nope")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_compare_answers_with_both_models_each_with_its_own_history(
    corrector, random_checkpoint, backend, monkeypatch, capsys
):
    import io

    from zhtune.cli import main
    from zhtune.serve.backend import load_backend

    base = load_backend(random_checkpoint, template=TEMPLATE, dtype="fp32")
    tuned1, _ = _answer(backend, [("user", GREETING[0])])
    base1, _ = _answer(base, [("user", GREETING[0])])
    tuned2, _ = _answer(backend, [("user", GREETING[0]), ("assistant", tuned1), ("user", FOLLOW_UP)])
    base2, _ = _answer(base, [("user", GREETING[0]), ("assistant", base1), ("user", FOLLOW_UP)])
    assert tuned1 != base1
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{GREETING[0]}\n{FOLLOW_UP}\n/exit\n"))
    args = ["chat", "--model", str(corrector), "--compare", str(random_checkpoint), "--template", TEMPLATE]
    assert main(args + ["--temperature", "0", "--max-tokens", str(MAX_TOKENS)]) == 0
    out = capsys.readouterr().out
    expected = f"[tuned] {tuned1}\n[base] {base1}\n{PROMPT}[tuned] {tuned2}\n[base] {base2}\n{PROMPT}"
    assert expected in out, out
