"""Readers stream files block by block: the same records and lines whatever the block size."""

from __future__ import annotations

import gzip
import json

import pytest

import zhtune.data.readers as readers
from zhtune.errors import DataError

FILES = [
    "alpaca_zh/alpaca_zh_demo.json",  # a JSON array, indented
    "sharegpt_toolcall_zh/glaive_toolcall_zh_demo.json",
    "belle/dev1K.json",  # JSON Lines
    "sharegpt_zh/sharegpt_zh_1K_format.jsonl",  # records of up to 55k characters
]


@pytest.mark.parametrize("rel", FILES)
def test_small_blocks_give_the_same_records(rel, shared, monkeypatch, tmp_path):
    path = shared / "data/instruct" / rel
    whole = list(readers.iter_records(path))
    monkeypatch.setattr(readers, "BLOCK_BYTES", 997)  # splits records, lines and UTF-8 characters
    assert list(readers.iter_records(path)) == whole
    gz = tmp_path / (path.name + ".gz")
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert list(readers.iter_records(gz)) == whole


def test_one_line_json_array_with_numbers_cut_at_block_ends(monkeypatch, tmp_path):
    records = [
        {"instruction": "题" * (i % 7), "output": str(i), "n": 12345678 + i, "f": [1.5, None, True]} for i in range(300)
    ]
    path = tmp_path / "one_line.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    for block in (1, 2, 3, 64, 1000):
        monkeypatch.setattr(readers, "BLOCK_BYTES", block)
        got = list(readers.iter_records(path))
        assert [r for _line, r in got] == records and {line for line, _r in got} == {1}


def test_array_errors_and_trailing_data(monkeypatch, tmp_path):
    monkeypatch.setattr(readers, "BLOCK_BYTES", 5)
    path = tmp_path / "bad.json"
    path.write_text('[\n{"a": "b"},\n{"a": "unterminated\n]\n')
    with pytest.raises(DataError, match=r"bad.json:3: invalid JSON: Invalid control character"):
        list(readers.iter_records(path))
    path.write_text('[{"a": 1}]\n  x')
    with pytest.raises(DataError, match="extra data after the array"):
        list(readers.iter_records(path))
    path.write_bytes(b'[{"a": "caf\xe9"}]')
    with pytest.raises(DataError, match="invalid UTF-8") as err:
        list(readers.iter_records(path))
    assert err.value.line == 1
