"""Benchmark ``zhtune merge`` against peft ``merge_and_unload`` + ``save_pretrained`` on a >= 3B random model, and
``zhtune merge`` with its verification against the merge alone.

Builds a randomly initialised model of Qwen2.5-3B's (or 7B's) shape (bf16, sharded safetensors) and a random LoRA
(r=16, all linear layers, B away from zero), then runs each method in its own fresh process so that peak RSS (VmHWM,
reset at the start) and wall time are each method's own: peft, zhtune (merge alone) and zhtune+verify (the default
``zhtune merge``: merge, then the streamed numeric verification). Prints the ratios and writes
``benchmarks/results/merge-<shape>-<machine>.json``.

    python benchmarks/merge.py [--work DIR] [--shape 3b|7b] [--layers N] [--machine NAME]
"""

from __future__ import annotations

import argparse
import json
import os
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
    from pathlib import Path
    from zhtune.merge.merge import merge_adapters
    merge_adapters(base, [adapter], out)
    if method == "zhtune+verify":
        from zhtune.merge.verify import verify_merge
        checks = verify_merge(Path(base), [Path(adapter)], Path(out))
        failed = [c["check"] for c in checks if not c["passed"]]
        assert not failed, failed
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_mb": hwm(), "start_rss_mb": start_rss}))
"""

SETUP = r"""
import sys, torch, transformers
from peft import LoraConfig, get_peft_model
shape, layers, base, adapter = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
torch.manual_seed(0)
SHAPES = {
    "3b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_attention_heads=16,
               num_key_value_heads=2, tie_word_embeddings=True),
    "7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
               num_key_value_heads=4, tie_word_embeddings=False),
}
config = transformers.Qwen2Config(**SHAPES[shape], num_hidden_layers=layers, max_position_embeddings=32768)
with torch.device("cpu"):
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model.save_pretrained(base, max_shard_size="4GB" if shape == "7b" else "2GB")
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
    parser.add_argument("--shape", choices=["3b", "7b"], default="3b")
    parser.add_argument("--layers", type=int, default=None, help="default: the real count (36 for 3B, 28 for 7B)")
    parser.add_argument("--machine", default="cpu", help="name for the results file (cpu, h200-host, ...)")
    parser.add_argument("--methods", default="peft,zhtune,zhtune+verify")
    args = parser.parse_args()
    layers = args.layers or {"3b": 36, "7b": 28}[args.shape]
    work = Path(args.work) / f"{args.shape}-{layers}"
    base, adapter = work / "base", work / "adapter"
    if not (base / "config.json").exists():
        work.mkdir(parents=True, exist_ok=True)
        print(run(SETUP, args.shape, str(layers), str(base), str(adapter)), flush=True)
    params = json.loads((base / "model.safetensors.index.json").read_text())["metadata"]["total_size"] / 2
    results = {}
    for method in args.methods.split(","):
        out = work / f"out-{method}-{time.time_ns()}"
        results[method] = json.loads(run(MEASURE, method, str(base), str(adapter), str(out)))
        subprocess.run(["rm", "-rf", str(out)], check=True)
        print(method, results[method], flush=True)
    report = {
        "benchmark": "merge",
        "machine": f"{args.machine}: {platform.node()} ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPU cores)",
        "model": f"Qwen2.5-{args.shape.upper()} shape, {layers} layers, bf16, random weights",
        "parameters": int(params),
        "adapter": "LoRA r=16, all linear layers, random A and B",
        "results": results,
    }
    for a, b in (("zhtune", "peft"), ("zhtune+verify", "zhtune"), ("zhtune+verify", "peft")):
        if a in results and b in results:
            report[f"{a}_over_{b}_peak_rss"] = round(results[a]["peak_rss_mb"] / results[b]["peak_rss_mb"], 3)
            report[f"{a}_over_{b}_time"] = round(results[a]["seconds"] / results[b]["seconds"], 3)
    print(json.dumps(report, indent=2))
    out = Path(__file__).parent / "results" / f"merge-{args.shape}-{args.machine}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
