"""Turn records of every supported instruction-data format into :class:`Conversation` objects.

Formats are registered explicitly in :data:`FORMATS`; ``auto`` picks one from the fields of the first record of
a file and then holds every record of that file to it. Each parser checks the fields it reads and raises a
:class:`FieldError` naming the field; :func:`load_conversations` adds ``file:line`` and either stops
(``on_error: raise``) or counts the record as skipped (``on_error: skip``). Nothing is dropped silently:
skipped records and trimmed trailing user turns are counted in the :class:`LoadReport`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from zhtune.config import DataConfig
from zhtune.data.conversation import Conversation, Message, order_problem
from zhtune.data.readers import iter_records
from zhtune.errors import ConfigError, DataError

UNANNOTATABLE = "无法标注"  # MuCGEC marks sentences its annotators could not correct this way


class FieldError(Exception):
    """A record-level problem; ``field`` is the dotted field name."""

    def __init__(self, field_name: str | None, reason: str):
        super().__init__(reason)
        self.field, self.reason = field_name, reason


@dataclass
class ParseContext:
    """Per-load settings a parser may need."""

    config: DataConfig
    trimmed: int = 0  # conversations whose unanswered trailing user turn was removed


def _str(rec: dict, key: str, *, required: bool = True, allow_empty: bool = False, where: str = "") -> str:
    name = f"{where}{key}"
    if key not in rec or rec[key] is None:
        if required:
            raise FieldError(name, "missing")
        return ""
    value = rec[key]
    if not isinstance(value, str):
        raise FieldError(name, f"expected a string, got {type(value).__name__}")
    if required and not allow_empty and not value.strip():
        raise FieldError(name, "empty")
    return value


def _list(rec: dict, key: str, *, where: str = "") -> list:
    if key not in rec or rec[key] is None:
        raise FieldError(f"{where}{key}", "missing")
    value = rec[key]
    if not isinstance(value, list):
        raise FieldError(f"{where}{key}", f"expected a list, got {type(value).__name__}")
    if not value:
        raise FieldError(f"{where}{key}", "the conversation is empty")
    return value


def _finish(messages: list[Message], system: str | None, tools: str | None, fields: list[str]) -> Conversation:
    problem = order_problem(messages)
    if problem is not None:
        index, reason = problem
        raise FieldError(fields[index] if index < len(fields) else None, reason)
    return Conversation(messages=tuple(messages), system=system or None, tools=tools)


def _history(rec: dict) -> tuple[list[Message], list[str]]:
    history = rec.get("history") or []
    if not isinstance(history, list):
        raise FieldError("history", f"expected a list of [question, answer] pairs, got {type(history).__name__}")
    messages, fields = [], []
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise FieldError(f"history[{i}]", "expected a [question, answer] pair of strings")
        messages += [Message("user", pair[0]), Message("assistant", pair[1])]
        fields += [f"history[{i}][0]", f"history[{i}][1]"]
    return messages, fields


def parse_alpaca(rec: dict, ctx: ParseContext) -> list[Conversation]:
    """alpaca / alpaca-zh / BELLE: ``instruction``, ``input``, ``output`` (+ ``system``, ``history``).

    The user turn is ``instruction`` followed by a newline and ``input`` when ``input`` is not empty, as
    Stanford Alpaca, Chinese-LLaMA-Alpaca and LLaMA-Factory all do.
    """
    instruction = _str(rec, "instruction", allow_empty=True)
    inp = _str(rec, "input", required=False)
    output = _str(rec, "output")
    query = "\n".join(x for x in (instruction, inp) if x)
    if not query.strip():
        raise FieldError("instruction", "empty (and no input)")
    messages, fields = _history(rec)
    messages += [Message("user", query), Message("assistant", output)]
    fields += ["instruction", "output"]
    return [_finish(messages, _str(rec, "system", required=False), None, fields)]


def parse_self_instruct(rec: dict, ctx: ParseContext) -> list[Conversation]:
    """BELLE / self-instruct seed tasks: ``instruction`` + ``instances: [{input, output}]``, one per instance."""
    instruction = _str(rec, "instruction")
    out = []
    for i, inst in enumerate(_list(rec, "instances")):
        if not isinstance(inst, dict):
            raise FieldError(f"instances[{i}]", "expected an object with input and output")
        inp = _str(inst, "input", required=False, where=f"instances[{i}].")
        output = _str(inst, "output", where=f"instances[{i}].")
        query = "\n".join(x for x in (instruction, inp) if x)
        out.append(_finish([Message("user", query), Message("assistant", output)], None, None, ["instruction"] * 2))
    return out


def parse_firefly(rec: dict, ctx: ParseContext) -> list[Conversation]:
    """BELLE / Firefly multi-turn: ``conversation: [{human, assistant}, ...]`` (+ ``system``)."""
    messages, fields = [], []
    for i, turn in enumerate(_list(rec, "conversation")):
        if not isinstance(turn, dict):
            raise FieldError(f"conversation[{i}]", "expected an object with human and assistant")
        messages.append(Message("user", _str(turn, "human", where=f"conversation[{i}].")))
        messages.append(Message("assistant", _str(turn, "assistant", where=f"conversation[{i}].")))
        fields += [f"conversation[{i}].human", f"conversation[{i}].assistant"]
    return [_finish(messages, _str(rec, "system", required=False), None, fields)]


def parse_firefly_old(rec: dict, ctx: ParseContext) -> list[Conversation]:
    """Firefly's first format: ``kind``, ``input``, ``target``."""
    messages = [Message("user", _str(rec, "input")), Message("assistant", _str(rec, "target"))]
    return [_finish(messages, None, None, ["input", "target"])]


def parse_guanaco_chat(rec: dict, ctx: ParseContext) -> list[Conversation]:
    """Chinese-Vicuna / Guanaco chat: parallel lists ``input: [...]`` and ``output: [...]``."""
    inputs, outputs = _list(rec, "input"), _list(rec, "output")
    if len(inputs) != len(outputs):
        raise FieldError("output", f"has {len(outputs)} turns but input has {len(inputs)}")
    messages, fields = [], []
    for i, (q, a) in enumerate(zip(inputs, outputs)):
        for role, value, name in (("user", q, f"input[{i}]"), ("assistant", a, f"output[{i}]")):
            if not isinstance(value, str):
                raise FieldError(name, f"expected a string, got {type(value).__name__}")
            if not value.strip():
                raise FieldError(name, "empty")
            messages.append(Message(role, value))
            fields.append(name)
    return [_finish(messages, _str(rec, "system", required=False), None, fields)]


SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "function_call": "function_call",
    "observation": "observation",
    "tool": "observation",
}


def parse_sharegpt(rec: dict, ctx: ParseContext) -> list[Conversation]:
    """ShareGPT: ``conversations: [{from, value}]`` with system/human/gpt/function_call/observation roles.

    A leading ``system`` turn (or a top-level ``system`` field) becomes the system prompt; ``tools`` may be a
    JSON string or a list. An unanswered trailing user turn is removed and counted, not fatal.
    """
    turns = _list(rec, "conversations")
    system = _str(rec, "system", required=False)
    messages, fields = [], []
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise FieldError(where, "expected an object with from and value")
        role = _str(turn, "from", where=f"{where}.")
        value = _str(turn, "value", where=f"{where}.", allow_empty=True)
        if role == "system" and i == 0:
            system = value
            continue
        if role not in SHAREGPT_ROLES:
            raise FieldError(f"{where}.from", f"unknown role {role!r} (known: system, {', '.join(SHAREGPT_ROLES)})")
        mapped = SHAREGPT_ROLES[role]
        if mapped == "function_call":
            _check_function_call(value, f"{where}.value")
        elif mapped == "assistant" and not value.strip():
            # Empty *user* turns are real ShareGPT data (the user pressed "continue"); an empty answer is not.
            raise FieldError(f"{where}.value", "empty assistant turn")
        messages.append(Message(mapped, value))
        fields.append(f"{where}.from")
    if len(messages) > 1 and messages[-1].role == "user":
        messages.pop()
        fields.pop()
        ctx.trimmed += 1
    if not messages:
        raise FieldError("conversations", "the conversation is empty")
    return [_finish(messages, system, _tools(rec), fields)]


def _check_function_call(value: str, where: str) -> None:
    try:
        call = json.loads(value)
    except json.JSONDecodeError as exc:
        raise FieldError(where, f"function_call is not valid JSON ({exc.msg})") from None
    calls = call if isinstance(call, list) else [call]
    for c in calls:
        if not (isinstance(c, dict) and isinstance(c.get("name"), str) and "arguments" in c):
            raise FieldError(where, 'function_call must be {"name": ..., "arguments": ...}')


def _tools(rec: dict) -> str | None:
    tools = rec.get("tools")
    if tools in (None, "", []):
        return None
    if isinstance(tools, str):
        try:
            parsed = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise FieldError("tools", f"not valid JSON ({exc.msg})") from None
    else:
        parsed = tools
    if not isinstance(parsed, list) or not all(isinstance(t, dict) for t in parsed):
        raise FieldError("tools", "expected a list of function schemas")
    return json.dumps(parsed, ensure_ascii=False)


def parse_cgec(rec: dict, ctx: ParseContext) -> list[Conversation]:
    """CGEC pairs: ``source`` + ``target`` (or ``targets`` from a para file), as a correction instruction.

    References equal to MuCGEC's ``无法标注`` are ignored; ``cgec_refs: each`` makes one sample per reference.
    """
    source = _str(rec, "source")
    if "targets" in rec:
        targets = rec["targets"]
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise FieldError("targets", "expected a list of strings")
    else:
        targets = [_str(rec, "target")]
    targets = [t for t in targets if t.strip() and t.strip() != UNANNOTATABLE]
    if not targets:
        raise FieldError("target", "no usable reference correction (missing, empty or 无法标注)")
    if ctx.config.cgec_refs == "first":
        targets = targets[:1]
    query = f"{ctx.config.cgec_instruction}\n{source}" if ctx.config.cgec_instruction else source
    return [
        Conversation(messages=(Message("user", query), Message("assistant", t)), meta={"source": source})
        for t in targets
    ]


FORMATS: dict[str, Callable[[dict, ParseContext], list[Conversation]]] = {
    "alpaca": parse_alpaca,
    "self_instruct": parse_self_instruct,
    "firefly": parse_firefly,
    "firefly_old": parse_firefly_old,
    "guanaco_chat": parse_guanaco_chat,
    "sharegpt": parse_sharegpt,
    "cgec": parse_cgec,
}


def detect_format(rec: object) -> str | None:
    """Name the format a record looks like, or None."""
    if not isinstance(rec, dict):
        return None
    if "conversations" in rec:
        return "sharegpt"
    if "conversation" in rec:
        return "firefly"
    if "instances" in rec and "instruction" in rec:
        return "self_instruct"
    if {"kind", "input", "target"} <= rec.keys():
        return "firefly_old"
    if isinstance(rec.get("input"), list) and isinstance(rec.get("output"), list):
        return "guanaco_chat"
    if "output" in rec and ("instruction" in rec or "input" in rec):
        return "alpaca"
    if "source" in rec and ("target" in rec or "targets" in rec):
        return "cgec"
    return None


@dataclass
class LoadReport:
    """What loading did: counts per file and the first few reasons records were skipped."""

    records: int = 0
    conversations: int = 0
    skipped: int = 0
    trimmed_trailing_user: int = 0
    formats: dict[str, str] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    max_reasons: int = 5

    def add_skip(self, error: DataError) -> None:
        self.skipped += 1
        if len(self.reasons) < self.max_reasons:
            self.reasons.append(str(error))

    def summary(self) -> str:
        text = (
            f"{self.records} records → {self.conversations} conversations; {self.skipped} skipped; "
            f"{self.trimmed_trailing_user} trailing unanswered user turns removed"
        )
        if self.reasons:
            text += "\n  first skipped: " + "\n  first skipped: ".join(self.reasons)
        return text


def check_format_name(config: DataConfig) -> str | None:
    """The explicit format of ``config`` (None for ``auto``).

    Raises:
        ConfigError: an unknown format name.
    """
    if config.format != "auto" and config.format not in FORMATS:
        raise ConfigError(f"data.format: unknown format {config.format!r}; known: auto, {', '.join(FORMATS)}")
    return None if config.format == "auto" else config.format


def detect_file_format(rec: object, path: str | Path, line: int) -> str:
    """The format of a file, detected from one of its records (the first that is an object).

    Raises:
        DataError: the record matches no format; the message says to set ``data.format``.
    """
    fmt = detect_format(rec)
    if fmt is None:
        raise DataError(
            str(path),
            line,
            None,
            f"cannot detect the format from fields {sorted(rec)}; set data.format to one of {', '.join(FORMATS)}",
        )
    return fmt


def record_conversations(
    rec: object, fmt: str | None, ctx: ParseContext, path: str | Path, line: int
) -> list[Conversation]:
    """Parse one raw record (as :func:`zhtune.data.readers.iter_records` yields it) into conversations.

    ``fmt`` may be None only while a file's format is still unknown, which happens only before its first object.

    Returns:
        The record's conversations (several for ``self_instruct`` instances or ``cgec_refs: each``), each with
        ``origin`` ``file:line``.

    Raises:
        DataError: the reader's error for this record, a record that is not an object, or a field error
            (file:line, field, reason).
    """
    if isinstance(rec, DataError):
        raise rec
    if not isinstance(rec, dict):
        raise DataError(str(path), line, None, f"expected a JSON object, got {type(rec).__name__}")
    try:
        convs = FORMATS[fmt](rec, ctx)
    except FieldError as exc:
        raise DataError(str(path), line, exc.field, f"{exc.reason} (format {fmt})") from None
    origin = f"{path}:{line}"
    return [Conversation(c.messages, c.system, c.tools, origin, c.meta) for c in convs]


def load_conversations(
    paths: Iterable[str | Path], config: DataConfig | None = None
) -> tuple[list[Conversation], LoadReport]:
    """Read every file in ``paths`` into conversations (in memory; training streams through
    :mod:`zhtune.data.prepare` instead).

    Args:
        paths: data files (JSON array, JSON Lines, ``.gz``, para).
        config: format, ``on_error`` policy and CGEC settings; defaults to :class:`DataConfig`.

    Returns:
        ``(conversations, report)``.

    Raises:
        DataError: the first invalid record (file:line, field) when ``on_error`` is ``raise``, and always for
            an unreadable file.
        ConfigError: an unknown ``format`` name.
    """
    config = config or DataConfig()
    explicit = check_format_name(config)
    out: list[Conversation] = []
    report = LoadReport()
    for path in paths:
        ctx = ParseContext(config)
        fmt = explicit
        for line, rec in iter_records(path):
            report.records += 1
            try:
                if fmt is None and isinstance(rec, dict):
                    fmt = detect_file_format(rec, path, line)
                    report.formats[str(path)] = fmt
                out += record_conversations(rec, fmt, ctx, path, line)
            except DataError as exc:
                if config.on_error == "raise":
                    raise
                report.add_skip(exc)
        report.formats.setdefault(str(path), fmt or "?")
        report.trimmed_trailing_user += ctx.trimmed
    report.conversations = len(out)
    return out, report
