"""The training fast path: which speed-ups apply to a model, applied in one place, and said once when one cannot.

``apply_fast_path(model, ...)`` is called by the training loop (``train.fast_path``, default on) on the peft model:

* fused LoRA linear layers (``zhtune.train.fused_lora``): our own autograd function, on every device;
* liger-kernel's fused RMSNorm, SwiGLU and RoPE (Triton) for the architectures liger knows, on CUDA when the
  ``liger-kernel`` package is installed; its cross-entropy is not used (``zhtune.train.loss`` does the loss);
* for transformers' ``glm`` (ChatGLM2/3, GLM-4), which liger does not cover: our Triton SwiGLU over the fused
  ``gate_up_proj`` and partial interleaved RoPE, and liger's RMSNorm (``zhtune.train.glm_kernels``), on CUDA;
* selective gradient checkpointing: only the first ``checkpoint_fraction`` of the decoder layers recompute their
  activations in the backward pass (1.0: all of them, the transformers default).

Every piece keeps the loss equal to the plain path within bf16 rounding (tests/train/test_fast.py, and the 50-step
parity run of benchmarks/train_throughput.py). Where a piece is unavailable (no CUDA, liger not installed, an
architecture liger does not cover) training goes on without it and a single log line says why.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
from dataclasses import dataclass, field

from zhtune.train.fused_lora import fuse_lora_layers

log = logging.getLogger(__name__)
_said: set[str] = set()


@dataclass
class FastPathReport:
    """What ``apply_fast_path`` did: the pieces applied, and why the others were not."""

    applied: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def say_once(key: str, message: str) -> None:
    """Log ``message`` as a warning the first time ``key`` is seen in this process."""
    if key not in _said:
        _said.add(key)
        log.warning(message)


def base_transformer(model):
    """The ``*ForCausalLM`` inside a peft (and DDP/accelerate ``.module``) wrapper."""
    inner = getattr(model, "module", model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def _on_cuda(base) -> bool:
    import torch

    return torch.cuda.is_available() and next(base.parameters()).device.type == "cuda"


def apply_liger(model) -> str | None:
    """Patch liger's RMSNorm/SwiGLU/RoPE into ``model``; None when applied, else the reason it was not."""
    base = base_transformer(model)
    if not _on_cuda(base):
        return "liger kernels need CUDA (the model is not on a GPU)"
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance
    except Exception as exc:  # ImportError, or Triton missing/broken
        return f"liger-kernel is not usable here ({type(exc).__name__}: {exc}); pip install liger-kernel"
    model_type = getattr(base.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return f"liger-kernel has no kernels for model type {model_type!r}"
    scoped_module_patch(
        importlib.import_module(type(base).__module__),
        lambda: _apply_liger_kernel_to_instance(
            base, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
        ),
    )
    return None


def scoped_module_patch(module, apply) -> None:
    """Run ``apply`` (which patches the model instance and, as liger does, the modeling module's globals), then put
    the module's classes back so models built later in this process (merge verification, inference, on any device)
    are plain; a patched rotary function stays for CUDA tensors and hands other tensors to the original."""
    saved = dict(vars(module))
    apply()
    for name, original in saved.items():
        patched = getattr(module, name, None)
        if patched is original:
            continue
        if name.startswith("apply_rotary") and callable(patched):
            setattr(module, name, _cuda_only(patched, original))
        else:
            setattr(module, name, original)


def _cuda_only(fast_fn, plain_fn):
    def rotary(q, *args, **kwargs):
        return (fast_fn if q.is_cuda else plain_fn)(q, *args, **kwargs)

    rotary.__wrapped__ = plain_fn
    return rotary


def select_checkpointed_layers(model, fraction: float) -> int:
    """Keep gradient checkpointing on the first ``ceil(fraction * layers)`` decoder layers only; return that count."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in base_transformer(model).modules() if isinstance(m, GradientCheckpointingLayer)]
    keep = math.ceil(fraction * len(layers))
    for i, layer in enumerate(layers):
        if i >= keep:
            layer.gradient_checkpointing = False
    return keep


def choose_attention(model, requested: str, packed: bool) -> str:
    """Resolve ``model.attn_implementation: auto``: flex attention for packed rows on CUDA (its block mask skips the
    tiles between documents), SDPA otherwise; an explicit choice is kept. Returns the implementation in use."""
    if requested != "auto":
        return requested
    base = base_transformer(model)
    if packed and _on_cuda(base):
        try:
            base.set_attn_implementation("flex_attention")
            return "flex_attention"
        except (ValueError, ImportError, AttributeError) as exc:
            say_once("flex", f"fast path: flex attention unavailable for {type(base).__name__} ({exc}); using SDPA")
    elif packed:
        say_once("flex", "fast path: flex attention needs CUDA for training; using SDPA with a block mask")
    return getattr(base.config, "_attn_implementation", "sdpa")


@contextlib.contextmanager
def attention_for_generation(model):
    """Generate with SDPA while training uses flex attention: flex would recompile for every new decoding length."""
    base = base_transformer(model)
    previous = getattr(base.config, "_attn_implementation", None)
    if previous != "flex_attention":
        yield model
        return
    base.set_attn_implementation("sdpa")
    try:
        yield model
    finally:
        base.set_attn_implementation(previous)


def apply_glm(model, report: FastPathReport) -> None:
    """Apply ``zhtune.train.glm_kernels`` to a ``glm`` model on CUDA; record what applied and why the rest did not."""
    from zhtune.train.glm_kernels import apply_glm_kernels

    base = base_transformer(model)
    if not _on_cuda(base):
        skipped = {"glm_kernels": "the glm kernels need CUDA (the model is not on a GPU)"}
    else:
        applied, skipped = apply_glm_kernels(base)
        report.applied += [f"glm {piece}" for piece in applied]
    for piece, reason in skipped.items():
        report.skipped[piece] = reason
        say_once(f"glm:{piece}", f"fast path: {reason}; using the transformers implementation")


def apply_layer_kernels(model, report: FastPathReport) -> None:
    """The RMSNorm/SwiGLU/RoPE kernels: ours for ``glm``, liger's for the architectures it knows (CUDA only)."""
    if getattr(base_transformer(model).config, "model_type", None) == "glm":
        apply_glm(model, report)
        return
    reason = apply_liger(model)
    if reason is None:
        report.applied.append("liger RMSNorm/SwiGLU/RoPE")
    else:
        report.skipped["liger"] = reason
        say_once("liger", f"fast path: {reason}; using the transformers implementations")


def apply_fast_path(
    model, *, kernels: bool = True, layer_kernels: bool = True, checkpoint_fraction: float = 1.0
) -> FastPathReport:
    """Apply the fast-path pieces to a peft model in place; log once for each piece that cannot apply.

    Args:
        model: the peft model (its base model is patched in place).
        kernels: fused LoRA layers and, with ``layer_kernels``, the RMSNorm/SwiGLU/RoPE kernels.
        layer_kernels: off keeps transformers' layers (the benchmarks' "before" of the kernels).
        checkpoint_fraction: checkpoint only this first fraction of the decoder layers.

    Returns:
        What was applied and, per piece, why the others were not.
    """
    report = FastPathReport()
    if kernels:
        n = fuse_lora_layers(model)
        if n:
            report.applied.append(f"fused LoRA linear ({n} layers)")
        else:
            report.skipped["fused_lora"] = "no peft LoRA linear layers"
    if kernels and layer_kernels:
        apply_layer_kernels(model, report)
    if checkpoint_fraction < 1.0:
        kept = select_checkpointed_layers(model, checkpoint_fraction)
        report.applied.append(f"gradient checkpointing on the first {kept} decoder layers")
    return report
