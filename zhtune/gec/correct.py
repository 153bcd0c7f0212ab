"""``zhtune correct``: batched greedy correction of a file of sentences, robust to what a model may emit.

Input lines are ``id<TAB>source`` (or ``id<TAB>source<TAB>refs...``) or one sentence per line. Sources longer than
``max_chars`` are split after sentence-final punctuation, corrected piece by piece and rejoined. Each piece is one
user turn (the instruction, a newline, the piece) decoded greedily by :class:`~zhtune.infer.engine.Generator`
with input-copy speculative decoding (the piece is the draft), under a token budget of its own: twice its token
count plus 16, so a row's output never depends on the other rows of its batch. An output cut by that budget
(``truncated``), empty, running away (far longer than its source) or looping (a short span repeated many times that
the source does not repeat) is replaced by its source and counted; with ``fallback=False`` the model's first line
is kept as it is (for analysis) and still counted. Output lines are ``id<TAB>source<TAB>hypothesis``, the para form
``zhtune score`` reads; tabs and carriage returns inside a hypothesis become spaces so that every line stays three
columns.

The instruction, system prompt and template come from one place (:func:`correction_settings`): what the adapter or
the zhtune-merged model recorded at training, overridden by explicit flags or recipe fields.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from zhtune.atomic import write_text_atomic
from zhtune.data.conversation import Conversation, Message
from zhtune.data.readers import tab_lines
from zhtune.errors import ZhtuneError
from zhtune.gec.corpora import CGEC_INSTRUCTION
from zhtune.infer.engine import Generator

_SPLIT = re.compile(r"(?<=[。！？；!?;])")
_LOOP = re.compile(r"(.{1,8}?)\1{3,}")
MAX_NEW_TOKENS = 512


@dataclass(frozen=True)
class CorrectionSettings:
    """The prompt a corrector gets: its chat template, system prompt (None: the template's default), thinking
    switch (Qwen3) and the instruction before each sentence."""

    template: str
    system: str | None = None
    enable_thinking: bool = False
    instruction: str = CGEC_INSTRUCTION


def correction_settings(
    recorded: dict,
    template: str | None = None,
    system: str | None = None,
    instruction: str | None = None,
    enable_thinking: bool | None = None,
) -> CorrectionSettings:
    """Explicit values over what was recorded (:func:`zhtune.model.load.recorded_settings`) over the defaults.

    Raises:
        ZhtuneError: no template given and none recorded.
    """

    def pick(given, key, default):
        if given is not None:
            return given
        return recorded.get(key) if recorded.get(key) is not None else default

    name = pick(template, "template", None)
    if not name:
        raise ZhtuneError(
            "no template recorded with this model or adapter (no zhtune_adapter.json or merge_report.json with a "
            "template); pass --template NAME (see `zhtune templates`)"
        )
    return CorrectionSettings(
        template=name,
        system=pick(system, "system", None),
        enable_thinking=bool(pick(enable_thinking, "enable_thinking", False)),
        instruction=pick(instruction, "instruction", CGEC_INSTRUCTION),
    )


def corrector(
    model, tokenizer, settings: CorrectionSettings, speculative: bool = True, graphs="auto", invariant="auto"
) -> Generator:
    """A :class:`Generator` that renders prompts as ``settings`` say (``graphs``/``invariant``: see the engine)."""
    from zhtune.data.templates import RenderOptions, get_template

    options = RenderOptions(system=settings.system, enable_thinking=settings.enable_thinking)
    return Generator(model, tokenizer, get_template(settings.template), options, speculative, graphs, invariant)


def read_inputs(path: str | Path) -> list[tuple[str, str]]:
    rows = []
    for lineno, cols in tab_lines(path):
        rows.append((cols[0], cols[1]) if len(cols) >= 2 else (str(lineno), cols[0]))
    return rows


def split_long(text: str, max_chars: int) -> list[str]:
    """Split after 。！？；!?; into pieces of at most ``max_chars`` where possible (never inside a sentence)."""
    if len(text) <= max_chars:
        return [text]
    pieces, current = [], ""
    for sent in (s for s in _SPLIT.split(text) if s):
        if current and len(current) + len(sent) > max_chars:
            pieces.append(current)
            current = ""
        current += sent
    if current:
        pieces.append(current)
    return pieces


def bad_output(source: str, hyp: str) -> str | None:
    """Why ``hyp`` cannot be a correction of ``source`` (``empty``/``runaway``/``repeated``), or None."""
    if not hyp.strip():
        return "empty"
    if len(hyp) > 2 * len(source) + 20:
        return "runaway"
    loop = _LOOP.search(hyp)
    if loop and loop.group(0) not in source:
        return "repeated"
    return None


def token_budget(source_ids: list[int], cap: int = MAX_NEW_TOKENS) -> int:
    """New tokens a piece may take: twice its own token count plus 16 (never its batch's), at most ``cap``."""
    return min(2 * len(source_ids) + 16, cap)


def first_line(text: str) -> str:
    """The answer's first line, stripped, with tabs and carriage returns as spaces (a para line keeps 3 columns)."""
    return text.strip().split("\n")[0].strip().replace("\t", " ").replace("\r", " ")


def user_turn(instruction: str, piece: str) -> Conversation:
    """The conversation a piece is corrected in: one user turn, the instruction, a newline and the piece."""
    return Conversation((Message("user", f"{instruction}\n{piece}" if instruction else piece),))


def correct_rows(
    generator: Generator,
    rows: list[tuple[str, str]],
    batch_size: int = 16,
    instruction: str = CGEC_INSTRUCTION,
    max_chars: int = 128,
    max_new_tokens: int | None = None,
    fallback: bool = True,
) -> tuple[list[tuple[str, str, str]], Counter]:
    """Correct ``(id, source)`` rows.

    Args:
        generator: the model, tokenizer and template to decode with (its ``stats`` gain this run's counters).
        rows: ``(id, source)`` pairs.
        batch_size: rows decoded at a time.
        instruction: the text before each piece in the user turn.
        max_chars: longer sources are split at sentence ends.
        max_new_tokens: one budget for every piece instead of :func:`token_budget`.
        fallback: replace bad outputs by their source (False: keep the model's first line).

    Returns:
        ``(id, source, hypothesis)`` rows and counts: ``sentences``, ``pieces`` and one key per fallback reason
        (``truncated``, ``empty``, ``runaway``, ``repeated``).
    """
    pieces = []  # (row index, piece)
    for k, (_id, src) in enumerate(rows):
        pieces += [(k, p) for p in split_long(src, max_chars)]
    prompts = [generator.prompt_ids(user_turn(instruction, p)) for _k, p in pieces]
    sources = [generator.source_ids(p) for _k, p in pieces]
    budgets = [max_new_tokens or token_budget(s) for s in sources]
    done = generator.complete(prompts, budgets, sources, batch_size)
    stats: Counter = Counter()
    fixed = [""] * len(rows)
    for (k, piece), completion in zip(pieces, done):
        hyp = first_line(generator.decode(completion.tokens))
        reason = "truncated" if completion.truncated else bad_output(piece, hyp)
        if reason:
            stats[reason] += 1
            if fallback:
                hyp = piece
        fixed[k] += hyp
    stats["sentences"] = len(rows)
    stats["pieces"] = len(pieces)
    return [(rid, src, hyp) for (rid, src), hyp in zip(rows, fixed)], stats


def write_para(rows: list[tuple[str, str, str]], path: str | Path) -> None:
    """Write ``id<TAB>source<TAB>hypothesis`` lines atomically (under sharding every rank writes the same file)."""
    write_text_atomic(path, "".join(f"{i}\t{s}\t{h}\n" for i, s, h in rows))


def correct_and_score(
    generator: Generator,
    rows: list[tuple[str, str]],
    refs: list,
    aligner,
    out_para: str | Path,
    batch_size: int = 16,
    instruction: str = CGEC_INSTRUCTION,
) -> dict:
    """Correct ``rows``, write the hypotheses to ``out_para`` and score them against ``refs`` (per-sentence reference
    edits); the score dict gains ``fallbacks`` (outputs replaced by their source, by reason)."""
    from zhtune.gec.scorer import score

    hyps, stats = correct_rows(generator, rows, batch_size, instruction)
    Path(out_para).parent.mkdir(parents=True, exist_ok=True)
    write_para(hyps, out_para)
    aligner.truncated = 0
    result = score([(i, src, [h]) for i, src, h in hyps], refs, aligner).as_dict()
    result["fallbacks"] = {k: v for k, v in stats.items() if k not in ("sentences", "pieces")}
    return result
