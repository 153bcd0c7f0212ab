"""What a generation request is, what it returns, and the counters a decoding run keeps.

A request is token ids in and token ids out: the prompt, the row's own budget of new tokens, and (for speculative
decoding) the source sentence's tokens to draft from. Every decoder of this package — the static-cache engine and
transformers' ``generate`` fallback — ends a row the same way (:func:`finish_row`): at the first stop token within
the budget (``stopped``), else after ``budget`` tokens (``truncated``). Prompt rendering lives in
:mod:`zhtune.infer.engine`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Request:
    """One row to generate.

    Attributes:
        prompt: the prompt's token ids (rendered with the chat template's generation prompt).
        budget: at most this many new tokens (the stop token counts as one).
        source: token ids to draft from (the sentence being corrected), or None for plain decoding.
    """

    prompt: Sequence[int]
    budget: int
    source: Sequence[int] | None = None


@dataclass
class Completion:
    """A finished row: ``tokens`` before the stop token; ``stopped`` False when the budget cut it."""

    tokens: list[int]
    stopped: bool

    @property
    def truncated(self) -> bool:
        return not self.stopped


def finish_row(tokens: Iterable[int], budget: int, stops: set[int] | frozenset[int]) -> Completion:
    """The greedy row of ``tokens`` as a decoder with ``budget`` and ``stops`` ends it."""
    out: list[int] = []
    for t in tokens:
        if t in stops:
            return Completion(out, True)
        out.append(int(t))
        if len(out) >= budget:
            break
    return Completion(out, False)


@dataclass
class DecodeStats:
    """Counters of decoding runs (added up over calls).

    Attributes:
        sequences: rows finished.
        tokens: tokens generated (each row's stop token included).
        forwards: model forwards (one per engine step).
        row_steps: (row, step) pairs in which a row gained tokens.
        drafted, accepted: draft tokens proposed and kept.
        seconds: wall time of the decoding calls.
        step_sizes: how many steps ran with each ``k`` (tokens per row per forward).
    """

    sequences: int = 0
    tokens: int = 0
    forwards: int = 0
    row_steps: int = 0
    drafted: int = 0
    accepted: int = 0
    seconds: float = 0.0
    step_sizes: Counter = field(default_factory=Counter)

    def add(self, other: DecodeStats) -> None:
        for name in ("sequences", "tokens", "forwards", "row_steps", "drafted", "accepted", "seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.step_sizes.update(other.step_sizes)

    @property
    def tokens_per_step(self) -> float:
        """The mean accepted length: tokens a row gains per step (1.0 without speculation)."""
        return self.tokens / self.row_steps if self.row_steps else 0.0

    def as_dict(self) -> dict:
        seconds = max(self.seconds, 1e-9)
        return {
            "sequences": self.sequences,
            "tokens": self.tokens,
            "forwards": self.forwards,
            "row_steps": self.row_steps,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "seconds": round(self.seconds, 4),
            "sequences_per_s": round(self.sequences / seconds, 2),
            "tokens_per_s": round(self.tokens / seconds, 1),
            "mean_accepted_length": round(self.tokens_per_step, 3),
            "step_sizes": {str(k): v for k, v in sorted(self.step_sizes.items())},
        }
