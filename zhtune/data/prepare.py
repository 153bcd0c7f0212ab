"""Build a prepared data set: stream the records, tokenize them chunk by chunk, write flat arrays to disk.

:func:`build_samples` turns the record stream of :mod:`zhtune.data.mix` into the tokenized half of a cache
(:mod:`zhtune.data.cache` decides where it goes and when it is reused). Memory is bounded by one chunk of records
(:data:`CHUNK_RECORDS`) plus a few bytes per record: every chunk is parsed, rendered, tokenized with one batch
call (:class:`zhtune.data.tokenize.BatchEncoder`) and appended to raw binary files. With ``data.num_workers`` > 1,
chunks are tokenized in that many processes, in order, with at most two chunks per process in flight.
:func:`build_layout` makes the other half from those files: the validation split on records and the packed rows.
Neither decides cache keys or locking.
"""

from __future__ import annotations

import collections
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from zhtune.config import Recipe
from zhtune.data.formats import LoadReport, ParseContext, check_format_name, record_conversations
from zhtune.data.mix import RecordStream, held_out_records
from zhtune.data.packing import best_fit_rows
from zhtune.data.templates import RenderOptions, get_template
from zhtune.data.tokenize import DROP_TOO_LONG, BatchEncoder, TokenizeReport, drop_reason
from zhtune.errors import DataError

CHUNK_RECORDS = 2048

# name -> dtype of every flat file of the tokenized half (raw little-endian arrays, np.memmap-able)
SAMPLE_ARRAYS = {
    "input_ids": np.int32,  # tokens of all kept samples, concatenated
    "supervised": np.bool_,  # per token: it carries a label
    "sample_length": np.int32,
    "sample_n_supervised": np.int32,
    "sample_record": np.int64,  # stream position of the record a sample came from
    "sample_truncated": np.bool_,
    "record_file": np.int32,
    "record_line": np.int64,
    "record_valid": np.bool_,  # parsed without error
    "record_first": np.int64,  # stream position of the record's first reading
    "dropped": np.int64,  # 4 per dropped sample: record position, tokens, reason code, truncated first
}


@dataclass
class ChunkResult:
    """What one chunk of records became (positions are relative to the chunk)."""

    valid: np.ndarray
    sample_item: np.ndarray
    ids: np.ndarray
    supervised: np.ndarray
    lengths: np.ndarray
    n_supervised: np.ndarray
    truncated: np.ndarray
    dropped: np.ndarray
    conversations: int = 0
    trimmed: int = 0
    errors: list = field(default_factory=list)  # (path, line, field, reason) of bad records, in order
    fatal: tuple | None = None  # the error that stops the build (on_error: raise, or a render error)
    pending: tuple | None = None  # (rendered, owner) between front and back


class ChunkEncoder:
    """Parse, render and tokenize chunks of stream items (in this process or in a worker)."""

    def __init__(self, recipe: Recipe, tokenizer):
        self.data = recipe.data
        self.paths = [str(p) for p in recipe.data.paths]
        options = RenderOptions(system=recipe.template.system, enable_thinking=recipe.template.enable_thinking)
        self.encoder = BatchEncoder(tokenizer, get_template(recipe.template.name), recipe.tokenize, options)

    def __call__(self, items: list[tuple[int, int, object, str | None]]) -> ChunkResult:
        return self.back(self.front(items))

    def front(self, items: list[tuple[int, int, object, str | None]]) -> ChunkResult:
        """Parse and render a chunk (pure Python): the result has no tokens yet, only ``pending`` renderings."""
        ctx = ParseContext(self.data)
        valid = np.zeros(len(items), dtype=bool)
        convs, owner, errors, fatal = [], [], [], None
        for j, (file, line, rec, fmt) in enumerate(items):
            try:
                got = record_conversations(rec, fmt, ctx, self.paths[file], line)
            except DataError as exc:
                errors.append((exc.path, exc.line, exc.field, exc.reason))
                if self.data.on_error == "raise":
                    fatal = errors[-1]
                    break
                continue
            valid[j] = True
            convs += got
            owner += [j] * len(got)
        try:
            rendered = self.encoder.render(convs)
        except DataError as exc:  # a conversation the template cannot render stops the build whatever on_error says
            fatal = fatal or (exc.path, exc.line, exc.field, exc.reason)
            rendered, owner = self.encoder.render([]), []
        empty = np.zeros(0, dtype=np.int64)
        result = ChunkResult(valid, empty, empty, empty, empty, empty, empty, empty, len(convs), ctx.trimmed, errors)
        result.fatal, result.pending = fatal, (rendered, np.asarray(owner, dtype=np.int64))
        return result

    def back(self, result: ChunkResult) -> ChunkResult:
        """Tokenize what :meth:`front` rendered and fill in the token arrays (the tokenizer's own threads run)."""
        rendered, owner = result.pending
        enc = self.encoder.encode_rendered(rendered)
        dropped = enc.dropped.copy()
        if len(dropped):
            dropped[:, 0] = owner[dropped[:, 0]]
        result.sample_item = owner[enc.kept] if len(enc.kept) else np.zeros(0, dtype=np.int64)
        result.ids, result.supervised, result.lengths = enc.ids, enc.supervised, enc.lengths
        result.n_supervised, result.truncated, result.dropped = enc.n_supervised, enc.truncated, dropped
        result.pending = None
        return result


_WORKER: ChunkEncoder | None = None


def _init_worker(payload: bytes) -> None:
    global _WORKER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: num_workers sets the parallelism
    _WORKER = ChunkEncoder(*pickle.loads(payload))


def _encode_in_worker(items):
    return _WORKER(items)


def _chunks(stream: RecordStream, size: int):
    chunk, firsts = [], []
    for item in stream:
        chunk.append((item.file, item.line, item.rec, item.fmt))
        firsts.append(item.first)
        if len(chunk) == size:
            yield chunk, firsts
            chunk, firsts = [], []
    if chunk:
        yield chunk, firsts


def _encoded_chunks(recipe: Recipe, tokenizer, stream: RecordStream):
    """``(items, firsts, ChunkResult)`` in stream order, tokenized here or by ``data.num_workers`` processes.

    In this process a second thread reads, parses and renders the next chunk while this one is in the tokenizer
    (which releases the GIL), so the Python work hides behind the tokenizer's.
    """
    workers = recipe.data.num_workers
    if workers <= 1:
        from concurrent.futures import ThreadPoolExecutor

        encode = ChunkEncoder(recipe, tokenizer)
        chunks = _chunks(stream, CHUNK_RECORDS)

        def next_front():
            got = next(chunks, None)
            return None if got is None else (*got, encode.front(got[0]))

        with ThreadPoolExecutor(1) as reader:
            ahead = reader.submit(next_front)
            while (done := ahead.result()) is not None:
                ahead = reader.submit(next_front)
                items, firsts, result = done
                yield items, firsts, result if result.fatal else encode.back(result)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ChunkEncoder(recipe, tokenizer)  # a template/tokenizer mismatch fails here, with its message, not in a worker
    payload = pickle.dumps((recipe, tokenizer))
    spawn = multiprocessing.get_context("spawn")
    # a worker that dies (killed, out of memory) raises BrokenProcessPool here instead of hanging the build
    with ProcessPoolExecutor(workers, mp_context=spawn, initializer=_init_worker, initargs=(payload,)) as pool:
        pending = collections.deque()
        for items, firsts in _chunks(stream, CHUNK_RECORDS):
            pending.append((items, firsts, pool.submit(_encode_in_worker, items)))
            if len(pending) >= 2 * workers:
                items0, firsts0, result = pending.popleft()
                yield items0, firsts0, result.result()
        while pending:
            items0, firsts0, result = pending.popleft()
            yield items0, firsts0, result.result()


class _Writer:
    """Appends chunks to the flat files of :data:`SAMPLE_ARRAYS` in ``folder``."""

    def __init__(self, folder: Path):
        self.files = {name: (folder / f"{name}.bin").open("wb") for name in SAMPLE_ARRAYS}

    def add(self, name: str, values) -> None:
        self.files[name].write(np.ascontiguousarray(values, dtype=SAMPLE_ARRAYS[name]).tobytes())

    def close(self) -> None:
        for handle in self.files.values():
            handle.close()


def build_samples(recipe: Recipe, tokenizer, folder: Path) -> dict:
    """Tokenize the recipe's data into ``folder`` (flat arrays, see :data:`SAMPLE_ARRAYS`); return the counts.

    Raises:
        DataError: the first bad record (``on_error: raise``; file:line, field), an unreadable file, or a
            conversation the template cannot render.
        ConfigError: an unknown format or template, a template the tokenizer lacks tokens for.
    """
    stream = RecordStream(recipe.data, check_format_name(recipe.data), recipe.train.seed)
    report = LoadReport()
    counts = collections.Counter()
    writer = _Writer(folder)
    base = 0
    try:
        for items, firsts, res in _encoded_chunks(recipe, tokenizer, stream):
            for path, line, fld, reason in res.errors:
                report.add_skip(DataError(path, line, fld, reason))
            if res.fatal is not None:
                raise DataError(*res.fatal)
            writer.add("input_ids", res.ids)
            writer.add("supervised", res.supervised)
            writer.add("sample_length", res.lengths)
            writer.add("sample_n_supervised", res.n_supervised)
            writer.add("sample_record", res.sample_item + base)
            writer.add("sample_truncated", res.truncated)
            writer.add("record_file", [it[0] for it in items])
            writer.add("record_line", [it[1] for it in items])
            writer.add("record_valid", res.valid)
            writer.add("record_first", firsts)
            dropped = res.dropped.copy()
            dropped[:, 0] += base
            writer.add("dropped", dropped.reshape(-1))
            base += len(items)
            counts.update(
                samples=len(res.lengths), tokens=int(res.lengths.sum()), conversations=res.conversations,
                supervised=int(res.n_supervised.sum()), trimmed=res.trimmed,
            )  # fmt: skip
    finally:
        writer.close()
    formats = {str(s.path): s.fmt or "?" for s in stream.sources}
    return {
        "records": base,
        "repeats": stream.repeats,
        "skipped": report.skipped,
        "skip_reasons": report.reasons,
        "trimmed_trailing_user": counts["trimmed"],
        "conversations": counts["conversations"],
        "samples": counts["samples"],
        "tokens": counts["tokens"],
        "supervised_tokens": counts["supervised"],
        "formats": formats,
    }


def open_arrays(folder: Path) -> dict[str, np.ndarray]:
    """The flat files of ``folder`` as read-only memory maps (empty arrays for empty files)."""
    out = {}
    for name, dtype in SAMPLE_ARRAYS.items():
        path = folder / f"{name}.bin"
        size = path.stat().st_size if path.exists() else 0
        out[name] = np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype=dtype)
    out["dropped"] = out["dropped"].reshape(-1, 4)
    out["sample_start"] = np.concatenate([[0], np.cumsum(out["sample_length"], dtype=np.int64)[:-1]])
    return out


def build_layout(arrays: dict[str, np.ndarray], recipe: Recipe, origin) -> tuple[dict[str, np.ndarray], dict]:
    """Split on records and pack: the arrays and counts of the layout half of a cache.

    Args:
        arrays: :func:`open_arrays` of the tokenized half.
        recipe: ``train.val_size`` / ``train.seed`` (the split), ``tokenize.packing`` / ``cutoff_len`` (the rows).
        origin: ``origin(record_position) -> "file:line"``, for the dropped samples named in the report.

    Returns:
        ``(arrays, meta)``: ``train_samples`` / ``val_samples`` (sample indices) and, when packing,
        ``train_row_offsets`` / ``train_row_members`` (and the same for val); meta has the counts of each split.

    Raises:
        ConfigError: ``val_size`` leaves no training data.
    """
    first = np.asarray(arrays["record_first"])
    n_rec = len(first)
    is_first = first == np.arange(n_rec)
    candidates = np.asarray(arrays["record_valid"]) & is_first
    ranks = np.cumsum(candidates) - 1
    held = held_out_records(int(candidates.sum()), recipe.train.val_size, recipe.train.seed)
    val_record = np.zeros(n_rec, dtype=bool)
    val_record[candidates] = held[ranks[candidates]]
    rec_of = np.asarray(arrays["sample_record"])
    val_sample = val_record[first[rec_of]] if len(rec_of) else np.zeros(0, dtype=bool)
    # a held-out record read again (interleave_over) is validated once and never trained on
    splits = {"train": np.flatnonzero(~val_sample), "val": np.flatnonzero(val_sample & (first[rec_of] == rec_of))}
    dropped = np.asarray(arrays["dropped"])
    drop_val = val_record[first[dropped[:, 0]]] & (first[dropped[:, 0]] == dropped[:, 0])
    drop_train = ~val_record[first[dropped[:, 0]]]
    out, meta = {}, {"val_records": int(held.sum()), "train_records": int(candidates.sum() - held.sum())}
    lengths = np.asarray(arrays["sample_length"])
    for name, samples in splits.items():
        out[f"{name}_samples"] = samples
        rows = 0
        if recipe.tokenize.packing:
            offsets, members = best_fit_rows(lengths[samples], recipe.tokenize.cutoff_len)
            out[f"{name}_row_offsets"], out[f"{name}_row_members"] = offsets, samples[members]
            rows = len(offsets) - 1
        split_dropped = dropped[drop_val if name == "val" else drop_train]
        meta[name] = _split_counts(arrays, samples, split_dropped, rows, recipe, origin)
    return out, meta


def _split_counts(arrays, samples: np.ndarray, dropped: np.ndarray, rows: int, recipe: Recipe, origin) -> dict:
    cutoff = recipe.tokenize.cutoff_len
    lengths = np.asarray(arrays["sample_length"])[samples]
    supervised = np.asarray(arrays["sample_n_supervised"])[samples]
    report = TokenizeReport(
        samples=len(samples) + len(dropped),
        kept=len(samples),
        truncated=int(np.asarray(arrays["sample_truncated"])[samples].sum() + dropped[:, 3].sum()),
        dropped_too_long=int((dropped[:, 2] == DROP_TOO_LONG).sum()),
        dropped_no_target=int((dropped[:, 2] != DROP_TOO_LONG).sum()),
        lengths=lengths,
        supervised=supervised,
        reasons=[drop_reason(origin(int(r)), int(n), int(c), cutoff) for r, n, c, _t in dropped[:5].tolist()],
    )
    tokens = int(lengths.sum())
    return {
        "samples": report.samples,
        "kept": report.kept,
        "truncated": report.truncated,
        "dropped_too_long": report.dropped_too_long,
        "dropped_no_target": report.dropped_no_target,
        "drop_reasons": report.reasons,
        "tokens": tokens,
        "supervised_tokens": int(supervised.sum()),
        "packed_rows": rows,
        "fill_ratio": round(tokens / (rows * cutoff), 4) if rows else None,
        "summary": report.summary(),
    }


def record_origins(arrays: dict[str, np.ndarray], paths) -> Callable[[int], str]:
    """``origin(record_position) -> "file:line"`` over the record arrays, naming files as ``paths`` does."""
    files, lines = arrays["record_file"], arrays["record_line"]
    return lambda pos: f"{paths[int(files[pos])]}:{int(lines[pos])}"


__all__ = ["CHUNK_RECORDS", "SAMPLE_ARRAYS", "build_samples", "build_layout", "open_arrays", "record_origins"]
