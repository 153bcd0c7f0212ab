"""What the engine is compared with: a plain argmax loop that recomputes the whole sequence every token (no cache,
no batching, no drafts), and a stub model whose greedy continuation is known in advance."""

from __future__ import annotations

import torch


@torch.no_grad()
def argmax_loop(model, prompt: list[int], budget: int, stops) -> tuple[list[int], bool]:
    """Greedy tokens after ``prompt``: ``(tokens before the stop token, stopped)``, at most ``budget`` tokens."""
    ids, out = list(prompt), []
    device = next(model.parameters()).device
    for _ in range(budget):
        t = int(model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0, -1].argmax())
        if t in stops:
            return out, True
        out.append(t)
        ids.append(t)
    return out, False


@torch.no_grad()
def sharpen(model, factor: float = 4.0):
    """Scale every weight so that a random model's logits are far apart (no argmax near-ties to flip)."""
    for p in model.parameters():
        p.mul_(factor)
    return model


def stub_model(next_token: dict[int, int], vocab: int = 64):
    """A real transformers Llama whose greedy next token is ``next_token[t]`` after token ``t``, whatever came before
    (else ``t + 1``): one-hot embeddings, attention and MLP outputs zeroed (so the residual stream stays the
    one-hot), and a head that maps each one-hot to its successor. Its layers still run through the engine's cache."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=vocab,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        max_position_embeddings=1024,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(vocab))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        head = torch.zeros(vocab, vocab)
        for t in range(vocab):
            head[next_token.get(t, (t + 1) % vocab), t] = 1.0
        model.lm_head.weight.copy_(head)
    return model


def sharpen_checkpoint(path, factor: float = 4.0):
    """:func:`sharpen` a checkpoint on disk: every tensor of every safetensors shard scaled, dtype and files kept."""
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    for shard in sorted(Path(path).glob("*.safetensors")):
        tensors = load_file(shard)
        save_file({k: (v.float() * factor).to(v.dtype) for k, v in tensors.items()}, shard, metadata={"format": "pt"})
    return path
