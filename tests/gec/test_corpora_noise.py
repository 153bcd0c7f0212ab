"""CGEC corpora readers, evaluation-overlap removal and the noise generator."""

from __future__ import annotations

import json

import pytest

from zhtune.cli import main
from zhtune.gec.corpora import (
    apply_fcgec_operation,
    evaluation_sentences,
    normalise,
    read_cgec,
    read_fcgec_rows,
    read_m2_rows,
    read_para_rows,
    remove_overlap,
    to_conversations,
)
from zhtune.gec.noise import KINDS, NoiseGenerator, noise_stats


@pytest.fixture(scope="module")
def cgec(shared):
    return shared / "data" / "cgec"


def test_m2_references_equal_the_derived_para(cgec):
    m2 = read_m2_rows(cgec / "nlpcc18/nlpcc18_test.ref.m2.char")
    para = read_para_rows(cgec / "nlpcc18/nlpcc18_test.refs.para")
    assert len(m2) == 2000
    assert [(r.source, r.refs) for r in m2] == [(r.source, r.refs) for r in para]
    assert sum(len(r.refs) == 2 for r in m2) == 259  # the second annotator


def test_fcgec_operations_reproduce_the_para_references(cgec):
    ours = read_fcgec_rows(cgec / "fcgec/FCGEC_valid.json")
    para = read_para_rows(cgec / "fcgec/FCGEC_valid.para")
    assert [r.id for r in ours] == [r.id for r in para] and len(ours) == 2000
    differ = [a.id for a, b in zip(ours, para) if a.refs != b.refs]
    # the only two differences: an Insert and a Modify at the same position, which the para conversion drops the
    # insertion of; we apply both (中韩和亚洲 -> 中韩等其他亚洲)
    assert differ == ["0a65f7163bfd7c71c28e6b6394af907b", "617998e611046e8b21aa277e9b3b7a8e"]


def test_fcgec_operation_kinds():
    s = "abcdef"
    assert apply_fcgec_operation(s, {"Switch": [1, 0, 2, 3, 4, 5]}) == ["bacdef"]
    assert apply_fcgec_operation(s, {"Delete": [0, 5]}) == ["bcde"]
    assert apply_fcgec_operation(s, {"Insert": [{"pos": -1, "tag": "INS_1", "label": "X"}]}) == ["Xabcdef"]
    assert apply_fcgec_operation(s, {"Insert": [{"pos": 2, "tag": "INS_2", "label": ["XY", "Z"]}]}) == [
        "abcXYdef",
        "abcZdef",
    ]
    assert apply_fcgec_operation(s, {"Modify": [{"pos": 1, "tag": "MOD_2+INS_1", "label": "XYZ"}]}) == ["aXYZdef"]


def test_mucgec_unannotatable_rows_have_no_reference(cgec):
    rows = read_cgec(cgec / "mucgec/MuCGEC_dev.txt")
    assert len(rows) == 1137 and sum(not r.refs for r in rows) == 3
    convs = to_conversations([r for r in rows if r.refs], refs="each")
    assert len(convs) == sum(len(r.refs) for r in rows)
    assert len(to_conversations(rows, refs="first")) == 1134


def test_overlap_removal_exact_and_normalised(cgec):
    dev = evaluation_sentences([cgec / "mucgec/MuCGEC_dev.txt"])
    rows = read_para_rows(cgec / "mucgec/MuCGEC_dev.txt")[:50]
    from zhtune.gec.corpora import CgecRow

    fresh = CgecRow("new", "这是一个全新的句子。", ("这是一个全新的句子。",))
    spaced = CgecRow("sp", " ".join(rows[0].source).replace("。", "."), ())
    kept, report = remove_overlap(rows + [fresh, spaced], dev)
    assert [r.id for r in kept] == ["new"]
    assert report == {"removed_exact": 50, "removed_normalised": 1, "kept": 1}
    assert normalise("你好 ，世界！") == normalise("你好,世界")


def test_noise_is_seeded_and_reports_its_distribution(cgec):
    sents = [r.refs[0] for r in read_para_rows(cgec / "mucgec/MuCGEC_dev.txt") if r.refs][:400]
    a = [NoiseGenerator(seed=3).corrupt(s) for s in sents[:20]]
    assert a == [NoiseGenerator(seed=3).corrupt(s) for s in sents[:20]]
    assert a != [NoiseGenerator(seed=4).corrupt(s) for s in sents[:20]]
    gen = NoiseGenerator(seed=0)
    results = [gen.corrupt(s) for s in sents]
    stats = noise_stats([k for _n, k in results])
    assert all(noisy != clean for (noisy, _k), clean in zip(results, sents))
    assert set(stats["kinds"]) == set(KINDS) and all(stats["kinds"][k] > 0 for k in KINDS)
    # 1/2/3 edits with probabilities 0.6/0.3/0.1
    per = stats["edits_per_sentence"]
    assert 0.5 < per["1"] / 400 < 0.7 and 0.2 < per["2"] / 400 < 0.4 and 0.04 < per["3"] / 400 < 0.16
    assert 0.2 < stats["kind_share"]["pinyin_sub"] < 0.4


def test_noise_command_writes_pairs_and_stats(tmp_path, capsys):
    src = tmp_path / "clean.txt"
    src.write_text("我们明天去北京看望爷爷。\n他把作业做完了以后才去玩。\n", encoding="utf-8")
    out = tmp_path / "pairs.para"
    assert main(["noise", "--input", str(src), "--output", str(out), "--seed", "1"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["sentences"] == 2 and stats["edits"] >= 2
    lines = [line.split("\t") for line in out.read_text().splitlines()]
    assert [c[2] for c in lines] == ["我们明天去北京看望爷爷。", "他把作业做完了以后才去玩。"]
    assert all(c[1] != c[2] for c in lines)


def test_cgec_data_command_removes_eval_overlap(cgec, tmp_path, capsys):
    train = tmp_path / "train.para"
    dev_rows = (cgec / "mucgec/MuCGEC_dev.txt").read_text(encoding="utf-8").splitlines()[:5]
    train.write_text(
        "\n".join(dev_rows + ["x1\t他很高兴的说。\t他很高兴地说。\t他高兴地说。"]) + "\n", encoding="utf-8"
    )
    out = tmp_path / "train.jsonl"
    assert (
        main(
            [
                "cgec-data",
                "--train",
                str(train),
                "--exclude",
                str(cgec / "mucgec/MuCGEC_dev.txt"),
                "--out",
                str(out),
                "--refs",
                "each",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["removed_exact"] == 5 and report["samples_written"] == 2
    from zhtune.data.formats import load_conversations

    convs, _ = load_conversations([out])
    assert [c.messages[1].content for c in convs] == ["他很高兴地说。", "他高兴地说。"]
