"""Correction edits as character offsets: exact slices of the input, the correction rebuilt from them, and the
scorer's own edit types; documents split into sentences with offsets into the whole text."""

from __future__ import annotations

import pytest

from zhtune.gec.align import CharAligner, char_edits
from zhtune.gec.noise import NoiseGenerator
from zhtune.gec.tables import tables_or_empty
from zhtune.serve.edits import TextEdit, apply_edits, document_pieces, text_edits


@pytest.fixture(scope="module")
def aligner():
    semantic, confusion, _folder = tables_or_empty()
    return CharAligner(semantic, confusion)


@pytest.fixture(scope="module")
def pairs(shared):
    """Human corrections (MuCGEC dev, first reference) and synthetic ones (zhtune noise) as (source, target)."""
    rows = (shared / "data/cgec/mucgec/MuCGEC_dev.txt").read_text(encoding="utf-8").splitlines()
    cols = [r.split("\t") for r in rows[:80]]
    # MuCGEC writes 没有错误 for "no error" and 无法标注 for "cannot be annotated"
    human = [(c[1], c[2]) for c in cols if len(c) > 2 and len(c[1]) < 80 and c[2] not in ("没有错误", "无法标注")]
    noise = NoiseGenerator(seed=3)
    synthetic = [(noise.corrupt(tgt)[0], tgt) for _src, tgt in human[:30]]
    return human + synthetic


def test_offsets_slice_the_source_and_rebuild_the_correction(aligner, pairs):
    edited = 0
    for src, tgt in pairs + [("I like  apples", "I like apples."), ("他 说：“好”", "他说：“好。”")]:
        edits = text_edits(aligner, src, tgt)
        for e in edits:
            assert src[e.start : e.end] == e.source and e.type in ("M", "R", "S", "W")
            assert (e.type == "M") == (e.source == "") and (e.type == "R") == (e.target == "")
        assert apply_edits(src, edits) == tgt
        edited += bool(edits)
    assert edited >= len(pairs) - 5  # nearly every pair has edits: the check is not vacuous


def test_edit_types_are_the_scorers(aligner, pairs):
    """Without spaces, the edits are the scorer's (ChERRANT char level) first alignment, type for type."""
    for src, tgt in pairs:
        if " " in src + tgt or src == tgt:
            continue
        mine = [(e.start, e.end, e.type, e.target) for e in text_edits(aligner, src, tgt)]
        scorer = [(e.start, e.end, e.cat, "" if e.cor == "-NONE-" else e.cor) for e in char_edits(aligner, src, tgt)]
        assert mine == scorer[: len(mine)], (src, tgt)


def test_each_type(aligner):
    cases = {
        ("我爱北京天按门。", "我爱北京天安门。"): [TextEdit(5, 6, "按", "安", "S")],
        ("他昨天去了学校了。", "他昨天去了学校。"): [TextEdit(7, 8, "了", "", "R")],
        ("这本书很好看", "这本书很好看。"): [TextEdit(6, 6, "", "。", "M")],
        ("我明天去北京打算。", "我明天打算去北京。"): [TextEdit(3, 8, "去北京打算", "打算去北京", "W")],
    }
    for (src, tgt), expected in cases.items():
        assert text_edits(aligner, src, tgt) == expected
    assert text_edits(aligner, "没有错。", "没有错。") == []
    assert text_edits(aligner, "天按门", "天安门", offset=10) == [TextEdit(11, 12, "按", "安", "S")]


def test_apply_edits_rejects_an_edit_that_does_not_match():
    good = TextEdit(5, 6, "按", "安", "S")
    assert apply_edits("我爱北京天按门。", [good]) == "我爱北京天安门。"
    with pytest.raises(ValueError, match="does not match"):
        apply_edits("我爱北京天按门。", [TextEdit(4, 5, "按", "安", "S")])  # off by one


def test_document_pieces_are_sentences_with_offsets():
    doc = "  我爱北京天按门。他昨天去了学校了！\n\n这本书很好看 \n最后一句？"
    pieces = document_pieces(doc, 1)
    assert [p for _o, p in pieces] == ["我爱北京天按门。", "他昨天去了学校了！", "这本书很好看", "最后一句？"]
    assert all(doc[o : o + len(p)] == p for o, p in pieces)
    grouped = document_pieces(doc, 64)  # sentences of a line grouped up to max_chars
    assert [p for _o, p in grouped] == ["我爱北京天按门。他昨天去了学校了！", "这本书很好看", "最后一句？"]
    assert document_pieces(" \n ", 1) == []
