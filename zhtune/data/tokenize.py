"""Turn rendered conversations into ``(input_ids, labels)`` with the loss on assistant turns only.

Labels are ``-100`` wherever no loss is taken. By default only assistant content and its end-of-turn token are
supervised; ``train_on_prompt`` supervises everything, ``mask_history`` only the last assistant turn. Samples
longer than ``cutoff_len`` are truncated or dropped (``overflow``); every dropped sample is counted with a reason
in the :class:`TokenizeReport`, so nothing disappears silently.

:func:`tokenize_conversation` is the reference, one conversation at a time. :class:`BatchEncoder` gives the same
ids and labels for a whole batch with one tokenizer call and no per-token Python: for a fast byte-level BPE
tokenizer (Qwen, GLM-4, Llama-3) a token's position is the running sum of its bytes (a table built once), so the
tokenizer need not compute offsets; other fast tokenizers use offsets; slow (remote-code) ones go one by one.
"""

from __future__ import annotations

import itertools
import logging
import unicodedata
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


def pad_id(tokenizer) -> int:
    """The id that pads batches: the tokenizer's pad token, else its EOS, else 0 (padding is masked out anyway)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(tokenizer.eos_token_id or 0)


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
    keep = segment_keep(segments, config)
    labels = [tid if keep[k] else IGNORE_INDEX for tid, k in zip(ids, owner)]
    return TokenizedSample(ids, labels, conv.origin)


def segment_keep(segments: list[Segment], config: TokenizeConfig) -> list[bool]:
    """Whether each segment's tokens carry a label (``train_on_prompt``, ``mask_history`` applied)."""
    if config.train_on_prompt:
        return [True] * len(segments)
    last_turn = max((s.turn for s in segments if s.target), default=-1)
    return [s.target and not (config.mask_history and s.turn != last_turn) for s in segments]


@dataclass
class TokenizeReport:
    """Counts of what the length policy did, with the first few dropped samples named."""

    samples: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_target: int = 0
    lengths: list[int] | np.ndarray = field(default_factory=list, repr=False)
    supervised: list[int] | np.ndarray = field(default_factory=list, repr=False)
    reasons: list[str] = field(default_factory=list)

    def _drop(self, reason: str) -> None:
        if len(self.reasons) < 5:
            self.reasons.append(reason)

    def summary(self) -> str:
        lengths = np.asarray(self.lengths) if len(self.lengths) else np.zeros(1, dtype=np.int64)
        sup = np.asarray(self.supervised) if len(self.supervised) else np.zeros(1, dtype=np.int64)
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


DROP_TOO_LONG, DROP_NO_TARGET = 1, 2


def drop_reason(origin: str, length: int, code: int, cutoff_len: int) -> str:
    """The message naming a dropped sample (``code``: :data:`DROP_TOO_LONG` or :data:`DROP_NO_TARGET`)."""
    if code == DROP_TOO_LONG:
        return f"{origin}: {length} tokens > cutoff_len {cutoff_len}"
    return f"{origin}: no supervised token left (answer past cutoff_len {cutoff_len}?)"


@dataclass
class EncodedBatch:
    """A batch of conversations after tokenizing and the cutoff policy, as flat arrays.

    Attributes:
        ids: int32 token ids of the kept samples, concatenated.
        supervised: bool per token of ``ids``: the token carries a label (its label is its id).
        lengths: int32 tokens per kept sample.
        n_supervised: int32 per kept sample: labels the loss sees (``labels[1:]``, as training shifts them).
        kept: int64 index (in the input batch) of each kept sample.
        truncated: bool per kept sample.
        dropped: int64 ``[k, 4]``: input index, token count, reason code and whether it was truncated first
            (a prompt longer than ``cutoff_len`` counts as truncated and then as dropped), per dropped sample.
    """

    ids: np.ndarray
    supervised: np.ndarray
    lengths: np.ndarray
    n_supervised: np.ndarray
    kept: np.ndarray
    truncated: np.ndarray
    dropped: np.ndarray


def apply_cutoff(ids: np.ndarray, supervised: np.ndarray, counts: np.ndarray, config: TokenizeConfig) -> EncodedBatch:
    """Apply ``cutoff_len`` / ``overflow`` to flat per-sample token arrays (``counts`` tokens each), vectorized.

    A sample longer than ``cutoff_len`` is cut to its first ``cutoff_len`` tokens (``truncate``) or dropped
    (``drop``); then a sample left without any supervised token after its first is dropped.
    """
    counts = counts.astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]) if len(counts) else counts
    too_long = counts > config.cutoff_len
    keep_len = np.minimum(counts, config.cutoff_len)
    prefix = np.concatenate([[0], np.cumsum(supervised, dtype=np.int64)])
    n_sup = prefix[starts + keep_len] - prefix[starts + np.minimum(keep_len, 1)]
    drop_long = too_long if config.overflow == "drop" else np.zeros_like(too_long)
    drop_empty = ~drop_long & (n_sup == 0)
    keep = ~(drop_long | drop_empty)
    sample_of = np.repeat(np.arange(len(counts)), counts)
    local = np.arange(len(ids)) - np.repeat(starts, counts)
    take = keep[sample_of] & (local < keep_len[sample_of])
    kept = np.flatnonzero(keep)
    drop_idx = np.flatnonzero(~keep)
    codes = np.where(drop_long[drop_idx], DROP_TOO_LONG, DROP_NO_TARGET)
    return EncodedBatch(
        ids=ids[take].astype(np.int32),
        supervised=supervised[take],
        lengths=keep_len[kept].astype(np.int32),
        n_supervised=n_sup[kept].astype(np.int32),
        kept=kept,
        truncated=too_long[kept],
        dropped=np.stack([drop_idx, counts[drop_idx], codes, too_long[drop_idx] & ~drop_long[drop_idx]], axis=1)
        .astype(np.int64)
        .reshape(-1, 4),
    )


def token_byte_lengths(tokenizer) -> np.ndarray | None:
    """Bytes of text each token id stands for, when that is fixed (a byte-level BPE tokenizer); else None.

    In the byte-level alphabet every character is one byte, so a vocabulary token's length is its byte count;
    an added token stands for its content. Tokenizers with a normalizer other than NFC, or with a token of no
    bytes, return None (their positions need the tokenizer's offsets).
    """
    from tokenizers import decoders, normalizers
    from tokenizers.pre_tokenizers import ByteLevel

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not isinstance(backend.decoder, decoders.ByteLevel):
        return None
    if backend.normalizer is not None and not isinstance(backend.normalizer, normalizers.NFC):
        return None
    alphabet = set(ByteLevel.alphabet())
    vocab = backend.get_vocab(with_added_tokens=False)
    added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
    table = np.zeros(max([*vocab.values(), *added, 0]) + 1, dtype=np.int64)
    for token, i in vocab.items():
        if not alphabet.issuperset(token):
            return None
        table[i] = len(token)
    for i, content in added.items():
        table[i] = len(content.encode("utf-8"))
    if (table[list(vocab.values()) + list(added)] == 0).any():
        return None
    return table


@dataclass
class Rendered:
    """Rendered texts of a batch: per text its runs of consecutive segments with the same supervision (texts,
    flags) and, for byte positions, their UTF-8 lengths; ``convs`` for templates encoded piece by piece."""

    texts: list[str]
    runs: list[tuple[list[str], list[bool]]]
    convs: list[Conversation] = field(default_factory=list)
    run_bytes: list[list[int]] | None = None
    normalized: bool = True


class BatchEncoder:
    """Render, tokenize and label batches of conversations exactly as :func:`tokenize_conversation` does.

    Args:
        tokenizer: a transformers tokenizer.
        template: the chat template.
        config: label and cutoff options.
        options: render options (system prompt, thinking).

    Raises:
        ConfigError: the tokenizer lacks a special token the template needs.
    """

    def __init__(self, tokenizer, template: Template, config: TokenizeConfig, options: RenderOptions):
        check_template_tokens(tokenizer, template)
        self.tokenizer, self.template, self.config, self.options = tokenizer, template, config, options
        self.specials = SpecialTokens.of(tokenizer)
        joined = template.tokenization == "joined" and getattr(tokenizer, "is_fast", False)
        self.byte_table = token_byte_lengths(tokenizer) if joined else None
        self.mode = "pieces" if not joined else ("bytes" if self.byte_table is not None else "offsets")
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._nfc = backend is not None and type(backend.normalizer).__name__ == "NFC"

    def encode(self, convs: list[Conversation]) -> EncodedBatch:
        """Tokenize ``convs`` and apply the cutoff policy (see :class:`EncodedBatch`).

        Raises:
            DataError: a conversation the template cannot render.
        """
        return self.encode_rendered(self.render(convs))

    def render(self, convs: list[Conversation]) -> Rendered:
        """The Python half of :meth:`encode` (rendering, segment byte lengths), which another thread may run while
        this one is in the tokenizer.

        Raises:
            DataError: a conversation the template cannot render.
        """
        if self.mode == "pieces":
            return Rendered([], [], convs=convs)
        texts, runs = [], []
        for conv in convs:
            segments = self.template.render(conv, self.specials, self.options)
            keep = segment_keep(segments, self.config)
            run_texts, run_keep = [], []
            for seg, k in zip(segments, keep):
                if run_keep and run_keep[-1] == k:
                    run_texts[-1] += seg.text
                else:
                    run_texts.append(seg.text)
                    run_keep.append(k)
            texts.append("".join(run_texts))
            runs.append((run_texts, run_keep))
        out = Rendered(texts, runs)
        if self.mode == "bytes":
            out.run_bytes = [[len(t.encode("utf-8")) for t in run_texts] for run_texts, _keep in runs]
            out.normalized = not self._nfc or all(unicodedata.is_normalized("NFC", t) for t in texts)
        return out

    def encode_rendered(self, rendered: Rendered) -> EncodedBatch:
        """Tokenize what :meth:`render` made and apply the cutoff policy."""
        if self.mode == "pieces":
            samples = [
                tokenize_conversation(c, self.tokenizer, self.template, self.config, self.options)
                for c in rendered.convs
            ]
            counts = np.array([len(x.input_ids) for x in samples], dtype=np.int64)
            ids = np.fromiter((t for x in samples for t in x.input_ids), np.int64, int(counts.sum()))
            labels = np.fromiter((t for x in samples for t in x.labels), np.int64, int(counts.sum()))
            return apply_cutoff(ids, labels != IGNORE_INDEX, counts, self.config)
        ids, counts, supervised = self._encode_joined(rendered)
        return apply_cutoff(ids, supervised, counts, self.config)

    def _encode_joined(self, rendered: Rendered) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Flat ids, per-text token counts and per-token supervision of the texts, each tokenized whole."""
        texts, runs = rendered.texts, rendered.runs
        if self.mode == "bytes" and rendered.run_bytes is not None:
            ids, counts = _backend_ids(self.tokenizer, texts)
            local_end, totals = _local_cumsum(self.byte_table[ids], counts)
            ok = totals == np.fromiter((sum(b) for b in rendered.run_bytes), np.int64, len(texts))
            if rendered.normalized and ok.all():
                return ids, counts, _owner_keep(local_end - 1, counts, rendered.run_bytes, [k for _t, k in runs])
            # A text the byte sums do not explain (normalization changed it, an added token ate a space):
            # this batch goes through the offsets; a tokenizer where that is the rule stops trying.
            if ok.mean() < 0.5:
                self.mode = "offsets"
        return self._encode_with_offsets(texts, runs)

    def _encode_with_offsets(self, texts: list[str], runs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False)
        counts = np.fromiter((len(x) for x in enc["input_ids"]), np.int64, len(texts))
        total = int(counts.sum())
        ids = np.fromiter(itertools.chain.from_iterable(enc["input_ids"]), np.int64, total)
        spans = np.fromiter(
            itertools.chain.from_iterable(itertools.chain.from_iterable(enc["offset_mapping"])), np.int64, 2 * total
        ).reshape(-1, 2)
        text_len = np.repeat(np.fromiter((len(t) for t in texts), np.int64, len(texts)), counts)
        # the segment holding the token's last character; a token with no characters takes the one at its start
        positions = np.where(spans[:, 1] > spans[:, 0], spans[:, 1] - 1, np.minimum(spans[:, 0], text_len - 1))
        run_chars = [[len(t) for t in run_texts] for run_texts, _keep in runs]
        return ids, counts, _owner_keep(positions, counts, run_chars, [k for _t, k in runs])


def _backend_ids(tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Ids of ``texts`` (no special tokens added) from the Rust tokenizer, without computing offsets."""
    backend = tokenizer.backend_tokenizer
    if backend.truncation is not None or backend.padding is not None:
        rows = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    else:
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        rows = [e.ids for e in encode(texts, add_special_tokens=False)]
    counts = np.fromiter((len(r) for r in rows), np.int64, len(rows))
    return np.fromiter(itertools.chain.from_iterable(rows), np.int64, int(counts.sum())), counts


def _local_cumsum(units: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Running sum of ``units`` restarting at every sample, and each sample's total."""
    prefix = np.concatenate([[0], np.cumsum(units, dtype=np.int64)])
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    base = prefix[starts]
    return prefix[1:] - np.repeat(base, counts), prefix[starts + counts] - base


def _owner_keep(positions: np.ndarray, counts: np.ndarray, run_lengths: list[list[int]], run_keep: list[list[bool]]):
    """Supervision of each token: that of the run (of segments) its position falls in, all samples at once."""
    n = len(counts)
    run_counts = np.fromiter((len(r) for r in run_lengths), np.int64, n)
    run_ends = np.fromiter(
        itertools.chain.from_iterable(itertools.accumulate(r) for r in run_lengths), np.int64, int(run_counts.sum())
    )
    keep = np.fromiter(itertools.chain.from_iterable(run_keep), bool, int(run_counts.sum()))
    run_keys = (np.repeat(np.arange(n, dtype=np.int64), run_counts) << 32) | run_ends
    token_keys = (np.repeat(np.arange(n, dtype=np.int64), counts) << 32) | positions
    owner = np.minimum(np.searchsorted(run_keys, token_keys, side="right"), max(len(keep) - 1, 0))
    return keep[owner] if len(keep) else np.zeros(len(positions), dtype=bool)


def tokenize_dataset(
    conversations: Iterable[Conversation],
    tokenizer,
    template: Template,
    config: TokenizeConfig = TokenizeConfig(),
    options: RenderOptions = RenderOptions(),
    batch_size: int = 1024,
) -> tuple[list[TokenizedSample], TokenizeReport]:
    """Tokenize every conversation and apply the ``cutoff_len`` / ``overflow`` policy, in memory.

    Returns:
        ``(samples, report)``; the report counts truncated and dropped samples with reasons.

    Raises:
        ConfigError: the tokenizer lacks a special token the template needs.
        DataError: a conversation the template cannot render (tools on a template without tool support).
    """
    encoder = BatchEncoder(tokenizer, template, config, options)
    report = TokenizeReport()
    out: list[TokenizedSample] = []
    convs = list(conversations)
    for begin in range(0, len(convs), batch_size):
        batch = convs[begin : begin + batch_size]
        enc = encoder.encode(batch)
        report.samples += len(batch)
        report.kept += len(enc.kept)
        report.truncated += int(enc.truncated.sum()) + int(enc.dropped[:, 3].sum())
        for index, length, code, _truncated in enc.dropped.tolist():
            if code == DROP_TOO_LONG:
                report.dropped_too_long += 1
            else:
                report.dropped_no_target += 1
            report._drop(drop_reason(batch[index].origin, length, code, config.cutoff_len))
        report.lengths += enc.lengths.tolist()
        report.supervised += enc.n_supervised.tolist()
        labels = np.where(enc.supervised, enc.ids, IGNORE_INDEX)
        bounds = np.concatenate([[0], np.cumsum(enc.lengths)]).tolist()
        ids_list, labels_list = enc.ids.tolist(), labels.tolist()
        for j, index in enumerate(enc.kept.tolist()):
            a, b = bounds[j], bounds[j + 1]
            out.append(TokenizedSample(ids_list[a:b], labels_list[a:b], batch[index].origin))
    return out, report
