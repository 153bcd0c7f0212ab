"""Tiny random models built from configs and loaded from disk exactly like real checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


# ``python KILL.py STEP WHERE ARGS...``: ``zhtune ARGS...``, every rank SIGKILLed right after the checkpoint of STEP
# of the run whose output folder contains WHERE is complete on all ranks (a known point, not a race against a timer)
KILL_AFTER_CHECKPOINT = """
import os, signal, sys
import torch
import zhtune.train.loop as loop
real, at, where = loop._save_checkpoint, int(sys.argv.pop(1)), sys.argv.pop(1)
def save_then_die(out, step, *args, **kwargs):
    real(out, step, *args, **kwargs)
    if step == at and where in str(out):
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        os.kill(os.getpid(), signal.SIGKILL)
loop._save_checkpoint = save_then_die
from zhtune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def kill_after_checkpoint(tmp: Path, step: int, where: str = "") -> list[str]:
    """The command line prefix (``python SCRIPT STEP WHERE``) of a zhtune run killed after that checkpoint."""
    script = tmp / "kill_after_checkpoint.py"
    script.write_text(KILL_AFTER_CHECKPOINT)
    return [str(script), str(step), where]


def subprocess_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child Python: the checkout first on ``PYTHONPATH`` (whatever else was on it
    kept, e.g. carried wheels), plus ``extra``."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


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


def tiny_model_dir(path: Path, arch: str, vocab_size: int = 256, seed: int = 0, max_shard_size: str | None = None):
    """Save a tiny random model of ``arch`` (qwen2, llama, glm, phi3) to ``path`` and return the folder."""
    import transformers

    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    config = {
        "qwen2": lambda: transformers.Qwen2Config(**common, tie_word_embeddings=True),
        "llama": lambda: transformers.LlamaConfig(**common),
        "glm": lambda: transformers.GlmConfig(**common, head_dim=8, pad_token_id=0),
        "phi3": lambda: transformers.Phi3Config(**common, pad_token_id=0),  # fused qkv_proj and gate_up_proj
    }[arch]()
    model = transformers.AutoModelForCausalLM.from_config(config)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


def load_fp32(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def tiny_checkpoint(path: Path, arch: str, shared: Path, tokenizer: str, seed: int = 0, vocab_size: int | None = None):
    """A tiny random checkpoint of ``arch`` with a real tokenizer from ``shared/tokenizers`` copied beside it.

    Shapes are the real family's scaled down (hidden 64, 2 layers, 4 heads, 2 KV heads); the vocabulary is the real
    tokenizer's unless ``vocab_size`` is given (a smaller one models LLaMA before Chinese-LLaMA extended it).
    """
    import shutil

    import transformers

    from tests.tokenizers import build_tokenizer_dir

    tok_dir = build_tokenizer_dir(tokenizer, shared, path.parent / "tokenizer-cache")
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    vocab = vocab_size or len(tok)
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    config = {
        "qwen2": lambda: transformers.Qwen2Config(
            **common, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True
        ),
        "llama": lambda: transformers.LlamaConfig(**common, rms_norm_eps=1e-5),
        "glm": lambda: transformers.GlmConfig(**common, head_dim=16, pad_token_id=tok.pad_token_id or 0),
    }[arch]()
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    for f in tok_dir.iterdir():
        if f.name not in ("config.json", "generation_config.json", "params.json"):
            shutil.copy(f, path / f.name)
    return path


# The families users hold as bf16 checkpoints: (architecture, shared tokenizer, shared folder with the real
# generation_config.json, chat template name, the real embedding rows — padded past the tokenizer as released).
REAL_FAMILIES = {
    "qwen2.5": ("qwen2", "qwen2.5-0.5b-instruct", "qwen2.5-0.5b-instruct", "qwen", 151936),
    "glm4": ("glm", "glm-4-9b-chat", "glm-4-9b-chat", "glm4", 151552),
    "llama2": ("llama", "llama-2-7b", "llama-2-7b", "llama2", 32000),
}


def real_checkpoint(path: Path, family: str, shared: Path, seed: int = 0, max_shard_size: str = "8MB") -> Path:
    """A tiny random checkpoint that looks like the ones users have: **bf16** weights in several safetensors shards,
    the family's real tokenizer files and its real ``generation_config.json`` (sampling settings, repetition penalty
    and end-of-turn ids included) from ``shared``, special-token ids in ``config.json`` as the real one has them, and
    the real padded embedding size (more rows than the tokenizer has tokens).

    Args:
        path: folder to create.
        family: a key of :data:`REAL_FAMILIES` (``qwen2.5``, ``glm4``, ``llama2``).
        shared: the ``../shared`` folder.
        seed: weight seed.
        max_shard_size: passed to ``save_pretrained`` (the default gives 3+ shards for a 150k vocabulary).

    Returns:
        ``path``.
    """
    import json
    import shutil

    import transformers

    from tests.tokenizers import build_tokenizer_dir

    arch, tokenizer, gen_dir, _template, rows = REAL_FAMILIES[family]
    tok_dir = build_tokenizer_dir(tokenizer, shared, path.parent / "tokenizer-cache")
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    generation = json.loads((shared / "tokenizers" / gen_dir / "generation_config.json").read_text())
    eos = generation.get("eos_token_id")
    ids = dict(
        eos_token_id=eos,
        pad_token_id=generation.get("pad_token_id", tok.pad_token_id),
        bos_token_id=generation.get("bos_token_id", tok.bos_token_id),
    )
    torch.manual_seed(seed)
    common = dict(
        vocab_size=max(rows, len(tok)),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        **ids,
    )
    config = {
        "qwen2": lambda: transformers.Qwen2Config(
            **common, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True
        ),
        "llama": lambda: transformers.LlamaConfig(**common, rms_norm_eps=1e-5),
        "glm": lambda: transformers.GlmConfig(**common, head_dim=16),
    }[arch]()
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2))  # the real file, unchanged
    for f in tok_dir.iterdir():
        if f.name not in ("config.json", "generation_config.json", "params.json"):
            shutil.copy(f, path / f.name)
    return path
