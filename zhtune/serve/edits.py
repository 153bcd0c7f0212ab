"""Corrections as character edits of the user's text, and documents as the sentences a corrector reads.

:func:`text_edits` aligns a source and its correction with the scorer's aligner (ChERRANT's char-level costs, its
span merging and word-order detection, its M/R/S/W classification; :mod:`zhtune.gec.align`) and returns the edits of
the first cheapest alignment as offsets into the source: ``source[start:end]`` is the edit's ``source`` and replacing
every edit's span by its ``target`` gives the correction back, character for character. Unlike the scorer, which drops
spaces and reads ``[缺失成分]`` as one token, every character of the text is a token here, so offsets are exact.

:func:`document_pieces` splits a document into the pieces a corrector is given: lines, then sentences grouped up to
``max_chars`` (:func:`zhtune.gec.correct.split_long`), without the whitespace around them, which stays as it is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from zhtune.gec.align import CharAligner, classify, merge_alignment
from zhtune.gec.correct import split_long


@dataclass(frozen=True)
class TextEdit:
    """``text[start:end]`` (``source``) becomes ``target``; ``type`` is M (missing), R (redundant), S, W."""

    start: int
    end: int
    source: str
    target: str
    type: str

    def as_dict(self) -> dict:
        return asdict(self)


def text_edits(aligner: CharAligner, source: str, corrected: str, offset: int = 0) -> list[TextEdit]:
    """The edits turning ``source`` into ``corrected``, in source order, offsets shifted by ``offset``.

    Args:
        aligner: the scorer's aligner (with or without the ChERRANT tables).
        source: the text as given.
        corrected: its correction.
        offset: added to every offset (the position of ``source`` inside a larger document).
    """
    if source == corrected:
        return []
    src, tgt = list(source), list(corrected)
    alignment = aligner.alignments(src, tgt)[0]
    edits = []
    for op in merge_alignment(alignment, src, tgt):
        kind, _cor = classify(op, tgt)
        _tag, i1, i2, j1, j2 = op
        edits.append(TextEdit(offset + i1, offset + i2, source[i1:i2], corrected[j1:j2], kind))
    return edits


def apply_edits(text: str, edits: list[TextEdit]) -> str:
    """Replace each edit's span of ``text`` by its target (edits in source order, not overlapping).

    Raises:
        ValueError: an edit whose ``source`` is not ``text[start:end]``, or edits out of order.
    """
    out, pos = [], 0
    for e in edits:
        if e.start < pos or text[e.start : e.end] != e.source:
            raise ValueError(f"edit {e} does not match the text at [{e.start}, {e.end})")
        out += [text[pos : e.start], e.target]
        pos = e.end
    return "".join(out) + text[pos:]


def document_pieces(text: str, max_chars: int) -> list[tuple[int, str]]:
    """``(offset, piece)`` for each non-blank piece of ``text``: lines split at sentence ends into pieces of at most
    ``max_chars`` where possible, stripped of surrounding whitespace; ``text[offset:offset + len(piece)] == piece``."""
    pieces, pos = [], 0
    for line in text.splitlines(keepends=True):
        for part in split_long(line, max_chars):
            core = part.strip()
            if core:
                pieces.append((pos + part.index(core), core))
            pos += len(part)
    return pieces
