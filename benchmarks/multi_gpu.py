"""Multi-GPU measurement from one command: DDP scaling of the fast path, and FSDP2 / ZeRO-3 against DDP.

    python benchmarks/multi_gpu.py --gpus N [--ddp-shape 7b] [--shapes 14b,32b] [--engines ddp,fsdp2,zero3]

1. DDP scaling: ``benchmarks/ddp_scaling.py`` under ``torchrun`` with 1, 2, 4, ... N processes in this job (the
   baseline is the 1-process run of the same job); tokens/s and efficiency = tokens/s(n) / (n x tokens/s(1)).
2. Sharded engines: for each shape a random bf16 checkpoint of the real Qwen2.5 config (seed 0, the real tokenizer)
   is written to ``--scratch``; each engine trains it with the real command, ``accelerate launch --config_file
   recipes/accelerate/X.yaml --num_processes N -m zhtune.cli train``, on alpaca-zh + BELLE dev data from ``--shared``
   (packed ``--row-len`` rows, one per GPU per micro-batch, gradient checkpointing, LoRA r=16 on all linear layers,
   bf16) for ``--steps`` steps. From its ``metrics.jsonl``: per-step losses, peak memory per GPU (the largest rank),
   tokens/s over the steps after ``--warmup`` (packed-row tokens, row-tail padding included), MFU over
   ``--peak-tflops`` with ``train_throughput.model_flops_per_token``; loss parity = the largest relative per-step
   difference against the DDP run of the same shape (same global batch, same data order). A run that runs out of
   GPU memory is recorded as not fitting.

Works with one GPU too (a dry run: DDP scaling of one process, each engine at world size 1). Writes
``benchmarks/results/multi_gpu-<N>gpu.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"ddp": "ddp.yaml", "fsdp2": "fsdp.yaml", "zero2": "deepspeed_zero2.yaml", "zero3": "deepspeed_zero3.yaml"}
DATA = ("data/instruct/alpaca_zh/alpaca_zh_demo.json", "data/instruct/belle/dev1K.json")


def ddp_scaling(gpus: int, shape: str, lengths: str, row_len: int) -> list[dict]:
    """One ``ddp_scaling.py`` run per power-of-two world size up to ``gpus`` (and ``gpus`` itself)."""
    worlds = sorted({2**k for k in range(gpus.bit_length()) if 2**k <= gpus} | {gpus})
    runs = []
    for world in worlds:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
        cmd += [str(ROOT / "benchmarks/ddp_scaling.py"), "--shape", shape, "--lengths", lengths]
        cmd += ["--row-len", str(row_len), "--rows", "2", "--ckpt", "0", "--steps", "6", "--warmup", "2"]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env())
        if proc.returncode != 0:
            runs.append({"world_size": world, "error": _error(proc)})
            continue
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = next((r["tokens_per_s"] for r in runs if r.get("world_size") == 1 and "tokens_per_s" in r), None)
    for r in runs:
        if base and "tokens_per_s" in r:
            r["speedup"] = round(r["tokens_per_s"] / base, 3)
            r["efficiency"] = round(r["tokens_per_s"] / (base * r["world_size"]), 3)
    return runs


def random_checkpoint(shape: str, shared: Path, scratch: Path) -> Path:
    """A random bf16 Qwen2.5 checkpoint of ``shape`` (built on the GPU, seed 0) with the real Qwen2.5 tokenizer."""
    from benchmarks.train_throughput import base_model

    folder = scratch / f"qwen2.5-{shape}-random"
    if (folder / "config.json").exists():
        return folder
    base_model(shape, "cuda").save_pretrained(folder, max_shard_size="5GB")
    for f in (shared / "tokenizers/qwen2.5-0.5b-instruct").iterdir():
        if f.name not in ("config.json", "generation_config.json"):
            shutil.copy(f, folder / f.name)
    return folder


def write_recipe(path: Path, checkpoint: Path, shared: Path, out: Path, args, grad_accum: int) -> Path:
    import yaml

    tree = {
        "model": {"path": str(checkpoint), "dtype": "bf16", "gradient_checkpointing": True},
        "data": {"paths": [str(shared / p) for p in DATA]},
        "template": {"name": "qwen"},
        "tokenize": {"cutoff_len": args.row_len},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "train": {
            "max_steps": args.steps,
            "micro_batch_size": 1,
            "grad_accum": grad_accum,
            "lr": 1e-4,
            "warmup_steps": 2,
            "save_every": 0,
            "eval_every": 0,
            "val_size": 0,
            "progress_bar": False,
        },
        "output": {"dir": str(out)},
    }
    path.write_text(yaml.safe_dump(tree, allow_unicode=True))
    return path


def train_run(engine: str, recipe: Path, out: Path, gpus: int, port: int) -> dict:
    """``zhtune train`` under ``engine``; the parsed metrics or the reason it did not finish."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "recipes/accelerate")]
    cmd[-1] += f"/{CONFIGS[engine]}"
    cmd += ["--num_processes", str(gpus), "--main_process_port", str(port), "-m", "zhtune.cli", "train", str(recipe)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env())
    if proc.returncode != 0:
        text = proc.stdout + proc.stderr
        return {"fits": "out of memory" not in text.lower(), "error": _error(proc)}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    banner = re.search(r"engine (\S+); fast path: (.*)", proc.stdout)
    return {"fits": True, "rows": rows, "fast_path": banner.group(2) if banner else None}


def summarise(result: dict, args, shape: str, gpus: int) -> dict:
    """tokens/s after warm-up, MFU, peak memory and per-step losses of one finished run."""
    from benchmarks.train_throughput import model_flops_per_token

    if "rows" not in result:
        return result
    rows = {r["step"]: r for r in result.pop("rows")}
    first, last = rows[args.warmup], rows[max(rows)]
    tokens = last["tokens_per_s"] * last["time_s"] - first["tokens_per_s"] * first["time_s"]
    tps = tokens / (last["time_s"] - first["time_s"])
    flops = model_flops_per_token(shape, args.mean_doc_len)  # attention is per document inside a packed row
    return {
        **result,
        "tokens_per_s": round(tps, 1),
        "tokens_per_s_per_gpu": round(tps / gpus, 1),
        "mfu": round(tps / gpus * flops / (args.peak_tflops * 1e12), 4),
        "peak_gib": max(r.get("peak_gib", 0.0) for r in rows.values()),
        "losses": [rows[s]["loss"] for s in sorted(rows)],
    }


def parity(runs: dict) -> None:
    """Largest relative per-step loss difference of each engine against DDP, written into its entry."""
    ddp = runs.get("ddp", {}).get("losses")
    for name, run in runs.items():
        if ddp and name != "ddp" and run.get("losses"):
            run["max_rel_loss_diff_vs_ddp"] = max(abs(a - b) / abs(b) for a, b in zip(run["losses"], ddp))


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _error(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "Error" in ln or "error" in ln]
    return (lines[-1] if lines else (proc.stdout + proc.stderr)[-500:]).strip()[:500]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument("--ddp-shape", default="7b", help="shape of the DDP scaling runs ('' to skip them)")
    parser.add_argument("--shapes", default="14b,32b", help="shapes trained under every engine ('' to skip)")
    parser.add_argument("--engines", default="ddp,fsdp2,zero3")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of tokens/s")
    parser.add_argument("--row-len", type=int, default=4096)
    parser.add_argument("--lengths", default=".carry/lengths.json", help="train_throughput.py --make-lengths output")
    parser.add_argument("--shared", default=str(ROOT.parent / "shared"))
    parser.add_argument("--scratch", default="/tmp/zhtune-multi-gpu")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="the card's bf16 matmul peak (as measured)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    lengths = json.loads(Path(args.lengths).read_text())["lengths"]
    args.mean_doc_len = sum(min(n, args.row_len) for n, _sup in lengths) / len(lengths)

    import torch

    card = torch.cuda.get_device_name()
    report = {"benchmark": "multi_gpu", "card": f"{args.gpus}x {card}", "gpus": args.gpus, "command": sys.argv}
    if args.ddp_shape:
        report["ddp_scaling"] = ddp_scaling(args.gpus, args.ddp_shape, args.lengths, args.row_len)
        for r in report["ddp_scaling"]:
            print(json.dumps(r), flush=True)
    shared, scratch = Path(args.shared), Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    report["sharded"] = {}
    for shape in [s for s in args.shapes.split(",") if s]:
        checkpoint = random_checkpoint(shape, shared, scratch)
        torch.cuda.empty_cache()
        runs = {}
        for i, engine in enumerate(e for e in args.engines.split(",") if e):
            out = scratch / f"run-{shape}-{engine}"
            recipe = write_recipe(scratch / f"{shape}-{engine}.yaml", checkpoint, shared, out, args, grad_accum=2)
            runs[engine] = summarise(train_run(engine, recipe, out, args.gpus, 29700 + i), args, shape, args.gpus)
            print(json.dumps({"shape": shape, "engine": engine, **runs[engine]}), flush=True)
        parity(runs)
        report["sharded"][shape] = runs
    out = Path(args.out or ROOT / f"benchmarks/results/multi_gpu-{args.gpus}gpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
