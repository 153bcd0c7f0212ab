"""Turn rendered conversations into ``(input_ids, labels)`` with the loss on assistant turns only.

Labels are ``-100`` wherever no loss is taken. By default only assistant content and its end-of-turn token are
supervised; ``train_on_prompt`` supervises everything, ``mask_history`` only the last assistant turn. Samples
longer than ``cutoff_len`` are truncated or dropped (``overflow``); every dropped sample is counted with a reason
in the :class:`TokenizeReport`, so nothing disappears silently.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from zhtune.config import TokenizeConfig
from zhtune.data.conversation import Conversation
from zhtune.data.templates import RenderOptions, Segment, SpecialTokens, Template
from zhtune.errors import ConfigError

IGNORE_INDEX = -100
log = logging.getLogger(__name__)
_warned: set[str] = set()


@dataclass
class TokenizedSample:
    """One training sample; ``origin`` is the ``file:line`` it came from."""

    input_ids: list[int]
    labels: list[int]
    origin: str = ""


def _special_id(tokenizer, name: str) -> int:
    tid = tokenizer.convert_tokens_to_ids(name)
    unk = getattr(tokenizer, "unk_token_id", None)
    if tid is None or (isinstance(tid, int) and tid == unk and name != getattr(tokenizer, "unk_token", None)):
        raise ConfigError(
            f"the tokenizer has no token {name!r}, which this template needs; is it the right template for this "
            f"model ({type(tokenizer).__name__})?"
        )
    return int(tid)


def check_template_tokens(tokenizer, template: Template) -> None:
    """Fail early, with the token's name, when ``template`` needs special tokens ``tokenizer`` lacks.

    Raises:
        ConfigError: a required token is missing or is not a single token.
    """
    for name in template.tokens:
        tid = _special_id(tokenizer, name)
        ids = tokenizer(name, add_special_tokens=False)["input_ids"]
        if list(ids) != [tid]:
            raise ConfigError(
                f"template '{template.name}' needs {name!r} as one special token, but this tokenizer splits it "
                f"into {list(ids)}; pick the template that matches the model"
            )


def encode_segments(tokenizer, segments: list[Segment], tokenization: str) -> tuple[list[int], list[int]]:
    """Encode segments; return ``(ids, segment_index_of_each_token)``.

    ``joined`` tokenizes the concatenated text once and assigns each token to the segment holding its last
    character (so a token that spans a boundary, like SentencePiece's ``▁答``, belongs to the answer). It needs
    a fast tokenizer's offsets; a slow tokenizer falls back to ``pieces`` with a one-time warning.
    """
    if tokenization == "joined" and not getattr(tokenizer, "is_fast", False):
        key = type(tokenizer).__name__
        if key not in _warned:
            _warned.add(key)
            log.warning("%s has no offsets (not a fast tokenizer): encoding template segments one by one", key)
        tokenization = "pieces"
    if tokenization == "pieces":
        ids, owner = [], []
        for k, seg in enumerate(segments):
            piece = (
                [_special_id(tokenizer, seg.text)]
                if seg.special
                else tokenizer.encode(seg.text, add_special_tokens=False)
            )
            ids += piece
            owner += [k] * len(piece)
        return ids, owner
    text = "".join(s.text for s in segments)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    char_owner = np.repeat(np.arange(len(segments)), [len(s.text) for s in segments])
    owner = []
    for start, end in enc["offset_mapping"]:
        pos = end - 1 if end > start else min(start, len(text) - 1)
        owner.append(int(char_owner[pos]))
    return list(enc["input_ids"]), owner


def tokenize_conversation(
    conv: Conversation,
    tokenizer,
    template: Template,
    config: TokenizeConfig = TokenizeConfig(),
    options: RenderOptions = RenderOptions(),
) -> TokenizedSample:
    """Render and tokenize one conversation (no length policy applied; see :func:`tokenize_dataset`)."""
    segments = template.render(conv, SpecialTokens.of(tokenizer), options)
    ids, owner = encode_segments(tokenizer, segments, template.tokenization)
    last_turn = max((s.turn for s in segments if s.target), default=-1)
    labels = []
    for tid, k in zip(ids, owner):
        seg = segments[k]
        keep = config.train_on_prompt or (seg.target and not (config.mask_history and seg.turn != last_turn))
        labels.append(tid if keep else IGNORE_INDEX)
    return TokenizedSample(ids, labels, conv.origin)


@dataclass
class TokenizeReport:
    """Counts of what the length policy did, with the first few dropped samples named."""

    samples: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_target: int = 0
    lengths: list[int] = field(default_factory=list, repr=False)
    supervised: list[int] = field(default_factory=list, repr=False)
    reasons: list[str] = field(default_factory=list)

    def _drop(self, reason: str) -> None:
        if len(self.reasons) < 5:
            self.reasons.append(reason)

    def summary(self) -> str:
        lengths = np.array(self.lengths or [0])
        sup = np.array(self.supervised or [0])
        text = (
            f"{self.samples} samples → {self.kept} kept; {self.truncated} truncated, {self.dropped_too_long} dropped "
            f"as too long, {self.dropped_no_target} dropped with no supervised token\n"
            f"tokens per sample: mean {lengths.mean():.1f}, median {np.median(lengths):.0f}, "
            f"p95 {np.percentile(lengths, 95):.0f}, max {lengths.max()}; total {lengths.sum()}, "
            f"supervised {sup.sum()} ({100 * sup.sum() / max(lengths.sum(), 1):.1f}%)"
        )
        if self.reasons:
            text += "\n  first dropped: " + "\n  first dropped: ".join(self.reasons)
        return text


def tokenize_dataset(
    conversations: Iterable[Conversation],
    tokenizer,
    template: Template,
    config: TokenizeConfig = TokenizeConfig(),
    options: RenderOptions = RenderOptions(),
) -> tuple[list[TokenizedSample], TokenizeReport]:
    """Tokenize every conversation and apply the ``cutoff_len`` / ``overflow`` policy.

    Returns:
        ``(samples, report)``; the report counts truncated and dropped samples with reasons.

    Raises:
        ConfigError: the tokenizer lacks a special token the template needs.
        DataError: a conversation the template cannot render (tools on a template without tool support).
    """
    check_template_tokens(tokenizer, template)
    report = TokenizeReport()
    out = []
    for conv in conversations:
        report.samples += 1
        sample = tokenize_conversation(conv, tokenizer, template, config, options)
        if len(sample.input_ids) > config.cutoff_len:
            if config.overflow == "drop":
                report.dropped_too_long += 1
                report._drop(f"{conv.origin}: {len(sample.input_ids)} tokens > cutoff_len {config.cutoff_len}")
                continue
            report.truncated += 1
            sample.input_ids = sample.input_ids[: config.cutoff_len]
            sample.labels = sample.labels[: config.cutoff_len]
        n_sup = sum(label != IGNORE_INDEX for label in sample.labels[1:])
        if n_sup == 0:
            report.dropped_no_target += 1
            report._drop(f"{conv.origin}: no supervised token left (answer past cutoff_len {config.cutoff_len}?)")
            continue
        report.kept += 1
        report.lengths.append(len(sample.input_ids))
        report.supervised.append(n_sup)
        out.append(sample)
    return out, report
