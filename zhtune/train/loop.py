"""The training loop, written out in one place.

``train(recipe)`` runs LoRA instruction tuning on 1..N processes (launched by ``torchrun`` or ``accelerate
launch``, as DDP, FSDP2 or DeepSpeed ZeRO-2/3: ``zhtune.train.distributed``; the loop itself never spawns
processes). The loss of an optimizer step is the summed cross-entropy over all
supervised tokens of all its micro-batches on all ranks, divided by their count, so gradient accumulation and data
parallelism give the same numbers as one big batch. Checkpoints are atomic and a resumed run continues the exact
same sequence (data order, RNG, optimizer, scheduler).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from zhtune import __version__
from zhtune.atomic import atomic_dir
from zhtune.config import Recipe, recipe_to_dict
from zhtune.errors import ConfigError
from zhtune.model.checkpoint_files import base_fingerprint, file_sha256, model_lineage
from zhtune.model.load import attach_lora, fit_embeddings, load_base_model, upcast_trainable, write_adapter_meta
from zhtune.model.tokenizer import load_tokenizer
from zhtune.train.checkpoint import (
    CHECKPOINTS,
    find_checkpoint,
    peft_to_live_names,
    read_checkpoint,
    restore_rng,
    rng_state,
    save_checkpoint,
)
from zhtune.train.distributed import (
    deepspeed_launched,
    gather_optimizer,
    gather_trainable,
    restore_optimizer,
    restore_trainable,
    select_engine,
    trainable_named,
)
from zhtune.train.fast import apply_fast_path, attention_for_generation, choose_attention
from zhtune.train.loss import summed_ce_chunked
from zhtune.train.metrics import MetricsWriter, plot_loss
from zhtune.train.schedule import StepSchedule, build_data, collate, step_seed, supervised_tokens

MIXED = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}


def summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over supervised positions, in fp32."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    return torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), reduction="sum", ignore_index=-100
    )


def _prepare_output(recipe: Recipe) -> tuple[Path, Path | None]:
    out = Path(recipe.output.dir)
    if recipe.train.resume_from:
        return out, find_checkpoint(out, recipe.train.resume_from)
    if (out / CHECKPOINTS).exists() or (out / "adapter").exists():
        raise ConfigError(
            f"output.dir {out} already holds a run; set train.resume_from=latest to continue it, or choose another "
            "output.dir (zhtune never overwrites a run)"
        )
    return out, None


def disable_lora_input_casting(model) -> None:
    """Turn off peft's per-call cast of LoRA inputs to the adapter weights' dtype (autocast handles dtypes)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False


def _forward_loss(model, batch: dict, device, chunked: bool = False) -> torch.Tensor:
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    if chunked:
        loss = summed_ce_chunked(model, inputs, batch["labels"])
        if loss is not None:
            return loss
    return summed_cross_entropy(model(**inputs, use_cache=False).logits, batch["labels"])


@torch.no_grad()
def evaluate(model, accelerator, units: list, data, micro_batch_size: int, mask_dtype, chunked: bool = True) -> float:
    """Mean loss per supervised token over ``units`` (sharded across ranks); through the chunked loss by default, so
    validation never builds the full ``[rows, length, vocab]`` logits that training avoids."""
    model.eval()
    mine = units[accelerator.process_index :: accelerator.num_processes]
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    # every rank runs the same number of forward passes (a sharded model gathers weights in each one); a rank
    # short of units runs the first unit again and counts nothing
    rounds = math.ceil(math.ceil(len(units) / accelerator.num_processes) / micro_batch_size)
    for i in range(0, rounds * micro_batch_size, micro_batch_size):
        chunk = mine[i : i + micro_batch_size]
        batch = collate(chunk or units[:1], data.packed, data.pad_id, mask_dtype, accelerator.device)
        loss = _forward_loss(model, batch, accelerator.device, chunked)
        if chunk:
            total[0] += loss
            total[1] += supervised_tokens(chunk)
    total = accelerator.reduce(total, "sum")
    model.train()
    return (total[0] / total[1].clamp(min=1)).item()


def _adapter_meta(recipe: Recipe) -> dict:
    """What ``zhtune_adapter.json`` records: the model trained on (content fingerprint and lineage), template, data.

    With ``lora.init_adapter`` in ``merge_then_new`` mode the model trained on is the base with that adapter merged
    in memory: no folder holds it, so the fingerprint is None and the lineage names the base plus that adapter.
    """
    fingerprint = base_fingerprint(recipe.model.path)
    lineage = model_lineage(recipe.model.path)
    init = recipe.lora.init_adapter
    if init is not None and init.mode == "merge_then_new":
        fingerprint = None
        lineage["adapters"].append(file_sha256(Path(init.path) / "adapter_model.safetensors"))
    return {
        "zhtune_version": __version__,
        "base_model": recipe.model.path,
        "base_fingerprint": fingerprint,
        "base_lineage": lineage,
        "template": recipe.template.name,
        "data": [{"path": p, "sha256": file_sha256(Path(p))} for p in recipe.data.paths],
        "recipe": recipe_to_dict(recipe),
    }


def train(recipe: Recipe, evaluators: list | tuple = ()) -> dict:
    """Train a LoRA adapter as ``recipe`` says; return a summary (steps, final losses, output paths).

    Args:
        recipe: the resolved recipe.
        evaluators: extra in-loop evaluations supplied by higher layers (the CGEC scorer): callables
            ``(model, tokenizer, step) -> {metric: value}`` with attributes ``every`` (steps) and ``best_key``
            (a metric to maximise; the adapter with its best value is kept in ``OUT/best_adapter``, or None).

    Raises:
        ConfigError / DataError: anything wrong with the recipe, model or data, before training starts.
    """
    from tqdm.auto import tqdm

    run = _setup(recipe)
    cfg, step = recipe.train, run.start_step
    if cfg.eval_every > 0 and run.data.val_units and step == 0:
        run.metrics.log({"step": 0, "eval_loss": _validation_loss(run)})
    bar = tqdm(
        total=run.total_steps, initial=step, disable=not (run.main and cfg.progress_bar), desc="train", unit="step"
    )
    run.model.train()
    started, tokens_seen, last, best = time.perf_counter(), 0, {}, {}
    while step < run.total_steps:
        lr = run.scheduler.get_last_lr()[0]  # the rate this step uses (the scheduler steps after it)
        loss, grad_norm, tokens = _train_step(run, step)
        tokens_seen += tokens
        step += 1
        elapsed = time.perf_counter() - started
        last = {
            "step": step,
            "epoch": round(step / run.schedule.steps_per_epoch, 4),
            "loss": loss,
            "lr": lr,
            "tokens_per_s": round(tokens_seen * run.accelerator.num_processes / max(elapsed, 1e-9), 1),
            "grad_norm": grad_norm,
            "time_s": round(elapsed, 3),
        }
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{last['lr']:.2e}", tok_s=f"{last['tokens_per_s']:.0f}")
        bar.update(1)
        best = _after_step(run, step, last, evaluators, best)
    bar.close()
    run.metrics.close()
    return _finish(run, step, last, best)


@dataclass
class _Run:
    """Everything one training run holds between steps."""

    recipe: Recipe
    out: Path
    accelerator: object
    engine: object
    tokenizer: object
    data: object
    model: object
    optimizer: object
    scheduler: object
    schedule: StepSchedule
    total_steps: int
    mask_dtype: torch.dtype | None
    chunked: bool
    metrics: MetricsWriter
    start_step: int

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def _setup(recipe: Recipe) -> _Run:
    """Output folder, engine, tokenizer, data, model, optimizer and schedule; a resumed run's states restored."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    cfg = recipe.train
    out, resume = _prepare_output(recipe)
    accelerator = _fresh_accelerator(Accelerator, MIXED[recipe.model.dtype])
    engine = select_engine(accelerator, recipe)
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(recipe.model.tokenizer or recipe.model.path, recipe.model.trust_remote_code)
    data = build_data(recipe, tokenizer)  # one process tokenizes into the cache, the others map it
    print(f"{data.source} (process {accelerator.process_index})", flush=True)
    model, optimizer, attn, kernels = _prepare_model(recipe, engine, len(tokenizer), data.packed)
    schedule = StepSchedule(
        len(data.train_units), cfg.micro_batch_size, cfg.grad_accum, accelerator.num_processes, cfg.seed
    )
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * schedule.steps_per_epoch)
    warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else round(cfg.warmup_ratio * total_steps)
    scheduler = get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    step = _resume(resume, engine, optimizer, scheduler) if resume else 0
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.resolved.json").write_text(json.dumps(recipe_to_dict(recipe), indent=2, ensure_ascii=False))
        (out / "data_report.txt").write_text("\n".join(f"{k}: {v}" for k, v in data.reports.items()) + "\n")
    return _Run(
        recipe=recipe,
        out=out,
        accelerator=accelerator,
        engine=engine,
        tokenizer=tokenizer,
        data=data,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        schedule=schedule,
        total_steps=total_steps,
        # SDPA takes a boolean block mask; flex attention builds its block-sparse mask from the position ids
        mask_dtype={"sdpa": torch.bool, "flex_attention": None}.get(attn, torch.float32),
        chunked=cfg.chunked_loss and kernels,
        metrics=MetricsWriter(out, accelerator.is_main_process, resume_step=step),
        start_step=step,
    )


def _train_step(run: _Run, step: int) -> tuple[float, float | None, int]:
    """One optimizer step (all its micro-batches on this rank); returns ``(loss, grad_norm, tokens)``: the loss per
    supervised token over all ranks, the norm before clipping, this rank's tokens."""
    accelerator, data = run.accelerator, run.data
    torch.manual_seed(step_seed(run.recipe.train.seed, accelerator.process_index, step))  # dropout: per rank, resumable
    all_micro = run.schedule.micro_batches(step)
    n_tok = sum(supervised_tokens([data.train_units[i] for i in mb]) for mb in all_micro)
    mine = all_micro[accelerator.process_index :: accelerator.num_processes]
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    tokens = 0
    for j, mb in enumerate(mine):
        units = [data.train_units[i] for i in mb]
        last = j == len(mine) - 1
        with run.engine.sync(last):
            batch = collate(units, data.packed, data.pad_id, run.mask_dtype, accelerator.device)
            ce = _forward_loss(run.model, batch, accelerator.device, run.chunked)
            # every engine averages gradients over ranks; scaling by world size makes the result sum / all tokens
            run.engine.backward(ce * accelerator.num_processes / max(n_tok, 1), last)
        loss_sum += ce.detach()
        tokens += sum(len(u.input_ids) for u in units)
    loss = (accelerator.reduce(loss_sum, "sum") / max(n_tok, 1)).item()
    grad_norm = run.engine.step(run.recipe.train.max_grad_norm)
    run.scheduler.step()
    return loss, grad_norm, tokens


def _validation_loss(run: _Run) -> float:
    cfg = run.recipe.train
    return evaluate(
        run.model, run.accelerator, run.data.val_units, run.data, cfg.micro_batch_size, run.mask_dtype, run.chunked
    )


def _after_step(run: _Run, step: int, last: dict, evaluators, best: dict) -> dict:
    """Log, validate, run the in-loop evaluators and checkpoint as the recipe says after ``step``; returns ``best``."""
    cfg, final = run.recipe.train, step == run.total_steps
    if step % cfg.log_every == 0 or final:
        if run.accelerator.device.type == "cuda":  # the largest peak of any rank, for the memory a run needs per GPU
            peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30], device=run.accelerator.device)
            last["peak_gib"] = round(run.accelerator.gather(peak).max().item(), 2)
        run.metrics.log(last)
    if cfg.eval_every > 0 and run.data.val_units and (step % cfg.eval_every == 0 or final):
        last["eval_loss"] = _validation_loss(run)
        run.metrics.log({"step": step, "eval_loss": last["eval_loss"]})
    for evaluator in evaluators:
        if evaluator.every > 0 and (step % evaluator.every == 0 or final):
            best = _run_evaluator(evaluator, run.engine, run.tokenizer, step, run.metrics, run.out, run.recipe, best)
    if (cfg.save_every > 0 and step % cfg.save_every == 0) or final:
        info = {"loss": last["loss"], "epoch": last["epoch"]}
        _save_checkpoint(run.out, step, run.engine, run.optimizer, run.scheduler, info)
    run.accelerator.wait_for_everyone()
    return best


def _finish(run: _Run, step: int, last: dict, best: dict) -> dict:
    """Gather and write the final adapter, the loss plot and ``summary.json``; return the summary."""
    summary = {"steps": step, "last": last, "output": str(run.out), "best": best, "engine": run.engine.name}
    weights = gather_trainable(run.engine)
    if run.main:
        model, recipe = run.engine.unwrapped(), run.recipe
        summary["adapter"] = str(_save_final_adapter(run.out, model, weights, run.tokenizer, recipe))
        summary["plot"] = str(plot_loss(run.out, title=_plot_title(recipe, run.out)))
        (run.out / "summary.json").write_text(json.dumps(summary, indent=2))
    run.accelerator.wait_for_everyone()
    return summary


def _prepare_model(recipe: Recipe, engine, vocab_size: int, packed: bool):
    """Load the base, attach LoRA, let the engine wrap or shard it with its optimizer, then apply the fast path
    (after sharding, so FSDP2 never holds the whole base on one GPU). Returns ``(model, optimizer, attention,
    kernels)``, ``kernels`` telling whether the fused pieces (and so the chunked loss) are on."""
    cfg = recipe.train
    model = load_base_model(recipe.model)
    resized = fit_embeddings(model, vocab_size)
    if recipe.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = attach_lora(model, recipe.lora, resized)
    upcast_trainable(model)
    if recipe.model.dtype != "fp32" and engine.casts_dtypes:
        # Under autocast the LoRA matmuls run in bf16/fp16 anyway; peft's own cast of every input to the fp32 adapter
        # dtype only adds full-size copies (16% of GPU time on a 7B step, measured in benchmarks/).
        disable_lora_input_casting(model)
    if recipe.model.quantization == "none":
        engine.place(model)  # the fast path patches device-specific kernels (a 4-bit model is placed already)
    # fused AdamW on CUDA: one kernel for all LoRA tensors, no foreach temporaries (same update rule)
    fused = engine.accelerator.device.type == "cuda"
    model, optimizer = engine.prepare(
        model, lambda params: torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    )
    requested = recipe.model.attn_implementation
    if not cfg.fast_path and requested == "auto":
        requested = "sdpa"
    attn = choose_attention(model, requested, packed)
    # ZeRO-3 gathers a module's weights only around its own forward: the fused kernels read them directly, so are off
    kernels = cfg.fast_path and engine.keeps_fused_kernels
    fast = apply_fast_path(
        model,
        kernels=kernels,
        checkpoint_fraction=recipe.model.checkpoint_fraction if recipe.model.gradient_checkpointing else 1.0,
    )
    if engine.accelerator.is_main_process:
        applied = "; ".join(fast.applied or ["no kernels"])
        print(f"engine {engine.name}; fast path: attention {attn}; {applied}", flush=True)
    return model, optimizer, attn, kernels


def _plot_title(recipe: Recipe, out: Path) -> str:
    """``run 03-cgec/train · model 02-merge_instruct/model · template qwen``: which run, on which model, how."""

    def last_two(path) -> str:
        path = Path(path).resolve()
        return f"{path.parent.name}/{path.name}" if path.parent.name else path.name

    return f"run {last_two(out)} · model {last_two(recipe.model.path)} · template {recipe.template.name}"


def _fresh_accelerator(accelerator_cls, mixed_precision: str):
    """An ``Accelerator`` for this run. accelerate keeps its settings in a process-wide singleton and refuses another
    mixed precision later in the same process (a pipeline's second stage in bf16 after one in fp32); the singleton is
    cleared first, keeping the distributed state (``PartialState``) that torchrun set up."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    # accelerate sets DeepSpeed up only when not told cpu=True (DeepSpeed has its own CPU accelerator)
    cpu = not torch.cuda.is_available() and not deepspeed_launched()
    return accelerator_cls(mixed_precision=mixed_precision, cpu=cpu)


def _resume(path: Path, engine, optimizer, scheduler) -> int:
    """Put the full states of checkpoint ``path`` back into the (possibly sharded) model and optimizer on every rank;
    return its step."""
    weights, state = read_checkpoint(path)
    live = [name for name, _p in trainable_named(engine.unwrapped())]
    restore_trainable(engine, peft_to_live_names(weights, live), path)
    restore_optimizer(engine, optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restore_rng(state, engine.accelerator.process_index)
    return int(state["step"])


def _save_checkpoint(out: Path, step: int, engine, optimizer, scheduler, info: dict) -> None:
    """Gather the full states on every rank (sharded engines need all of them), write them from the main process."""
    weights = gather_trainable(engine)
    state = {
        "optimizer": gather_optimizer(engine, optimizer, step),
        "scheduler": scheduler.state_dict(),
        "rng": _all_ranks(engine.accelerator, rng_state()),
    }
    if engine.accelerator.is_main_process:
        model = engine.unwrapped()
        save_checkpoint(out, step, lambda tmp: model.save_pretrained(tmp, state_dict=weights), state, info)


def _all_ranks(accelerator, value) -> list:
    """``value`` of every rank, in rank order (a list of one without a process group)."""
    if accelerator.num_processes == 1:
        return [value]
    gathered = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def _run_evaluator(evaluator, engine, tokenizer, step, metrics, out, recipe, best) -> dict:
    """Run one in-loop evaluation and keep the best adapter by ``evaluator.best_key``.

    A sharded model (FSDP2, ZeRO-3) gathers its weights inside every forward pass, so every rank runs the same
    evaluation in step (redundant work, but no rank waits on a collective another rank never joins); otherwise the
    main process runs it alone. The values are shared so that all ranks take part in gathering the best adapter.
    """
    accelerator = engine.accelerator
    values = None
    if engine.shards_parameters or accelerator.is_main_process:
        unwrapped = engine.unwrapped()
        unwrapped.eval()
        with attention_for_generation(unwrapped):
            values = evaluator(unwrapped, tokenizer, step)
        unwrapped.train()
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        values = broadcast_object_list([values])[0]
    metrics.log({"step": step, **values})
    key = evaluator.best_key
    if key and (key not in best or values[key] > best[key]):
        best = {**best, key: values[key], f"{key}_step": step}
        weights = gather_trainable(engine)
        if accelerator.is_main_process:
            model = engine.unwrapped()
            _save_final_adapter(out, model, weights, tokenizer, recipe, name="best_adapter", extra={"best": best})
    accelerator.wait_for_everyone()
    return best


def _save_final_adapter(
    out: Path, model, weights: dict, tokenizer, recipe: Recipe, name: str = "adapter", extra: dict | None = None
) -> Path:
    """Write the full (gathered) adapter ``weights`` of ``model`` as a peft adapter folder ``out/name``."""
    with atomic_dir(out / name) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=weights)
        tokenizer.save_pretrained(tmp)
        write_adapter_meta(tmp, {**_adapter_meta(recipe), **(extra or {})})
    return out / name
