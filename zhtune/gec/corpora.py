"""CGEC corpora → ``(id, source, [references])`` rows → training conversations, with evaluation-overlap removal.

Readers: para files (``id<TAB>src<TAB>ref...``; NLPCC18 sources ``id<TAB>src``; MuCGEC, whose ``无法标注`` rows are
skipped), char-level M2 files (each annotator's first alignment line ``Tk-A0`` is its corrected sentence; ``Tk
没有错误`` means the source is correct) and FCGEC's JSON (each annotator's operation dict applied as a whole:
``Switch`` reorders first, then ``Delete``, ``Modify`` (``MOD_n`` replaces n characters) and ``Insert`` (after the
position; -1 is the start) act on the switched order; list-valued labels are alternatives, expanded as a cartesian
product). Training rows never contain a sentence that appears in an evaluation set, compared exactly and after
removing whitespace and punctuation; the number removed is reported.
"""

from __future__ import annotations

import itertools
import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from zhtune.config import DataConfig
from zhtune.data.conversation import Conversation, Message
from zhtune.data.formats import UNANNOTATABLE
from zhtune.data.readers import tab_lines
from zhtune.errors import DataError

CGEC_INSTRUCTION = DataConfig.cgec_instruction  # one default instruction for data loading, training and correction


@dataclass(frozen=True)
class CgecRow:
    id: str
    source: str
    refs: tuple[str, ...]  # empty: no reference (a test set); a ref equal to the source means "no error"


def read_para_rows(path: str | Path) -> list[CgecRow]:
    """A para file; MuCGEC ``无法标注`` references are dropped (a row left without references keeps none)."""
    rows = []
    for lineno, cols in tab_lines(path):
        if len(cols) < 2:
            raise DataError(str(path), lineno, None, "expected id<TAB>source[<TAB>reference...]")
        refs = tuple(r for r in cols[2:] if r and r != UNANNOTATABLE)
        rows.append(CgecRow(cols[0], cols[1], refs))
    return rows


def read_m2_rows(path: str | Path) -> list[CgecRow]:
    """A char- (or word-) level M2 file: one row per ``S`` block, one reference per annotator."""
    rows = []
    for k, block in enumerate(Path(path).read_text(encoding="utf-8").strip().split("\n\n"), start=1):
        lines = block.split("\n")
        if not lines[0].startswith("S "):
            raise DataError(str(path), None, f"block {k}", "an M2 block must start with 'S '")
        source = "".join(lines[0][2:].split())
        refs: dict[str, str] = {}
        for line in lines[1:]:
            m = re.match(r"T(\d+)(-A(\d+))? (.*)$", line)
            if not m or (m.group(3) not in (None, "0")):
                continue
            text = m.group(4).strip()
            refs.setdefault(m.group(1), source if text == "没有错误" else "".join(text.split()))
        rows.append(CgecRow(str(k), source, tuple(r for r in refs.values() if r != UNANNOTATABLE)))
    return rows


def apply_fcgec_operation(sentence: str, op: dict) -> list[str]:
    """All corrected sentences one FCGEC annotator's operation dict describes (alternatives expanded)."""
    chars = list(sentence)
    if "Switch" in op:
        chars = [chars[i] for i in op["Switch"]]
    deleted = set(op.get("Delete", []))
    slots = []  # (kind, pos, n, alternatives)
    for mod in op.get("Modify", []):
        # tags: MOD_n (n characters replaced), MOD_n+INS_k / MOD_n+DEL_k (the label is longer / shorter); the
        # first number is always how many characters the label replaces
        m = re.search(r"_(\d+)", str(mod.get("tag", "MOD_1")))
        n = int(m.group(1)) if m else 1
        slots.append(("mod", mod["pos"], n, mod["label"] if isinstance(mod["label"], list) else [mod["label"]]))
    for ins in op.get("Insert", []):
        slots.append(("ins", ins["pos"], 0, ins["label"] if isinstance(ins["label"], list) else [ins["label"]]))
    out = []
    for choice in itertools.product(*[s[3] for s in slots]) if slots else [()]:
        mods = {s[1]: (s[2], c) for s, c in zip(slots, choice) if s[0] == "mod"}
        inserts: dict[int, str] = {}
        for s, c in zip(slots, choice):
            if s[0] == "ins":
                inserts[s[1]] = inserts.get(s[1], "") + c
        text, i = inserts.get(-1, ""), 0
        while i < len(chars):
            if i in mods:
                n, label = mods[i]
                text += label
                skipped = range(i, i + n)
            else:
                skipped = range(i, i + 1)
                if i not in deleted:
                    text += chars[i]
            for j in skipped:
                text += inserts.get(j, "")
            i = skipped[-1] + 1
        out.append(text)
    return out


def read_fcgec_rows(path: str | Path) -> list[CgecRow]:
    """FCGEC's JSON: ``{uuid: {sentence, error_flag, operation (a JSON string)...}}``."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    rows = []
    for uuid, item in data.items():
        sentence = item["sentence"]
        refs: list[str] = []
        if "operation" in item and item.get("error_flag"):
            ops = json.loads(item["operation"]) if isinstance(item["operation"], str) else item["operation"]
            for op in ops:
                for ref in apply_fcgec_operation(sentence, op):
                    if ref not in refs:
                        refs.append(ref)
        elif "error_flag" in item:
            refs = [sentence]
        rows.append(CgecRow(uuid, sentence, tuple(refs)))
    return rows


def read_cgec(path: str | Path) -> list[CgecRow]:
    """Read any supported CGEC file, choosing the reader from its content."""
    path = Path(path)
    head = path.read_text(encoding="utf-8")[:200].lstrip("\ufeff")
    if head.startswith("S "):
        return read_m2_rows(path)
    if head.lstrip().startswith("{"):
        return read_fcgec_rows(path)
    return read_para_rows(path)


_PUNCT_WS = re.compile(r"\s+")


def normalise(sentence: str) -> str:
    """Whitespace and punctuation removed, full-width folded (NFKC): the key for overlap checks."""
    text = unicodedata.normalize("NFKC", _PUNCT_WS.sub("", sentence))
    return "".join(ch for ch in text if not unicodedata.category(ch).startswith("P"))


def remove_overlap(rows: list[CgecRow], eval_sentences: set[str]) -> tuple[list[CgecRow], dict]:
    """Drop rows whose source or any reference is an evaluation sentence (exactly or normalised)."""
    exact = set(eval_sentences)
    norm = {normalise(s) for s in eval_sentences}
    kept, n_exact, n_norm = [], 0, 0
    for row in rows:
        texts = (row.source, *row.refs)
        if any(t in exact for t in texts):
            n_exact += 1
        elif any(normalise(t) in norm for t in texts):
            n_norm += 1
        else:
            kept.append(row)
    return kept, {"removed_exact": n_exact, "removed_normalised": n_norm, "kept": len(kept)}


def evaluation_sentences(paths: list[str | Path]) -> set[str]:
    """Every source and reference sentence of the given evaluation files (or plain one-sentence-per-line files)."""
    out: set[str] = set()
    for p in paths:
        text = Path(p).read_text(encoding="utf-8")
        if "\t" in text or text.startswith("S ") or text.lstrip().startswith("{"):
            for row in read_cgec(p):
                out.add(row.source)
                out.update(row.refs)
        else:
            out.update(line.strip().lstrip("\ufeff") for line in text.split("\n") if line.strip())
    return out


def to_conversations(
    rows: list[CgecRow], instruction: str = CGEC_INSTRUCTION, refs: str = "first", origin: str = ""
) -> list[Conversation]:
    """Correction conversations: the user turn is the instruction and the sentence, the answer a reference."""
    out = []
    for row in rows:
        targets = row.refs[:1] if refs == "first" else row.refs
        for ref in targets:
            query = f"{instruction}\n{row.source}" if instruction else row.source
            out.append(
                Conversation(
                    (Message("user", query), Message("assistant", ref)),
                    origin=f"{origin}:{row.id}",
                    meta={"source": row.source},
                )
            )
    return out
