"""Sharded training through ``accelerate launch`` with the real ``recipes/accelerate`` files, on CPU in fp32.

FSDP2 runs with 2 processes (gloo). DeepSpeed ZeRO-2/3 run with 1 process: DeepSpeed's CPU accelerator works here,
but accelerate sets up a DeepSpeed run only on GPUs for more than one process (on CPU its state counts one process
while DeepSpeed counts two, and the batch-size check fails), so the 2-process DeepSpeed runs wait for a GPU machine.
Every run is compared with one plain 1-process run of the same global batch: per-step losses to 1e-5, the saved
adapter tensor by tensor, and a merge of the sharded run's adapter passes verification.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import kill_after_checkpoint, subprocess_env
from tests.train.conftest import ALPACA, write_recipe
from zhtune.train.checkpoint import find_checkpoint
from zhtune.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
ACCELERATE = ROOT / "recipes" / "accelerate"
STEPS = 4
COMMON = {"max_steps": STEPS, "save_every": 2, "eval_every": STEPS, "micro_batch_size": 1, "val_size": 6}
# CPU runs everywhere (gloo), also on a GPU machine: these are the exact fp32 comparisons
ENV = subprocess_env(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}


def eval_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["eval_loss"] for r in read_metrics(run) if "eval_loss" in r}


def launch(config: str, processes: int, recipe: Path, *overrides: str, port: int = 29541) -> list[str]:
    """The ``accelerate launch`` command line of a CPU fp32 run with one of the shipped accelerate files."""
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE / config),
        "--num_processes", str(processes), "--mixed_precision", "no", "--main_process_port", str(port),
        "-m", "zhtune.cli", "train", str(recipe), *overrides,
    ]  # fmt: skip


def run(cmd: list[str], timeout: int = 400) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc


def recipe(tmp: Path, checkpoint, shared, name: str, grad_accum: int, cgec: bool = True, **train) -> Path:
    """A run of ``STEPS`` steps; with ``cgec`` the in-training CGEC evaluation (generation) at the last step."""
    dev = {"data": str(shared / "data/cgec/mucgec/MuCGEC_dev.txt"), "every": STEPS, "limit": 4, "batch_size": 4}
    return write_recipe(
        tmp / f"{name}.yaml",
        checkpoint,
        shared / ALPACA,
        tmp / name,
        "llama2",
        train={**COMMON, "grad_accum": grad_accum, **train},
        eval={"cgec": dev} if cgec else {},
    )


def cgec_scores(run: Path) -> list[dict]:
    return [r for r in read_metrics(run) if "cgec_f0.5" in r]


def assert_same_curve(got: dict, want: dict, tol: float = 1e-5) -> None:
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1)), (sorted(got), sorted(want))
    for step in want:
        assert abs(got[step] - want[step]) <= tol, (step, got[step], want[step])


def assert_same_adapter(got_dir: Path, want_dir: Path) -> None:
    got = load_file(got_dir / "adapter_model.safetensors")
    want = load_file(want_dir / "adapter_model.safetensors")
    assert sorted(got) == sorted(want) and want
    for name, tensor in want.items():
        assert got[name].shape == tensor.shape and tensor.numel() > 0, name  # never ZeRO-3's empty [0] tensors
        assert got[name].dtype == torch.float32, name
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def single(llama_checkpoint, shared, tmp_path_factory):
    """The plain 1-process run: global batch 1 x 4 x 1."""
    tmp = tmp_path_factory.mktemp("single")
    run([sys.executable, "-m", "zhtune.cli", "train", str(recipe(tmp, llama_checkpoint, shared, "run", 4))])
    return tmp / "run"


@pytest.fixture(scope="module")
def single_plain(llama_checkpoint, shared, tmp_path_factory):
    """The same without the fast path: ZeRO-3 turns its fused pieces off (Adam magnifies their rounding in LoRA-A)."""
    tmp = tmp_path_factory.mktemp("plain")
    cfg = recipe(tmp, llama_checkpoint, shared, "run", 4, fast_path=False)
    run([sys.executable, "-m", "zhtune.cli", "train", str(cfg)])
    return tmp / "run"


@pytest.fixture(scope="module")
def fsdp2(llama_checkpoint, shared, tmp_path_factory):
    """FSDP2 on 2 processes with the same global batch: 1 x 2 x 2."""
    tmp = tmp_path_factory.mktemp("fsdp2")
    proc = run(launch("fsdp.yaml", 2, recipe(tmp, llama_checkpoint, shared, "run", 2)))
    assert "engine fsdp2" in proc.stdout, proc.stdout[-2000:]
    return tmp / "run"


def test_fsdp2_two_processes_match_one_process(fsdp2, single):
    assert_same_curve(losses(fsdp2), losses(single))
    got, want = eval_losses(fsdp2), eval_losses(single)
    assert sorted(got) == sorted(want) == [0, STEPS]  # 6 validation rows over 2 ranks: same forward count per rank
    assert all(abs(got[s] - want[s]) <= 1e-5 for s in want), (got, want)
    assert_same_adapter(fsdp2 / "adapter", single / "adapter")
    assert_same_adapter(fsdp2 / "checkpoints" / "step-0000002", single / "checkpoints" / "step-0000002")
    # generation on both ranks of the sharded model: the same corrections as the unsharded one, no hang
    assert cgec_scores(fsdp2) == cgec_scores(single) and len(cgec_scores(single)) == 1
    assert_same_adapter(fsdp2 / "best_adapter", single / "adapter")
    assert (fsdp2 / "cgec_eval" / f"step-{STEPS:07d}.para").read_text() == (
        single / "cgec_eval" / f"step-{STEPS:07d}.para"
    ).read_text()
    grad_norms = [r["grad_norm"] for r in read_metrics(fsdp2) if "loss" in r]
    want = [r["grad_norm"] for r in read_metrics(single) if "loss" in r]
    assert all(g is not None for g in grad_norms)
    torch.testing.assert_close(torch.tensor(grad_norms), torch.tensor(want), rtol=1e-4, atol=1e-6)


def test_fsdp2_resume_after_kill_matches_uninterrupted(fsdp2, llama_checkpoint, shared, tmp_path):
    cfg = recipe(tmp_path, llama_checkpoint, shared, "run", 2, cgec=False)
    killed = launch("fsdp.yaml", 2, cfg, port=29542)
    at = killed.index("-m", killed.index("--main_process_port"))
    killed[at : at + 2] = kill_after_checkpoint(tmp_path, 2)  # both ranks die after step 2's save
    proc = subprocess.run(killed, capture_output=True, text=True, timeout=400, env=ENV)
    assert proc.returncode != 0, "the run was not killed"
    assert find_checkpoint(tmp_path / "run", "latest").name == "step-0000002"
    assert not (tmp_path / "run" / "checkpoints" / f"step-{STEPS:07d}").exists()
    assert not (tmp_path / "run" / "adapter").exists()
    run(launch("fsdp.yaml", 2, cfg, "train.resume_from=latest", port=29543))
    assert_same_curve(losses(tmp_path / "run"), losses(fsdp2), tol=1e-6)
    assert_same_adapter(tmp_path / "run" / "adapter", fsdp2 / "adapter")


def test_fsdp2_adapter_merges_and_verifies(fsdp2, llama_checkpoint, tmp_path):
    merged = tmp_path / "merged"
    proc = subprocess.run(
        [sys.executable, "-m", "zhtune.cli", "merge", "--base", str(llama_checkpoint), "--adapter"]
        + [str(fsdp2 / "adapter"), "--out", str(merged)],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import json

    assert json.loads((merged / "merge_report.json").read_text())["passed"] is True


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_matches_one_process(stage, request, llama_checkpoint, shared, tmp_path):
    pytest.importorskip("deepspeed", reason="pip install 'zhtune[deepspeed]'")
    single = request.getfixturevalue("single" if stage == 2 else "single_plain")
    cfg = recipe(tmp_path, llama_checkpoint, shared, "run", 4, fast_path=stage == 2)
    proc = run(launch(f"deepspeed_zero{stage}.yaml", 1, cfg, port=29544 + stage))
    assert f"engine deepspeed-zero{stage}" in proc.stdout, proc.stdout[-2000:]
    run_dir = tmp_path / "run"
    assert_same_curve(losses(run_dir), losses(single))  # one optimizer step per zhtune step: 4 micro-batches each
    assert_same_adapter(run_dir / "adapter", single / "adapter")
    assert cgec_scores(run_dir) == cgec_scores(single)
    norms = [r["grad_norm"] for r in read_metrics(run_dir) if "loss" in r]
    want = [r["grad_norm"] for r in read_metrics(single) if "loss" in r]
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(want), rtol=1e-4, atol=1e-6)
    if stage == 3:
        # a DeepSpeed checkpoint (gathered Adam state) resumes exactly in a plain process
        step2 = run_dir / "checkpoints" / "step-0000002"
        run([sys.executable, "-m", "zhtune.cli", "train", str(cfg), f"train.resume_from={step2}"])
        assert_same_curve(losses(run_dir), losses(single))
        assert_same_adapter(run_dir / "adapter", single / "adapter")


@pytest.mark.parametrize(
    ("env", "dtype", "message"),
    [
        ({"FSDP_VERSION": "1"}, "fp32", "fsdp_version 1"),
        ({"FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "true"}, "fp32", "fsdp_offload_params"),
        ({"FSDP_VERSION": "2", "FSDP_ACTIVATION_CHECKPOINTING": "true"}, "fp32", "model.gradient_checkpointing"),
        ({"FSDP_VERSION": "2", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}, "fp32", "fsdp_cpu_ram_efficient_loading"),
        ({"FSDP_VERSION": "2"}, "fp16", "fp16 is not supported under FSDP"),
        ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_USE_FSDP": "false"}, "fp32", "did not set up DeepSpeed"),
    ],
)
def test_unsupported_setups_stop_with_a_message(env, dtype, message, monkeypatch):
    """What accelerate's launcher says (its environment) and accelerate's state decide the engine; untested
    settings stop before any model is loaded. The FSDP settings are read the way accelerate reads them."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from zhtune.config import recipe_from_dict
    from zhtune.errors import ConfigError
    from zhtune.train.distributed import DataParallel, select_engine

    for key in [k for k in os.environ if k.startswith("FSDP_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    accelerator = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, state=SimpleNamespace(), num_processes=2)
    recipe = recipe_from_dict({"model": {"path": "m", "dtype": dtype}, "data": {"paths": ["d.json"]}})
    with pytest.raises(ConfigError, match=message):
        select_engine(accelerator, recipe)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    assert isinstance(select_engine(accelerator, recipe), DataParallel)  # a plain launch is DDP


@pytest.mark.parametrize(
    ("stage", "zero", "override", "message"),
    [
        (1, {}, {}, "ZeRO stage 1"),
        (2, {"offload_optimizer": {"device": "cpu"}}, {}, "offload_optimizer"),
        (3, {}, {"resume_from": "latest"}, "resuming a DeepSpeed run is not supported"),
    ],
)
def test_unsupported_deepspeed_setups_stop_with_a_message(stage, zero, override, message, monkeypatch):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from zhtune.config import recipe_from_dict
    from zhtune.errors import ConfigError
    from zhtune.train.distributed import select_engine

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    plugin = SimpleNamespace(zero_stage=stage, deepspeed_config={"zero_optimization": {"stage": stage, **zero}})
    accelerator = SimpleNamespace(
        distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace(deepspeed_plugin=plugin), num_processes=1
    )
    tree = {"model": {"path": "m", "dtype": "fp32"}, "data": {"paths": ["d.json"]}, "train": override}
    with pytest.raises(ConfigError, match=message):
        select_engine(accelerator, recipe_from_dict(tree))
