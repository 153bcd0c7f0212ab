"""``zhtune score``: ChERRANT's char-level span-based correction score, plus what ChERRANT lacks.

A hypothesis para file (``id<TAB>source<TAB>hypothesis``) is turned into edits against its own source column
(:mod:`zhtune.gec.align`, hypotheses converted from traditional to simplified Chinese first, as ChERRANT does).
References are a char-level M2 file or a multi-reference para file (each reference column one annotator, converted
the same way). Per sentence, the hypothesis is compared with every annotator and the one giving the best running
corpus F0.5 (then more TP, fewer FP, fewer FN) is kept, exactly as ChERRANT's ``compare_m2_for_evaluation.py`` does;
sentences whose only reference is ``无法标注`` are skipped. On top: a per-type (M/R/S/W) breakdown and the
over-correction rate on sentences whose gold has no edit.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from zhtune.data.readers import tab_lines
from zhtune.errors import DataError
from zhtune.gec.align import CharAligner, CharEdit, char_edits
from zhtune.gec.tables import find_tables, load_tables

_CONVERTER = None


def to_simplified(text: str) -> str:
    """OpenCC ``t2s``, the conversion ChERRANT applies to hypotheses and references."""
    global _CONVERTER
    if _CONVERTER is None:
        from opencc import OpenCC

        _CONVERTER = OpenCC("t2s")
    return _CONVERTER.convert(text)


def read_para(path: str | Path) -> list[tuple[str, str, list[str]]]:
    """``(id, source, [targets...])`` per line, whitespace removed inside sentences as ChERRANT does."""
    rows = []
    for lineno, cols in tab_lines(path):
        if len(cols) < 2:
            raise DataError(str(path), lineno, None, "expected id<TAB>source[<TAB>target...]")
        rows.append((cols[0], "".join(cols[1].split()), ["".join(c.split()) for c in cols[2:]]))
    return rows


def read_m2(path: str | Path) -> list[list[CharEdit]]:
    """The edits of every sentence block of an M2 file (``A start end|||cat|||cor|||...|||coder``)."""
    blocks = Path(path).read_text(encoding="utf-8").strip().split("\n\n")
    out = []
    for block in blocks:
        edits = []
        for line in block.split("\n"):
            if line.startswith("A "):
                fields = line[2:].split("|||")
                start, end = (int(x) for x in fields[0].split())
                edits.append(CharEdit(start, end, fields[1], fields[2].replace(" ", ""), int(fields[-1])))
        out.append(edits)
    return out


def _by_coder(edits: list[CharEdit]) -> dict[int, dict[tuple, list[str]]]:
    coders: dict[int, dict[tuple, list[str]]] = {}
    if not edits:
        edits = [CharEdit(-1, -1, "noop", "-NONE-", 0)]
    for e in edits:
        d = coders.setdefault(e.coder, {})
        if e.cat == "UNK":
            continue
        d.setdefault((e.start, e.end, e.cor), []).append(e.cat)
    return coders


def _compare(hyp: dict, ref: dict) -> tuple[int, int, int, dict]:
    tp = fp = fn = 0
    cats: dict[str, list[int]] = {}
    for h_edit, h_cats in hyp.items():
        if h_cats[0] == "noop":
            continue
        if h_edit in ref:
            for c in ref[h_edit]:
                tp += 1
                cats.setdefault(c, [0, 0, 0])[0] += 1
        else:
            for c in h_cats:
                fp += 1
                cats.setdefault(c, [0, 0, 0])[1] += 1
    for r_edit, r_cats in ref.items():
        if r_cats[0] == "noop":
            continue
        if r_edit not in hyp:
            for c in r_cats:
                fn += 1
                cats.setdefault(c, [0, 0, 0])[2] += 1
    return tp, fp, fn, cats


def f_score(tp: int, fp: int, fn: int, beta: float = 0.5) -> tuple[float, float, float]:
    """Precision, recall and F-beta rounded to 4 places, with ChERRANT's conventions for empty counts."""
    p = float(tp) / (tp + fp) if fp else 1.0
    r = float(tp) / (tp + fn) if fn else 1.0
    f = float((1 + beta**2) * p * r) / ((beta**2 * p) + r) if p + r else 0.0
    return round(p, 4), round(r, 4), round(f, 4)


@dataclass
class ScoreResult:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    sentences: int = 0
    skipped_unannotatable: int = 0
    per_type: dict[str, list[int]] = field(default_factory=dict)
    no_edit_gold: int = 0
    overcorrected: int = 0
    truncated_alignments: int = 0
    seconds: float = 0.0

    def as_dict(self, beta: float = 0.5) -> dict:
        p, r, f = f_score(self.tp, self.fp, self.fn, beta)
        types = {}
        for cat, (tp, fp, fn) in sorted(self.per_type.items()):
            cp, cr, cf = f_score(tp, fp, fn, beta)
            types[cat] = {"tp": tp, "fp": fp, "fn": fn, "precision": cp, "recall": cr, f"f{beta}": cf}
        return {
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "precision": p,
            "recall": r,
            f"f{beta}": f,
            "sentences": self.sentences,
            "skipped_unannotatable": self.skipped_unannotatable,
            "per_type": types,
            "no_edit_gold_sentences": self.no_edit_gold,
            "overcorrection_rate": round(self.overcorrected / self.no_edit_gold, 4) if self.no_edit_gold else None,
            "truncated_alignments": self.truncated_alignments,
            "seconds": round(self.seconds, 2),
        }


def score(hyp_rows, ref_edits: list[list[CharEdit]], aligner: CharAligner, beta: float = 0.5) -> ScoreResult:
    """Score hypothesis rows ``(id, source, [hyp])`` against per-sentence reference edits."""
    result = ScoreResult()
    best = Counter(tp=0, fp=0, fn=0)
    start = time.perf_counter()
    for (_id, src, hyps), ref in zip(hyp_rows, ref_edits, strict=True):
        result.sentences += 1
        hyp_text = to_simplified(hyps[0]) if hyps else ""
        hyp = _by_coder(char_edits(aligner, src, hyp_text, 0))
        refs = _by_coder(ref)
        if len(refs) == 1:
            only = next(iter(refs.values()))
            if len(only) == 1 and next(iter(only.values()))[0] == "NA":
                result.skipped_unannotatable += 1
                continue
        if all(all(c[0] == "noop" for c in d.values()) for d in refs.values()):
            result.no_edit_gold += 1
            if any(c[0] != "noop" for d in hyp.values() for c in d.values()):
                result.overcorrected += 1
        b_tp, b_fp, b_fn, b_f, b_cats = 0, 0, 0, -1.0, {}
        for h in hyp.values():
            for r in refs.values():
                tp, fp, fn, cats = _compare(h, r)
                _p, _r, f = f_score(tp + best["tp"], fp + best["fp"], fn + best["fn"], beta)
                if (
                    f > b_f
                    or (f == b_f and tp > b_tp)
                    or (f == b_f and tp == b_tp and fp < b_fp)
                    or (f == b_f and tp == b_tp and fp == b_fp and fn < b_fn)
                ):
                    b_tp, b_fp, b_fn, b_f, b_cats = tp, fp, fn, f, cats
        best += Counter(tp=b_tp, fp=b_fp, fn=b_fn)
        for cat, counts in b_cats.items():
            acc = result.per_type.setdefault(cat, [0, 0, 0])
            for k in range(3):
                acc[k] += counts[k]
    result.tp, result.fp, result.fn = best["tp"], best["fp"], best["fn"]
    result.truncated_alignments = aligner.truncated
    result.seconds = time.perf_counter() - start
    return result


def reference_edits(ref: str | Path, aligner: CharAligner, limit: int | None = None) -> list[list[CharEdit]]:
    """Reference edits from a char-level M2 file or a para file (one annotator per reference column); with
    ``limit``, of the first ``limit`` sentences only (aligning references is the slow part)."""
    ref = Path(ref)
    head = ref.read_text(encoding="utf-8")[:2]
    if head.startswith("S "):
        return read_m2(ref)[:limit]
    out = []
    for _id, src, targets in read_para(ref)[:limit]:
        edits = []
        for k, tgt in enumerate(targets):
            edits += char_edits(aligner, src, to_simplified(tgt), k)
        out.append(edits)
    return out


def score_files(hyp: str | Path, ref: str | Path, tables: str | Path | None = None, beta: float = 0.5) -> dict:
    """Score a hypothesis para file against a reference M2 or para file; return the JSON-ready result.

    Raises:
        DataError: unreadable files or different sentence counts (both named).
        ConfigError: the ChERRANT tables cannot be found.
    """
    start = time.perf_counter()
    semantic, confusion = load_tables(str(find_tables(tables)))
    aligner = CharAligner(semantic, confusion)
    hyp_rows = read_para(hyp)
    refs = reference_edits(ref, aligner)
    if len(hyp_rows) != len(refs):
        raise DataError(str(hyp), None, None, f"{len(hyp_rows)} sentences, but {ref} has {len(refs)}")
    aligner.truncated = 0
    result = score(hyp_rows, refs, aligner, beta)
    result.seconds = time.perf_counter() - start  # everything: tables, reference conversion, scoring
    return result.as_dict(beta)
