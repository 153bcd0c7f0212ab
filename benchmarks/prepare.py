"""`zhtune prepare` at BELLE scale against the tokenizer alone, measured side by side in one run.

Data: ``../shared/data/instruct/belle/dev1K.json`` repeated to ``--records`` records (1M by default), each made
unique (its instruction numbered), written as JSON Lines. Measured, each in its own fresh process:

* baseline: the same tokenizer (the real Qwen2.5 tokenizer from ../shared) batch-encoding the same texts, i.e. the
  rendered Qwen chat texts ``zhtune prepare`` tokenizes, 2048 per call (``tokenizer(texts)``, what users call);
  only the encode calls are timed (reading and rendering are not), and ``encode_batch_fast`` of the Rust tokenizer
  is timed too, for reference;
* ``zhtune prepare RECIPE --json`` on those records: wall time of the whole command (start-up, hashing, reading,
  rendering, tokenizing, writing, splitting, packing), and its peak RSS;
* the same command again (a cache hit), and ``zhtune prepare`` of ``--small`` records (peak RSS must not grow with
  the data).

Writes ``benchmarks/results/prepare-cpu.json`` with the machine described. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ZHTUNE_SHARED", ROOT.parent / "shared"))
BELLE = SHARED / "data/instruct/belle/dev1K.json"
TOKENIZER = SHARED / "tokenizers/qwen2.5-0.5b-instruct"
BATCH = 2048


def make_data(path: Path, n: int) -> Path:
    """``n`` BELLE records: dev1K.json over and over, every instruction numbered so that no two are equal."""
    if path.exists():
        return path
    records = [json.loads(line) for line in BELLE.read_text(encoding="utf-8").splitlines() if line.strip()]
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for i in range(n):
            r = records[i % len(records)]
            f.write(json.dumps({**r, "instruction": f"{r['instruction']}（第{i}题）"}, ensure_ascii=False) + "\n")
    tmp.rename(path)
    return path


def write_recipe(path: Path, data: Path, cache: Path, workers: int) -> Path:
    import yaml

    recipe = {
        "model": {"path": str(TOKENIZER)},
        "data": {"paths": [str(data)], "cache_dir": str(cache), "num_workers": workers},
        "template": {"name": "qwen"},
        "tokenize": {"cutoff_len": 2048, "packing": True},
        "train": {"val_size": 0.02, "seed": 42},
    }
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    return path


def baseline(data: Path) -> dict:
    """Seconds the tokenizer alone needs to batch-encode the rendered texts (run in a child process)."""
    from zhtune.config import DataConfig
    from zhtune.data.formats import ParseContext, parse_alpaca
    from zhtune.data.templates import RenderOptions, SpecialTokens, get_template, rendered_text
    from zhtune.model.tokenizer import load_tokenizer

    tok = load_tokenizer(str(TOKENIZER))
    template, specials, ctx = get_template("qwen"), SpecialTokens.of(tok), ParseContext(DataConfig())
    backend = tok.backend_tokenizer
    out = {"hf_seconds": 0.0, "fast_seconds": 0.0, "texts": 0, "tokens": 0}

    def run(texts):
        t = time.perf_counter()
        ids = tok(texts, add_special_tokens=False)["input_ids"]
        out["hf_seconds"] += time.perf_counter() - t
        t = time.perf_counter()
        backend.encode_batch_fast(texts, add_special_tokens=False)
        out["fast_seconds"] += time.perf_counter() - t
        out["texts"] += len(texts)
        out["tokens"] += sum(map(len, ids))

    texts = []
    with data.open(encoding="utf-8") as f:
        for line in f:
            conv = parse_alpaca(json.loads(line), ctx)[0]
            texts.append(rendered_text(template.render(conv, specials, RenderOptions())))
            if len(texts) == BATCH:
                run(texts)
                texts = []
    if texts:
        run(texts)
    return out


def prepare_command(recipe: Path) -> list[str]:
    # zhtune prepare in a child that reports its own peak RSS (VmHWM) after the command returns
    code = (
        "import sys, json; from zhtune.memory import peak_rss_mb, reset_peak_rss; reset_peak_rss();"
        " from zhtune.cli import main; rc = main(sys.argv[1:]);"
        " print(json.dumps({'peak_rss_mb': peak_rss_mb()}), file=sys.stderr); sys.exit(rc)"
    )
    return [sys.executable, "-c", code, "prepare", str(recipe), "--json"]


def run_prepare(recipe: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.run(prepare_command(recipe), capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"zhtune prepare failed:\n{proc.stderr[-3000:]}")
    peak = json.loads(proc.stderr.strip().splitlines()[-1])["peak_rss_mb"]
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(peak, 1), "result": json.loads(proc.stdout)}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    mem = next(
        line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
    )
    from importlib import metadata

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(int(mem) / 2**20, 1),
        "python": platform.python_version(),
        **{p: metadata.version(p) for p in ("tokenizers", "transformers", "numpy")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=100_000)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--work", default=None, help="folder for the data and caches (default: a temporary one)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/prepare-cpu.json"))
    parser.add_argument("--baseline-only", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_only:
        print(json.dumps(baseline(Path(args.baseline_only))))
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="zhtune-prepare-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    big = make_data(work / f"belle-{args.records}.jsonl", args.records)
    small = make_data(work / f"belle-{args.small}.jsonl", args.small)
    cache = work / "cache"
    subprocess.run([sys.executable, "-m", "zhtune.cli", "prepare", str(write_recipe(work / "r.yaml", big, cache, 1)),
                    "--clean"], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    base = json.loads(subprocess.run([sys.executable, __file__, "--baseline-only", str(big)], capture_output=True,
                                     text=True, env=env, check=True).stdout)  # fmt: skip
    print(f"baseline: tokenizer(texts) {base['hf_seconds']:.1f} s, encode_batch_fast {base['fast_seconds']:.1f} s "
          f"for {base['texts']} texts, {base['tokens']} tokens", flush=True)  # fmt: skip
    recipe = write_recipe(work / "big.yaml", big, cache, args.num_workers)
    cold = run_prepare(recipe)
    print(f"zhtune prepare, {args.records} records: {cold['seconds']} s, peak RSS {cold['peak_rss_mb']} MB", flush=True)
    hit = run_prepare(recipe)
    print(f"zhtune prepare again (cache hit): {hit['seconds']} s, built {hit['result']['built']}", flush=True)
    small_run = run_prepare(write_recipe(work / "small.yaml", small, work / "cache-small", args.num_workers))
    print(f"zhtune prepare, {args.small} records: {small_run['seconds']} s, peak RSS {small_run['peak_rss_mb']} MB")

    ratio = cold["seconds"] / base["hf_seconds"]
    growth = cold["peak_rss_mb"] - small_run["peak_rss_mb"]
    result = {
        "card": "prepare-cpu",
        "machine": machine(),
        "data": {"records": args.records, "source": "belle/dev1K.json repeated, instructions numbered", **base},
        "num_workers": args.num_workers,
        "prepare_seconds": cold["seconds"],
        "baseline_tokenizer_seconds": round(base["hf_seconds"], 2),
        "baseline_encode_batch_fast_seconds": round(base["fast_seconds"], 2),
        "ratio_prepare_over_tokenizer": round(ratio, 3),
        "ratio_prepare_over_encode_batch_fast": round(cold["seconds"] / base["fast_seconds"], 3),
        "peak_rss_mb": cold["peak_rss_mb"],
        "peak_rss_mb_small": small_run["peak_rss_mb"],
        "small_records": args.small,
        "peak_rss_growth_mb": round(growth, 1),
        "cache_hit_seconds": hit["seconds"],
        "acceptance": {
            "ratio_at_most_1.25": ratio <= 1.25,
            "peak_rss_under_2gb": cold["peak_rss_mb"] < 2048,
            "rss_growth_within_300mb": growth <= 300,
            "cache_hit_under_10s": hit["seconds"] < 10 and hit["result"]["built"] == [],
        },
        "counts": {k: cold["result"][k] for k in ("train", "val")} | {"load": cold["result"]["load"]},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"prepare / tokenizer = {ratio:.3f}; peak RSS {cold['peak_rss_mb']} MB (+{growth:.0f} MB over "
          f"{args.small} records); cache hit {hit['seconds']} s -> {args.out}")  # fmt: skip


if __name__ == "__main__":
    main()
