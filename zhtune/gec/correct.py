"""``zhtune correct``: batched correction of a file of sentences, robust to what a model may emit.

Input lines are ``id<TAB>source`` (or ``id<TAB>source<TAB>refs...``) or one sentence per line. Sources longer than
``max_chars`` are split after sentence-final punctuation, corrected piece by piece and rejoined. An output that is
empty, runs away (far longer than its source) or loops (a short span repeated many times that the source does not
repeat) is replaced by its source, and counted. Output lines are ``id<TAB>source<TAB>hypothesis``, the para form
``zhtune score`` reads.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from zhtune.atomic import write_text_atomic
from zhtune.data.conversation import Conversation, Message
from zhtune.data.readers import tab_lines
from zhtune.gec.corpora import CGEC_INSTRUCTION
from zhtune.infer.engine import Generator

_SPLIT = re.compile(r"(?<=[。！？；!?;])")
_LOOP = re.compile(r"(.{1,8}?)\1{3,}")


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


def correct_rows(
    generator: Generator,
    rows: list[tuple[str, str]],
    batch_size: int = 16,
    instruction: str = CGEC_INSTRUCTION,
    max_chars: int = 128,
    max_new_tokens: int | None = None,
) -> tuple[list[tuple[str, str, str]], Counter]:
    """Correct ``(id, source)`` rows; return ``(id, source, hypothesis)`` rows and fallback counts."""
    pieces = []  # (row index, piece)
    for k, (_id, src) in enumerate(rows):
        pieces += [(k, p) for p in split_long(src, max_chars)]
    outputs: list[str] = []
    for i in range(0, len(pieces), batch_size):
        batch = pieces[i : i + batch_size]
        convs = [Conversation((Message("user", f"{instruction}\n{p}" if instruction else p),)) for _k, p in batch]
        limit = max_new_tokens or min(2 * max(len(p) for _k, p in batch) + 16, 512)
        outputs += generator.generate(convs, limit)
    stats: Counter = Counter()
    fixed = [""] * len(rows)
    for (k, piece), hyp in zip(pieces, outputs):
        hyp = hyp.strip().split("\n")[0].strip()
        reason = bad_output(piece, hyp)
        if reason:
            stats[reason] += 1
            hyp = piece
        fixed[k] += hyp
    stats["sentences"] = len(rows)
    stats["pieces"] = len(pieces)
    return [(rid, src, hyp) for (rid, src), hyp in zip(rows, fixed)], stats


def write_para(rows: list[tuple[str, str, str]], path: str | Path) -> None:
    # atomic: under sharded training every rank runs the in-training evaluation and writes the same file
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
