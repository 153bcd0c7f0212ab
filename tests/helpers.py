"""Tiny random models built from configs and loaded from disk exactly like real checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_qwen2(path: Path, vocab_size: int = 512, seed: int = 0, attn: str = "eager"):
    """Save a 2-layer random Qwen2 (the real Qwen2.5 layout, scaled down) to ``path`` and load it back."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)
    return model.eval()
