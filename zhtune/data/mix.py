"""One stream of raw records from several data files (``data.mix``, ``data.max_samples``), and the validation split.

The stream is what ``zhtune prepare`` tokenizes: records in the order the mix strategy gives them, each with its
file, line, position in the stream and, for a record read again by ``interleave_over``, the position of its first
reading (so the split can treat both readings as one record). Nothing here parses a record's fields or
tokenizes: :mod:`zhtune.data.formats` and :mod:`zhtune.data.tokenize` do. The split is made on records, before a
record expands into several samples (``cgec_refs: each``, self-instruct instances), so the references of one
sentence never fall on both sides.
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from zhtune.config import DataConfig
from zhtune.data.formats import detect_file_format
from zhtune.data.readers import iter_records
from zhtune.errors import ConfigError, DataError

_DRAWS = 1 << 16  # interleave draws are made in blocks of this size (fixed: the order depends on it)


@dataclass
class StreamItem:
    """One record of the stream: ``rec`` is the parsed JSON (or the reader's :class:`DataError`), ``fmt`` the
    file's format (None while it is unknown, i.e. before the file's first object), ``first`` the stream position
    of the record's first reading (its own position unless it is a repeat)."""

    file: int
    line: int
    rec: object
    fmt: str | None
    first: int


@dataclass
class _Source:
    """One data file being read: at most ``limit`` records per pass, format fixed or detected."""

    path: Path
    index: int
    limit: int | None
    fmt: str | None
    passes: int = 0
    read: int = 0  # records read in this pass
    records: Iterator | None = None
    first_positions: array = field(default_factory=lambda: array("q"))  # only kept when reading again is possible

    def start(self) -> None:
        self.records, self.read = iter_records(self.path), 0

    def next(self, position: int, keep_positions: bool) -> StreamItem | None:
        """The next record of this pass, or None when the file (or its ``max_samples``) is exhausted."""
        if self.records is None:
            self.start()
        if self.limit is not None and self.read >= self.limit:
            return None
        got = next(self.records, None)
        if got is None:
            return None
        line, rec = got
        ordinal = self.read
        self.read += 1
        if self.fmt is None and isinstance(rec, dict):
            try:
                self.fmt = detect_file_format(rec, self.path, line)
            except DataError as exc:
                rec = exc  # counted or raised like any bad record; detection is tried again on the next one
        if self.passes == 0:
            if keep_positions:
                self.first_positions.append(position)
            first = position
        else:
            first = self.first_positions[ordinal]
        return StreamItem(self.index, line, rec, self.fmt, first)


class RecordStream:
    """The records of ``data.paths`` mixed as ``data.mix`` says, with per-file ``max_samples``.

    Args:
        data: the data section (paths, format, max_samples, mix).
        explicit_format: the format every file is read as (None: detected per file).
        seed: the seed for ``interleave`` draws when ``data.mix.seed`` is not set (the recipe's ``train.seed``).
    """

    def __init__(self, data: DataConfig, explicit_format: str | None, seed: int):
        limits = data.file_limits()
        self.sources = [_Source(Path(p), i, limits[i], explicit_format) for i, p in enumerate(data.paths)]
        self.mix = data.mix
        self.seed = data.mix.seed if data.mix.seed is not None else seed
        self.position = 0
        self.repeats = 0  # records read again by interleave_over

    def __iter__(self) -> Iterator[StreamItem]:
        if self.mix.strategy == "concat":
            for source in self.sources:
                while (item := source.next(self.position, False)) is not None:
                    yield self._count(item)
        else:
            yield from self._interleave(self.mix.strategy == "interleave_over")

    def _count(self, item: StreamItem) -> StreamItem:
        if item.first != self.position:
            self.repeats += 1
        self.position += 1
        return item

    def _choices(self) -> Iterator[int]:
        n = len(self.sources)
        if not self.mix.probabilities:
            while True:
                yield from range(n)
        rng = np.random.default_rng(self.seed)
        probs = np.asarray(self.mix.probabilities, dtype=np.float64)
        while True:
            yield from rng.choice(n, size=_DRAWS, p=probs / probs.sum()).tolist()

    def _interleave(self, oversample: bool) -> Iterator[StreamItem]:
        exhausted = [False] * len(self.sources)
        empty = [False] * len(self.sources)
        for k in self._choices():
            source = self.sources[k]
            if empty[k]:
                continue
            item = source.next(self.position, oversample)
            if item is None:
                if not oversample:
                    return
                exhausted[k] = True
                if source.passes == 0 and source.read == 0:
                    empty[k] = True  # a file with no records cannot be read again
                if all(exhausted):
                    return
                source.passes += 1
                source.start()
                item = source.next(self.position, oversample)
                if item is None:
                    continue
            yield self._count(item)


def held_out_records(n_records: int, val_size: float, seed: int) -> np.ndarray:
    """Which of ``n_records`` records are held out for validation: ``val_size`` of them (a fraction below 1, or a
    count), chosen with ``seed`` exactly as zhtune always chose them (Python's ``random.Random(seed).shuffle``).

    Returns:
        A boolean array, True for held-out records.

    Raises:
        ConfigError: ``val_size`` leaves no training data.
    """
    n_val = int(val_size) if val_size >= 1 else int(round(n_records * val_size))
    held = np.zeros(n_records, dtype=bool)
    if n_val <= 0:
        return held
    if n_val >= n_records:
        raise ConfigError(f"train.val_size {val_size} leaves no training data ({n_records} records)")
    order = list(range(n_records))
    random.Random(seed).shuffle(order)
    held[np.asarray(order[:n_val], dtype=np.int64)] = True
    return held
