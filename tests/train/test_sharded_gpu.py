"""FSDP2 and DeepSpeed ZeRO-2/3 on GPUs in bf16, against a plain (DDP-path) run of the same global batch.

A tiny bf16 Qwen2.5-shaped checkpoint (real tokenizer, real generation config), the fast path on (flex attention for
packed rows, fused LoRA, liger where installed; ZeRO-3 turns the fused pieces off), gradient checkpointing on, the
in-training CGEC evaluation at the last step. World size 1 always; 2 processes as well when the machine has 2 GPUs.
Skipped without CUDA; ZeRO tests skipped without ``deepspeed``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import real_checkpoint, subprocess_env
from tests.train.test_sharded import ACCELERATE, cgec_scores, eval_losses, losses

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
STEPS = 8
GLOBAL_ACCUM = 4  # micro-batches per step over all ranks
WORLDS = [1] + ([2] if torch.cuda.is_available() and torch.cuda.device_count() >= 2 else [])
ENV = subprocess_env()
ENGINES = {"fsdp2": "fsdp.yaml", "zero2": "deepspeed_zero2.yaml", "zero3": "deepspeed_zero3.yaml"}


def _recipe(path, checkpoint, shared, out, grad_accum: int):
    from tests.train.conftest import write_recipe

    return write_recipe(
        path,
        checkpoint,
        shared / "data/instruct/alpaca_zh/alpaca_zh_demo.json",
        out,
        "qwen",
        model={"dtype": "bf16", "gradient_checkpointing": True, "attn_implementation": "auto"},
        tokenize={"cutoff_len": 256},
        train={
            "max_steps": STEPS,
            "micro_batch_size": 2,
            "grad_accum": grad_accum,
            "save_every": STEPS // 2,
            "eval_every": STEPS,
            "val_size": 8,
            "lr": 1e-3,
        },
        eval={"cgec": {"data": str(shared / "data/cgec/mucgec/MuCGEC_dev.txt"), "every": STEPS, "limit": 8}},
    )


@pytest.fixture(scope="module")
def checkpoint(shared, tmp_path_factory):
    return real_checkpoint(tmp_path_factory.mktemp("ck") / "qwen", "qwen2.5", shared)


@pytest.fixture(scope="module")
def ddp(checkpoint, shared, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    cfg = _recipe(tmp / "r.yaml", checkpoint, shared, tmp / "run", GLOBAL_ACCUM)
    proc = subprocess.run(
        [sys.executable, "-m", "zhtune.cli", "train", str(cfg)], capture_output=True, text=True, env=ENV, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp / "run"


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_sharded_bf16_matches_ddp(engine, world, ddp, checkpoint, shared, tmp_path):
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed")
    cfg = _recipe(tmp_path / "r.yaml", checkpoint, shared, tmp_path / "run", GLOBAL_ACCUM // world)
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE / ENGINES[engine]),
        "--num_processes", str(world), "--main_process_port", str(29600 + world),
        "-m", "zhtune.cli", "train", str(cfg),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    name = {"fsdp2": "fsdp2", "zero2": "deepspeed-zero2", "zero3": "deepspeed-zero3"}[engine]
    assert f"engine {name}" in proc.stdout
    run = tmp_path / "run"
    got, want = losses(run), losses(ddp)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    worst = max(abs(got[s] - want[s]) / abs(want[s]) for s in want)
    print(json.dumps({"engine": engine, "world": world, "max_rel_loss_diff": worst, "losses": got, "ddp": want}))
    assert worst <= 5e-3, (worst, got, want)  # bf16 rounding differences only; a wrong step count differs by far more
    assert abs(eval_losses(run)[STEPS] - eval_losses(ddp)[STEPS]) / eval_losses(ddp)[STEPS] <= 5e-3
    assert len(cgec_scores(run)) == 1  # in-training generation ran (on every rank for FSDP2 / ZeRO-3) and finished
    adapter, reference = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (run, ddp))
    assert sorted(adapter) == sorted(reference)
    for key, tensor in reference.items():
        assert adapter[key].shape == tensor.shape and adapter[key].dtype == torch.float32, key
    merged = tmp_path / "merged"
    merge = subprocess.run(
        [sys.executable, "-m", "zhtune.cli", "merge", "--base", str(checkpoint), "--adapter", str(run / "adapter")]
        + ["--out", str(merged)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert merge.returncode == 0, merge.stdout[-3000:] + merge.stderr[-3000:]
    assert json.loads((merged / "merge_report.json").read_text())["passed"] is True
