"""zhtune's own ChatGLM-6B (v1) for transformers: the GLM-130B-style architecture without remote code.

ChatGLM-6B is not a Llama-like decoder and transformers has no implementation of it. What makes it different, as
its original ``modeling_chatglm.py`` computes it (``tests/model`` compares against that code):

* 2D rotary positions. The first half of every head rotates by the token's position, the second half by its block
  position. Up to ``<sop>`` (the bos token) positions count 0, 1, … and block positions are 0; from ``<sop>`` on
  every token takes the position of ``[gMASK]`` (or ``[MASK]``) and block positions count 1, 2, … Rotation is
  rotate-half (NeoX style) within each half, with frequencies rounded to fp16 as the original stores them.
* Prefix-LM attention: the tokens before ``<sop>`` see each other in both directions; from ``<sop>`` on, causal.
* Post-LN residuals scaled by ``alpha = sqrt(2 * layers)``: ``h = LN(x) * alpha + f(LN(x))``, per sublayer, where
  ``layers`` is 28 whatever the depth (the original block's default argument, which its model never overrides).
* LayerNorm with bias, a GELU (tanh) MLP, biases on q/k/v/o and on the MLP, an untied output head.

The checkpoint keeps q, k and v as separate projections (``zhtune convert`` splits the original's fused,
per-head-interleaved ``query_key_value``), so LoRA targets the usual names. Inputs follow transformers' conventions:
``position_ids`` may be the 2D ``[batch, 2, length]`` positions (as the original tokenizer makes them), or 1D
positions that restart at 0 for each packed document, or absent (one document per row; padding from
``attention_mask``); a 4D ``attention_mask`` is a mask of allowed keys (bool, or additive 0/min) to which the
prefix-LM context of each document is added. With a KV cache, positions of new tokens come from the prompt's
``[gMASK]``/``<sop>``, remembered on the cache at the first forward (``generate`` also passes them explicitly).

Not supported (refused by ``zhtune convert``): p-tuning prefixes, quantized int4/int8 weights, 1D position encoding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from zhtune.model.chatglm_config import ZhtuneChatGLMConfig

# transformers renamed the cache field of model outputs from ``past_key_values`` (5.17) to ``cache`` (5.24)
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
_ROWS = "_zhtune_glm_rows"  # per-row (mask position, <sop> index, document start) remembered on a KV cache


def _documents(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(doc, idx)``: each token's document number in its row (-1 for padding) and its index in that document.

    Documents start where 1D ``position_ids`` restart at 0 (packed rows); without them a row is one document.
    Padding (``attention_mask == 0`` in a 2D mask) belongs to no document.
    """
    b, n = input_ids.shape
    t = torch.arange(n, device=input_ids.device).expand(b, n)
    real = attention_mask.bool() if attention_mask is not None and attention_mask.dim() == 2 else None
    if real is not None and real.shape[1] != n:
        real = real[:, -n:]
    if position_ids is not None and position_ids.dim() == 2:
        starts = (position_ids == 0) | (t == 0)
    elif real is not None:
        starts = real & ~torch.cat([real.new_zeros(b, 1), real[:, :-1]], dim=1)  # first real token of a row
        starts[:, 0] = True
    else:
        starts = t == 0
    doc = starts.long().cumsum(1) - 1
    start_at = torch.where(starts, t, torch.zeros_like(t)).cummax(1).values
    idx = t - start_at
    if real is not None:
        doc = torch.where(real, doc, torch.full_like(doc, -1))
        if position_ids is None or position_ids.dim() != 2:
            idx = torch.where(real, real.long().cumsum(1) - 1, torch.zeros_like(idx))
    return doc, idx


def _first_index(slot: torch.Tensor, hit: torch.Tensor, idx: torch.Tensor, slots: int, missing: int) -> torch.Tensor:
    """Per slot, the smallest ``idx`` where ``hit`` holds (``missing`` when it never does)."""
    values = torch.where(hit, idx, torch.full_like(idx, missing)).flatten()
    out = torch.full((slots,), missing, dtype=idx.dtype, device=idx.device)
    return out.scatter_reduce(0, slot.flatten(), values, reduce="amin")


def glm_positions(input_ids: torch.Tensor, doc: torch.Tensor, idx: torch.Tensor, config: ZhtuneChatGLMConfig):
    """2D positions ``[batch, 2, length]`` and, per token, whether it is context (before ``<sop>``) of its document.

    Follows the original tokenizer's ``_pad``: a document without ``<sop>`` is all context with block positions 0
    (here it is attended causally, so text without ``<sop>`` cannot see its own future); ``[gMASK]`` is preferred to
    ``[MASK]`` as the original model's ``forward`` does. Returns ``(position_ids, is_context, (mask_pos, ctx))`` where
    the last pair is per token (the values of its document).
    """
    b, n = input_ids.shape
    slots = b * n + 1
    slot = torch.where(doc >= 0, doc + torch.arange(b, device=doc.device)[:, None] * n, torch.full_like(doc, b * n))
    missing = n + 1
    ctx = _first_index(slot, input_ids == config.bos_token_id, idx, slots, missing)
    doc_len = torch.zeros(slots, dtype=idx.dtype, device=idx.device).scatter_reduce(
        0, slot.flatten(), (idx + 1).flatten(), reduce="amax"
    )
    gmask = _first_index(slot, input_ids == config.gmask_token_id, idx, slots, missing)
    mask = _first_index(slot, input_ids == config.mask_token_id, idx, slots, missing)
    mask_pos = torch.where(gmask < missing, gmask, mask)[slot]
    has_bos = ctx[slot] < missing
    ctx_tok = torch.where(has_bos, ctx[slot], doc_len[slot])
    generated = idx >= ctx_tok
    position = torch.where(generated & (mask_pos < missing), mask_pos, idx)
    block = torch.where(generated, idx - ctx_tok + 1, torch.zeros_like(idx))
    pad = doc < 0
    position, block = position.masked_fill(pad, 0), block.masked_fill(pad, 0)
    is_context = has_bos & ~generated & ~pad
    return torch.stack([position, block], dim=1), is_context, (torch.where(mask_pos < missing, mask_pos, -1), ctx_tok)


def _allowed_keys(mask: torch.Tensor) -> torch.Tensor:
    """A 4D transformers mask as booleans: True where a query may attend a key."""
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class ZhtuneChatGLMAttention(nn.Module):
    """Self-attention with separate q/k/v (with bias) and 2D rotary embeddings on the two halves of each head."""

    def __init__(self, config: ZhtuneChatGLMConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        h = config.hidden_size
        self.q_proj = nn.Linear(h, h, bias=True)
        self.k_proj = nn.Linear(h, h, bias=True)
        self.v_proj = nn.Linear(h, h, bias=True)
        self.o_proj = nn.Linear(h, h, bias=True)

    def _rope(self, x: torch.Tensor, rotary: tuple) -> torch.Tensor:
        (cos_p, sin_p), (cos_b, sin_b) = rotary
        x1, x2 = x.chunk(2, dim=-1)
        cos_p, sin_p, cos_b, sin_b = (c.to(x.dtype) for c in (cos_p, sin_p, cos_b, sin_b))
        x1 = x1 * cos_p + _rotate_half(x1) * sin_p
        x2 = x2 * cos_b + _rotate_half(x2) * sin_b
        return torch.cat([x1, x2], dim=-1)

    def forward(self, hidden_states, rotary, allowed, cache=None) -> torch.Tensor:
        b, n, _ = hidden_states.shape
        shape = (b, n, self.num_heads, self.head_dim)
        q = self._rope(self.q_proj(hidden_states).view(shape).transpose(1, 2), rotary)
        k = self._rope(self.k_proj(hidden_states).view(shape).transpose(1, 2), rotary)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if allowed.shape[-1] < k.shape[-2]:  # a preallocated (static) cache holds more key slots than are filled
            allowed = F.pad(allowed, (0, k.shape[-2] - allowed.shape[-1]), value=False)
        if getattr(self.config, "_attn_implementation", "sdpa") == "eager":
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
            out = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class ZhtuneChatGLMMLP(nn.Module):
    def __init__(self, config: ZhtuneChatGLMConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class ZhtuneChatGLMLayer(GradientCheckpointingLayer):
    """One GLM block: post-LN residuals scaled by ``sqrt(2 * config.alpha_layers)``."""

    def __init__(self, config: ZhtuneChatGLMConfig, layer_idx: int):
        super().__init__()
        self.alpha = math.sqrt(2 * config.alpha_layers)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = ZhtuneChatGLMAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ZhtuneChatGLMMLP(config)

    def forward(self, hidden_states, rotary=None, allowed=None, layer_past=None, use_cache=False) -> torch.Tensor:
        x = self.input_layernorm(hidden_states)
        h = x * self.alpha + self.self_attn(x, rotary, allowed, layer_past)
        m = self.post_attention_layernorm(h)
        return m * self.alpha + self.mlp(m)


class ZhtuneChatGLMPreTrainedModel(PreTrainedModel):
    config_class = ZhtuneChatGLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ZhtuneChatGLMLayer"]
    _supports_sdpa = True


class ZhtuneChatGLMModel(ZhtuneChatGLMPreTrainedModel):
    """The decoder stack; ``forward`` returns the final hidden states."""

    def __init__(self, config: ZhtuneChatGLMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(ZhtuneChatGLMLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def rotary(self, positions: torch.Tensor) -> tuple:
        """``((cos, sin) for positions, (cos, sin) for block positions)``, each ``[batch, 1, length, head_dim/2]``."""
        dim = self.config.hidden_size // self.config.num_attention_heads // 2
        device = positions.device
        # The original keeps inv_freq as fp16 (RotaryEmbedding: inv_freq.half()); the rounded values are the model's.
        inv_freq = (1.0 / (self.config.rope_theta ** (torch.arange(0, dim, 2, device=device).float() / dim))).half()
        out = []
        for k in range(2):
            freqs = positions[:, k, :, None].float() * inv_freq.float()
            emb = torch.cat((freqs, freqs), dim=-1)[:, None]
            out.append((emb.cos(), emb.sin()))
        return tuple(out)

    def position_ids_for(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The 2D positions ``[batch, 2, length]`` of (left- or right-) padded rows of one document each."""
        doc, idx = _documents(input_ids, attention_mask, None)
        return glm_positions(input_ids, doc, idx, self.config)[0]

    def _plan(self, input_ids, attention_mask, position_ids, cache, past: int):
        """Positions and the boolean attention mask ``[batch, 1, new, past + new]`` of this forward."""
        b, n = input_ids.shape
        t = torch.arange(n, device=input_ids.device)
        if past == 0:
            doc, idx = _documents(input_ids, attention_mask, position_ids)
            positions, is_context, (mask_pos, ctx) = glm_positions(input_ids, doc, idx, self.config)
            if position_ids is not None and position_ids.dim() == 3:
                positions = position_ids
            if cache is not None:  # generation continues the last document of each row
                start = t[None, :] - idx
                setattr(cache, _ROWS, torch.stack([mask_pos[:, -1], ctx[:, -1], start[:, -1]], dim=1))
            same = (doc[:, :, None] == doc[:, None, :]) & (doc[:, None, :] >= 0)
            prefix = same & is_context[:, None, :]
            if attention_mask is not None and attention_mask.dim() == 4:
                allowed = _allowed_keys(attention_mask)[..., :n] | prefix[:, None]
            else:
                allowed = (same & (t[None, :, None] >= t[None, None, :]) | prefix)[:, None]
            return positions, allowed | torch.eye(n, dtype=torch.bool, device=t.device)
        if position_ids is None or position_ids.dim() != 3:
            rows = getattr(cache, _ROWS, None)
            if rows is None:
                raise ValueError(
                    "continuing from a KV cache needs 2D position_ids [batch, 2, length] or a cache "
                    "filled by this model's first forward"
                )
            idx = past + t[None, :] - rows[:, 2:3]
            generated = idx >= rows[:, 1:2]
            position = torch.where(generated & (rows[:, 0:1] >= 0), rows[:, 0:1], idx)
            block = torch.where(generated, idx - rows[:, 1:2] + 1, torch.zeros_like(idx))
            position_ids = torch.stack([position, block], dim=1)
        if attention_mask is not None and attention_mask.dim() == 4:
            return position_ids, _allowed_keys(attention_mask)
        keys = torch.arange(past + n, device=t.device)
        allowed = (keys[None, :] <= past + t[:, None])[None, None].expand(b, 1, n, past + n)
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, None, -(past + n) :]
        return position_ids, allowed

    def forward(
        self, input_ids=None, attention_mask=None, position_ids=None, cache=None, use_cache=False, inputs_embeds=None
    ):
        """Final hidden states. Positions come from ``input_ids`` (or ``position_ids``); with ``inputs_embeds``
        alone there is no ``[gMASK]``/``<sop>`` to find and each row is read as plain text (causal, positions 0..n-1)
        unless 2D ``position_ids`` are given."""
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if input_ids is None:
            input_ids = torch.full(inputs_embeds.shape[:2], -1, dtype=torch.long, device=inputs_embeds.device)
        past = cache.get_seq_length() if cache is not None else 0
        positions, allowed = self._plan(input_ids, attention_mask, position_ids, cache, past)
        rotary = self.rotary(positions)
        hidden = inputs_embeds
        for layer in self.layers:
            hidden = layer(hidden, rotary=rotary, allowed=allowed, layer_past=cache, use_cache=use_cache)
        return self.norm(hidden)


class ZhtuneChatGLMForCausalLM(ZhtuneChatGLMPreTrainedModel, GenerationMixin):
    """ChatGLM-6B with its output head; ``generate`` works with transformers' KV cache."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ZhtuneChatGLMConfig):
        super().__init__(config)
        self.model = ZhtuneChatGLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        cache=None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits (and the loss with ``labels``). ``cache`` and ``past_key_values`` are the two names transformers
        has used for the KV cache (5.24 and 5.17); either is accepted. Other keyword arguments transformers passes
        (``return_dict``, ``output_attentions``, ...) are accepted and ignored: there are no attention weights to
        return."""
        from transformers.cache_utils import DynamicCache

        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        checkpointing = self.training and any(layer.gradient_checkpointing for layer in self.model.layers)
        if use_cache and cache is None and not checkpointing:
            try:
                cache = DynamicCache(config=self.config)
            except TypeError:  # older signatures
                cache = DynamicCache()
        inputs_embeds = kwargs.get("inputs_embeds")
        hidden = self.model(
            input_ids, attention_mask, position_ids, cache if use_cache else None, use_cache, inputs_embeds
        )
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            extra = {k: v for k, v in kwargs.items() if k in ("num_items_in_batch", "ignore_index")}
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **extra)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None})

    def prepare_inputs_for_generation(self, input_ids, *args, **kwargs):
        """transformers' preparation, with the 2D positions of the whole sequence sliced to the new tokens."""
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        new = inputs["input_ids"].shape[1]
        mask = kwargs.get("attention_mask")
        inputs["position_ids"] = self.model.position_ids_for(input_ids, mask)[..., -new:]
        return inputs
