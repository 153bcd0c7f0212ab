"""The training loss without full logits: cross-entropy computed only at supervised positions, in chunks.

The plain path computes ``[batch, length, vocab]`` logits (152k wide for Qwen) and keeps them, in fp32, for the
backward pass: for a 2048-token row that is 1.2 GiB. Here the final hidden states are captured by a forward hook on
the model's last norm, the model is asked for the logits of one position only (``logits_to_keep=1``), and the head is
applied to the supervised positions alone, a chunk at a time, each chunk re-computed in the backward pass
(activation checkpointing), so at most one chunk of logits exists at a time. When the head is a frozen plain
``nn.Linear`` (LoRA without a trained head), the gradient with respect to the hidden states is computed in the same
pass as the loss (softmax minus one-hot, times the head weight), so the head's matrix product runs twice per chunk
instead of three times and nothing is recomputed. The value equals the plain loss (same matrix products, summed in
fp32). Models whose last norm cannot be found use the plain path (said once).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from zhtune.train.fast import base_transformer, say_once
from zhtune.train.fused_lora import compute_dtype


def _final_norm(base):
    """The module whose output feeds the LM head (``model.norm`` in Llama/Qwen/GLM families), or None."""
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model", None)
    for name in ("norm", "final_layernorm", "ln_f"):
        if decoder is not None and hasattr(decoder, name):
            return getattr(decoder, name)
    return None


def _chunk_ce(head, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(head(hidden).float(), labels, reduction="sum")


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` against ``labels``; the hidden gradient is made in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens: int, dtype: torch.dtype):
        weight = weight.to(dtype)
        need_grad = ctx.needs_input_grad[0]
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for i in range(0, hidden.shape[0], chunk_tokens):
            h, y = hidden[i : i + chunk_tokens].to(dtype), labels[i : i + chunk_tokens]
            logits = (h @ weight.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            rows = torch.arange(h.shape[0], device=h.device)
            total += (lse - logits[rows, y]).sum()
            if not need_grad:
                continue
            probs = logits.sub_(lse.unsqueeze(-1)).exp_()
            probs[rows, y] -= 1.0
            grad_hidden[i : i + chunk_tokens] = probs.to(dtype) @ weight
        if need_grad:
            ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None, None  # loss is linear in nothing else


def _fusable_head(head) -> bool:
    return type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad


def _auto_chunk(vocab: int) -> int:
    """Tokens per chunk so that one chunk's fp32 logits stay near 256 MiB (441 tokens for a 152k vocabulary)."""
    return max(64, 2**26 // max(vocab, 1))


def summed_ce_chunked(model, inputs: dict, labels: torch.Tensor, chunk_tokens: int = 0) -> torch.Tensor | None:
    """Summed next-token cross-entropy over supervised positions; None when the fast path does not apply."""
    base = base_transformer(model)
    norm = _final_norm(base)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if norm is None or head is None:
        say_once("chunked_loss", f"chunked loss: no final norm / output head on {type(base).__name__}; full logits")
        return None
    captured = {}
    handle = norm.register_forward_hook(lambda _m, _i, out: captured.__setitem__("h", out))
    try:
        out = model(**inputs, logits_to_keep=1, use_cache=False)
    finally:
        handle.remove()
    hidden = captured["h"][:, :-1]
    target = labels[:, 1:].to(hidden.device)
    keep = target != -100
    hs, ys = hidden[keep], target[keep]
    total = out.logits.sum() * 0.0  # keeps the graph through the model's own (one-position) head
    chunk_tokens = chunk_tokens or _auto_chunk(head.weight.shape[0])
    if _fusable_head(head):
        dtype = compute_dtype(hs)
        with torch.autocast(hs.device.type, enabled=False):
            return total + _LinearCrossEntropy.apply(hs, head.weight, ys, chunk_tokens, dtype)
    for i in range(0, hs.shape[0], chunk_tokens):
        total = total + checkpoint(
            _chunk_ce, head, hs[i : i + chunk_tokens], ys[i : i + chunk_tokens], use_reentrant=False
        )
    return total
