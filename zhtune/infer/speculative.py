"""Input-copy drafting for speculative decoding: a corrected sentence is mostly its source, so guess the source.

A :class:`CopyDrafter` keeps a pointer into the source sentence's token ids (and the end-of-turn token after them)
at the token the output is expected to continue with, and proposes the tokens from there. After every step it moves
the pointer past what was accepted; after an edit (the model wrote something else than the source) it re-aligns by
finding the last few generated tokens in the source, nearest to where the pointer was (aggressive decoding for GEC,
Sun et al. 2021; Ge et al. 2022, here for a decoder-only model). The draft length adapts: it doubles while whole
drafts are accepted and halves (to no less than a few tokens) after a rejection.

Drafts are only guesses. :func:`accepted_length` is the whole acceptance rule — a draft token is kept only where it
equals the model's own greedy token at that position — so the output is the greedy output whatever the drafter
proposes (the engine verifies every draft in one forward). The source is tokenized on its own, which may differ
from its tokens inside the prompt or the answer (BPE merges across a boundary); that costs speed, never
correctness. This module does no tensor work.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def accepted_length(draft: Sequence[int], predicted: Sequence[int]) -> int:
    """The number of leading draft tokens equal to the model's greedy tokens at their positions.

    Args:
        draft: the proposed tokens ``d_0, d_1, ...``.
        predicted: the model's argmax at the position before each draft token (``predicted[i]`` is what the model
            writes where ``d_i`` was proposed, given everything before it).

    Returns:
        ``a`` such that ``d_0..d_{a-1}`` are what greedy decoding writes; ``predicted[a]`` is then the model's own
        next token (the "bonus" token every verify step yields).
    """
    n = 0
    for d, p in zip(draft, predicted):
        if d != p:
            break
        n += 1
    return n


class CopyDrafter:
    """Proposes the continuation of ``source`` from where the output stands.

    Args:
        source: the source sentence's token ids.
        end_token: the end-of-turn token proposed after the source (a corrector stops there), or None.
        max_draft: the longest draft :attr:`want` asks for.
        min_draft: the shortest draft it asks for after a rejection (on a GPU a few more tokens per step cost
            nothing; on a CPU every token costs).
        width: characters a token stands for (to skip the source tokens an unmatched output token replaces);
            None counts every token as one.
    """

    MATCH_LENGTHS = (3, 2, 1)  # suffix lengths tried when re-aligning, longest first

    def __init__(
        self,
        source: Sequence[int],
        end_token: int | None = None,
        *,
        max_draft: int = 32,
        min_draft: int = 4,
        width: Callable[[int], int] | None = None,
    ):
        self.source = list(source) + ([end_token] if end_token is not None else [])
        self.pos = 0
        self.max_draft = max(1, max_draft)
        self.min_draft = max(1, min(min_draft, self.max_draft))
        self.width = width
        self.want = min(self.max_draft, max(1, len(self.source)))

    def propose(self, n: int) -> list[int]:
        """Up to ``n`` draft tokens: the source from the aligned position (fewer near its end)."""
        return self.source[self.pos : self.pos + max(0, n)]

    def update(self, out: Sequence[int], drafted: int, accepted: int) -> None:
        """Move past a step's output: ``accepted`` of ``drafted`` proposed tokens were kept and the model's own next
        token is ``out[-1]`` (``out`` is the whole output so far)."""
        self.pos += accepted
        bonus = out[-1]
        if self.pos < len(self.source) and self.source[self.pos] == bonus:
            self.pos += 1  # the model copied one more token than was drafted
        else:
            self.pos = self._realign(out, self.pos)
        if drafted and accepted == drafted:
            self.want = min(self.max_draft, 2 * max(self.want, drafted))
        elif drafted:  # an edit: most of the sentence is usually still ahead, so shrink gently
            self.want = min(self.max_draft, max(self.min_draft, accepted + 1, self.want // 2))
        self.want = max(1, min(self.want, len(self.source) - self.pos))

    def _realign(self, out: Sequence[int], expected: int) -> int:
        """The source position after the last generated tokens, matched as an n-gram nearest to ``expected``."""
        for n in self.MATCH_LENGTHS:
            if len(out) < n:
                continue
            tail = list(out[-n:])
            ends = [i + n for i in range(len(self.source) - n + 1) if self.source[i : i + n] == tail]
            if ends:
                return min(ends, key=lambda e: (abs(e - expected - 1), e))
        # New text that is nowhere in the source: assume it replaces as many source characters as it has
        # (a substitution, the commonest edit); whitespace-only text replaces nothing (an insertion).
        chars = self.width(out[-1]) if self.width else 1
        pos = expected
        while chars > 0 and pos < len(self.source):
            chars -= max(1, self.width(self.source[pos]) if self.width else 1)
            pos += 1
        return pos
