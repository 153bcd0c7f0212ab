"""Fixtures for training tests: tiny checkpoints with real tokenizers, and recipe files."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.helpers import tiny_checkpoint

ALPACA = "data/instruct/alpaca_zh/alpaca_zh_demo.json"

# ``python KILL.py STEP train RECIPE``: zhtune train, every rank SIGKILLed right after the checkpoint of STEP is
# complete on all ranks (a kill at a known point, not a race against a timer)
KILL_AFTER_CHECKPOINT = """
import os, signal, sys
import torch
import zhtune.train.loop as loop
real, at = loop._save_checkpoint, int(sys.argv.pop(1))
def save_then_die(out, step, *args, **kwargs):
    real(out, step, *args, **kwargs)
    if step == at:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        os.kill(os.getpid(), signal.SIGKILL)
loop._save_checkpoint = save_then_die
from zhtune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def kill_after_checkpoint_script(tmp: Path) -> Path:
    script = tmp / "kill_after_checkpoint.py"
    script.write_text(KILL_AFTER_CHECKPOINT)
    return script


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
