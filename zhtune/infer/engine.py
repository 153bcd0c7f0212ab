"""Batched greedy generation on a static KV cache, with input-copy speculative decoding, for chat-templated prompts.

:class:`Engine` decodes token requests. It keeps ``batch_size`` rows busy (a finished row is refilled from the queue,
a quarter of the rows at a time so that new prompts are read together) and runs one step at a time through
:class:`~zhtune.infer.kv.StepRunner`: every row feeds ``k`` tokens — the rest of its prompt (chunked prefill), or
its last token followed by a draft (:mod:`zhtune.infer.speculative`) — and the model's argmax after each of them
comes back. The longest agreeing prefix of a draft is kept plus the model's own next token, so the output is
token for token the greedy output; ``speculative=False`` feeds no drafts. ``k`` is the largest a row asks for
(rounded up to a power of two when steps are CUDA graphs, one graph per size); rows with less to feed get longer
drafts, which cost nothing in a launch-bound step. Each row stops at a stop token or at its own budget. On a GPU
the steps run on batch-invariant kernels (:mod:`zhtune.infer.invariant`): a token's logits are then the same bit for
bit whatever ``k`` and whichever rows share its step, so in bf16 too the output equals the engine's own one-sentence,
draft-free greedy decoding at every batch size (``invariant=False``: torch's kernels, ~1.25x faster, bf16 rows may
then flip at a near-tie).

Greedy means greedy: no sampling, no repetition penalty, no logits processor of any kind, whatever the checkpoint's
``generation_config.json`` says; stop tokens are the template's end-of-turn tokens and the tokenizer's EOS. A model
the static cache cannot run (see :class:`~zhtune.infer.kv.UnsupportedModel`) is decoded by transformers' ``generate``
with the same settings (:mod:`zhtune.infer.hf`), said once.

:class:`Generator` puts a chat template in front: conversations in, text out, prompts rendered and encoded by the
same :func:`~zhtune.data.tokenize.encode_segments` as training, so a model sees at inference the token ids it was
trained on.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from zhtune.data.conversation import Conversation
from zhtune.data.templates import RenderOptions, SpecialTokens, Template
from zhtune.data.tokenize import encode_segments, pad_id
from zhtune.errors import ZhtuneError
from zhtune.infer import speculative
from zhtune.infer.completion import Completion, DecodeStats, Request
from zhtune.infer.hf import hf_generate
from zhtune.infer.invariant import available as invariant_kernels_available
from zhtune.infer.kv import StepRunner, UnsupportedModel, causal_lm
from zhtune.infer.speculative import CopyDrafter

log = logging.getLogger(__name__)
# Model types whose attention is plain causal attention over RoPE positions through transformers'
# AttentionInterface (checked numerically in tests/infer); others are decoded by transformers' generate.
STATIC_CACHE_MODEL_TYPES = ("qwen2", "qwen3", "llama", "mistral", "glm", "glm4", "phi3")


class _Row:
    """One request being decoded: what it still has to feed, its output, its slots in the cache."""

    def __init__(self, index: int, request: Request, drafter: CopyDrafter | None, stops: frozenset[int]):
        if not request.prompt:
            raise ValueError(f"request {index} has an empty prompt")
        self.index, self.budget, self.stops, self.drafter = index, max(1, request.budget), stops, drafter
        self.todo = [int(t) for t in request.prompt]  # prompt left to prefill, then the last token (not cached yet)
        self.end = 0  # slots holding this row's cached tokens
        self.out: list[int] = []
        self.stopped = False
        self.fixed, self.draft = 0, []

    def need(self, k_max: int) -> int:
        return min(k_max, len(self.todo) + (self.drafter.want if self.drafter else 0))

    def inputs(self, k: int, pad: int) -> list[int]:
        fixed = self.todo[:k]
        room = k - len(fixed)
        self.fixed = len(fixed)
        self.draft = self.drafter.propose(room) if self.drafter and room else []
        return fixed + self.draft + [pad] * (room - len(self.draft))

    def advance(self, preds: Sequence[int], stats: DecodeStats) -> bool:
        """Take a step's argmax tokens; True when the row is finished."""
        f = self.fixed
        if len(self.todo) > f:  # a prompt chunk with more to come: nothing to emit yet
            self.todo = self.todo[f:]
            self.end += f
            return False
        at = f - 1  # the prediction after the last fed token is the first new one
        accepted = speculative.accepted_length(self.draft, preds[at : at + len(self.draft)])
        new = self.draft[:accepted] + [int(preds[at + accepted])]
        self.end += f + accepted
        self.todo = [new[-1]]
        stats.row_steps += 1
        stats.drafted += len(self.draft)
        stats.accepted += accepted
        if self._emit(new, stats):
            return True
        if self.drafter:
            self.drafter.update(self.out, len(self.draft), accepted)
        return False

    def _emit(self, new: list[int], stats: DecodeStats) -> bool:
        for t in new:
            stats.tokens += 1
            if t in self.stops:
                self.stopped = True
                return True
            self.out.append(t)
            if len(self.out) >= self.budget:
                return True
        return False


def _invariant_choice(invariant: bool | str, device: torch.device) -> bool:
    if invariant == "auto":
        return device.type == "cuda" and invariant_kernels_available(device)
    if invariant and not invariant_kernels_available(device):
        raise ZhtuneError(f"batch-invariant kernels need Triton and a CUDA device (the model is on {device})")
    return bool(invariant)


def _bucket(n: int, k_max: int) -> int:
    k = 1
    while k < n:
        k *= 2
    return min(k, k_max)


class Engine:
    """Greedy decoding of token requests on a static cache (see the module docstring).

    Args:
        model: a transformers causal LM or a peft model around one, in eval mode.
        stop_ids: tokens that end a row (not part of its output).
        pad_id: the token fed where a row has nothing to feed.
        speculative: draft from each request's ``source`` (rows without one decode plainly).
        graphs: ``"auto"`` (CUDA graphs on CUDA), True or False.
        invariant: batch-invariant kernels for the steps (:mod:`zhtune.infer.invariant`), so that the output is
            bit for bit the same at every batch size and draft length: ``"auto"`` (on CUDA with Triton), True
            (raises without them) or False (torch's kernels: on a GPU in bf16 a row may then depend on its batch).
        end_token: the token drafted after the source (the template's end of turn).
        width: characters a token stands for, for re-aligning drafts after an edit.
        max_step_tokens: rows x k at most per step (bounds the logits of a step).
        max_k: tokens per row per step at most (prefill chunk and draft length).
    """

    def __init__(
        self,
        model,
        stop_ids: Sequence[int],
        pad_id: int,
        *,
        speculative: bool = True,
        graphs: bool | str = "auto",
        invariant: bool | str = "auto",
        end_token: int | None = None,
        width: Callable[[int], int] | None = None,
        max_step_tokens: int = 2048,
        max_k: int = 64,
    ):
        self.model, self.pad_id, self.speculative = model, int(pad_id), speculative
        self.stops = frozenset(int(s) for s in stop_ids)
        self.end_token, self.width = end_token, width
        self.max_step_tokens, self.max_k = max_step_tokens, max_k
        device = next(model.parameters()).device
        self.graphs = device.type == "cuda" if graphs == "auto" else bool(graphs)
        self.invariant = _invariant_choice(invariant, device)
        self.stats = DecodeStats()
        self._runner: StepRunner | None = None
        model_type = getattr(causal_lm(model).config, "model_type", None)
        self.fallback: str | None = None
        if model_type not in STATIC_CACHE_MODEL_TYPES:
            self._use_fallback(f"model type {model_type!r} is not one the static cache is checked on")

    def _use_fallback(self, reason: str) -> None:
        self.fallback = reason
        log.warning("zhtune engine: %s; decoding with transformers' generate (greedy, no penalties)", reason)

    def k_max(self, rows: int) -> int:
        k = max(8, min(self.max_k, self.max_step_tokens // max(rows, 1)))
        return 1 << (k.bit_length() - 1)  # a power of two, so graph buckets reach it

    def _runner_for(self, rows: int, slots: int) -> StepRunner:
        slots = -(-slots // 128) * 128
        r = self._runner
        if r is not None and r.rows == rows and r.max_len >= slots:
            return r
        self.close()
        self._runner = StepRunner(self.model, rows, slots, graphs=self.graphs, invariant=self.invariant)
        return self._runner

    def close(self) -> None:
        """Free the cache and graphs and give the model its own attention back (a later call makes new ones)."""
        if self._runner is not None:
            self._runner.close()
            self._runner = None

    @torch.no_grad()
    def generate(self, requests: Sequence[Request], batch_size: int = 16) -> list[Completion]:
        """Greedy completions of ``requests`` (in their order), ``batch_size`` rows decoding at a time."""
        if not requests:
            return []
        start = time.perf_counter()
        stats = DecodeStats()
        results = None
        if self.fallback is None:
            try:
                results = self._decode(requests, max(1, min(batch_size, len(requests))), stats)
            except UnsupportedModel as exc:
                self._use_fallback(str(exc))
                stats = DecodeStats()
        if results is None:
            results = hf_generate(self.model, requests, sorted(self.stops), self.pad_id, batch_size)
            stats.tokens = sum(len(c.tokens) + c.stopped for c in results)
        stats.sequences = len(results)
        stats.seconds = time.perf_counter() - start
        self.stats.add(stats)
        return results

    def _decode(self, requests: Sequence[Request], rows: int, stats: DecodeStats) -> list[Completion]:
        k_max = self.k_max(rows)
        runner = self._runner_for(rows, max(len(r.prompt) + max(1, r.budget) for r in requests) + k_max)
        queue = deque(enumerate(requests))
        slots: list[_Row | None] = [None] * rows
        results: list[Completion | None] = [None] * len(requests)
        refill = max(1, rows // 4)
        while True:
            free = [i for i, row in enumerate(slots) if row is None]
            if queue and len(free) >= min(refill, len(queue)):
                for i in free[: len(queue)]:
                    index, request = queue.popleft()
                    slots[i] = _Row(index, request, self._drafter(request, k_max), self.stops)
            active = [(i, row) for i, row in enumerate(slots) if row is not None]
            if not active:
                break
            need = max(row.need(k_max) for _i, row in active)
            k = _bucket(need, k_max) if runner.graphs_on else need
            grid, ends = [[self.pad_id] * k for _ in range(rows)], [0] * rows
            for i, row in active:
                grid[i], ends[i] = row.inputs(k, self.pad_id), row.end
            preds = runner(torch.tensor(grid), torch.tensor(ends)).tolist()
            stats.forwards += 1
            stats.step_sizes[k] += 1
            for i, row in active:
                if row.advance(preds[i], stats):
                    results[row.index] = Completion(row.out, row.stopped)
                    slots[i] = None
        return results

    def _drafter(self, request: Request, k_max: int) -> CopyDrafter | None:
        if not self.speculative or request.source is None:
            return None
        # a longer draft is free in a launch-bound GPU step, and costs its tokens on a CPU
        min_draft = 4 if self.graphs else 1
        return CopyDrafter(request.source, self.end_token, max_draft=k_max - 1, min_draft=min_draft, width=self.width)


@dataclass
class Generator:
    """Greedy generation for chat conversations (ending with a user turn) on :class:`Engine`.

    Attributes:
        model, tokenizer: a loaded causal LM (or peft model) and its tokenizer.
        template: the chat template the model was trained with.
        options: system prompt override and Qwen3 thinking switch (``add_generation_prompt`` is implied).
        speculative: draft from the sources given to :meth:`complete`.
        graphs: CUDA graphs for the decoding steps (``"auto"``: on CUDA).
        invariant: batch-invariant kernels for the steps (``"auto"``: on CUDA with Triton; see :class:`Engine`).
    """

    model: object
    tokenizer: object
    template: Template
    options: RenderOptions = RenderOptions()
    speculative: bool = True
    graphs: bool | str = "auto"
    invariant: bool | str = "auto"
    _engine: Engine | None = field(default=None, init=False, repr=False)
    _widths: dict = field(default_factory=dict, init=False, repr=False)

    def prompt_ids(self, conv: Conversation) -> list[int]:
        opts = RenderOptions(self.options.system, self.options.enable_thinking, add_generation_prompt=True)
        segments = self.template.render(conv, SpecialTokens.of(self.tokenizer), opts)
        ids, _owner = encode_segments(self.tokenizer, segments, self.template.tokenization)
        return ids

    def _token_id(self, name: str) -> int | None:
        tid = self.tokenizer.convert_tokens_to_ids(name)
        ok = isinstance(tid, int) and tid != getattr(self.tokenizer, "unk_token_id", None)
        return tid if ok else None

    def stop_ids(self) -> list[int]:
        """The template's end-of-turn tokens and the tokenizer's EOS."""
        ids = {int(self.tokenizer.eos_token_id)} if self.tokenizer.eos_token_id is not None else set()
        ids.update(t for t in map(self._token_id, self.template.stop) if t is not None)
        return sorted(ids)

    def end_of_turn_id(self) -> int | None:
        """The token the model writes after an answer (the template's first stop token), for drafting."""
        for name in self.template.stop:
            if (tid := self._token_id(name)) is not None:
                return tid
        return self.tokenizer.eos_token_id

    def source_ids(self, text: str) -> list[int]:
        """``text`` tokenized on its own (drafts only need to be good guesses of the answer's tokens)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def token_width(self, token: int) -> int:
        if token not in self._widths:
            self._widths[token] = len(self.tokenizer.decode([token]).strip())
        return self._widths[token]

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            pad = pad_id(self.tokenizer)
            self._engine = Engine(
                self.model,
                self.stop_ids(),
                pad,
                speculative=self.speculative,
                graphs=self.graphs,
                invariant=self.invariant,
                end_token=self.end_of_turn_id(),
                width=self.token_width,
            )
        return self._engine

    @property
    def stats(self) -> DecodeStats:
        return self.engine.stats

    def complete(
        self,
        prompts: Sequence[Sequence[int]],
        budgets: Sequence[int],
        sources: Sequence[Sequence[int] | None] | None = None,
        batch_size: int = 16,
    ) -> list[Completion]:
        """Greedy completions of prompt ids, each row with its own budget (and source to draft from)."""
        sources = sources if sources is not None else [None] * len(prompts)
        requests = [Request(p, b, s) for p, b, s in zip(prompts, budgets, sources)]
        return self.engine.generate(requests, batch_size)

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def generate(self, convs: list[Conversation], max_new_tokens: int = 128, batch_size: int = 16) -> list[str]:
        """Decoded greedy answers of ``convs``, at most ``max_new_tokens`` each (no drafting)."""
        prompts = [self.prompt_ids(c) for c in convs]
        done = self.complete(prompts, [max_new_tokens] * len(prompts), None, batch_size)
        return [self.decode(c.tokens) for c in done]

    def close(self) -> None:
        """Free the engine's cache and graphs and give the model its own attention back."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None
