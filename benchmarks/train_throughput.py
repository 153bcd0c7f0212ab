"""Training throughput: plain transformers+peft vs zhtune's fast path, same GPU, same data, one process.

Data: the real length distribution of alpaca_zh_demo.json + BELLE dev1K.json tokenized with the real Qwen2.5
tokenizer and the qwen template (``--lengths``, a JSON file of ``[tokens, supervised tokens]`` per sample, made from
../shared by ``python benchmarks/train_throughput.py --make-lengths``); token ids are random (content does not change
speed). Model: randomly initialised, of a real shape (``--shape``: Qwen2.5 ``0.5b``/``7b``; transformers' native ``glm``
of GLM-4-9B ``glm4-9b`` and ChatGLM3-6B ``chatglm3-6b``, the layout ``zhtune convert`` writes; ``tiny``/``glm-tiny``
for a CPU smoke run), bf16, LoRA r=16 on all linear layers. A comma-separated ``--shape`` runs each shape in turn in
this one process (e.g. ``7b,glm4-9b``: the glm kernels' MFU next to the Qwen2.5-7B one, measured on the same GPU).

Stacks, all in this one process on the same GPU (``--configs``, ``stack:size:ckpt[:option]``):

* ``plain``: transformers + peft, SDPA, bf16 autocast (as the HF Trainer runs it), random-order batches padded to
  their longest sample, the model's own loss (full logits); size = samples per batch.
* ``trl``: TRL's ``SFTTrainer`` with ``use_liger_kernel`` (liger's layer kernels and TRL's fused LM head), the same
  LoRA, completion-only loss, padded batches (its packing is only correct with flash attention, not installed);
  option ``grouped`` = length-grouped sampling.
* ``zhtune-base``: packed rows + chunked loss without the kernels (the earlier fast path); ``zhtune-lora``: that plus
  the fused LoRA layers, transformers' own RMSNorm/SwiGLU/RoPE (for ``glm``, the fast path before its kernels);
  ``zhtune``: the fast path of ``zhtune train`` (``zhtune.train.fast``); ``qlora``: the same on an NF4 base loaded by
  ``zhtune.model.load``;
  size = ``ROW_LENxROWS``; option ``flex`` = flex attention (what ``model.attn_implementation: auto`` picks on CUDA),
  ``flex+compile`` = also ``torch.compile`` on every decoder layer.
* ``ckpt``: gradient checkpointing on all layers, ``nockpt`` off, ``ckptF`` on the first F of the layers.

Reported per configuration: effective (non-pad) tokens/s and per step, MFU (model FLOPs = forward + input-gradient
matmuls + causal attention, recomputation not counted, over 790 TFLOP/s), peak memory; then the best of each stack and
the ratios, and a loss-parity run (same samples per step, plain vs fast, bf16, ``--parity-steps``; ``parity_ok``: every
step within 1e-3 relative). The plain stack (and the plain parity curve) of a shape runs first, before liger patches
anything in this process; zhtune's liger patch leaves the modeling module's classes plain
(``zhtune.train.fast.scoped_module_patch``), the glm kernels patch one instance only, and TRL applies its own. With
several shapes, ``mfu_vs_first_shape`` compares each shape's best ``zhtune`` MFU with the first shape's.
Results go to ``benchmarks/results/train_throughput-<shape>[+<shape>...].json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from pathlib import Path

import torch

PEAK_TFLOPS = 790.0
# Each shape: its architecture and the config fields (random weights; the rotary base does not change the work).
SHAPES = {
    "tiny": dict(
        arch="qwen2",
        vocab_size=151936,  # the real vocabulary: TRL pads with the real tokenizer's id
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "0.5b": dict(
        arch="qwen2",
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "7b": dict(
        arch="qwen2",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    ),
    "14b": dict(
        arch="qwen2",
        vocab_size=152064,
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=48,
        num_attention_heads=40,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    ),
    "32b": dict(
        arch="qwen2",
        vocab_size=152064,
        hidden_size=5120,
        intermediate_size=27648,
        num_hidden_layers=64,
        num_attention_heads=40,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    ),
    # GLM-4-9B-chat's config.json as native glm: padded_vocab_size, ffn_hidden_size, multi_query_group_num, kv_channels
    "glm4-9b": dict(
        arch="glm",
        vocab_size=151552,
        hidden_size=4096,
        intermediate_size=13696,
        num_hidden_layers=40,
        num_attention_heads=32,
        num_key_value_heads=2,
        head_dim=128,
        attention_bias=True,
        rms_norm_eps=1.5625e-07,
        tie_word_embeddings=False,
    ),
    "chatglm3-6b": dict(
        arch="glm",
        vocab_size=65024,
        hidden_size=4096,
        intermediate_size=13696,
        num_hidden_layers=28,
        num_attention_heads=32,
        num_key_value_heads=2,
        head_dim=128,
        attention_bias=True,
        rms_norm_eps=1e-05,
        tie_word_embeddings=False,
    ),
    "glm-tiny": dict(
        arch="glm",
        vocab_size=65024,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        attention_bias=True,
        tie_word_embeddings=False,
    ),
}
TARGETS = {
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "glm": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"],
}


def shape_config(shape: str) -> dict:
    """The config fields of ``shape`` (without its architecture)."""
    return {k: v for k, v in SHAPES[shape].items() if k != "arch"}


def targets(shape: str) -> list[str]:
    return TARGETS[SHAPES[shape]["arch"]]


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


def base_model(shape: str, device: str, attn: str = "sdpa"):
    """A randomly initialised model of the shape, bf16, seed 0 (every stack starts from the same weights)."""
    from transformers import AutoModelForCausalLM, GlmConfig, Qwen2Config

    torch.manual_seed(0)
    if SHAPES[shape]["arch"] == "glm":
        config = GlmConfig(**shape_config(shape), max_position_embeddings=32768, pad_token_id=0)
    else:
        config = Qwen2Config(**shape_config(shape), max_position_embeddings=32768, rope_theta=1e6)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=attn)


def build(shape: str, device: str, attn: str = "sdpa"):
    """``base_model`` with LoRA r=16 on all linear layers, trainable weights in fp32."""
    from peft import LoraConfig, get_peft_model

    from zhtune.model.load import upcast_trainable

    model = get_peft_model(
        base_model(shape, device, attn),
        LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets(shape)),
    )
    upcast_trainable(model)
    return model


def model_flops_per_token(shape: str, seq_len: float) -> float:
    """Forward + input-gradient matmul FLOPs per token (4 * linear params) plus causal attention (3x its forward)."""
    s = SHAPES[shape]
    h, layers, inter = s["hidden_size"], s["num_hidden_layers"], s["intermediate_size"]
    head_dim = s.get("head_dim", h // s["num_attention_heads"])
    q, kv = head_dim * s["num_attention_heads"], head_dim * s["num_key_value_heads"]
    linear = layers * (h * q * 2 + h * kv * 2 + 3 * h * inter) + h * s["vocab_size"]
    attention_fwd = layers * 2 * seq_len * q  # QK^T and AV, causal: half of 2 * 2 * seq * heads * head_dim
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

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    _set_checkpointing(model, checkpointing)
    order = list(range(len(samples)))
    random.Random(1).shuffle(order)
    torch.cuda.reset_peak_memory_stats() if device == "cuda" else None
    tokens, start = 0, None
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
        out.loss.item()  # a per-step sync, as a trainer that logs its loss makes (kept as measured)
    _sync(device)
    return tokens / (time.perf_counter() - start), _peak(device), tokens / steps


def run_zhtune(model, samples, row_len: int, rows: int, steps: int, warmup: int, device: str, attn: str = "sdpa"):
    """zhtune's loop on ``model`` as it is set up (checkpointing, kernels): packed rows, chunked loss, fused AdamW."""
    from zhtune.data.packing import collate_packed, pack_samples, real_tokens
    from zhtune.train.loss import summed_ce_chunked
    from zhtune.train.schedule import supervised_tokens

    model.train()  # from_pretrained (the QLoRA base) returns eval mode, where checkpointing is off
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device == "cuda")
    packed = pack_samples(samples, row_len, 0)
    random.Random(1).shuffle(packed)
    mask_dtype = None if attn == "flex_attention" else torch.bool
    torch.cuda.reset_peak_memory_stats() if device == "cuda" else None
    static = torch.cuda.memory_allocated() / 2**30 if device == "cuda" else float("nan")
    tokens, start = 0, None
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            start, tokens = time.perf_counter(), 0
        units = [packed[(step * rows + i) % len(packed)] for i in range(rows)]
        b = collate_packed(units, mask_dtype, device)
        inputs = {k: v for k, v in b.items() if k != "labels"}
        n_sup = supervised_tokens(units)
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = summed_ce_chunked(model, inputs, b["labels"]) / n_sup
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += real_tokens(units)
    _sync(device)
    return tokens / (time.perf_counter() - start), _peak(device), static, tokens / steps


def run_trl(
    shape: str, samples, batch: int, steps: int, warmup: int, checkpointing: bool, grouped: bool, device, tokenizer_dir
):
    """TRL's SFTTrainer with liger kernels (its fused LM head too), LoRA r=16, bf16, completion-only loss, padded
    batches (packing is only correct with flash attention there); effective tokens counted from attention masks."""
    import dataclasses
    import tempfile

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    model = base_model(shape, device)
    data = Dataset.from_dict(
        {
            "input_ids": [s.input_ids for s in samples],
            "completion_mask": [[int(label != -100) for label in s.labels] for s in samples],
        }
    )
    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    sampler = {}
    if grouped:
        sampler = (
            {"train_sampling_strategy": "group_by_length"}
            if "train_sampling_strategy" in fields
            else {"group_by_length": True}
        )
    args = SFTConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=batch,
        max_steps=warmup + steps,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        bf16=device == "cuda",
        use_cpu=device != "cuda",
        gradient_checkpointing=checkpointing,
        use_liger_kernel=device == "cuda",
        completion_only_loss=True,
        packing=False,
        max_length=2048,
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        seed=1,
        **sampler,
    )
    marks: list[float] = []
    counted: list[int] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_args, **_kwargs):
            _sync(device)
            marks.append(time.perf_counter())

    class Timed(SFTTrainer):
        def training_step(self, model, inputs, *rest, **kw):
            counted.append(int(inputs["attention_mask"].sum()))
            return super().training_step(model, inputs, *rest, **kw)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets(shape))
    trainer = Timed(
        model=model,
        args=args,
        train_dataset=data,
        peft_config=peft_config,
        processing_class=tokenizer,
        callbacks=[Clock()],
    )
    torch.cuda.reset_peak_memory_stats() if device == "cuda" else None
    trainer.train()
    tps = sum(counted[warmup:]) / (marks[-1] - marks[warmup - 1])
    peak = _peak(device)
    del trainer, model
    _free(device)
    return tps, peak, sum(counted[warmup:]) / steps


def loss_parity(shape, samples, steps: int, batch: int, device: str, modes=("plain", "fast")) -> dict:
    """Same samples each step: plain (padded, full logits) vs fast (packed, chunked, kernels); per-step losses."""
    from zhtune.data.packing import collate_packed, collate_padded, pack_samples
    from zhtune.train.fast import apply_fast_path
    from zhtune.train.loop import disable_lora_input_casting, summed_cross_entropy
    from zhtune.train.loss import summed_ce_chunked
    from zhtune.train.schedule import supervised_tokens

    curves = {}
    for mode in modes:
        attn = "flex_attention" if mode == "fast" and device == "cuda" else "sdpa"
        model = build(shape, device, attn)
        _set_checkpointing(model, True)
        if mode == "fast":
            disable_lora_input_casting(model)
            curves["fast_path"] = apply_fast_path(model).applied
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=2e-4, fused=mode == "fast" and device == "cuda")
        curve = []
        for step in range(steps):
            chunk = samples[step * batch : (step + 1) * batch]
            n_sup = supervised_tokens(chunk)
            with torch.autocast(device, dtype=torch.bfloat16):
                if mode == "plain":
                    b = collate_padded(chunk, 0)
                    inputs = {"input_ids": b["input_ids"].to(device), "attention_mask": b["attention_mask"].to(device)}
                    loss = summed_cross_entropy(model(**inputs).logits, b["labels"].to(device)) / n_sup
                else:
                    mask = None if attn == "flex_attention" else torch.bool
                    b = collate_packed(pack_samples(chunk, 2048, 0), mask, device)
                    inputs = {k: v for k, v in b.items() if k != "labels"}
                    loss = summed_ce_chunked(model, inputs, b["labels"]) / n_sup
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            curve.append(loss.item())
        curves[mode] = curve
        del model, opt
        _free(device)
    return curves


def _free(device: str) -> None:
    """Collect the reference cycles a model holds (bound forwards, hooks) and hand the memory back."""
    gc.collect()
    torch.cuda.empty_cache() if device == "cuda" else None


def _set_checkpointing(model, on: bool, fraction: float = 1.0) -> None:
    from zhtune.train.fast import select_checkpointed_layers

    if on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        if fraction < 1.0:
            select_checkpointed_layers(model, fraction)
    else:
        model.gradient_checkpointing_disable()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _peak(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")


def _parse(spec: str) -> dict:
    """``stack:size:ckpt[:option]``: stack plain|trl|zhtune-base|zhtune|qlora; size B (samples) or LENxROWS;
    ckpt ckpt|nockpt|ckptF (checkpoint the first F of the layers); option flex|grouped."""
    parts = spec.split(":")
    stack, size, ck = parts[:3]
    return {
        "stack": stack,
        "size": size,
        "ckpt": ck != "nockpt",
        "fraction": float(ck[4:]) if ck.startswith("ckpt") and len(ck) > 4 else 1.0,
        "option": parts[3] if len(parts) > 3 else "",
    }


ORDER = {"plain": 0, "zhtune-base": 1, "zhtune-lora": 2, "zhtune": 3, "qlora": 4, "trl": 5}
ZHTUNE_STACKS = ("zhtune-base", "zhtune-lora", "zhtune")


def _qlora_model(shape: str):
    """A random model of the shape saved to /dev/shm and loaded the way ``zhtune train`` loads a QLoRA base."""
    import tempfile

    from zhtune.config import LoraConfig, ModelConfig
    from zhtune.model.load import attach_lora, load_base_model, upcast_trainable

    folder = Path(tempfile.mkdtemp(dir="/dev/shm" if Path("/dev/shm").exists() else None))
    base_model(shape, "cuda").save_pretrained(folder)
    _free("cuda")
    model = load_base_model(ModelConfig(path=str(folder), quantization="4bit"))
    model = attach_lora(model, LoraConfig(r=16, alpha=32, dropout=0.0, target_modules=tuple(targets(shape))), False)
    upcast_trainable(model)
    return model  # checkpointing is set by the caller, as for every zhtune configuration


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="7b", help=f"one of {sorted(SHAPES)}, or several separated by commas")
    parser.add_argument("--lengths", default=".carry/lengths.json")
    parser.add_argument("--make-lengths", action="store_true")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--parity-steps", type=int, default=50)
    parser.add_argument("--out", default="")
    parser.add_argument("--tokenizer", default=".carry/qwen-tokenizer", help="the Qwen2.5 tokenizer (TRL wants one)")
    parser.add_argument(
        "--configs",
        default="plain:16:ckpt,plain:8:nockpt,trl:16:ckpt,zhtune:4096x4:ckpt,zhtune:4096x2:nockpt,zhtune:2048x1:ckpt",
    )
    args = parser.parse_args()
    if args.make_lengths:
        make_lengths(Path(args.lengths))
        return
    shapes = args.shape.split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape {unknown[0]!r}; known: {', '.join(sorted(SHAPES))}")
    lengths = json.loads(Path(args.lengths).read_text())["lengths"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    per_shape = {shape: run_shape(shape, args, lengths, device) for shape in shapes}
    if len(shapes) == 1:
        results = per_shape[shapes[0]]
    else:
        results = {"card": per_shape[shapes[0]]["card"], "torch": torch.__version__, "shapes": per_shape}
        first = _best_zhtune_mfu(per_shape[shapes[0]])
        results["mfu_vs_first_shape"] = {
            shape: round(_best_zhtune_mfu(r) / first, 3) if first and _best_zhtune_mfu(r) else None
            for shape, r in per_shape.items()
        }
        results["mfu_within_10_percent_of_first_shape"] = {
            shape: ratio is not None and ratio >= 0.9 for shape, ratio in results["mfu_vs_first_shape"].items()
        }
    results["command"] = "python " + " ".join(sys.argv)
    print(json.dumps({k: v for k, v in results.items() if k != "shapes"}, indent=1))
    name = "+".join(shapes)
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"train_throughput-{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")


def _best_zhtune_mfu(results: dict) -> float | None:
    best = results.get("best_zhtune")
    return results["configs"][best]["mfu"] if best else None


def run_shape(shape: str, args, lengths, device: str) -> dict:
    """Every configuration of ``args.configs`` on ``shape``, then the loss-parity run; the shape's results."""
    from zhtune.train.fast import FastPathReport, apply_fast_path, apply_layer_kernels
    from zhtune.train.loop import disable_lora_input_casting

    samples = samples_from(lengths, SHAPES[shape]["vocab_size"])
    mean_len = sum(n for n, _ in lengths) / len(lengths)
    flops = model_flops_per_token(shape, mean_len)
    results = {
        "card": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "shape": shape,
        "torch": torch.__version__,
        "mean_sample_tokens": round(mean_len, 1),
        "configs": {},
    }
    specs = sorted(args.configs.split(","), key=lambda spec: ORDER[_parse(spec)["stack"]])
    parity = {}
    if args.parity_steps:  # the plain curve first, before any kernel patches exist in this process
        parity = loss_parity(shape, samples, args.parity_steps, 8, device, modes=("plain",))
    model, state = None, None
    for spec in specs:
        c = _parse(spec)
        try:
            if c["stack"] in ("plain", *ZHTUNE_STACKS) and model is None:
                model, state = build(shape, device), "plain"
            if c["stack"] in ZHTUNE_STACKS and state == "plain":
                disable_lora_input_casting(model)
                state = "base"
            if c["stack"] in ("zhtune-lora", "zhtune") and state == "base":
                results["fast_path_without_layer_kernels"] = apply_fast_path(model, layer_kernels=False).applied
                state = "lora"
            if c["stack"] == "zhtune" and state == "lora":
                report = FastPathReport()
                apply_layer_kernels(model, report)
                results["fast_path"] = results["fast_path_without_layer_kernels"] + report.applied
                results["fast_path_skipped"] = report.skipped
                state = "fast"
            if c["stack"] in ("qlora", "trl") and model is not None:
                del model
                model = None
                _free(device)
            if c["stack"] == "trl":
                tps, peak, per_step = run_trl(
                    shape,
                    samples,
                    int(c["size"]),
                    args.steps,
                    args.warmup,
                    c["ckpt"],
                    c["option"] == "grouped",
                    device,
                    args.tokenizer,
                )
                static = None
            elif c["stack"] == "plain":
                tps, peak, per_step = run_plain(
                    model, samples, int(c["size"]), args.steps, args.warmup, c["ckpt"], device
                )
                static = None
            else:
                if c["stack"] == "qlora":
                    model = _qlora_model(shape)
                    results["qlora_fast_path"] = apply_fast_path(model).applied
                attn = "flex_attention" if "flex" in c["option"] else "sdpa"
                model.set_attn_implementation(attn)
                _set_checkpointing(model, c["ckpt"], c["fraction"])
                if "compile" in c["option"]:  # torch.compile each decoder layer (stays compiled: put it last)
                    from transformers.modeling_layers import GradientCheckpointingLayer

                    for layer in model.modules():
                        if isinstance(layer, GradientCheckpointingLayer):
                            layer.compile()
                row_len, rows = (int(x) for x in c["size"].split("x"))
                tps, peak, static, per_step = run_zhtune(
                    model, samples, row_len, rows, args.steps, args.warmup, device, attn
                )
                model.set_attn_implementation("sdpa")
                if c["stack"] == "qlora":
                    del model
                    model = None
                    _free(device)
            results["configs"][spec] = {
                "tokens_per_s": round(tps, 1),
                "peak_gib": round(peak, 2),
                "mfu": round(tps * flops / (PEAK_TFLOPS * 1e12), 4),
                "effective_tokens_per_step": round(per_step),
            }
            if static is not None:
                results["configs"][spec]["before_step_gib"] = round(static, 2)
        except torch.OutOfMemoryError:
            results["configs"][spec] = {"oom": True}
        _free(device)
        print(shape, spec, results["configs"][spec], flush=True)
    del model
    _free(device)
    _summarise(results)
    if args.parity_steps:
        parity |= loss_parity(shape, samples, args.parity_steps, 8, device, modes=("fast",))
        rel = [abs(a - b) / abs(a) for a, b in zip(parity["plain"], parity["fast"])]
        results["loss_parity"] = {
            "steps": args.parity_steps,
            "max_relative_difference": max(rel),
            "max_abs_difference": max(abs(a - b) for a, b in zip(parity["plain"], parity["fast"])),
            "parity_ok": max(rel) < 1e-3,
            **parity,
        }
        print(shape, "parity max rel diff", max(rel), flush=True)
    return results


def _summarise(results: dict) -> None:
    """Best configuration of each stack and the ratios between them (in place)."""
    ok = {k: v for k, v in results["configs"].items() if "tokens_per_s" in v}
    for stack in ("plain", "trl", "zhtune-lora", "zhtune"):
        best = max(((v["tokens_per_s"], k) for k, v in ok.items() if _parse(k)["stack"] == stack), default=None)
        if best:
            results[f"best_{stack}"] = best[1]
    zh = ok.get(results.get("best_zhtune"), {}).get("tokens_per_s")
    for stack in ("plain", "trl", "zhtune-lora"):
        if zh and results.get(f"best_{stack}"):
            results[f"zhtune_over_{stack}"] = round(zh / ok[results[f"best_{stack}"]]["tokens_per_s"], 3)
    plain_ck = max((v["tokens_per_s"] for k, v in ok.items() if k.startswith("plain") and _parse(k)["ckpt"]), default=0)
    if zh and plain_ck:
        results["zhtune_over_plain_with_checkpointing"] = round(zh / plain_ck, 3)


if __name__ == "__main__":
    main()
