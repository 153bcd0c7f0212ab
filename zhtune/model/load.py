"""Load a local base checkpoint for training or inference, and attach, save and reload LoRA adapters.

The base is read with transformers from a local folder only; remote code only with ``trust_remote_code``. When the
tokenizer is larger than the embedding matrix (Chinese-LLaMA/Alpaca extend LLaMA's vocabulary), the embeddings are
resized and both embeddings and output head are trained in full through peft's ``modules_to_save``, so the adapter
carries them. An adapter folder written here is a plain peft adapter plus ``zhtune_adapter.json`` describing how it
was made (base fingerprint, template, data, resolved recipe).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from zhtune.config import LoraConfig, ModelConfig
from zhtune.errors import ConfigError
from zhtune.model.checkpoint_files import MERGE_REPORT, embedding_tensor_name
from zhtune.model.targets import lora_targets

log = logging.getLogger(__name__)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ADAPTER_META = "zhtune_adapter.json"


def load_base_model(config: ModelConfig):
    """Load the base model from a local folder (an original ChatGLM folder is converted once, see
    :func:`zhtune.model.convert.resolve_checkpoint`).

    Raises:
        ConfigError: missing folder or a checkpoint transformers cannot load.
    """
    from transformers import AutoModelForCausalLM

    from zhtune.model.convert import resolve_checkpoint

    path = resolve_checkpoint(config.path)
    if not (path / "config.json").exists():
        raise ConfigError(f"model.path {path} is not a checkpoint folder (no config.json)")
    extra = {}
    if config.quantization != "none":
        device = int(os.environ.get("LOCAL_RANK", 0))  # torchrun / accelerate: one GPU per process
        extra = {"quantization_config": quantization_config(config), "device_map": {"": device}}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path),
            dtype=DTYPES[config.dtype],
            attn_implementation="sdpa" if config.attn_implementation == "auto" else config.attn_implementation,
            trust_remote_code=config.trust_remote_code,
            local_files_only=True,
            **extra,
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the model in {path}: {exc}") from None
    return model


def quantization_config(config: ModelConfig):
    """The bitsandbytes settings for ``model.quantization: 4bit`` (QLoRA: NF4, double quantization).

    Raises:
        ConfigError: no CUDA GPU, or bitsandbytes is not installed.
    """
    from transformers import BitsAndBytesConfig

    if not torch.cuda.is_available():
        raise ConfigError("model.quantization=4bit (QLoRA) needs a CUDA GPU; use quantization: none on this machine")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("model.quantization=4bit needs bitsandbytes: pip install 'zhtune[qlora]'") from None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=DTYPES[config.dtype],
    )


def fit_embeddings(model, vocab_size: int) -> bool:
    """Grow the embeddings (and head) to ``vocab_size`` rows when the tokenizer is larger; return whether it did."""
    weight = model.get_input_embeddings().weight
    rows = getattr(weight, "ds_shape", weight.shape)[0]  # under DeepSpeed ZeRO-3 loading the local shape is empty
    if vocab_size <= rows:
        return False
    log.info("resizing embeddings %d -> %d to fit the tokenizer", rows, vocab_size)
    model.resize_token_embeddings(vocab_size, mean_resizing=True)
    return True


def embedding_module_names(model) -> list[str]:
    """Short names of the input embedding and output head modules (for ``modules_to_save``)."""
    names = []
    wanted = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
    for name, module in model.named_modules():
        if id(module) in wanted:
            names.append(name.rsplit(".", 1)[-1])
    return sorted(set(names))


def upcast_trainable(model) -> None:
    """Keep the trainable weights (and so their optimizer state) in fp32, whatever the base dtype."""
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def attach_lora(model, lora: LoraConfig, resized: bool):
    """Wrap ``model`` with a trainable LoRA adapter (or continue/merge an existing one, ``lora.init_adapter``)."""
    import peft

    if lora.init_adapter is not None:
        path = lora.init_adapter.path
        if not (Path(path) / "adapter_config.json").exists():
            raise ConfigError(f"lora.init_adapter.path {path} is not an adapter folder")
        if lora.init_adapter.mode == "resume_weights":
            return peft.PeftModel.from_pretrained(model, path, is_trainable=True)
        model = peft.PeftModel.from_pretrained(model, path).merge_and_unload()
    modules_to_save = list(lora.modules_to_save)
    if resized:
        extra = [n for n in embedding_module_names(model) if n not in modules_to_save]
        if extra:
            log.info("vocabulary was extended: training %s in full (modules_to_save)", extra)
            modules_to_save += extra
    cfg = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora_targets(model.config.model_type, lora.target_modules),
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        modules_to_save=modules_to_save or None,
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, cfg)


def load_adapter_model(base: str | Path, adapter: str | Path, dtype: str = "fp32", trust_remote_code: bool = False):
    """zhtune's own loader: the base (resized to the adapter's vocabulary if it was extended) plus the adapter."""
    import peft
    from safetensors import safe_open

    model = load_base_model(
        ModelConfig(path=str(base), dtype=dtype, attn_implementation="eager", trust_remote_code=trust_remote_code)
    )
    with safe_open(Path(adapter) / "adapter_model.safetensors", "pt") as f:
        embed = embedding_tensor_name(f.keys())
        rows = f.get_slice(embed).get_shape()[0] if embed else None
    if rows and rows != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(rows)
    return peft.PeftModel.from_pretrained(model, str(adapter)).eval()


def write_adapter_meta(folder: Path, meta: dict) -> None:
    (folder / ADAPTER_META).write_text(json.dumps(meta, indent=2, ensure_ascii=False))


def inference_dtype(dtype: str = "auto") -> str:
    """``auto``: bf16 on a CUDA GPU that has it, fp32 elsewhere (a CPU computes bf16 slowly); else ``dtype``."""
    if dtype != "auto":
        return dtype
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def load_for_inference(
    model_dir: str | Path, adapter: str | Path | None = None, dtype: str = "auto", trust_remote_code: bool = False
):
    """A model ready to generate: the checkpoint, plus ``adapter`` when given, on GPU when there is one.

    Args:
        model_dir: a checkpoint folder (a merged model, or the base of ``adapter``).
        adapter: a peft adapter folder, or None.
        dtype: ``auto`` (see :func:`inference_dtype`), ``bf16``, ``fp16`` or ``fp32``.
        trust_remote_code: allow model code shipped in the checkpoint.

    Raises:
        ConfigError: not a checkpoint folder, or a checkpoint transformers cannot load.
    """
    dtype = inference_dtype(dtype)
    if adapter:
        model = load_adapter_model(model_dir, adapter, dtype, trust_remote_code)
    else:
        model = load_base_model(
            ModelConfig(
                path=str(model_dir), dtype=dtype, attn_implementation="sdpa", trust_remote_code=trust_remote_code
            )
        ).eval()
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model


def recorded_settings(model_dir: str | Path, adapter: str | Path | None = None) -> dict:
    """How a model was trained, as zhtune recorded it: the adapter's ``zhtune_adapter.json`` when an adapter is
    given, else a zhtune-merged model's ``merge_report.json`` (both carry ``template`` and the resolved ``recipe``).

    Returns:
        ``{"template", "system", "enable_thinking", "instruction", "recorded_in"}``; values are None where
        nothing was recorded (``system`` None also means "the template's default system prompt").
    """
    candidates = ([Path(adapter) / ADAPTER_META] if adapter else []) + [Path(model_dir) / MERGE_REPORT]
    for meta_file in candidates:
        if not meta_file.exists():
            continue
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{meta_file}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        if not meta.get("template"):
            continue
        recipe = meta.get("recipe") or {}
        template = recipe.get("template") or {}
        return {
            "template": meta["template"],
            "system": template.get("system"),
            "enable_thinking": template.get("enable_thinking"),
            "instruction": (recipe.get("data") or {}).get("cgec_instruction"),
            "recorded_in": str(meta_file),
        }
    return {"template": None, "system": None, "enable_thinking": None, "instruction": None, "recorded_in": None}


def recorded_template(model_dir: str | Path, adapter: str | Path | None = None) -> str | None:
    """The chat template an adapter was trained with, or that a zhtune-merged model records."""
    return recorded_settings(model_dir, adapter)["template"]
