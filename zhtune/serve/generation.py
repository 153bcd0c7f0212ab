"""Batched chat generation with per-row sampling settings, stop strings and token-by-token text callbacks.

Rows of one batch may ask for different things (greedy or sampled, temperature, top-p, seed, token budget, stop
strings); transformers' ``generate`` takes one setting for the whole batch, so it runs greedy with explicit neutral
settings (nothing from the checkpoint's ``generation_config.json`` leaks in: no repetition penalty, no top-k) and two
small hooks do the per-row work:

* :class:`RowSampler` (a logits processor) draws each sampled row's token from its own ``torch.Generator`` (so a
  seeded request gives the same text whatever else shares its batch) after temperature and top-p, and leaves the
  argmax to the greedy step; greedy rows are untouched. Ids past the tokenizer's vocabulary (the embedding padding
  real checkpoints carry) are never produced.
* :class:`RowStopper` (a stopping criterion) ends each row at an end-of-turn id, a stop string or its own budget,
  and turns its tokens into text deltas as they come (:class:`TextStream`).

Deliberately not here: the prompt (the backend renders it with the training template), scheduling of requests (the
batcher), and the fast greedy correction engine (``zhtune.infer``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from zhtune.data.tokenize import pad_id

GREEDY_BELOW = 1e-5  # a temperature this small is greedy (dividing by it would overflow the logits)


@dataclass(frozen=True)
class SamplingParams:
    """How one row is decoded.

    Attributes:
        temperature: 0 (anything below ``GREEDY_BELOW``) for greedy (argmax); otherwise the softmax temperature.
        top_p: nucleus sampling mass (1.0 keeps every token); ignored when greedy.
        max_tokens: the most tokens generated for this row (the end-of-turn token included).
        stop: strings that end the row; the text returned stops before the first one.
        seed: seed of this row's own random generator (None: a fresh random seed).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Completion:
    """What one row produced: text (stop strings removed), ``finish_reason`` (``stop``/``length``/``cancelled``)."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)


class TextStream:
    """Incremental detokenization of one row: ``push`` a token, get the new text that is safe to show.

    Text is held back while it ends in an incomplete UTF-8 sequence (decoded as U+FFFD) or in what could be the
    beginning of a stop string, so that no stop string and no broken character is ever sent.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return the text delta now safe to emit (``stopped`` becomes True at a stop string)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = text[: min(hits)], True
            return self.flush()
        self.text = text
        end = len(text)
        while end > self.sent and text[end - 1] == "\ufffd":
            end -= 1
        end -= self._stop_prefix(text[:end])
        return self._take(max(end, self.sent))

    def flush(self) -> str:
        """All text not yet emitted (at the end of the row)."""
        return self._take(len(self.text))

    def _stop_prefix(self, text: str) -> int:
        """Length of the longest tail of ``text`` that begins a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if s.startswith(text[-k:]):
                    best = k
                    break
        return best

    def _take(self, end: int) -> str:
        delta = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return delta


class Row:
    """One request in a batch: its prompt, settings, stream state and callback.

    Args:
        prompt_ids: the rendered prompt.
        params: its sampling settings.
        on_delta: called with each new piece of text (from the generating thread).
        cancelled: returns True when the requester has gone (the row then ends at the next token).
    """

    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        on_delta: Callable[[str], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ):
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.on_delta = on_delta
        self.cancelled = cancelled
        self.generated: list[int] = []
        self.finish: str | None = None
        self.stream: TextStream | None = None
        self.rng: torch.Generator | None = None

    def accept(self, token: int, stop_ids: set[int]) -> None:
        """Take the row's next token; decide whether it ends the row."""
        self.generated.append(token)
        if token in stop_ids:
            self.end("stop")
            return
        delta = self.stream.push(token)
        if delta and self.on_delta:
            self.on_delta(delta)
        if self.stream.stopped:
            self.end("stop")
        elif self.cancelled is not None and self.cancelled():
            self.end("cancelled")
        elif len(self.generated) >= self.params.max_tokens:
            self.end("length")

    def end(self, reason: str) -> None:
        self.finish = reason
        delta = self.stream.flush()
        if delta and self.on_delta:
            self.on_delta(delta)

    def completion(self) -> Completion:
        return Completion(
            self.stream.text, self.finish or "length", len(self.prompt_ids), len(self.generated), self.generated
        )


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, rng: torch.Generator) -> int:
    """Draw one token id from ``logits`` (1-D, float) at ``temperature`` within the top-``top_p`` mass."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass strictly above each token
        sorted_probs[before >= top_p] = 0.0  # the most likely token always stays (its "before" is 0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=rng))


class RowSampler(LogitsProcessor):
    """Per-row sampling inside a greedy ``generate``: a sampled row's scores become one finite entry, its draw."""

    def __init__(self, rows: list[Row], vocab_limit: int):
        self.rows, self.vocab_limit = rows, vocab_limit

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[-1] > self.vocab_limit:
            scores[:, self.vocab_limit :] = -float("inf")
        for r, row in enumerate(self.rows):
            if row.finish is not None or row.params.temperature < GREEDY_BELOW:
                continue
            if row.rng is None:
                row.rng = torch.Generator(device=scores.device)
                if row.params.seed is None:
                    row.rng.seed()
                else:
                    row.rng.manual_seed(row.params.seed)
            choice = sample_token(scores[r].float(), row.params.temperature, row.params.top_p, row.rng)
            scores[r] = -float("inf")
            scores[r, choice] = 0.0
        return scores


class RowStopper(StoppingCriteria):
    """Ends each row on its own terms and streams its text; returns the per-row done flags ``generate`` wants."""

    def __init__(self, rows: list[Row], stop_ids: set[int]):
        self.rows, self.stop_ids = rows, stop_ids

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        last = input_ids[:, -1].tolist()
        for row, token in zip(self.rows, last):
            if row.finish is None:
                row.accept(int(token), self.stop_ids)
        return torch.tensor([row.finish is not None for row in self.rows], device=input_ids.device)


def neutral_config(max_new_tokens: int, stop_ids: list[int], pad_id: int) -> GenerationConfig:
    """Greedy settings with every logits-changing option set explicitly, so the checkpoint's
    ``generation_config.json`` (sampling, top-k, repetition penalty) cannot fill them in."""
    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        eos_token_id=stop_ids,
        pad_token_id=pad_id,
        temperature=1.0,
        top_p=1.0,
        top_k=50,  # transformers' neutral value (unused without sampling; any other value is warned about)
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        renormalize_logits=False,
    )


@torch.no_grad()
def generate_rows(model, tokenizer, rows: list[Row], stop_ids: list[int]) -> list[Completion]:
    """Decode ``rows`` in one left-padded batch; each row ends on its own; return their completions.

    Raises:
        whatever the model raises; rows keep the text they had streamed.
    """
    if not rows:
        return []
    for row in rows:
        row.stream = TextStream(tokenizer, row.params.stop)
    pad = pad_id(tokenizer)
    width = max(len(r.prompt_ids) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows])
    mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in rows])
    device = next(model.parameters()).device
    model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        generation_config=neutral_config(max(r.params.max_tokens for r in rows), stop_ids, pad),
        logits_processor=LogitsProcessorList([RowSampler(rows, len(tokenizer))]),
        stopping_criteria=StoppingCriteriaList([RowStopper(rows, set(stop_ids))]),
    )
    for row in rows:
        if row.finish is None:
            row.end("length")
    return [row.completion() for row in rows]
