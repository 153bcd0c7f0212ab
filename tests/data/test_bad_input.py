"""Broken files give one clear error naming file, line and field; ``on_error: skip`` counts them instead."""

from __future__ import annotations

import pytest

from zhtune.cli import main
from zhtune.config import DataConfig
from zhtune.data.formats import load_conversations
from zhtune.errors import DataError

GOOD = '{"instruction": "你好", "input": "", "output": "你好！"}'

# name -> (file text as bytes, line of the error, field named, words in the reason)
BROKEN = {
    "invalid_json_line7.jsonl": ("\n".join([GOOD] * 6 + ['{"instruction": "x", "output": }']), 7, None, "invalid JSON"),
    "missing_output.jsonl": (
        "\n".join([GOOD, GOOD, '{"instruction": "写一首诗", "input": ""}']),
        3,
        "output",
        "missing",
    ),
    "wrong_type.jsonl": (
        "\n".join([GOOD, '{"instruction": "写一首诗", "output": 42}']),
        2,
        "output",
        "expected a string",
    ),
    "empty_conversation.jsonl": (
        '{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}\n{"conversations": []}',
        2,
        "conversations",
        "empty",
    ),
    "role_out_of_order.jsonl": (
        '{"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"},'
        ' {"from": "gpt", "value": "c"}]}',
        1,
        "conversations[1].from",
        "cannot come after",
    ),
    "unknown_role.jsonl": (
        '{"conversations": [{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}]}',
        1,
        "conversations[1].from",
        "unknown role",
    ),
    "array_invalid.json": (
        '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]',
        3,
        None,
        "invalid JSON",
    ),
    "array_missing.json": (
        '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c"}\n]',
        3,
        "output",
        "missing",
    ),
}


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_file_names_file_line_field(name, tmp_path):
    text, line, field, words = BROKEN[name]
    path = write(tmp_path, name, text)
    with pytest.raises(DataError) as err:
        load_conversations([path])
    exc = err.value
    assert (exc.path, exc.line, exc.field) == (str(path), line, field)
    assert str(exc).startswith(f"{path}:{line}: ")
    assert words in str(exc)


def test_invalid_utf8_names_line(tmp_path):
    path = write(
        tmp_path,
        "latin1.jsonl",
        (GOOD + "\n" + GOOD + "\n").encode() + '{"instruction": "caf\xe9", "output": "x"}\n'.encode("latin-1"),
    )
    with pytest.raises(DataError) as err:
        load_conversations([path])
    assert err.value.line == 3 and "invalid UTF-8" in str(err.value)
    convs, report = load_conversations([path], DataConfig(on_error="skip"))
    assert len(convs) == 2 and report.skipped == 1 and ":3:" in report.reasons[0]


def test_skip_mode_counts_and_reports_first_reasons(tmp_path):
    lines = [GOOD] * 3 + ['{"instruction": "x"}'] * 8 + ["not json"]
    path = write(tmp_path, "mixed.jsonl", "\n".join(lines))
    convs, report = load_conversations([path], DataConfig(on_error="skip"))
    assert len(convs) == 3 and report.skipped == 9
    assert len(report.reasons) == 5 and report.reasons[0].startswith(f"{path}:4: field 'output'")
    assert "9 skipped" in report.summary()


def test_cli_prints_error_without_traceback(tmp_path, capsys, shared):
    path = write(tmp_path, "missing_output.jsonl", BROKEN["missing_output.jsonl"][0])
    tok = shared / "tokenizers/qwen2.5-0.5b-instruct"
    code = main(["render", "--tokenizer", str(tok), "--template", "qwen", "--data", str(path)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{path}:3: field 'output': missing" in err
    assert "Traceback" not in err


def test_undetectable_format_says_what_to_do(tmp_path):
    path = write(tmp_path, "odd.jsonl", '{"question": "a", "answer": "b"}\n')
    with pytest.raises(DataError, match="set data.format"):
        load_conversations([path])


def test_para_readers_share_line_numbers_and_utf8_errors(tmp_path):
    """Every para reader (data, CGEC corpora, scorer, correct inputs) goes through ``tab_lines``."""
    from zhtune.data.readers import tab_lines
    from zhtune.gec.corpora import read_para_rows
    from zhtune.gec.correct import read_inputs
    from zhtune.gec.scorer import read_para

    good = tmp_path / "ok.para"
    good.write_bytes("\ufeff1\t他去学校了吗\t他去学校了吗？\r\n\n2\t我很喜欢\r\n".encode())
    assert list(tab_lines(good)) == [(1, ["1", "他去学校了吗", "他去学校了吗？"]), (3, ["2", "我很喜欢"])]
    assert [r.id for r in read_para_rows(good)] == ["1", "2"]
    assert read_para(good)[1] == ("2", "我很喜欢", [])
    assert read_inputs(good) == [("1", "他去学校了吗"), ("2", "我很喜欢")]
    bad = tmp_path / "bad.para"
    bad.write_bytes("1\t好\n2\t".encode() + b"\xff\xfe\n")
    for reader in (read_para_rows, read_para, read_inputs):
        with pytest.raises(DataError, match="invalid UTF-8") as info:
            reader(bad)
        assert info.value.line == 2
