"""Correction speed on one GPU: zhtune's engine (static cache, CUDA-graph steps, input-copy speculative decoding)
against transformers' ``generate``, with a corrector trained from scratch in the same run (issue 13).

1. **Train a corrector** — a Qwen2 of the Qwen2.5-0.5B shape from random init (``--tokenizer``: a folder with the
   real Qwen2.5 tokenizer files), ``zhtune.train.loop.train`` (what ``zhtune train`` runs) on CGEC pairs from
   ``--instruct``'s ``cgec/`` plus correct sentences from its other folders (and the pairs' targets) corrupted by
   ``zhtune noise``, with every sentence of NLPCC18, MuCGEC and FCGEC removed. ``--train-mode full`` (default) trains
   the attention and MLP weights in full (peft ``modules_to_save`` for q/k/v/gate/up/down, a rank-64 LoRA on
   ``o_proj``; the embeddings, tied head and norms stay at their random init): LoRA alone cannot turn random weights
   into a corrector in minutes. ``lora`` is
   plain LoRA on all linear layers. Training stops at ``--train-seconds`` (its steps are planned from an assumed
   throughput, ``--assumed-train-tokens-per-s``, and a clock from the first step guards them); the model is merged
   and saved in bf16.
2. **Time correction** of the NLPCC18 test sources (the instruction the corrector was trained with, the qwen
   template): transformers greedy ``generate`` at batch 1 and 16 and its prompt lookup (``prompt_lookup_num_tokens``)
   at batch 1 on the first sentences (each capped in seconds), zhtune at batch 1, 16 and 64 on the same sentences
   (after one untimed pass that captures the graphs); tokens/s counts generated tokens (stop token included) of the
   same rows. **Lossless** is measured against zhtune's own plain greedy decoding, one sentence at a time with no
   drafts (``zhtune_b1_no_speculative``): every speculative run must equal it token for token (``lossless``). On
   the batch-invariant kernels (the engine's default on a GPU) that holds in bf16 too; the same batch-16 run on
   torch's kernels (``zhtune_b16_torch_kernels``) shows what they change. Every run is also compared with
   transformers' greedy output of the same row at batch 1 and 16, whose own bf16 outputs differ between the two.
   Then all 2000 sentences through ``zhtune correct`` (the CLI function, in this process) at batch 64, wall time
   including the model load and graph capture, scored with ChERRANT (F0.5); then the first sentences again in
   fp32 (``fp32``), zhtune against transformers, where kernel choice no longer moves an argmax.
3. **7B steps** — one decode step and one verify step of k tokens (k = 1..64) on the Qwen2.5-7B shape with random
   weights (speed does not depend on the weights), zhtune's captured step (on the batch-invariant kernels and on
   torch's) vs transformers' forward with its cache, batch 1 and 16; then a **projection** (not a measurement) of
   the 7B sentence latency: the step sizes the trained corrector's batch-1 run used, timed at 7B, against the 7B
   prefill and per-token time of transformers' greedy ``generate``.

Every phase is guarded: an error is recorded in the JSON and the next phase runs (timing falls back to the random
base when training fails); the JSON (``--out``) is rewritten after every phase. ``--quick`` is a smoke run on CPU with
a tiny shape. Inputs (copy them into the git-ignored ``.carry/`` for the GPU machine): ``--tokenizer``
(``../shared/tokenizers/qwen2.5-0.5b-instruct``), ``--instruct`` (``../shared/data/instruct``) and ``--cgec``
(``../shared/data/cgec``: ``nlpcc18/``, ``mucgec/``, ``fcgec/``, ``cherrant_tables/``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import random
import re
import shutil
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zhtune.atomic import write_text_atomic  # noqa: E402
from zhtune.infer.completion import DecodeStats, Request  # noqa: E402

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}  # fmt: skip
# trained in full; o_proj gets a LoRA (peft needs one target); embeddings, the tied head and the norms stay at init
FULL_MODULES = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
EVAL_SETS = ("nlpcc18/nlpcc18_test.src.txt", "nlpcc18/nlpcc18_test.ref.m2.char", "mucgec/MuCGEC_dev.txt",
             "mucgec/MuCGEC_test.txt", "fcgec/FCGEC_valid.json", "fcgec/FCGEC_test.json")  # fmt: skip
TARGETS = {"b1_vs_hf_greedy": 20.0, "b16_vs_hf_greedy": 8.0, "b1_vs_hf_prompt_lookup": 5.0, "nlpcc18_wall_s": 20.0}


class Run:
    """The results dict, the time budget and the phase guard that records errors and keeps going."""

    def __init__(self, out: Path, budget_s: float, results: dict):
        self.out, self.start, self.budget, self.results = out, time.perf_counter(), budget_s, results
        results.setdefault("errors", {})
        results.setdefault("skipped", {})

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)

    @contextlib.contextmanager
    def phase(self, name: str, needs_s: float = 0.0):
        if self.left() < needs_s:
            self.results["skipped"][name] = f"{self.left():.0f} s left of the budget, {needs_s:.0f} s needed"
            print(f"[{name}] skipped: {self.results['skipped'][name]}", flush=True)
            yield False
            return
        t0 = time.perf_counter()
        print(f"[{name}] start ({self.left():.0f} s left)", flush=True)
        try:
            yield True
        except Exception as exc:  # record, free what can be freed, go on with the next phase
            self.results["errors"][name] = f"{type(exc).__name__}: {exc}\n" + traceback.format_exc()[-3000:]
            print(f"[{name}] FAILED: {type(exc).__name__}: {exc}", flush=True)
        finally:
            self.results.setdefault("phase_seconds", {})[name] = round(time.perf_counter() - t0, 1)
            free_memory()
            self.save()

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.out, json.dumps(self.results, indent=2, ensure_ascii=False))


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# -- 1. data and training --------------------------------------------------------------------------------------------
_SENTENCE = re.compile(r"[^。！？\n]*[。！？]")


def _mostly_chinese(s: str) -> bool:
    han = sum("\u4e00" <= ch <= "\u9fff" for ch in s)
    return 8 <= len(s) <= 80 and han >= 0.7 * len(s)


def cgec_pairs(instruct: Path) -> list[tuple[str, str]]:
    pairs = [(r["input"], r["output"]) for r in json.loads((instruct / "cgec/text_correct.json").read_text("utf-8"))]
    for line in (instruct / "cgec/pycorrector_grammar_train_sharegpt.jsonl").read_text("utf-8").splitlines():
        turns = json.loads(line)["conversations"]
        pairs.append((turns[0]["value"].split("\n\n", 1)[-1].strip(), turns[1]["value"].strip()))
    # one line each, and no longer than the pieces `zhtune correct` feeds (it splits sources past 128 characters)
    return [(s, t) for s, t in pairs if s and t and "\n" not in s + t and max(len(s), len(t)) <= 128]


def correct_sentences(instruct: Path, limit: int, seed: int) -> list[str]:
    """Sentences of the assistant answers in every instruction set but the CGEC ones (and their tool calls)."""
    from zhtune.config import DataConfig
    from zhtune.data.formats import load_conversations

    files = [p for p in sorted(instruct.rglob("*.json*")) if "cgec" not in p.parts and "toolcall" not in str(p)]
    out: set[str] = set()
    for path in files:
        try:
            convs, _report = load_conversations([path], DataConfig(on_error="skip"))
        except Exception as exc:  # a format this benchmark does not need
            print(f"  skipped {path.name}: {exc}", flush=True)
            continue
        for conv in convs:
            for m in conv.messages:
                if m.role == "assistant":
                    out.update(s.strip() for s in _SENTENCE.findall(m.content) if _mostly_chinese(s.strip()))
    sentences = sorted(out)
    random.Random(seed).shuffle(sentences)
    return sentences[:limit]


def build_training_data(args, work: Path) -> tuple[Path, dict]:
    """CGEC pairs + noised correct sentences + some identity pairs, every evaluation sentence removed."""
    from zhtune.cli import main as zhtune_main
    from zhtune.gec.corpora import CgecRow, evaluation_sentences, remove_overlap

    pairs = cgec_pairs(args.instruct)
    clean = [t for _s, t in pairs] + correct_sentences(args.instruct, args.max_noise_sentences, args.seed)
    clean = list(dict.fromkeys(clean))[: args.max_noise_sentences]
    (work / "clean.txt").write_text("\n".join(clean) + "\n", encoding="utf-8")
    with contextlib.redirect_stdout(io.StringIO()) as noise_report:
        zhtune_main(["noise", "--input", str(work / "clean.txt"), "--output", str(work / "noised.para"), "--force"])
    noised = [line.split("\t")[1:3] for line in (work / "noised.para").read_text("utf-8").splitlines()]
    identity = [(s, s) for s in clean[:: max(1, int(1 / args.identity_share))]]
    rows = [CgecRow(str(i), s, (t,)) for i, (s, t) in enumerate(pairs + [tuple(x) for x in noised] + identity)]
    exclude = [args.cgec / p for p in EVAL_SETS if (args.cgec / p).exists()]
    rows, removed = remove_overlap(rows, evaluation_sentences(exclude))
    random.Random(args.seed).shuffle(rows)
    path = work / "train.jsonl"
    lines = (json.dumps({"source": r.source, "target": r.refs[0]}, ensure_ascii=False) for r in rows)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = {"cgec_pairs": len(pairs), "noised": len(noised), "identity": len(identity), "written": len(rows)}
    report.update(removed, excluded_sets=[str(p.relative_to(args.cgec)) for p in exclude])
    report["noise_distribution"] = json.loads(noise_report.getvalue() or "{}")
    return path, report


def save_random_base(shape: str, tokenizer_dir: Path, out: Path, device: str) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    config = Qwen2Config(**SHAPES[shape], rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768, **ids)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    return out


class TrainingClock:
    """An in-loop "evaluator" that ends training at a deadline or at the last step, keeping the live model (the
    loop's final checkpoint and adapter writes are skipped: the benchmark merges and saves the model itself)."""

    best_key = None

    class Stop(Exception):
        pass

    def __init__(self, seconds: float, steps: int, every: int = 5):
        self.seconds, self.steps, self.every = seconds, steps, every
        self.deadline, self.model, self.step, self.by = None, None, 0, None

    def __call__(self, model, tokenizer, step: int) -> dict:
        if self.deadline is None:  # the first call: data and model are ready, training has begun
            self.deadline = time.perf_counter() + self.seconds
        if step >= self.steps or time.perf_counter() > self.deadline:
            self.model, self.step, self.by = model, step, "steps" if step >= self.steps else "deadline"
            raise self.Stop
        return {}


def train_corrector(args, base: Path, data: Path, work: Path, device: str) -> tuple[Path, dict]:
    from transformers import AutoTokenizer

    from zhtune.config import recipe_from_dict
    from zhtune.train.loop import train
    from zhtune.train.metrics import read_metrics

    tokens_per_step = args.cutoff_len * args.micro_batch
    steps = args.train_steps or max(10, int(args.train_seconds * args.assumed_train_tokens_per_s / tokens_per_step))
    if args.train_mode == "full":
        lora = {"r": 64, "alpha": 64, "dropout": 0.0, "target_modules": ["o_proj"], "modules_to_save": FULL_MODULES}
    else:
        lora = {"r": 64, "alpha": 128, "dropout": 0.0, "target_modules": "all-linear"}
    tree = {
        "model": {"path": str(base), "dtype": "bf16" if device == "cuda" else "fp32", "gradient_checkpointing": False},
        "data": {"paths": [str(data)], "format": "cgec"},
        "template": {"name": "qwen"},
        "tokenize": {"cutoff_len": args.cutoff_len},
        "lora": lora,
        "train": {"lr": args.lr, "max_steps": steps, "micro_batch_size": args.micro_batch, "grad_accum": 1,
                  "warmup_steps": min(50, steps // 10), "eval_every": 0, "val_size": 0, "save_every": 0,
                  "log_every": 10, "progress_bar": False, "seed": args.seed},
        "output": {"dir": str(work / "train")},
    }  # fmt: skip
    clock = TrainingClock(args.train_seconds, steps)
    t0 = time.perf_counter()
    try:
        train(recipe_from_dict(tree, "correct_speed"), [clock])
    except TrainingClock.Stop:
        pass
    seconds = time.perf_counter() - t0
    losses = [r["loss"] for r in read_metrics(work / "train") if "loss" in r]
    merged = clock.model.merge_and_unload().to(torch.bfloat16)
    clock.model = None
    merged.set_attn_implementation("sdpa")
    merged.config.use_cache = True
    out = work / "corrector"
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    del merged
    report = {"mode": args.train_mode, "planned_steps": steps, "steps": clock.step, "stopped_by": clock.by,
              "seconds": round(seconds, 1), "tokens_per_step": tokens_per_step, "lr": args.lr, "lora": lora,
              "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
              "supervised_tokens_per_s_last": next((r.get("tokens_per_s") for r in reversed(read_metrics(
                  work / "train")) if r.get("tokens_per_s")), None)}  # fmt: skip
    return out, report


# -- 2. correction timing --------------------------------------------------------------------------------------------
def nlpcc_requests(generator, src: Path, instruction: str, limit: int | None = None) -> list[Request]:
    from zhtune.gec.correct import read_inputs, split_long, token_budget, user_turn

    pieces = [p for _i, s in read_inputs(src)[:limit] for p in split_long(s, 128)]
    requests = []
    for p in pieces:
        source = generator.source_ids(p)
        requests.append(Request(generator.prompt_ids(user_turn(instruction, p)), token_budget(source), source))
    return requests


def _speed(done, seconds: float, **extra) -> dict:
    tokens = sum(len(c.tokens) + c.stopped for c in done)
    return {"sentences": len(done), "tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
            "sentences_per_s": round(len(done) / max(seconds, 1e-9), 2), **extra}  # fmt: skip


def time_hf(model, requests, stops, pad, batch_size: int, cap_s: float, prompt_lookup: int = 0):
    from zhtune.infer.hf import hf_generate

    hf_generate(model, requests[:1], stops, pad, 1, prompt_lookup)  # warm-up (kernels, allocator)
    done, t0 = [], time.perf_counter()
    for i in range(0, len(requests), batch_size):
        done += hf_generate(model, requests[i : i + batch_size], stops, pad, batch_size, prompt_lookup)
        if time.perf_counter() - t0 > cap_s:
            break
    sync()
    return _speed(done, time.perf_counter() - t0, batch_size=batch_size, prompt_lookup=prompt_lookup), done


def time_engine(generator, requests, batch_size: int):
    engine = generator.engine
    engine.generate(requests, batch_size)  # untimed: captures the graphs of the step sizes this run uses
    engine.stats = DecodeStats()
    t0 = time.perf_counter()
    done = engine.generate(requests, batch_size)
    sync()
    result = _speed(done, time.perf_counter() - t0, batch_size=batch_size, speculative=engine.speculative)
    result["engine"] = engine.stats.as_dict()
    result["fallback"] = engine.fallback
    return result, done


def mismatches(ours, theirs) -> dict:
    n = min(len(ours), len(theirs))
    bad = [i for i in range(n) if ours[i].tokens != theirs[i].tokens or ours[i].stopped != theirs[i].stopped]
    return {"compared": n, "mismatched": len(bad), "first_mismatched_rows": bad[:10]}


def load_corrector(args, model_dir: Path, instruction: str, dtype: str, sentences: int):
    """The corrector in ``dtype``, a ``corrector(**options)`` factory for it, and the requests of the first
    ``sentences`` NLPCC18 test sources with their stop and pad tokens."""
    from zhtune.gec.correct import CorrectionSettings, corrector
    from zhtune.model.load import load_for_inference
    from zhtune.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    model = load_for_inference(model_dir, dtype=dtype)
    settings = CorrectionSettings("qwen", instruction=instruction)

    def make(**options):
        return corrector(model, tokenizer, settings, **options)

    spec = make()
    requests = nlpcc_requests(spec, args.cgec / "nlpcc18/nlpcc18_test.src.txt", instruction, sentences)
    return model, make, spec, requests, spec.stop_ids(), tokenizer.pad_token_id


def timing_phase(args, run: Run, model_dir: Path, instruction: str) -> None:
    dtype = "bf16" if torch.cuda.is_available() else "fp32"
    sentences = max(args.b1_sentences, args.b16_sentences)
    model, make, spec, requests, stops, pad = load_corrector(args, model_dir, instruction, dtype, sentences)
    plain, vendor = make(speculative=False), make(invariant=False)
    t = run.results.setdefault("timing", {})
    t["hf_greedy_b1"], hf_b1 = time_hf(model, requests[: args.b1_sentences], stops, pad, 1, args.hf_cap_s)
    run.save()
    t["hf_prompt_lookup_b1"], hf_pl = time_hf(model, requests[: len(hf_b1)], stops, pad, 1, args.hf_cap_s / 2, 10)
    run.save()
    t["hf_greedy_b16"], hf_b16 = time_hf(model, requests[: args.b16_sentences], stops, pad, 16, args.hf_cap_s / 2)
    run.save()
    b1, b16 = requests[: len(hf_b1)], requests[: len(hf_b16)]
    t["zhtune_b1"], z_b1 = time_engine(spec, b1, 1)
    # the engine's own greedy decoding, one sentence at a time and no drafts: what "lossless" is measured against
    t["zhtune_b1_no_speculative"], greedy = time_engine(plain, b16, 1)
    t["zhtune_b16"], z_b16 = time_engine(spec, b16, 16)
    t["zhtune_b64"], z_b64 = time_engine(spec, b16, 64)
    t["zhtune_b16_torch_kernels"], z_vendor = time_engine(vendor, b16, 16)
    for g in (spec, plain, vendor):
        g.close()
    run.results["mismatches"] = {
        "zhtune_b1_vs_zhtune_greedy_b1": mismatches(z_b1, greedy),
        "zhtune_b16_vs_zhtune_greedy_b1": mismatches(z_b16, greedy),
        "zhtune_b64_vs_zhtune_greedy_b1": mismatches(z_b64, greedy),
        "zhtune_greedy_b1_vs_hf_greedy_b1": mismatches(greedy, hf_b1),
        "zhtune_b16_vs_hf_greedy_b1": mismatches(z_b16, hf_b1),
        "zhtune_b16_vs_hf_greedy_b16": mismatches(z_b16, hf_b16),
        "hf_greedy_b16_vs_hf_greedy_b1": mismatches(hf_b16, hf_b1),
        "hf_prompt_lookup_b1_vs_hf_greedy_b1": mismatches(hf_pl, hf_b1),
        "zhtune_b16_torch_kernels_vs_zhtune_greedy_b1": mismatches(z_vendor, greedy),
    }
    lossless = ("zhtune_b1_vs_zhtune_greedy_b1", "zhtune_b16_vs_zhtune_greedy_b1", "zhtune_b64_vs_zhtune_greedy_b1")
    run.results["lossless"] = all(run.results["mismatches"][k]["mismatched"] == 0 for k in lossless)
    tps = {k: v["tokens_per_s"] for k, v in t.items()}
    run.results["ratios"] = {
        "b1_vs_hf_greedy": round(tps["zhtune_b1"] / tps["hf_greedy_b1"], 2),
        "b16_vs_hf_greedy": round(tps["zhtune_b16"] / tps["hf_greedy_b16"], 2),
        "b1_vs_hf_prompt_lookup": round(tps["zhtune_b1"] / tps["hf_prompt_lookup_b1"], 2),
        "b64_vs_hf_greedy_b16": round(tps["zhtune_b64"] / tps["hf_greedy_b16"], 2),
        "b1_speculative_vs_b1_plain": round(tps["zhtune_b1"] / tps["zhtune_b1_no_speculative"], 2),
        "b16_invariant_vs_torch_kernels": round(tps["zhtune_b16"] / tps["zhtune_b16_torch_kernels"], 2),
    }
    del model


def fp32_phase(args, run: Run, model_dir: Path, instruction: str) -> None:
    """The same rows in fp32 (TF32 off): zhtune's speculative batches against transformers' greedy decoding, where
    both are exact enough that kernel choice does not move an argmax."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model, _make, spec, requests, stops, pad = load_corrector(args, model_dir, instruction, "fp32", args.b16_sentences)
    t = run.results.setdefault("fp32", {})
    t["hf_greedy_b1"], hf_b1 = time_hf(model, requests[: args.b1_sentences // 2], stops, pad, 1, args.hf_cap_s / 2)
    t["hf_greedy_b16"], hf_b16 = time_hf(model, requests, stops, pad, 16, args.hf_cap_s / 2)
    rows = requests[: len(hf_b16)]
    t["zhtune_b16"], z_b16 = time_engine(spec, rows, 16)
    t["zhtune_b64"], z_b64 = time_engine(spec, rows, 64)
    spec.close()
    t["mismatches"] = {
        "zhtune_b16_vs_hf_greedy_b16": mismatches(z_b16, hf_b16),
        "zhtune_b64_vs_hf_greedy_b16": mismatches(z_b64, hf_b16),
        "zhtune_b16_vs_hf_greedy_b1": mismatches(z_b16, hf_b1),
        "hf_greedy_b16_vs_hf_greedy_b1": mismatches(hf_b16, hf_b1),
    }
    del model


def full_test_set(args, run: Run, model_dir: Path, instruction: str, work: Path) -> None:
    """All NLPCC18 test sentences through `zhtune correct` (wall time), then ChERRANT F0.5."""
    from zhtune.cli import main as zhtune_main
    from zhtune.gec.scorer import score_files

    src, ref = args.cgec / "nlpcc18/nlpcc18_test.src.txt", args.cgec / "nlpcc18/nlpcc18_test.ref.m2.char"
    if args.full_sentences:
        lines = src.read_text("utf-8").splitlines()[: args.full_sentences]
        src = work / "nlpcc18_head.src.txt"
        src.write_text("\n".join(lines) + "\n", encoding="utf-8")
        blocks = ref.read_text("utf-8").strip().split("\n\n")[: args.full_sentences]
        ref = work / "nlpcc18_head.m2"
        ref.write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
    hyp = work / "nlpcc18_test.hyp.para"
    argv = ["correct", "--model", str(model_dir), "--input", str(src), "--output", str(hyp), "--template", "qwen",
            "--instruction", instruction, "--batch-size", "64", "--force"]  # fmt: skip
    printed = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(printed):
        code = zhtune_main(argv)
    wall = time.perf_counter() - t0
    print(printed.getvalue(), end="", flush=True)
    sentences = len(src.read_text("utf-8").splitlines())
    run.results["nlpcc18_correct"] = {
        "command": "zhtune " + " ".join(argv),
        "exit": code,
        "sentences": sentences,
        "wall_s": round(wall, 2),
        "printed": printed.getvalue(),
    }
    result = score_files(hyp, ref, args.cgec / "cherrant_tables")
    keep = ("tp", "fp", "fn", "precision", "recall", "f0.5", "sentences", "overcorrection_rate")
    run.results["nlpcc18_score"] = {k: result[k] for k in keep if k in result}


# -- 3. 7B-shape steps -----------------------------------------------------------------------------------------------
def _mean_seconds(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps


def _hf_step_ms(model, cache, ids: torch.Tensor, reps: int) -> float:
    """A forward of ``ids`` (k new tokens per row) with transformers' cache, which is then cut back to the prefix."""
    k = ids.shape[1]

    def step():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        cache.crop(-k)  # negative: the number of tokens to drop (transformers 5.17 and 5.24)

    return round(1000 * _mean_seconds(step, reps), 3)


def _hf_generate_times(model, prompt: list[int], reps: int = 3) -> dict:
    """transformers' greedy ``generate`` at batch 1: the median time of 1, 8 and 40 new tokens (``reps`` runs each);
    per token from 8 -> 40 (decode only: the prefill cancels out), prefill as the 1-token time."""
    from zhtune.infer.hf import hf_generate

    hf_generate(model, [Request(prompt, 4)], [], 0, 1)  # warm-up
    timed = {}
    for n in (1, 8, 40):
        runs = []
        for _ in range(reps):
            t0 = time.perf_counter()
            hf_generate(model, [Request(prompt, n)], [], 0, 1)
            sync()
            runs.append(time.perf_counter() - t0)
        timed[n] = sorted(runs)[len(runs) // 2]
    per_token = (timed[40] - timed[8]) / 32
    return {
        "hf_generate_b1_ms_per_token": round(1000 * per_token, 3),
        "hf_generate_b1_tokens_per_s": round(1 / per_token, 1),
        "hf_generate_prefill_ms": round(1000 * timed[1], 3),
    }


@torch.no_grad()
def step_timings(shape: str, ks, batches, reps: int, device: str, prefix: int = 96) -> dict:
    """ms per step: transformers' forward of k tokens with its cache vs zhtune's (captured) step, after ``prefix``,
    on the batch-invariant kernels (``zhtune``: the engine's default on a GPU) and on torch's
    (``zhtune_torch_kernels``)."""
    from transformers import AutoModelForCausalLM, DynamicCache, Qwen2Config

    from zhtune.infer.invariant import available
    from zhtune.infer.kv import StepRunner

    config = Qwen2Config(**SHAPES[shape], rope_theta=1e6, max_position_embeddings=32768)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(1000, 100000, (1, prefix), generator=g).tolist()[0]
    kinds = {"zhtune": available(device), "zhtune_torch_kernels": False}
    out: dict = {"shape": shape, "prefix_tokens": prefix, "reps": reps, "hf": {}, "zhtune_graphs": {}}
    out.update({name: {} for name in kinds}, invariant_kernels=kinds["zhtune"])
    out.update(_hf_generate_times(model, prompt))
    for rows in batches:
        cache = DynamicCache()
        model(input_ids=torch.tensor([prompt] * rows, device=device), past_key_values=cache, use_cache=True)
        ends = torch.full((rows,), prefix, dtype=torch.long)
        hf_row = out["hf"].setdefault(str(rows), {})
        for k in ks:
            ids = torch.randint(1000, 100000, (rows, k), generator=g)
            hf_row[str(k)] = _hf_step_ms(model, cache, ids.to(device), reps)
        for name, invariant in kinds.items():
            runner = StepRunner(model, rows, prefix + 2 * max(ks) + 64, graphs=device == "cuda", invariant=invariant)
            row = out[name].setdefault(str(rows), {})
            for k in ks:
                ids = torch.randint(1000, 100000, (rows, k), generator=g)
                row[str(k)] = round(1000 * _mean_seconds(lambda ids=ids, r=runner, e=ends: r(ids, e), reps), 3)
            out["zhtune_graphs"][str(rows)] = runner.graphs_on
            runner.close()
    return out


def projection(run: Run) -> dict | None:
    """7B sentence latency from the trained corrector's batch-1 step sizes, timed at 7B: a projection."""
    t, steps = run.results.get("timing", {}), run.results.get("steps_7b", {})
    if "zhtune_b1" not in t or "1" not in steps.get("zhtune", {}) or "hf_generate_b1_ms_per_token" not in steps:
        return None
    z, sizes = t["zhtune_b1"], t["zhtune_b1"]["engine"]["step_sizes"]
    measured = sorted(int(k) for k in steps["zhtune"]["1"])
    # each step size is priced at the smallest measured k that holds it (on a GPU they are the same powers of two)
    priced_at = {k: str(next((m for m in measured if m >= int(k)), measured[-1])) for k in sizes}
    zh_ms = sum(count * steps["zhtune"]["1"][priced_at[k]] for k, count in sizes.items())
    n, tokens = z["sentences"], z["tokens"]
    hf_ms = n * steps["hf_generate_prefill_ms"] + tokens * steps["hf_generate_b1_ms_per_token"]
    return {
        "what": "a projection, not a measurement: the step sizes zhtune used for the 0.5B corrector's batch-1 run, "
        "each priced at the 7B step time measured here (prefill chunks included); transformers priced at its 7B "
        "prefill (96 tokens) plus its measured 7B per-token decode time for as many tokens",
        "sentences": n,
        "tokens_per_sentence": round(tokens / n, 1),
        "step_sizes_priced_at": priced_at,
        "zhtune_s_per_sentence": round(zh_ms / 1000 / n, 4),
        "hf_greedy_s_per_sentence": round(hf_ms / 1000 / n, 4),
        "speedup": round(hf_ms / zh_ms, 1),
    }


# -- main ------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", type=Path, required=True, help="Qwen2.5 tokenizer files")
    p.add_argument("--instruct", type=Path, required=True, help="../shared/data/instruct (or a copy)")
    p.add_argument("--cgec", type=Path, required=True, help="../shared/data/cgec (nlpcc18, mucgec, fcgec, tables)")
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/correct_speed-<card>.json")
    p.add_argument("--work", type=Path, default=Path("runs/correct_speed"))
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny shape, a few steps and sentences")
    p.add_argument("--shape", default=None, help="corrector shape (default 0.5b; tiny with --quick)")
    p.add_argument("--train-mode", choices=["full", "lora"], default="full")
    p.add_argument("--train-seconds", type=float, default=180.0, help="training steps, after data and model load")
    p.add_argument("--train-steps", type=int, default=0, help="fixed steps instead of planning from the seconds")
    p.add_argument("--assumed-train-tokens-per-s", type=float, default=50000.0)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--cutoff-len", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=16, help="packed rows per step (more, smaller steps)")
    p.add_argument("--max-noise-sentences", type=int, default=40000)
    p.add_argument("--identity-share", type=float, default=0.1)
    p.add_argument("--b1-sentences", type=int, default=160)
    p.add_argument("--b16-sentences", type=int, default=160)
    p.add_argument("--hf-cap-s", type=float, default=90.0, help="seconds each batch-1 baseline may take at most")
    p.add_argument("--full-sentences", type=int, default=0, help="0: all NLPCC18 test sentences")
    p.add_argument("--budget-seconds", type=float, default=540.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only-steps-7b", action="store_true", help="run phase 3 alone, into the results in --out")
    args = p.parse_args(argv)
    if args.quick:
        args.shape = args.shape or "tiny"
        args.train_steps = args.train_steps or 4
        args.cutoff_len, args.micro_batch, args.max_noise_sentences = 128, 4, 300
        args.b1_sentences, args.b16_sentences, args.hf_cap_s = 3, 5, 30.0
        args.full_sentences = args.full_sentences or 12
    args.shape = args.shape or "0.5b"
    return args


def prepare_work_dir(work: Path) -> Path:
    """A fresh work folder; an existing one is emptied only if this script made it (its marker file is there)."""
    marker = work / ".correct_speed"
    if work.exists() and any(work.iterdir()):
        if not marker.exists():
            raise SystemExit(f"--work {work} exists and was not made by this benchmark; pass another folder")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    marker.write_text("made by benchmarks/correct_speed.py; emptied by its next run\n")
    return work


def steps_7b_phase(args, run: Run, device: str) -> None:
    with run.phase("steps_7b", needs_s=30) as ok:
        if ok:
            shape = "tiny" if args.quick else "7b"
            ks = (1, 4, 16) if args.quick else (1, 2, 4, 8, 16, 32, 64)
            run.results["steps_7b"] = step_timings(shape, ks, (1, 16), 3 if args.quick else 10, device)
    run.results["projection_7b"] = projection(run)


def main(argv=None) -> int:
    import transformers

    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    if args.out is None:
        slug = "h200" if "H200" in card else re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")
        default = "runs/correct_speed-quick.json" if args.quick else f"benchmarks/results/correct_speed-{slug}.json"
        args.out = Path(default)
    if args.only_steps_7b:  # a second call on the same card, into the results of the first
        results = json.loads(args.out.read_text("utf-8"))
        if results.get("card") != card:
            raise SystemExit(f"{args.out} was measured on {results.get('card')}, this is {card}")
        results["steps_7b_call"] = "measured in a separate call on the same card (the first call's budget ran out)"
        run = Run(args.out, args.budget_seconds, results)
        steps_7b_phase(args, run, device)
        run.save()
        return 1 if results["errors"] else 0
    results = {"card": card, "quick": args.quick,
               "torch": torch.__version__, "transformers": transformers.__version__, "shape": args.shape,
               "targets": TARGETS}  # fmt: skip
    run = Run(args.out, args.budget_seconds, results)
    work = prepare_work_dir(args.work)
    from zhtune.config import DataConfig

    instruction = DataConfig.cgec_instruction
    model_dir = None
    with run.phase("data") as ok:
        if ok:
            data, results["data"] = build_training_data(args, work)
    with run.phase("base"):
        base = save_random_base(args.shape, args.tokenizer, work / "base", device)
        model_dir = base  # timing falls back to the random base if training fails
    with run.phase("train", needs_s=60) as ok:
        if ok and model_dir is not None and results.get("data"):
            model_dir, results["train"] = train_corrector(args, base, data, work, device)
    results["timed_model"] = "trained corrector" if results.get("train") else "random base (training failed)"
    if model_dir is not None:
        with run.phase("timing", needs_s=60) as ok:
            if ok:
                timing_phase(args, run, model_dir, instruction)
        with run.phase("nlpcc18_full", needs_s=40) as ok:
            if ok:
                full_test_set(args, run, model_dir, instruction, work)
        with run.phase("fp32", needs_s=90) as ok:
            if ok:
                fp32_phase(args, run, model_dir, instruction)
    steps_7b_phase(args, run, device)
    ratios, wall = results.get("ratios", {}), results.get("nlpcc18_correct", {}).get("wall_s")
    results["targets_met"] = {k: (ratios.get(k, 0) >= v) for k, v in TARGETS.items() if k in ratios}
    if "lossless" in results:
        results["targets_met"]["lossless"] = results["lossless"]
    if wall is not None and not args.full_sentences:
        results["targets_met"]["nlpcc18_wall_s"] = wall <= TARGETS["nlpcc18_wall_s"]
    results["total_seconds"] = round(time.perf_counter() - run.start, 1)
    run.save()
    print(
        json.dumps(
            {k: results.get(k) for k in ("ratios", "targets_met", "mismatches", "nlpcc18_score", "errors")}, indent=1
        )
    )
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
