"""A static KV cache under transformers' own model code, and the step that runs k tokens per row through it.

The model's forward is transformers' own (embeddings, norms, RoPE, projections, MLP, head: exactly its code); only
the attention core is ours, registered through transformers' public ``AttentionInterface`` under
:data:`ATTENTION`. Each call of a step writes the new keys/values into preallocated buffers ``[rows, kv heads,
max_len, head dim]`` at every row's own slots and attends over the whole buffer with a mask, so rows are ragged:
row ``r`` holds its tokens at slots ``0..end[r]-1`` and position ids are slot numbers (no padding, no left-shift).
Slots past a row's end may hold stale keys from rejected drafts; the mask never lets a query see them. Query heads
that share a key/value head are folded into the query length, so grouped-query attention reads each cached key
once (no ``repeat_kv`` copy, and SDPA keeps its fused kernels with a mask).

Because every tensor shape is fixed for a given ``(rows, k)``, the whole step — mask, forward, argmax — is captured
once as a CUDA graph and replayed (:class:`StepRunner`); on CPU it runs eagerly. The model is called with
``use_cache=False`` and explicit ``position_ids`` and a 4D mask, which transformers passes through untouched, so no
private cache class or ``cache_position`` argument is involved (they changed between transformers 5.17 and 5.24).

This module does not choose tokens or drafts (:mod:`zhtune.infer.engine`, :mod:`zhtune.infer.speculative`). A model
whose attention does not go through ``AttentionInterface`` (remote code), or that needs something this attention
does not do (a sliding window shorter than the cache, logit soft-capping, attention sinks), is refused with
:class:`UnsupportedModel` by a probe forward before anything is allocated.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F

from zhtune.errors import ZhtuneError
from zhtune.infer.invariant import batch_invariant

log = logging.getLogger(__name__)
ATTENTION = "zhtune_static_kv"
# Attention arguments this implementation cannot honour; a model passing any of them (not None) is refused.
_UNSUPPORTED = ("softcap", "s_aux", "sinks", "position_bias")


class UnsupportedModel(ZhtuneError):
    """The model cannot run on the static-cache engine (the caller may fall back to transformers' generate)."""


class StaticCache:
    """Per-layer key/value buffers and what the current forward needs: its write slots and masks.

    Attributes:
        keys, values: ``layer -> [rows, kv_heads, max_len, head_dim]``.
        slots: ``[rows, k]`` slot (= position) of every token of the current forward.
        masks: ``group size -> [rows, 1, group * k, max_len]`` boolean masks (True: may attend).
        probe: while probing, ``layer -> (kv_heads, head_dim, dtype, sliding_window, heads)`` is recorded here.
        problems: what the probe found this attention cannot do.
    """

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.slots: torch.Tensor | None = None
        self.masks: dict[int, torch.Tensor] = {}
        self.probe: dict[int, tuple] | None = None
        self.problems: list[str] = []


_active: list[StaticCache] = []  # the cache the running forward uses (a stack: one engine at a time per thread)


@contextlib.contextmanager
def _using(cache: StaticCache):
    _active.append(cache)
    try:
        yield cache
    finally:
        _active.pop()


def static_kv_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: write ``key``/``value`` into the active cache, attend over it.

    ``query`` is ``[rows, heads, k, head_dim]``; returns ``([rows, k, heads, head_dim], None)`` as transformers'
    attention functions do. Outside an engine forward it defers to transformers' SDPA attention.
    """
    if not _active:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    cache = _active[-1]
    layer = getattr(module, "layer_idx", None)
    if cache.probe is not None:
        return _probe(cache, module, layer, query, key, value, scaling, kwargs)
    rows, heads, k, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    index = cache.slots[:, None, :, None].expand(rows, kv_heads, k, dim)
    keys, values = cache.keys[layer], cache.values[layer]
    keys.scatter_(2, index, key.to(keys.dtype))
    values.scatter_(2, index, value.to(values.dtype))
    # heads h = j * group + g share kv head j: fold g into the query length, one SDPA over the cached keys
    folded = query.reshape(rows, kv_heads, group * k, dim).to(keys.dtype)
    with _masked_kernels(query.is_cuda):
        out = F.scaled_dot_product_attention(folded, keys, values, attn_mask=cache.masks[group], scale=scaling)
    return out.reshape(rows, heads, k, dim).transpose(1, 2), None


def _masked_kernels(cuda: bool):
    """On CUDA, SDPA's memory-efficient kernel (it takes any boolean mask) or the math one; flash takes no mask."""
    if not cuda:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _probe(cache, module, layer, query, key, value, scaling, kwargs):
    if layer is None:
        cache.problems.append(f"{type(module).__name__} has no layer_idx")
    for name in _UNSUPPORTED:
        if kwargs.get(name) is not None:
            cache.problems.append(f"{type(module).__name__} uses {name}")
    cache.probe[layer] = (key.shape[1], key.shape[-1], key.dtype, kwargs.get("sliding_window"), query.shape[1])
    group = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(group, dim=1)
    value = value.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
    return out.transpose(1, 2), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, static_kv_attention)


def step_slots(ends: torch.Tensor, k: int, max_len: int) -> torch.Tensor:
    """Slots (and positions) of a step's ``k`` tokens per row: ``end, end+1, ...``, clamped inside the buffer (the
    engine keeps real tokens below ``max_len - k``; the clamp only keeps padding of idle rows in bounds)."""
    return (ends[:, None] + torch.arange(k, device=ends.device)).clamp_(max=max_len - 1)


def causal_lm(model):
    """The ``*ForCausalLM`` inside a peft wrapper (LoRA layers stay in place), or ``model`` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def autocast_dtype(model) -> torch.dtype | None:
    """The half dtype to autocast to when the weights mix dtypes (a bf16 base with fp32 LoRA weights in training),
    as the training forward does; None when all floating weights share one dtype."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    halves = [d for d in (torch.bfloat16, torch.float16) if d in dtypes]
    return halves[0] if len(dtypes) > 1 and halves else None


class StepRunner:
    """Runs forwards of ``k`` tokens for each of ``rows`` rows over a static cache; returns the argmax tokens.

    Args:
        model: a transformers causal LM (or a peft model around one) in eval mode.
        rows: the batch size, fixed for the runner's life.
        max_len: slots per row.
        graphs: capture each distinct ``k`` as a CUDA graph (CUDA only); False runs eagerly.
        invariant: run the forwards on the batch-invariant kernels (:mod:`zhtune.infer.invariant`).

    Raises:
        UnsupportedModel: the probe forward found a model this attention cannot run exactly.
    """

    def __init__(self, model, rows: int, max_len: int, graphs: bool = False, invariant: bool = False):
        _register()
        self.model, self.rows, self.max_len, self.invariant = model, rows, max_len, invariant
        self.lm = causal_lm(model)
        self.device = next(self.lm.parameters()).device
        self.graphs_on = bool(graphs) and self.device.type == "cuda"
        self.autocast = autocast_dtype(self.lm)
        self.cache = StaticCache()
        self._graphs: dict[int, tuple] = {}
        self._pool = None
        self._previous = getattr(self.lm.config, "_attn_implementation", None)
        if self._previous == ATTENTION:  # another engine holds this model: give back transformers' SDPA
            self._previous = "sdpa"
        try:
            self.lm.set_attn_implementation(ATTENTION)
        except (ValueError, AttributeError, ImportError) as exc:
            self._previous = None
            raise UnsupportedModel(f"{type(self.lm).__name__} cannot switch its attention: {exc}") from None
        try:
            if getattr(self.lm.config, "_attn_implementation", None) != ATTENTION:
                raise UnsupportedModel(f"{type(self.lm).__name__} does not take transformers' attention functions")
            self._allocate(self._probe_layers())
        except BaseException:
            self.close()
            raise

    # -- set-up ---------------------------------------------------------------------------------------------------
    def _probe_layers(self) -> dict[int, tuple]:
        self.cache.probe = {}
        ids = torch.zeros((1, 2), dtype=torch.long, device=self.device)
        with torch.no_grad(), self._autocast(), _using(self.cache):
            self.lm(input_ids=ids, position_ids=torch.arange(2, device=self.device)[None], use_cache=False)
        found, self.cache.probe = self.cache.probe, None
        name = type(self.lm).__name__
        if not found:
            raise UnsupportedModel(f"{name} does not call transformers' attention functions")
        if self.cache.problems:
            raise UnsupportedModel(f"{name}: " + "; ".join(sorted(set(self.cache.problems))))
        windows = [w for (_h, _d, _t, w, _q) in found.values() if w is not None and w < self.max_len]
        if windows:
            raise UnsupportedModel(f"{name} has a sliding window of {min(windows)} tokens < {self.max_len} slots")
        return found

    def _allocate(self, layers: dict[int, tuple]) -> None:
        for layer, (kv_heads, dim, dtype, _window, _heads) in layers.items():
            shape = (self.rows, kv_heads, self.max_len, dim)
            self.cache.keys[layer] = torch.zeros(shape, dtype=dtype, device=self.device)
            self.cache.values[layer] = torch.zeros(shape, dtype=dtype, device=self.device)
        self.groups = sorted({heads // kv_heads for (kv_heads, _d, _t, _w, heads) in layers.values()})

    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast, cache_enabled=False)

    def close(self) -> None:
        """Give the buffers and graphs back and restore the model's attention implementation."""
        self._graphs.clear()
        self.cache.keys.clear()
        self.cache.values.clear()
        self.cache.masks.clear()
        self.cache.slots = None
        if self._previous is not None and getattr(self.lm.config, "_attn_implementation", None) == ATTENTION:
            self.lm.set_attn_implementation(self._previous)
        self._previous = None

    # -- the step -------------------------------------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        return self.step_logits(ids, ends).argmax(-1)

    def step_logits(self, ids: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """The eager step: ``ids [rows, k]`` written at slots ``ends[r]..`` (both on the model's device); returns the
        ``[rows, k, vocab]`` logits."""
        k = ids.shape[1]
        slots = step_slots(ends, k, self.max_len)
        visible = torch.arange(self.max_len, device=ids.device)[None, None, :] <= slots[:, :, None]
        self.cache.slots = slots
        self.cache.masks = {g: visible[:, None].repeat(1, 1, g, 1) for g in self.groups}
        with self._autocast(), _using(self.cache), batch_invariant(self.invariant):
            return self.lm(input_ids=ids, position_ids=slots, attention_mask=visible[:, None], use_cache=False).logits

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """Greedy tokens after each of ``ids`` (``[rows, k]``, CPU) written at slots ``ends[r]..`` (``[rows]``,
        CPU); returns ``[rows, k]`` on the CPU. Real tokens must stay below slot ``max_len - k``."""
        k = ids.shape[1]
        if getattr(self.lm.config, "_attn_implementation", None) != ATTENTION:
            self.lm.set_attn_implementation(ATTENTION)  # another engine on this model gave it its own back
        if not self.graphs_on:
            return self._forward(ids.to(self.device), ends.to(self.device)).cpu()
        if k not in self._graphs:
            try:
                self._graphs[k] = self._capture(k)
            except (RuntimeError, UnsupportedModel) as exc:  # keep going, eagerly, rather than lose the run
                log.warning("CUDA graph capture failed for k=%d (%s); the engine runs eagerly from here", k, exc)
                self.graphs_on = False
                self._graphs.clear()
                return self(ids, ends)
        graph, static_ids, static_ends, out = self._graphs[k]
        static_ids.copy_(ids)
        static_ends.copy_(ends)
        graph.replay()
        return out.cpu()

    def _capture(self, k: int) -> tuple:
        # Warm-up and capture write keys at the last k slots, which no row's real tokens ever occupy.
        ids = torch.zeros((self.rows, k), dtype=torch.long, device=self.device)
        ends = torch.full((self.rows,), self.max_len - k, dtype=torch.long, device=self.device)
        out = torch.zeros((self.rows, k), dtype=torch.long, device=self.device)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                out.copy_(self._forward(ids, ends))
        torch.cuda.current_stream().wait_stream(stream)
        eager = out.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out.copy_(self._forward(ids, ends))
        graph.replay()
        if not torch.equal(out, eager):
            raise UnsupportedModel(f"the captured step of k={k} disagrees with the eager step")
        return graph, ids, ends, out
