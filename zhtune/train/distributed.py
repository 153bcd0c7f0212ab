"""How the training loop runs on 1..N processes: DDP, FSDP2 or DeepSpeed ZeRO-2/3, chosen by ``accelerate launch``.

The loop asks an *engine* for the few things that differ between them: wrapping the model and optimizer, whether
gradients synchronise on a micro-batch, the backward pass, the optimizer step with gradient clipping (and its norm),
and the full (unsharded) trainable weights and optimizer state, gathered on the main process for checkpoints and the
final adapter, and put back on resume. Checkpoints therefore have one format for every engine: a normal peft adapter
plus Adam moments keyed by parameter name.

* ``DataParallel``: one process, or DDP (``torchrun``, ``recipes/accelerate/ddp.yaml``), through accelerate.
* ``Fsdp2``: ``fully_shard`` on every decoder layer and on the ``*ForCausalLM`` inside peft (so ``generate`` goes
  through the root too), ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``: the LoRA weights and their
  optimizer state stay fp32 next to the bf16 base (FSDP2 only requires a uniform dtype among *trainable*
  parameters), gradients accumulate and reduce in fp32. Applied here rather than by accelerate, because accelerate
  prepares FSDP only on GPUs (on CPU it silently runs DDP) and the same code must run in the CPU tests.
* ``DeepSpeedZero``: ZeRO stage 2 or 3 through accelerate. Accumulation, micro-batch size and clipping are written
  into the DeepSpeed config from the recipe, the engine's own accumulation boundary is set for every micro-batch
  and the engine steps once per zhtune step (accelerate's wrapper would step inside every ``backward``); the
  clipping is DeepSpeed's and its norm is reported. Under bf16 DeepSpeed keeps the module in bf16 and the fp32
  master weights in its optimizer; those fp32 masters are what is gathered and saved. ZeRO-3 gathers a module's
  weights only around that module's own forward, so the fused LoRA layers and the chunked loss (which read weights
  directly) are off under ZeRO-3. Resuming a DeepSpeed run is refused: its optimizer creates Adam state only at
  the first step, so a restored state cannot be put back exactly; a DeepSpeed checkpoint resumes under DDP or FSDP2.

Anything else (FSDP1, CPU offload, DeepSpeed stage 0/1, accelerate's own FSDP activation checkpointing, fp16 with a
sharding engine, QLoRA with a sharding engine) stops with a message saying what to use instead: none of it is
tested.
"""

from __future__ import annotations

import contextlib
import os

import torch

from zhtune.errors import ConfigError
from zhtune.train.fast import base_transformer, say_once

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def trainable_named(model) -> list[tuple[str, torch.nn.Parameter]]:
    """The trainable parameters of the (unwrapped) peft model, in module order, with their peft names."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


class DataParallel:
    """One process or DDP through accelerate: every rank holds the whole model."""

    name = "ddp"
    shards_parameters = False
    keeps_fused_kernels = True
    # the forward runs under autocast (DDP) or casts every parameter to one compute dtype (FSDP2's policy), so the
    # LoRA layers need no input casts of their own; DeepSpeed does neither (fp32 LoRA next to a bf16 base needs them)
    casts_dtypes = True

    def __init__(self, accelerator):
        self.accelerator = accelerator
        if accelerator.num_processes == 1:
            self.name = "single"

    def place(self, model) -> None:
        """Move the whole model to this rank's device before :meth:`prepare`."""
        model.to(self.accelerator.device)

    def prepare(self, model, make_optimizer):
        """Wrap ``model`` (DDP, autocast) and build its optimizer; return ``(model, torch optimizer)``."""
        optimizer = make_optimizer([p for _, p in trainable_named(model)])
        self.model, self.prepared = self.accelerator.prepare(model, optimizer)
        return self.model, optimizer

    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def sync(self, last: bool):
        """Context for one micro-batch: gradients are all-reduced on the last micro-batch of a step only."""
        return contextlib.nullcontext() if last else self.accelerator.no_sync(self.model)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.accelerator.backward(loss)

    def step(self, max_norm: float) -> float | None:
        """Clip (when ``max_norm`` > 0), step and zero the gradients; return the norm before clipping."""
        params = [p for _, p in trainable_named(self.unwrapped())]
        norm = self.accelerator.clip_grad_norm_(params, max_norm) if max_norm > 0 else None
        self.prepared.step()
        self.prepared.zero_grad(set_to_none=True)
        return None if norm is None else float(norm)

    def full_tensor(self, param, key: str | None = None, optimizer=None) -> torch.Tensor | None:
        """The whole value of ``param`` (``key`` None) or of its optimizer state ``key``; None if absent."""
        value = param if key is None else optimizer.state.get(param, {}).get(key)
        return None if value is None else value.detach()

    def load_tensor(self, param, value: torch.Tensor) -> None:
        with torch.no_grad():
            param.copy_(value.to(param.device, param.dtype))

    def local_state(self, param, value: torch.Tensor) -> torch.Tensor:
        return value.to(param.device)


class Fsdp2(DataParallel):
    """FSDP2 (``torch.distributed.fsdp.fully_shard``), applied here to decoder layers and the ``*ForCausalLM``."""

    name = "fsdp2"
    shards_parameters = True

    def __init__(self, accelerator, plugin, compute_dtype: torch.dtype):
        self.accelerator, self.plugin, self.compute_dtype = accelerator, plugin, compute_dtype

    def place(self, model) -> None:
        """Nothing: ``fully_shard`` moves each rank's shards to its device, one layer at a time."""

    def prepare(self, model, make_optimizer):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy()
        if self.compute_dtype != torch.float32:
            policy = MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32)
        base = base_transformer(model)
        names = set(getattr(base, "_no_split_modules", None) or ())
        layers = [m for m in base.modules() if type(m).__name__ in names]
        if not layers:
            say_once("fsdp_layers", f"FSDP2: {type(base).__name__} names no decoder layer class; one FSDP unit")
        reshard = bool(self.plugin.reshard_after_forward) if self.plugin is not None else True
        for layer in layers:
            fully_shard(layer, mp_policy=policy, reshard_after_forward=reshard)
        fully_shard(base, mp_policy=policy)
        self.root, self.model = base, model
        optimizer = make_optimizer([p for _, p in trainable_named(model)])
        self.prepared = optimizer
        return model, optimizer

    def unwrapped(self):
        return self.model

    def sync(self, last: bool):
        self.root.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def step(self, max_norm: float) -> float | None:
        from torch.distributed.tensor import DTensor

        params = [p for _, p in trainable_named(self.model)]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if max_norm > 0 else None
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        self.prepared.step()
        self.prepared.zero_grad(set_to_none=True)
        return None if norm is None else float(norm)

    def full_tensor(self, param, key: str | None = None, optimizer=None) -> torch.Tensor | None:
        value = super().full_tensor(param, key, optimizer)
        return value.full_tensor() if hasattr(value, "full_tensor") else value

    def load_tensor(self, param, value: torch.Tensor) -> None:
        with torch.no_grad():
            param.to_local().copy_(self.local_state(param, value.to(param.dtype)).to_local())

    def local_state(self, param, value: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)


class DeepSpeedZero(DataParallel):
    """DeepSpeed ZeRO-2 or ZeRO-3 through accelerate, one engine step per zhtune step."""

    shards_parameters = False
    casts_dtypes = False

    def __init__(self, accelerator, stage: int, recipe):
        self.accelerator, self.stage = accelerator, stage
        self.name = f"deepspeed-zero{stage}"
        self.shards_parameters = stage == 3
        self.keeps_fused_kernels = stage != 3
        cfg = recipe.train
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        # the recipe is the contract: its accumulation, micro-batch and clipping, whatever the launcher file says
        ds["train_micro_batch_size_per_gpu"] = cfg.micro_batch_size
        ds["gradient_accumulation_steps"] = cfg.grad_accum
        ds["train_batch_size"] = cfg.micro_batch_size * cfg.grad_accum * accelerator.num_processes
        ds["gradient_clipping"] = max(cfg.max_grad_norm, 0.0)
        accelerator.gradient_accumulation_steps = cfg.grad_accum

    def prepare(self, model, make_optimizer):
        optimizer = make_optimizer([p for _, p in trainable_named(model)])
        self.model, self.prepared = self.accelerator.prepare(model, optimizer)
        return self.model, optimizer

    def unwrapped(self):
        return self.model.module

    def sync(self, last: bool):
        self.model.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        # DeepSpeed divides the loss by its accumulation steps; the loop's loss is already a share of the step's sum
        self.model.backward(loss * self.model.gradient_accumulation_steps())
        if last:
            self.model.step()  # clip (gradient_clipping), optimizer step, zero grad: once per zhtune step

    def step(self, max_norm: float) -> float | None:
        norm = self.model.get_global_grad_norm()
        return None if norm is None or max_norm <= 0 else float(norm)

    def full_tensor(self, param, key: str | None = None, optimizer=None) -> torch.Tensor | None:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        value = safe_get_full_fp32_param(param) if key is None else safe_get_full_optimizer_state(param, key)
        return None if value is None else value.detach()

    def load_tensor(self, param, value: torch.Tensor) -> None:
        raise ConfigError("resuming a DeepSpeed run is not supported; resume its checkpoint under DDP or FSDP2")


def deepspeed_launched() -> bool:
    """Whether ``accelerate launch`` was given a DeepSpeed config (its launcher says so in the environment)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def select_engine(accelerator, recipe):
    """The engine for this launch, read from accelerate's state (and, on CPU, from its launcher's FSDP setting).

    Raises:
        ConfigError: a distributed setup zhtune does not run (it says what to use instead).
    """
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    fsdp = kind == DistributedType.FSDP or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if deepspeed_launched() and kind != DistributedType.DEEPSPEED:
        raise ConfigError("accelerate did not set up DeepSpeed (no GPU?); use recipes/accelerate/fsdp.yaml on CPU")
    if kind == DistributedType.DEEPSPEED:
        _check_sharded(recipe, "DeepSpeed")
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if world != accelerator.num_processes:
            raise ConfigError(
                f"accelerate counts {accelerator.num_processes} process(es) but DeepSpeed {world}: accelerate sets up "
                "DeepSpeed for several processes only on GPUs; on CPU use recipes/accelerate/fsdp.yaml"
            )
        plugin = accelerator.state.deepspeed_plugin
        zero = plugin.deepspeed_config.get("zero_optimization", {})
        offload = [k for k in ("offload_optimizer", "offload_param") if zero.get(k, {}).get("device", "none") != "none"]
        if plugin.zero_stage not in (2, 3) or offload:
            raise ConfigError(
                f"DeepSpeed ZeRO stage {plugin.zero_stage}{' with ' + ', '.join(offload) if offload else ''} is not "
                "supported; use zero_stage 2 or 3 without offload (recipes/accelerate/deepspeed_zero2.yaml, "
                "deepspeed_zero3.yaml)"
            )
        if plugin.zero_stage == 3 and recipe.lora.init_adapter is not None:
            raise ConfigError("lora.init_adapter is not supported under DeepSpeed ZeRO-3; use FSDP2 or ZeRO-2")
        if recipe.train.resume_from:
            raise ConfigError(
                "train.resume_from: resuming a DeepSpeed run is not supported (DeepSpeed creates its Adam state at "
                "the first step); resume the checkpoint with recipes/accelerate/fsdp.yaml or ddp.yaml and the same "
                "number of processes"
            )
        return DeepSpeedZero(accelerator, plugin.zero_stage, recipe)
    if fsdp:
        _check_sharded(recipe, "FSDP")
        return Fsdp2(accelerator, _fsdp_plugin(accelerator), _compute_dtype(recipe))
    if kind in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
        return DataParallel(accelerator)
    raise ConfigError(
        f"accelerate distributed type {kind} is not supported; use DDP, FSDP2 or DeepSpeed ZeRO-2/3 "
        "(recipes/accelerate/)"
    )


def _compute_dtype(recipe) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[recipe.model.dtype]


def _check_sharded(recipe, engine: str) -> None:
    if recipe.model.dtype == "fp16":
        raise ConfigError(f"model.dtype fp16 is not supported under {engine}; use bf16")
    if recipe.model.quantization != "none":
        raise ConfigError(f"model.quantization {recipe.model.quantization} (QLoRA) is not supported under {engine}")


def _fsdp_plugin(accelerator):
    """accelerate's FSDP settings (on CPU, where accelerate makes none, read from its launcher's environment)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = getattr(accelerator.state, "fsdp_plugin", None) or FullyShardedDataParallelPlugin()
    problems = []
    if plugin.fsdp_version != 2:
        problems.append(f"fsdp_version {plugin.fsdp_version} (set fsdp_version: 2)")
    if type(plugin.cpu_offload).__name__ == "CPUOffloadPolicy" or getattr(plugin.cpu_offload, "offload_params", False):
        problems.append("fsdp_offload_params (set it false)")
    if plugin.activation_checkpointing:
        problems.append("fsdp_activation_checkpointing (set it false; model.gradient_checkpointing does this)")
    if plugin.cpu_ram_efficient_loading:
        problems.append("fsdp_cpu_ram_efficient_loading (set it false)")
    if problems:
        raise ConfigError("FSDP settings not supported: " + "; ".join(problems) + " (see recipes/accelerate/fsdp.yaml)")
    return plugin


# ---- full states: gathered on every rank's call, kept by the main process ----


def gather_trainable(engine) -> dict[str, torch.Tensor]:
    """Full fp32 trainable weights by peft name, on CPU (every rank must call; all ranks receive them)."""
    return {n: engine.full_tensor(p).float().cpu() for n, p in trainable_named(engine.unwrapped())}


def gather_optimizer(engine, optimizer, step: int) -> dict:
    """Full Adam state by parameter name (``{"state": {name: {step, exp_avg, exp_avg_sq}}, "param_groups"}``)."""
    state = {}
    for name, p in trainable_named(engine.unwrapped()):
        moments = {k: engine.full_tensor(p, k, optimizer) for k in ADAM_KEYS}
        if all(v is not None for v in moments.values()):
            state[name] = {"step": torch.tensor(float(step)), **{k: v.float().cpu() for k, v in moments.items()}}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return {"state": state, "param_groups": groups}


def restore_trainable(engine, weights: dict[str, torch.Tensor], where) -> None:
    """Put full trainable weights (by peft name) back into the (possibly sharded) model.

    Raises:
        ConfigError: the checkpoint lacks a trainable tensor of this model or has extra ones.
    """
    named = dict(trainable_named(engine.unwrapped()))
    missing, extra = sorted(set(named) - set(weights)), sorted(set(weights) - set(named))
    if missing or extra:
        raise ConfigError(f"checkpoint {where} does not fit this model: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, p in named.items():
        engine.load_tensor(p, weights[name])


def restore_optimizer(engine, optimizer, saved: dict) -> None:
    """Load a :func:`gather_optimizer` state into the torch optimizer (sharded like its parameters)."""
    named = trainable_named(engine.unwrapped())
    if all(isinstance(k, int) for k in saved["state"]):  # torch's own index-keyed state (one process, or DDP)
        optimizer.load_state_dict(saved)
        return
    index = {name: i for i, (name, _p) in enumerate(named)}
    state = {}
    for name, entry in saved["state"].items():
        p = named[index[name]][1]
        state[index[name]] = {"step": entry["step"], **{k: engine.local_state(p, entry[k]) for k in ADAM_KEYS}}
    groups = [{**g, "params": list(range(len(named)))} for g in saved["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
