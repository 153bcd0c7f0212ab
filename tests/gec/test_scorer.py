"""The char-level scorer against official ChERRANT figures, and its edit rules on hand-made pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zhtune.cli import main
from zhtune.gec.align import CharAligner, char_edits
from zhtune.gec.scorer import reference_edits, score_files, to_simplified
from zhtune.gec.tables import load_tables

# (hypothesis, reference, TP, FP, FN, P, R, F0.5) as the official ChERRANT char-level scorer gives them
OFFICIAL = [
    (
        "hyp/nlpcc18_test.sys_ernie_ernie_formal_epoch-10.para",
        "nlpcc18/nlpcc18_test.ref.m2.char",
        944,
        1236,
        2930,
        0.4330,
        0.2437,
        0.3748,
    ),
    ("mucgec/example_pred_dev.txt", "mucgec/MuCGEC_dev.txt", 1084, 1635, 3003, 0.3987, 0.2652, 0.3622),
    ("hyp/fcgec_valid.oracle_ref1.para", "fcgec/FCGEC_valid.para", 1317, 0, 0, 1.0, 1.0, 1.0),
]


@pytest.fixture(scope="module")
def cgec(shared):
    return shared / "data" / "cgec"


@pytest.fixture(scope="module")
def aligner(cgec):
    return CharAligner(*load_tables(str(cgec / "cherrant_tables")))


@pytest.mark.parametrize("case", OFFICIAL, ids=lambda c: c[0].split("/")[-1])
def test_official_figures(case, cgec):
    hyp, ref, tp, fp, fn, p, r, f = case
    result = score_files(cgec / hyp, cgec / ref, cgec / "cherrant_tables")
    assert (result["tp"], result["fp"], result["fn"]) == (tp, fp, fn)
    assert (result["precision"], result["recall"], result["f0.5"]) == (p, r, f)
    assert result["truncated_alignments"] == 0
    per_type = result["per_type"]
    assert set(per_type) <= {"M", "R", "S", "W"}
    assert sum(t["tp"] for t in per_type.values()) == tp and sum(t["fp"] for t in per_type.values()) == fp


def test_pathological_hypothesis_is_bounded(cgec):
    result = score_files(
        cgec / "hyp/nlpcc18_test.sys_t5_formal_epoch-4.para",
        cgec / "nlpcc18/nlpcc18_test.ref.m2.char",
        cgec / "cherrant_tables",
    )
    assert result["truncated_alignments"] == 1  # its alignment search was cut at the bound, not run to the end
    # every other sentence is scored as the official tool scores it: replacing the one pathological hypothesis by
    # its source changes the counts only by that sentence's own edits
    clean = score_files(
        cgec / "hyp/nlpcc18_test.sys_t5_formal_epoch-4.l1307src.para",
        cgec / "nlpcc18/nlpcc18_test.ref.m2.char",
        cgec / "cherrant_tables",
    )
    assert clean["truncated_alignments"] == 0
    assert abs(result["tp"] - clean["tp"]) <= 5 and result["fn"] - clean["fn"] == clean["tp"] - result["tp"]


def test_whole_nlpcc18_test_set(cgec):
    result = score_files(
        cgec / "hyp/nlpcc18_test.identity.para", cgec / "nlpcc18/nlpcc18_test.ref.m2.char", cgec / "cherrant_tables"
    )
    assert result["sentences"] == 2000 and result["seconds"] > 0
    # an identity hypothesis has no TP; its only "edits" come from traditional characters in the source (t2s)
    assert result["tp"] == 0 and result["fp"] <= 5


def test_unannotatable_sentences_skipped_and_overcorrection(cgec):
    result = score_files(
        cgec / "hyp/mucgec_dev.identity.para", cgec / "mucgec/MuCGEC_dev.txt", cgec / "cherrant_tables"
    )
    assert result["skipped_unannotatable"] == 3
    assert result["no_edit_gold_sentences"] > 0 and result["overcorrection_rate"] is not None
    oracle = score_files(
        cgec / "hyp/mucgec_dev.oracle_ref1.para", cgec / "mucgec/MuCGEC_dev.txt", cgec / "cherrant_tables"
    )
    assert oracle["fp"] == 0 and oracle["overcorrection_rate"] == 0.0


@pytest.mark.parametrize(
    ("src", "tgt", "expected"),
    [
        ("我爱北京天门。", "我爱北京天安门。", [(5, 5, "M", "安")]),  # missing character
        ("我们们去学校。", "我们去学校。", [(1, 2, "R", "-NONE-")]),  # redundant character
        ("我爱北京天按门。", "我爱北京天安门。", [(5, 6, "S", "安")]),  # substitution (similar sound)
        ("他高兴的跑了出去", "他高兴地跑了出去", [(3, 4, "S", "地")]),
        ("我爱北京天按们。", "我爱北京天安门。", [(5, 7, "S", "安门")]),  # adjacent substitutions merge
        ("我去北京明天。", "我明天去北京。", [(1, 6, "W", "明天去北京")]),  # D M I with the same chars: word order
        ("ab", "ba", [(0, 2, "W", "ba")]),  # transposition
        ("我吃饭了和喝水了", "我吃了饭和喝了水", [(2, 4, "W", "了饭"), (6, 8, "W", "了水")]),
        ("你好", "你好", [(-1, -1, "noop", "-NONE-")]),
        ("你好", "无法标注", [(-1, -1, "NA", "-NONE-")]),
    ],
)
def test_edit_kinds_and_merging_rules(aligner, src, tgt, expected):
    got = [(e.start, e.end, e.cat, e.cor) for e in char_edits(aligner, src, tgt)]
    assert got == expected


def test_separate_edits_stay_separate(aligner):
    # a word-order edit and an insertion far from it are two edits, not one merged span
    edits = char_edits(aligner, "他非常很高兴", "他很非常高兴啊")
    assert [(e.start, e.end, e.cat, e.cor) for e in edits] == [(1, 4, "W", "很非常"), (6, 6, "M", "啊")]


def test_alternative_cheapest_alignments_are_pooled(aligner):
    # two cheapest alignments give two different edit lists (a real MuCGEC dev pair); ChERRANT writes both under
    # the same annotator and its scorer pools them, so both lists appear, in back-trace order
    edits = char_edits(aligner, "在哥哥的生日我就认识他。", "在哥哥生日的时候我就认识他。")
    assert [(e.start, e.end, e.cat, e.cor) for e in edits] == [
        (3, 6, "W", "生日的"),
        (6, 6, "M", "时候"),
        (3, 4, "R", "-NONE-"),
        (6, 6, "M", "的时候"),
    ]


def test_hypotheses_are_simplified_before_diffing(aligner):
    assert to_simplified("學生們") == "学生们"
    # the source keeps its traditional characters, so an identity hypothesis is not edit-free
    assert [e.cat for e in char_edits(aligner, "學生們很好", to_simplified("學生們很好"))] == ["S", "S"]


def test_cli_json_contract(cgec, capsys, tmp_path):
    # the contract is the command and its JSON fields (the figures are checked above): the first 100 sentences
    paths = []
    for name in ("hyp/fcgec_valid.oracle_ref1.para", "fcgec/FCGEC_valid.para"):
        lines = (cgec / name).read_text(encoding="utf-8").splitlines(keepends=True)[:100]
        paths.append(tmp_path / Path(name).name)
        paths[-1].write_text("".join(lines), encoding="utf-8")
    code = main(["score", "--hyp", str(paths[0]), "--ref", str(paths[1]), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert {"tp", "fp", "fn", "precision", "recall", "f0.5"} <= set(out)
    assert out["sentences"] == 100 and out["fp"] == 0 and out["f0.5"] == 1.0  # the oracle hypothesis


def test_missing_tables_fall_back_to_empty_for_in_training_use(tmp_path):
    from zhtune.gec.tables import tables_or_empty

    semantic, confusion, folder = tables_or_empty(tmp_path / "nowhere")
    assert (semantic, confusion, folder) == ({}, {}, None)
    # the scorer itself insists on the real tables
    from zhtune.errors import ConfigError
    from zhtune.gec.tables import find_tables

    with pytest.raises(ConfigError, match="cilin.txt"):
        find_tables(tmp_path / "nowhere")


@pytest.mark.parametrize("ref", ["mucgec/MuCGEC_dev.txt", "nlpcc18/nlpcc18_test.ref.m2.char"])
def test_reference_edits_of_the_first_sentences_only(ref, cgec, aligner):
    first = reference_edits(cgec / ref, aligner, limit=7)
    assert len(first) == 7 and any(first)
    assert first == reference_edits(cgec / ref, aligner, limit=12)[:7]
