"""``zhtune render`` end to end on real files."""

from __future__ import annotations

import json
import subprocess
import sys

from zhtune.cli import main
from zhtune.data.tokenize import IGNORE_INDEX


def test_help_runs():
    out = subprocess.run([sys.executable, "-m", "zhtune.cli", "--help"], capture_output=True, text=True, check=True)
    assert "render" in out.stdout


def test_render_writes_ids_and_labels(tmp_path, shared, capsys, real_tokenizer):
    tok_dir = shared / "tokenizers/qwen2.5-0.5b-instruct"
    data = shared / "data/instruct/alpaca_zh/alpaca_zh_demo.json"
    out = tmp_path / "out.jsonl"
    args = [
        "render",
        "--tokenizer",
        str(tok_dir),
        "--template",
        "qwen",
        "--data",
        str(data),
        "--limit",
        "5",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5
    tok = real_tokenizer("qwen2.5-0.5b-instruct")
    first = json.loads(data.read_text())[0]
    for row in rows[:1]:
        assert set(row) == {"input_ids", "labels"} and len(row["input_ids"]) == len(row["labels"])
        supervised = [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX]
        assert tok.decode(supervised) == first["output"] + "<|im_end|>"
    assert "5 samples → 5 kept" in capsys.readouterr().err
    # never overwrite without being asked
    assert main(args) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(args + ["--force"]) == 0


def test_render_prints_highlighted_spans(shared, capsys):
    tok_dir = shared / "tokenizers/qwen2.5-0.5b-instruct"
    data = shared / "data/instruct/cgec/pycorrector_grammar_test_sharegpt.jsonl"
    assert (
        main(
            [
                "render",
                "--tokenizer",
                str(tok_dir),
                "--template",
                "qwen",
                "--data",
                str(data),
                "--limit",
                "2",
                "--show",
                "1",
                "--color",
                "never",
            ]
        )
        == 0
    )
    out = capsys.readouterr()
    first = json.loads(data.read_text().splitlines()[0])["conversations"][1]["value"]
    assert f"«{first}<|im_end|>»" in out.out
    assert "tokens per sample: mean" in out.err


def test_remote_code_tokenizer_needs_explicit_trust(shared, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    code = main(
        ["render", "--tokenizer", str(shared / "tokenizers/chatglm3-6b"), "--template", "chatglm3", "--data", str(data)]
    )
    assert code == 2 and "--trust-remote-code" in capsys.readouterr().err
