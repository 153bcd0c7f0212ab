"""Show what the model will see: rendered samples with supervised spans highlighted, and length statistics.

This is the engine of ``zhtune render``; it formats, it does not decide anything the tokenizer layer does not.
"""

from __future__ import annotations

import json
from pathlib import Path

from zhtune.atomic import write_text_atomic
from zhtune.data.tokenize import IGNORE_INDEX, TokenizedSample

GREEN, RESET = "\x1b[32m", "\x1b[0m"
OPEN, CLOSE = "«", "»"


def highlight(sample: TokenizedSample, tokenizer, color: bool) -> str:
    """Decode ``sample`` with its supervised spans in green (``color``) or between « and »."""
    out, start = [], 0
    ids, labels = sample.input_ids, sample.labels
    while start < len(ids):
        sup = labels[start] != IGNORE_INDEX
        end = start
        while end < len(ids) and (labels[end] != IGNORE_INDEX) == sup:
            end += 1
        text = tokenizer.decode(ids[start:end], skip_special_tokens=False)
        if sup:
            text = f"{GREEN}{text}{RESET}" if color else f"{OPEN}{text}{CLOSE}"
        out.append(text)
        start = end
    return "".join(out)


def write_jsonl(samples: list[TokenizedSample], out: str | Path, overwrite: bool = False) -> None:
    """Write ``{"input_ids": [...], "labels": [...]}`` per line, atomically; refuse to overwrite unless asked.

    Raises:
        FileExistsError: ``out`` exists and ``overwrite`` is False.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --force to overwrite it")
    write_text_atomic(out, "".join(json.dumps({"input_ids": s.input_ids, "labels": s.labels}) + "\n" for s in samples))
