"""Every native format loads; the real samples in ../shared load with their known record counts."""

from __future__ import annotations

import gzip
import json

import pytest

from zhtune.config import DataConfig
from zhtune.data.formats import load_conversations

# file under ../shared/data/instruct -> (format, records, conversations, skipped, trimmed trailing user turns)
REAL_FILES = {
    "alpaca_zh/alpaca_zh_demo.json": ("alpaca", 1000, 1000, 0, 0),
    "alpaca_zh/identity.json": ("alpaca", 91, 91, 0, 0),
    "belle/dev1K.json": ("alpaca", 1000, 1000, 0, 0),
    "belle/zh_seed_tasks.json": ("self_instruct", 175, 175, 0, 0),
    "firefly/dummy_data.jsonl": ("firefly", 33, 33, 0, 0),
    "guanaco_belle_vicuna/instruct_data_sample.jsonl": ("alpaca", 10, 10, 0, 0),
    "guanaco_belle_vicuna/chat_data_sample.jsonl": ("guanaco_chat", 3, 3, 0, 0),
    # 7 irregular records: 6 end on an unanswered user turn (removed, counted), 1 is a lone user turn (invalid)
    "sharegpt_zh/sharegpt_zh_1K_format.jsonl": ("sharegpt", 1000, 999, 1, 6),
    "sharegpt_zh/medical_sft_1K_format.jsonl": ("sharegpt", 1000, 1000, 0, 0),
    # 2 records put a tool result right after a plain answer (no function_call): invalid order
    "sharegpt_toolcall_zh/glaive_toolcall_zh_demo.json": ("sharegpt", 300, 298, 2, 0),
    "cgec/pycorrector_grammar_train_sharegpt.jsonl": ("sharegpt", 1061, 1061, 0, 0),
    "cgec/pycorrector_grammar_test_sharegpt.jsonl": ("sharegpt", 500, 500, 0, 0),
    "cgec/text_correct.json": ("alpaca", 4998, 4998, 0, 0),
}
SKIPPED_AT = {
    "sharegpt_zh/sharegpt_zh_1K_format.jsonl": [":781: field 'conversations[0].from'"],
    "sharegpt_toolcall_zh/glaive_toolcall_zh_demo.json": [
        ":5819: field 'conversations[2].from'",
        ":8763: field 'conversations[2].from'",
    ],
}


@pytest.mark.parametrize("rel", sorted(REAL_FILES))
def test_real_samples_load(rel, shared):
    path = shared / "data/instruct" / rel
    fmt, records, convs, skipped, trimmed = REAL_FILES[rel]
    loaded, report = load_conversations([path], DataConfig(on_error="skip"))
    assert report.formats[str(path)] == fmt
    assert (report.records, len(loaded), report.skipped, report.trimmed_trailing_user) == (
        records,
        convs,
        skipped,
        trimmed,
    )
    for expected, reason in zip(SKIPPED_AT.get(rel, []), report.reasons):
        assert expected in reason
    assert all(c.messages[-1].role in ("assistant", "function_call") for c in loaded)
    assert all(c.origin.startswith(str(path) + ":") for c in loaded)


def test_tool_schemas_and_calls_survive(shared):
    path = shared / "data/instruct/sharegpt_toolcall_zh/glaive_toolcall_zh_demo.json"
    convs, _ = load_conversations([path], DataConfig(on_error="skip"))
    first = convs[0]
    assert json.loads(first.tools)[0]["name"] == "generate_invoice"
    assert [m.role for m in first.messages] == ["user", "function_call", "observation", "assistant"]


def write(tmp_path, name, text, gz=False):
    path = tmp_path / name
    data = text.encode("utf-8")
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def test_each_format_parses(tmp_path):
    cases = {
        "a.json": (
            '[{"instruction": "翻译", "input": "你好", "output": "Hello", "system": "S", "history": [["在吗", "在"]]}]',
            ["在吗", "在", "翻译\n你好", "Hello"],
        ),
        "b.jsonl": (
            '{"conversation": [{"human": "问1", "assistant": "答1"}, {"human": "问2", "assistant": "答2"}]}',
            ["问1", "答1", "问2", "答2"],
        ),
        "c.jsonl": ('{"kind": "Couplet", "input": "上联：春风", "target": "下联：秋月"}', ["上联：春风", "下联：秋月"]),
        "d.jsonl": ('{"input": ["q1", "q2"], "output": ["a1", "a2"]}', ["q1", "a1", "q2", "a2"]),
        "e.jsonl": (
            '{"conversations": [{"from": "system", "value": "SYS"}, {"from": "human", "value": "q"},'
            ' {"from": "gpt", "value": "a"}]}',
            ["q", "a"],
        ),
        "f.jsonl": ('{"source": "我爱北京天按门。", "target": "我爱北京天安门。"}', None),
        "g.para": ("1\t我爱北京天按门。\t我爱北京天安门。\t我爱北京的天安门。\n", None),
    }
    for name, (text, contents) in cases.items():
        for gz in (False, True):
            path = write(tmp_path, name + (".gz" if gz else ""), text, gz)
            convs, _ = load_conversations([path])
            assert len(convs) == 1, name
            if contents is not None:
                assert [m.content for m in convs[0].messages] == contents, name
            else:
                assert convs[0].messages[0].content.endswith("\n我爱北京天按门。")
                assert convs[0].messages[1].content == "我爱北京天安门。"
    convs, _ = load_conversations([tmp_path / "a.json"])
    assert convs[0].system == "S"
    convs, _ = load_conversations([tmp_path / "e.jsonl"])
    assert convs[0].system == "SYS"


def test_cgec_refs_each_and_unannotatable(tmp_path):
    path = write(tmp_path, "m.para", "1\t他很高兴的说。\t他很高兴地说。\t无法标注\t他高兴地说。\n")
    convs, _ = load_conversations([path], DataConfig(cgec_refs="each"))
    assert [c.messages[1].content for c in convs] == ["他很高兴地说。", "他高兴地说。"]


def test_json_array_records_know_their_line(tmp_path):
    path = write(
        tmp_path,
        "x.json",
        '[\n  {"instruction": "a", "output": "b"},\n\n  {"instruction": "c",\n   "output": "d"}\n]\n',
    )
    convs, _ = load_conversations([path])
    assert [c.origin.rsplit(":", 1)[1] for c in convs] == ["2", "4"]


def test_explicit_format_overrides_detection(tmp_path):
    path = write(tmp_path, "x.jsonl", '{"instruction": "a", "input": "b", "output": "c"}\n')
    convs, _ = load_conversations([path], DataConfig(format="alpaca"))
    assert convs[0].messages[0].content == "a\nb"
