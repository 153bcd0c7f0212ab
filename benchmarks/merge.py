"""Benchmark ``zhtune merge`` against peft ``merge_and_unload`` + ``save_pretrained`` on a >= 3B random model.

Builds a randomly initialised model of Qwen2.5-3B's shape (bf16, sharded safetensors) and a random LoRA (r=16,
all linear layers, B away from zero), then runs each merge in its own fresh process so that peak RSS (VmHWM,
reset at the start) and wall time are each method's own. Prints the ratios and writes
``benchmarks/results/merge-cpu.json``.

    python benchmarks/merge.py [--work DIR] [--layers N]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

MEASURE = r"""
import json, sys, time
open("/proc/self/clear_refs", "w").write("5")
def hwm():
    return next(int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
def rss():
    return next(int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:"))
import torch
start_rss = rss(); t0 = time.perf_counter()
method, base, adapter, out = sys.argv[1:5]
if method == "peft":
    from transformers import AutoModelForCausalLM
    from peft import PeftModel
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.save_pretrained(out)
else:
    from zhtune.merge.merge import merge_adapters
    merge_adapters(base, [adapter], out, dtype="bf16")
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_mb": hwm(), "start_rss_mb": start_rss}))
"""

SETUP = r"""
import sys, torch, transformers
from peft import LoraConfig, get_peft_model
layers, base, adapter = int(sys.argv[1]), sys.argv[2], sys.argv[3]
torch.manual_seed(0)
config = transformers.Qwen2Config(vocab_size=151936, hidden_size=2048, intermediate_size=11008,
    num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True,
    max_position_embeddings=32768)
with torch.device("cpu"):
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model.save_pretrained(base, max_shard_size="2GB")
print("params", sum(p.numel() for p in model.parameters()))
lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
peft_model = get_peft_model(model, lora)
peft_model.save_pretrained(adapter)
"""


def run(code: str, *args: str) -> str:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return out.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="/tmp/zhtune-merge-bench")
    parser.add_argument("--layers", type=int, default=36, help="36 = Qwen2.5-3B")
    args = parser.parse_args()
    work = Path(args.work)
    base, adapter = work / "base", work / "adapter"
    if not (base / "config.json").exists():
        work.mkdir(parents=True, exist_ok=True)
        print(run(SETUP, str(args.layers), str(base), str(adapter)), flush=True)
    params = json.loads((base / "model.safetensors.index.json").read_text())["metadata"]["total_size"] / 2
    results = {}
    for method in ("peft", "zhtune"):
        out = work / f"out-{method}-{time.time_ns()}"
        results[method] = json.loads(run(MEASURE, method, str(base), str(adapter), str(out)))
        subprocess.run(["rm", "-rf", str(out)], check=True)
        print(method, results[method], flush=True)
    ratio_rss = results["zhtune"]["peak_rss_mb"] / results["peft"]["peak_rss_mb"]
    ratio_time = results["zhtune"]["seconds"] / results["peft"]["seconds"]
    report = {
        "benchmark": "merge",
        "machine": f"{platform.node()} ({platform.processor() or platform.machine()}, CPU)",
        "model": f"Qwen2.5-3B shape, {args.layers} layers, bf16, random weights",
        "parameters": int(params),
        "adapter": "LoRA r=16, all linear layers, random A and B",
        "results": results,
        "zhtune_over_peft_peak_rss": round(ratio_rss, 3),
        "zhtune_over_peft_time": round(ratio_time, 3),
    }
    print(json.dumps(report, indent=2))
    out = Path(__file__).parent / "results" / "merge-cpu.json"
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
