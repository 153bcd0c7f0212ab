"""Which modules LoRA targets, per architecture: one explicit table keyed by ``config.model_type``.

``auto`` looks the model type up here (an unknown type is an error that lists the known ones and suggests
``all-linear``); ``all-linear`` lets peft pick every linear layer but the output head; a list is used as given.
"""

from __future__ import annotations

from zhtune.errors import ConfigError

_ATTN_MLP = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "qwen2": _ATTN_MLP,
    "qwen3": _ATTN_MLP,
    "llama": _ATTN_MLP,  # LLaMA-2, Chinese-LLaMA/Alpaca (extended vocabulary), Llama-3
    "mistral": _ATTN_MLP,
    # GLM-4 (-hf), and ChatGLM2/3 and GLM-4 converted from their original layout by zhtune convert
    "glm": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"),
    "glm4": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"),
    # ChatGLM-6B converted by zhtune (zhtune.model.chatglm); ChatGLM2/3 and GLM-4 convert to "glm"
    "zhtune_chatglm": ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"),
    "chatglm": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),  # the original remote-code layout
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
}


def lora_targets(model_type: str, requested: str | tuple[str, ...]) -> str | list[str]:
    """Resolve the recipe's ``target_modules`` for ``model_type``.

    Raises:
        ConfigError: ``auto`` for a model type without a table entry.
    """
    if requested == "all-linear":
        return "all-linear"
    if isinstance(requested, str) and requested != "auto":
        return [requested]
    if requested != "auto":
        return list(requested)
    if model_type not in LORA_TARGETS:
        raise ConfigError(
            f"no LoRA target table for model_type {model_type!r} (known: {', '.join(sorted(LORA_TARGETS))}); "
            "set lora.target_modules to all-linear or a list of module names"
        )
    return list(LORA_TARGETS[model_type])
