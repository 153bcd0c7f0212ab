"""Training on the prepared-data cache: two processes tokenize once, the losses are those zhtune gave before the
cache existed, a resumed run maps the cache instead of tokenizing again, and ranks draw different dropout masks."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.train.conftest import ALPACA, write_recipe
from zhtune.train.metrics import read_metrics
from zhtune.train.schedule import step_seed

# Per-step losses of this recipe (1 process, micro_batch_size 2, grad_accum 2) from zhtune at b69e04f, before the
# cache: data loaded, split, tokenized and packed in memory by every process.
BEFORE_THE_CACHE = [10.391484043054414, 10.356166932641006, 10.399219060348251, 10.336744326636905]
COMMON = {"max_steps": 4, "eval_every": 0, "save_every": 0, "micro_batch_size": 2}


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def data_lines(output: str) -> list[str]:
    """The line each process prints about the cache (``data: built ...`` or ``data: mapped ...``)."""
    return [line for line in output.splitlines() if line.startswith(("data: built", "data: mapped"))]


def run(*args, env=None):
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})}
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_two_processes_tokenize_once_and_train_as_before(llama_checkpoint, shared, tmp_path):
    one = write_recipe(
        tmp_path / "one.yaml", llama_checkpoint, shared / ALPACA, tmp_path / "one", "llama2",
        train={**COMMON, "grad_accum": 2, "save_every": 2},
    )  # fmt: skip
    cache1 = f"data.cache_dir={tmp_path / 'cache1'}"
    out = run("-m", "zhtune.cli", "train", str(one), cache1)
    assert [line.split()[1] for line in data_lines(out)] == ["built"]
    got = losses(tmp_path / "one")
    assert len(got) == 4 and all(abs(a - b) <= 1e-5 * b for a, b in zip(got, BEFORE_THE_CACHE)), got

    two = write_recipe(
        tmp_path / "two.yaml", llama_checkpoint, shared / ALPACA, tmp_path / "two", "llama2",
        train={**COMMON, "grad_accum": 1},
    )  # fmt: skip
    torchrun = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541"]
    cache2 = f"data.cache_dir={tmp_path / 'cache2'}"
    out = run(*torchrun, "-m", "zhtune.cli", "train", str(two), cache2, env={"OMP_NUM_THREADS": "1"})
    lines = data_lines(out)
    assert sorted(line.split()[1] for line in lines) == ["built", "mapped"], lines
    assert {line.rsplit("(process", 1)[1] for line in lines} == {" 0)", " 1)"}
    assert len(list((tmp_path / "cache2").glob("samples-*"))) == 1
    two_losses = losses(tmp_path / "two")
    assert all(abs(a - b) <= 1e-5 for a, b in zip(two_losses, got)) and len(two_losses) == 4, (two_losses, got)

    # resuming maps the cache the first run built; it never tokenizes again
    out = run("-m", "zhtune.cli", "train", str(one), cache1, "train.resume_from=latest", "train.max_steps=6")
    assert [line.split()[1] for line in data_lines(out)] == ["mapped"]
    assert len(losses(tmp_path / "one")) == 6


def test_dropout_seeds_differ_per_rank_and_step_and_repeat():
    seeds = {(rank, step): step_seed(7, rank, step) for rank in range(4) for step in range(50)}
    assert len(set(seeds.values())) == len(seeds)
    assert step_seed(7, 1, 3) == seeds[(1, 3)] and step_seed(8, 1, 3) != seeds[(1, 3)]
    assert all(0 <= s < 2**63 for s in seeds.values())
