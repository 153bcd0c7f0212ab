"""Fixtures for training tests: tiny checkpoints with real tokenizers, and recipe files."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.helpers import tiny_checkpoint

ALPACA = "data/instruct/alpaca_zh/alpaca_zh_demo.json"


def write_recipe(path: Path, checkpoint: Path, data: Path, out: Path, template: str, **sections) -> Path:
    tree = {
        "model": {
            "path": str(checkpoint),
            "dtype": "fp32",
            "gradient_checkpointing": False,
            "attn_implementation": "sdpa",
        },
        "data": {"paths": [str(data)]},
        "template": {"name": template},
        "tokenize": {"cutoff_len": 64},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {
            "lr": 5e-3,
            "max_steps": 40,
            "micro_batch_size": 2,
            "grad_accum": 1,
            "eval_every": 40,
            "save_every": 0,
            "val_size": 16,
            "warmup_steps": 2,
            "progress_bar": False,
            "seed": 7,
        },
        "output": {"dir": str(out)},
    }
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(tree, allow_unicode=True))
    return path


@pytest.fixture(scope="session")
def llama_checkpoint(shared, tmp_path_factory):
    """Tiny LLaMA with the real LLaMA-2 tokenizer (32000 tokens): the fastest real-vocabulary model."""
    return tiny_checkpoint(tmp_path_factory.mktemp("ck") / "llama", "llama", shared, "llama-2-7b")
