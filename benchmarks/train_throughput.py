"""Training throughput: plain transformers+peft vs zhtune's fast path, same GPU, same data, one process.

Data: the real length distribution of alpaca_zh_demo.json + BELLE dev1K.json tokenized with the real Qwen2.5
tokenizer and the qwen template (``--lengths``, a JSON file of ``[tokens, supervised tokens]`` per sample, made from
../shared by ``python benchmarks/train_throughput.py --make-lengths``); token ids are random (content does not change
speed). Model: randomly initialised Qwen2.5 of the real shape (``--shape 0.5b|7b``), bf16, LoRA r=16 on all linear
layers.

* plain: transformers + peft, SDPA, bf16 autocast (as the HF Trainer runs it), random-order batches padded to their
  longest sample, the model's own loss (full logits), with and without gradient checkpointing.
* zhtune: packed rows without cross-document attention (SDPA block mask, or flex attention from position ids), loss
  at supervised positions only in chunks (no full logits), no per-call fp32 cast of LoRA inputs, bf16 autocast.

Reported per configuration: effective (non-pad) tokens/s, MFU (model FLOPs = forward + input-gradient matmuls + causal
attention, recomputation not counted, over 790 TFLOP/s), peak memory; plus a loss-parity run (same samples per step,
plain vs fast, bf16) and ratios. Results go to ``benchmarks/results/train_throughput-<shape>.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

PEAK_TFLOPS = 790.0
SHAPES = {
    "tiny": dict(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "0.5b": dict(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "7b": dict(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    ),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_lengths(out: Path) -> None:
    from transformers import AutoTokenizer

    from zhtune.config import TokenizeConfig
    from zhtune.data.formats import load_conversations
    from zhtune.data.templates import get_template
    from zhtune.data.tokenize import tokenize_dataset

    shared = Path(__file__).resolve().parents[2] / "shared"
    tok = AutoTokenizer.from_pretrained(shared / "tokenizers/qwen2.5-0.5b-instruct")
    convs, _ = load_conversations(
        [shared / "data/instruct/alpaca_zh/alpaca_zh_demo.json", shared / "data/instruct/belle/dev1K.json"]
    )
    samples, _ = tokenize_dataset(convs, tok, get_template("qwen"), TokenizeConfig(cutoff_len=2048))
    lengths = [[len(s.input_ids), sum(label != -100 for label in s.labels)] for s in samples]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"lengths": lengths}))


def build(shape: str, device: str, attn: str = "sdpa"):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(**SHAPES[shape], max_position_embeddings=32768, rope_theta=1e6)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=attn)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


def model_flops_per_token(shape: str, seq_len: float) -> float:
    """Forward + input-gradient matmul FLOPs per token (4 * linear params) plus causal attention (3x its forward)."""
    s = SHAPES[shape]
    h, layers, inter = s["hidden_size"], s["num_hidden_layers"], s["intermediate_size"]
    kv = h // s["num_attention_heads"] * s["num_key_value_heads"]
    linear = layers * (h * h * 2 + h * kv * 2 + 3 * h * inter) + h * s["vocab_size"]
    attention_fwd = layers * 2 * seq_len * h  # QK^T and AV, causal: half of 2 * 2 * seq * h
    return 4 * linear + 3 * attention_fwd


def samples_from(lengths, vocab: int, seed: int = 0):
    from zhtune.data.tokenize import TokenizedSample

    rng = random.Random(seed)
    out = []
    for n, sup in lengths:
        ids = [rng.randrange(10, vocab - 10) for _ in range(n)]
        out.append(TokenizedSample(ids, [-100] * (n - sup) + ids[n - sup :]))
    return out


def run_plain(model, samples, batch: int, steps: int, warmup: int, checkpointing: bool, device: str):
    from zhtune.data.packing import collate_padded

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    _set_checkpointing(model, checkpointing)
    order = list(range(len(samples)))
    random.Random(1).shuffle(order)
    torch.cuda.reset_peak_memory_stats() if device == "cuda" else None
    tokens, start, losses = 0, None, []
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            start, tokens = time.perf_counter(), 0
        idx = [order[(step * batch + i) % len(order)] for i in range(batch)]
        b = collate_padded([samples[i] for i in idx], 0)
        out = model(
            input_ids=b["input_ids"].to(device),
            attention_mask=b["attention_mask"].to(device),
            labels=b["labels"].to(device),
        )
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(b["attention_mask"].sum())
        losses.append(out.loss.item())
    _sync(device)
    return tokens / (time.perf_counter() - start), _peak(device), losses


def run_zhtune(
    model,
    samples,
    row_len: int,
    rows: int,
    steps: int,
    warmup: int,
    checkpointing: bool,
    device: str,
    mask_dtype=torch.bool,
):
    from zhtune.data.packing import collate_packed, pack_samples
    from zhtune.train.loop import disable_lora_input_casting
    from zhtune.train.loss import summed_ce_chunked

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    _set_checkpointing(model, checkpointing)
    disable_lora_input_casting(model)
    packed = pack_samples(samples, row_len, 0)
    random.Random(1).shuffle(packed)
    torch.cuda.reset_peak_memory_stats() if device == "cuda" else None
    tokens, start = 0, None
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            start, tokens = time.perf_counter(), 0
        units = [packed[(step * rows + i) % len(packed)] for i in range(rows)]
        b = collate_packed(units, mask_dtype)
        inputs = {k: v.to(device) for k, v in b.items() if k != "labels"}
        n_sup = int((b["labels"][:, 1:] != -100).sum())
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = summed_ce_chunked(model, inputs, b["labels"]) / n_sup
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += sum(s >= 0 for u in units for s in u.seq_ids)
    _sync(device)
    return tokens / (time.perf_counter() - start), _peak(device), sum(len(u.input_ids) for u in packed)


def loss_parity(shape, samples, steps: int, batch: int, device: str) -> dict:
    """Same samples each step: plain (padded, full logits) vs fast (packed, chunked); per-step relative difference."""
    from zhtune.data.packing import collate_packed, collate_padded, pack_samples
    from zhtune.train.loop import disable_lora_input_casting, summed_cross_entropy
    from zhtune.train.loss import summed_ce_chunked

    curves = {}
    for mode in ("plain", "fast"):
        model = build(shape, device)
        _set_checkpointing(model, True)
        if mode == "fast":
            disable_lora_input_casting(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
        curve = []
        for step in range(steps):
            chunk = samples[step * batch : (step + 1) * batch]
            n_sup = sum(sum(label != -100 for label in s.labels[1:]) for s in chunk)
            with torch.autocast(device, dtype=torch.bfloat16):
                if mode == "plain":
                    b = collate_padded(chunk, 0)
                    inputs = {"input_ids": b["input_ids"].to(device), "attention_mask": b["attention_mask"].to(device)}
                    loss = summed_cross_entropy(model(**inputs).logits, b["labels"].to(device)) / n_sup
                else:
                    b = collate_packed(pack_samples(chunk, 2048, 0), torch.bool)
                    inputs = {k: v.to(device) for k, v in b.items() if k != "labels"}
                    loss = summed_ce_chunked(model, inputs, b["labels"]) / n_sup
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            curve.append(loss.item())
        curves[mode] = curve
        del model, opt
        torch.cuda.empty_cache() if device == "cuda" else None
    rel = [abs(a - b) / abs(a) for a, b in zip(curves["plain"], curves["fast"])]
    return {"steps": steps, "max_relative_difference": max(rel), "plain": curves["plain"], "fast": curves["fast"]}


def _set_checkpointing(model, on: bool) -> None:
    if on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    else:
        model.gradient_checkpointing_disable()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _peak(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--lengths", default=".carry/lengths.json")
    parser.add_argument("--make-lengths", action="store_true")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--parity-steps", type=int, default=50)
    parser.add_argument(
        "--configs", default="plain:16:ckpt,plain:8:nockpt,zhtune:4096x4:ckpt,zhtune:4096x4:nockpt,zhtune:2048x1:ckpt"
    )
    args = parser.parse_args()
    if args.make_lengths:
        make_lengths(Path(args.lengths))
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lengths = json.loads(Path(args.lengths).read_text())["lengths"]
    samples = samples_from(lengths, SHAPES[args.shape]["vocab_size"])
    mean_len = sum(n for n, _ in lengths) / len(lengths)
    flops = model_flops_per_token(args.shape, mean_len)
    results = {
        "card": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "shape": args.shape,
        "torch": torch.__version__,
        "mean_sample_tokens": round(mean_len, 1),
        "configs": {},
    }
    model = build(args.shape, device)
    for spec in args.configs.split(","):
        kind, size, ck = spec.split(":")
        try:
            if kind == "plain":
                tps, peak, _ = run_plain(model, samples, int(size), args.steps, args.warmup, ck == "ckpt", device)
            else:
                row_len, rows = (int(x) for x in size.split("x"))
                tps, peak, _ = run_zhtune(model, samples, row_len, rows, args.steps, args.warmup, ck == "ckpt", device)
            results["configs"][spec] = {
                "tokens_per_s": round(tps, 1),
                "peak_gib": round(peak, 2),
                "mfu": round(tps * flops / (PEAK_TFLOPS * 1e12), 4),
            }
        except torch.OutOfMemoryError:
            results["configs"][spec] = {"oom": True}
            torch.cuda.empty_cache()
        print(spec, results["configs"][spec], flush=True)
    del model
    torch.cuda.empty_cache() if device == "cuda" else None
    ok = {k: v for k, v in results["configs"].items() if "tokens_per_s" in v}
    best_plain = max((v["tokens_per_s"], k) for k, v in ok.items() if k.startswith("plain"))
    best_zh = max((v["tokens_per_s"], k) for k, v in ok.items() if k.startswith("zhtune"))
    results["configs_order"] = args.configs
    results["best_plain"], results["best_zhtune"] = best_plain[1], best_zh[1]
    results["zhtune_over_plain"] = round(best_zh[0] / best_plain[0], 3)
    if args.parity_steps:
        results["loss_parity"] = loss_parity(args.shape, samples, args.parity_steps, 8, device)
        print("parity max rel diff", results["loss_parity"]["max_relative_difference"], flush=True)
    print(json.dumps({k: v for k, v in results.items() if k != "loss_parity"}, indent=1))
    out = Path(__file__).parent / "results" / f"train_throughput-{args.shape}.json"
    out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
