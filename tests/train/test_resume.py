"""Exact resume, crash safety during a checkpoint save, DDP equivalence and init_adapter, on CPU in fp32."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from tests.helpers import kill_after_checkpoint, load_fp32
from tests.train.conftest import ALPACA, write_recipe
from zhtune.config import InitAdapterConfig, LoraConfig, ModelConfig
from zhtune.model.load import attach_lora, load_base_model
from zhtune.train.checkpoint import find_checkpoint
from zhtune.train.metrics import read_metrics

N = 6
RESUME = {"max_steps": 2 * N, "save_every": N, "eval_every": 0, "grad_accum": 2, "micro_batch_size": 1}
LORA = {"dropout": 0.1}  # dropout draws random numbers: resume must restore the RNG too


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def cli(*args, env=None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "zhtune.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


@pytest.fixture(scope="module")
def uninterrupted(llama_checkpoint, shared, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    recipe = write_recipe(
        tmp / "r.yaml", llama_checkpoint, shared / ALPACA, tmp / "run", "llama2", train=RESUME, lora=LORA
    )
    proc = cli("train", str(recipe))
    assert proc.wait(timeout=300) == 0, proc.stdout.read()
    return losses(tmp / "run")


def test_resume_after_kill_matches_uninterrupted(uninterrupted, llama_checkpoint, shared, tmp_path):
    recipe = write_recipe(
        tmp_path / "r.yaml", llama_checkpoint, shared / ALPACA, tmp_path / "run", "llama2", train=RESUME, lora=LORA
    )
    killed = [sys.executable, *kill_after_checkpoint(tmp_path, N), "train", str(recipe)]
    proc = subprocess.run(killed, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert find_checkpoint(tmp_path / "run", "latest").name == f"step-{N:07d}"
    assert not (tmp_path / "run" / "adapter").exists()
    resumed = cli("train", str(recipe), "train.resume_from=latest")
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()
    got = losses(tmp_path / "run")
    assert sorted(got) == list(range(1, 2 * N + 1))
    for step, loss in uninterrupted.items():
        assert abs(got[step] - loss) <= 1e-6, (step, got[step], loss)


CRASH_DURING_SAVE = """
import os, sys
import zhtune.train.checkpoint as ck
real = ck._fsync_tree
def crash_on_second_save(path):
    if "step-{step:07d}".format(step=2 * {n}) in path.name:
        os._exit(137)  # die like a SIGKILL after the adapter and states were half written
    real(path)
ck._fsync_tree = crash_on_second_save
from zhtune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_crash_during_save_keeps_previous_checkpoint(uninterrupted, llama_checkpoint, shared, tmp_path):
    recipe = write_recipe(
        tmp_path / "r.yaml", llama_checkpoint, shared / ALPACA, tmp_path / "run", "llama2", train=RESUME, lora=LORA
    )
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_DURING_SAVE.replace("{n}", str(N)), "train", str(recipe)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 137
    run = tmp_path / "run"
    assert find_checkpoint(run, "latest").name == f"step-{N:07d}"
    assert list((run / "checkpoints").glob(".step-*.tmp-*")), "the crash should have left a half-written folder"
    resumed = subprocess.run(
        [sys.executable, "-m", "zhtune.cli", "train", str(recipe), "train.resume_from=latest"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert not list((run / "checkpoints").glob(".step-*.tmp-*"))
    got = losses(run)
    for step, loss in uninterrupted.items():
        assert abs(got[step] - loss) <= 1e-6, (step, got[step], loss)


def test_ddp_two_processes_match_one_process(llama_checkpoint, shared, tmp_path):
    common = {"max_steps": 4, "eval_every": 0, "save_every": 0, "micro_batch_size": 2}
    one = write_recipe(
        tmp_path / "one.yaml",
        llama_checkpoint,
        shared / ALPACA,
        tmp_path / "one",
        "llama2",
        train={**common, "grad_accum": 2},
    )
    two = write_recipe(
        tmp_path / "two.yaml",
        llama_checkpoint,
        shared / ALPACA,
        tmp_path / "two",
        "llama2",
        train={**common, "grad_accum": 1},
    )
    assert cli("train", str(one)).wait(timeout=300) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29533",
            "-m",
            "zhtune.cli",
            "train",
            str(two),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5, (step, a[step], b[step])


@pytest.mark.parametrize("mode", ["resume_weights", "merge_then_new"])
def test_init_adapter_starts_from_base_plus_adapter(mode, llama_checkpoint, tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    torch.manual_seed(3)
    donor = get_peft_model(
        load_fp32(llama_checkpoint), PeftLoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    donor.save_pretrained(tmp_path / "donor")
    ids = torch.tensor([[1, 50, 600, 7000, 80]])
    with torch.no_grad():
        expected = PeftModel.from_pretrained(load_fp32(llama_checkpoint), tmp_path / "donor")(input_ids=ids).logits
        base = load_fp32(llama_checkpoint)(input_ids=ids).logits
    model = load_base_model(ModelConfig(path=str(llama_checkpoint), dtype="fp32"))
    lora = LoraConfig(r=8, dropout=0.0, init_adapter=InitAdapterConfig(path=str(tmp_path / "donor"), mode=mode))
    model = attach_lora(model, lora, resized=False).eval()
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, base, atol=1e-4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    if mode == "merge_then_new":
        assert any("k_proj" in n for n in trainable)  # the new adapter has the recipe's own targets
