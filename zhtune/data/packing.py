"""Pack short samples into fixed-length rows without letting any token attend across documents.

Rows are filled best-fit-decreasing. Inside a row every document keeps its own position ids (restarting at 0)
and its own causal block of the attention mask, and the first token of each document carries no label (in an
unpacked batch position 0 is never predicted either), so the summed loss over packed rows equals the summed loss
over the same samples unpacked. Padding at the end of a row attends only to itself and carries no label.

The 4D additive mask built here serves eager and SDPA attention on any device; the GPU fast path can use the
same ``seq_ids`` / ``position_ids`` with a varlen or flex-attention kernel instead.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from zhtune.data.tokenize import IGNORE_INDEX, TokenizedSample


@dataclass
class PackedRow:
    """One packed row; ``seq_ids`` numbers the documents in the row (-1 for padding)."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    seq_ids: list[int]

    @property
    def n_documents(self) -> int:
        return len({s for s in self.seq_ids if s >= 0})


def best_fit_rows(lengths: np.ndarray, row_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack documents of ``lengths`` tokens into rows of ``row_len``: best fit, longest first, ties by position.

    Each document goes to the row with the least room that still fits it (the earliest such row on a tie), or
    opens a new row. Rows are kept in buckets by free room (a heap of row indices per room, the rooms sorted), so
    a million documents pack in seconds with a few small arrays, never a Python object per document.

    Returns:
        ``(row_offsets, members)``: ``members[row_offsets[r]:row_offsets[r + 1]]`` are the indices of the
        documents of row ``r``, in the order they were placed.

    Raises:
        ValueError: a document longer than ``row_len`` (apply the cutoff policy first); the message has its index.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.max() > row_len:
        i = int(np.argmax(lengths))
        raise ValueError(f"document {i} of {int(lengths[i])} tokens does not fit a row of {row_len}")
    order = np.argsort(-lengths, kind="stable")
    row_of = np.empty(len(order), dtype=np.int64)
    rows_with_room: dict[int, list[int]] = {}  # free tokens -> heap of the rows with exactly that much room
    rooms: list[int] = []  # the keys of rows_with_room, sorted
    n_rows = 0
    for pos, n in enumerate(lengths[order].tolist()):
        k = bisect.bisect_left(rooms, n)
        if k == len(rooms):
            row, room = n_rows, row_len
            n_rows += 1
        else:
            room = rooms[k]
            heap = rows_with_room[room]
            row = heapq.heappop(heap)
            if not heap:
                del rooms[k], rows_with_room[room]
        left = room - n
        heap = rows_with_room.get(left)
        if heap is None:
            rows_with_room[left] = [row]
            bisect.insort(rooms, left)
        else:
            heapq.heappush(heap, row)
        row_of[pos] = row
    members = order[np.argsort(row_of, kind="stable")]
    row_offsets = np.concatenate([[0], np.cumsum(np.bincount(row_of, minlength=n_rows))]).astype(np.int64)
    return row_offsets, members


def pack_samples(samples: Sequence[TokenizedSample], row_len: int, pad_id: int) -> list[PackedRow]:
    """Pack samples into rows of exactly ``row_len`` tokens (best fit, longest first; see :func:`best_fit_rows`).

    Raises:
        ValueError: a sample longer than ``row_len`` (apply the cutoff policy first).
    """
    for s in samples:
        if len(s.input_ids) > row_len:
            raise ValueError(f"{s.origin}: sample of {len(s.input_ids)} tokens does not fit a row of {row_len}")
    offsets, members = best_fit_rows(np.array([len(s.input_ids) for s in samples], dtype=np.int64), row_len)
    members = members.tolist()
    return [
        _build_row([samples[i] for i in members[offsets[r] : offsets[r + 1]]], row_len, pad_id)
        for r in range(len(offsets) - 1)
    ]


def _build_row(members: list[TokenizedSample], row_len: int, pad_id: int) -> PackedRow:
    ids, labels, pos, seq = [], [], [], []
    for d, s in enumerate(members):
        n = len(s.input_ids)
        ids += s.input_ids
        labels += [IGNORE_INDEX] + s.labels[1:]
        pos += range(n)
        seq += [d] * n
    pad = row_len - len(ids)
    return PackedRow(ids + [pad_id] * pad, labels + [IGNORE_INDEX] * pad, pos + list(range(pad)), seq + [-1] * pad)


def row_from_arrays(
    ids: np.ndarray, supervised: np.ndarray, starts: np.ndarray, lengths: np.ndarray, members, row_len: int, pad_id: int
) -> PackedRow:
    """The packed row of documents ``members``, read from flat token arrays (the memory-mapped cache).

    ``ids[starts[d]:starts[d] + lengths[d]]`` are document ``d``'s tokens and ``supervised`` says which carry a
    label; the row is what :func:`pack_samples` makes of the same documents.
    """
    spans = [(int(starts[m]), int(lengths[m])) for m in members]
    lens = np.array([n for _s, n in spans], dtype=np.int64)
    tokens = np.concatenate([ids[a : a + n] for a, n in spans]).astype(np.int64)
    labels = np.where(np.concatenate([supervised[a : a + n] for a, n in spans]), tokens, IGNORE_INDEX)
    doc_starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    labels[doc_starts] = IGNORE_INDEX  # in a row no document predicts its first token (as position 0 unpacked)
    positions = np.arange(len(tokens)) - np.repeat(doc_starts, lens)
    seq = np.repeat(np.arange(len(spans)), lens)
    pad = row_len - len(tokens)
    return PackedRow(
        tokens.tolist() + [pad_id] * pad,
        labels.tolist() + [IGNORE_INDEX] * pad,
        positions.tolist() + list(range(pad)),
        seq.tolist() + [-1] * pad,
    )


def block_causal_mask(seq_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """4D mask ``[batch, 1, L, L]``: with ``dtype=torch.bool`` True where a query may attend a key (what SDPA
    takes), otherwise additive (0 allowed, dtype-min elsewhere; what eager attention adds to its scores).

    A query attends keys of its own document at or before it; padding (``seq_id`` -1) attends only itself, so
    no softmax row is empty.
    """
    length = seq_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=seq_ids.device).tril()
    same = (seq_ids[:, :, None] == seq_ids[:, None, :]) & (seq_ids[:, :, None] >= 0)
    allowed = (same & causal) | torch.eye(length, dtype=torch.bool, device=seq_ids.device)
    if dtype == torch.bool:
        return allowed[:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=seq_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def collate_packed(
    rows: Sequence[PackedRow], dtype: torch.dtype | None = torch.float32, device: torch.device | str | None = None
) -> dict[str, torch.Tensor]:
    """Stack packed rows into model inputs (``input_ids``, ``labels``, ``position_ids``, 4D ``attention_mask``).

    With ``dtype=None`` no mask is built: transformers then derives the document blocks from the restarting
    ``position_ids`` itself, which flex attention turns into a block-sparse mask that skips cross-document tiles.
    With ``device`` the tensors are made there and the ``[rows, 1, length, length]`` mask is built on the device
    from the small sequence-id tensor (building it on the CPU and copying it costs more than the GPU's attention).
    """
    batch = {
        "input_ids": torch.tensor([r.input_ids for r in rows], device=device),
        "labels": torch.tensor([r.labels for r in rows], device=device),
        "position_ids": torch.tensor([r.position_ids for r in rows], device=device),
    }
    if dtype is not None:
        batch["attention_mask"] = block_causal_mask(torch.tensor([r.seq_ids for r in rows], device=device), dtype)
    return batch


def collate_padded(samples: Sequence[TokenizedSample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad samples to the longest one (the plain, unpacked batch)."""
    longest = max(len(s.input_ids) for s in samples)
    ids, labels, mask = [], [], []
    for s in samples:
        pad = longest - len(s.input_ids)
        ids.append(s.input_ids + [pad_id] * pad)
        labels.append(s.labels + [IGNORE_INDEX] * pad)
        mask.append([1] * len(s.input_ids) + [0] * pad)
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}


def real_tokens(rows: Sequence[PackedRow]) -> int:
    """Tokens of ``rows`` that belong to a document (not row padding)."""
    return sum(s >= 0 for r in rows for s in r.seq_ids)


def packing_efficiency(rows: Sequence[PackedRow]) -> float:
    """Share of row tokens that are real (non-padding) tokens."""
    total = sum(len(r.input_ids) for r in rows)
    return real_tokens(rows) / max(total, 1)
