"""Packing: same loss as unpacked training, and no token sees another document."""

from __future__ import annotations

import bisect
import random

import numpy as np
import pytest
import torch

from tests.helpers import tiny_qwen2
from zhtune.data.packing import (
    best_fit_rows,
    collate_packed,
    collate_padded,
    pack_samples,
    packing_efficiency,
    row_from_arrays,
)
from zhtune.data.tokenize import IGNORE_INDEX, TokenizedSample

VOCAB = 512


def random_samples(n: int, seed: int = 0) -> list[TokenizedSample]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(3, 40)
        ids = [rng.randrange(1, VOCAB) for _ in range(length)]
        prompt = rng.randint(1, length - 1)
        labels = [IGNORE_INDEX] * prompt + ids[prompt:]
        if i % 3 == 0:  # some samples supervise their first token too (train_on_prompt)
            labels = list(ids)
        out.append(TokenizedSample(ids, labels, f"sample{i}"))
    return out


def summed_loss(model, batch) -> torch.Tensor:
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
    labels = batch["labels"]
    shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
    return torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        reduction="sum",
        ignore_index=IGNORE_INDEX,
    )


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def model(request, tmp_path_factory):
    return tiny_qwen2(tmp_path_factory.mktemp(f"qwen2-{request.param}"), VOCAB, attn=request.param)


def test_packed_loss_equals_unpacked_loss(model):
    samples = random_samples(24)
    rows = pack_samples(samples, row_len=96, pad_id=0)
    assert sorted(len(r.input_ids) for r in rows) == [96] * len(rows)
    assert sum(r.n_documents for r in rows) == len(samples)
    assert len(rows) < len(samples) / 2 and packing_efficiency(rows) > 0.8
    with torch.no_grad():
        packed = summed_loss(model, collate_packed(rows))
        unpacked = sum(summed_loss(model, collate_padded([s], pad_id=0)) for s in samples)
        batched = summed_loss(model, collate_padded(samples, pad_id=0))
    n_tokens = sum(sum(label != IGNORE_INDEX for label in s.labels[1:]) for s in samples)
    assert n_tokens > 300
    torch.testing.assert_close(packed, unpacked, rtol=1e-5, atol=1e-5 * n_tokens)
    torch.testing.assert_close(batched, unpacked, rtol=1e-5, atol=1e-5 * n_tokens)


def _doc_logits(model, rows, doc) -> torch.Tensor:
    (row,) = rows
    start = next(i for i in range(len(row.input_ids)) if row.input_ids[i : i + len(doc)] == doc)
    batch = collate_packed(rows)
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
    return logits[start : start + len(doc)]


def test_logits_do_not_depend_on_neighbouring_documents(model):
    doc = list(range(10, 30))
    ref = _doc_logits(model, pack_samples([TokenizedSample(doc, doc)], 64, 0), doc)
    for seed in (1, 2):
        rng = random.Random(seed)
        other = [rng.randrange(40, VOCAB) for _ in range(30)]
        rows = pack_samples([TokenizedSample(other, other), TokenizedSample(doc, doc)], 64, 0)
        assert rows[0].n_documents == 2
        torch.testing.assert_close(_doc_logits(model, rows, doc), ref, rtol=1e-5, atol=1e-5)
    # the neighbour matters without the block mask, so the check above is not vacuous
    row = rows[0]
    start = next(i for i in range(64) if row.input_ids[i : i + 20] == doc)
    with torch.no_grad():
        leaky = model(input_ids=torch.tensor([row.input_ids])).logits[0, start : start + 20]
    assert start > 0 and not torch.allclose(leaky, ref, atol=1e-3)


def test_oversized_sample_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        pack_samples([TokenizedSample([1] * 10, [1] * 10, "f.json:3")], row_len=8, pad_id=0)


def test_position_ids_alone_give_document_blocks_with_flex_attention(tmp_path):
    """Without a mask, transformers derives the blocks from restarting position ids (the flex-attention path)."""
    model = tiny_qwen2(tmp_path / "flex", VOCAB, attn="flex_attention")
    doc = list(range(10, 30))
    other = list(range(40, 70))
    rows = pack_samples([TokenizedSample(other, other), TokenizedSample(doc, doc)], 64, 0)
    batch = collate_packed(rows, None)
    assert "attention_mask" not in batch
    with torch.no_grad():
        # use_cache=False as in training: with a cache transformers does not look for packed sequences
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[
            0, 30:50
        ]
        alone = model(input_ids=torch.tensor([doc])).logits[0]
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-4)


def old_pack_rows(lengths: list[int], row_len: int) -> list[list[int]]:
    """zhtune's packing before the bucketed version, kept verbatim as the reference (Python lists, insort)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            rows.append([i])
            bisect.insort(free, (row_len - n, len(rows) - 1))
        else:
            room, r = free.pop(k)
            rows[r].append(i)
            bisect.insort(free, (room - n, r))
    return rows


def rows_of(lengths, row_len):
    offsets, members = best_fit_rows(np.array(lengths), row_len)
    return [members[offsets[r] : offsets[r + 1]].tolist() for r in range(len(offsets) - 1)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bucketed_best_fit_equals_the_list_version(seed):
    rng = random.Random(seed)
    row_len = rng.choice([64, 256, 2048])
    # many equal lengths (ties) and lengths that fill rows exactly
    lengths = [rng.choice([rng.randint(1, row_len), row_len // 4, row_len // 2, 3]) for _ in range(3000)]
    assert rows_of(lengths, row_len) == old_pack_rows(lengths, row_len)


def first_fit_rows(lengths: list[int], row_len: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows, free = [], []
    for i in order:
        r = next((r for r, room in enumerate(free) if room >= lengths[i]), None)
        if r is None:
            rows.append([]), free.append(row_len)
            r = len(rows) - 1
        rows[r].append(i)
        free[r] -= lengths[i]
    return rows


def test_the_packing_comparison_can_fail():
    """On the same lengths first fit packs otherwise, so the equality above is a real check of best fit."""
    rng = random.Random(0)
    lengths = [rng.randint(1, 256) for _ in range(3000)]
    assert rows_of(lengths, 256) != first_fit_rows(lengths, 256)
    assert sorted(map(sorted, first_fit_rows(lengths, 256))) != sorted(map(sorted, rows_of(lengths, 256)))


def test_rows_from_arrays_equal_rows_from_samples():
    samples = random_samples(40, seed=3)
    rows = pack_samples(samples, row_len=96, pad_id=7)
    ids = np.concatenate([np.array(s.input_ids) for s in samples]).astype(np.int32)
    sup = np.concatenate([np.array(s.labels) != IGNORE_INDEX for s in samples])
    lengths = np.array([len(s.input_ids) for s in samples])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    offsets, members = best_fit_rows(lengths, 96)
    for r, row in enumerate(rows):
        got = row_from_arrays(ids, sup, starts, lengths, members[offsets[r] : offsets[r + 1]], 96, 7)
        assert got == row
