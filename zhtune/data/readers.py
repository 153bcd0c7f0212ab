"""Read raw records from data files, keeping the line each record starts on.

Handles JSON arrays, JSON Lines (whatever the extension says), gzip-compressed versions of both, and
tab-separated parallel ("para") files ``id<TAB>source<TAB>ref...``. Every record comes with its 1-based line
number so that any later error can name ``file:line``. This module only parses; what a record *means* is
decided in :mod:`zhtune.data.formats`.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from pathlib import Path

from zhtune.errors import DataError

_WS = re.compile(r"[ \t\n\r]*")
PARA_SUFFIXES = (".para", ".tsv", ".txt")


def _read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(str(path), None, None, "file not found") from None
    except IsADirectoryError:
        raise DataError(str(path), None, None, "is a directory, expected a data file") from None
    if path.suffix == ".gz" or data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise DataError(str(path), None, None, f"not a valid gzip file ({exc})") from None
    return data


def _decode(data: bytes, path: Path, first_line: int = 1) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = first_line + data.count(b"\n", 0, exc.start)
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        bad = data[exc.start : exc.end].hex(" ")
        raise DataError(
            str(path), line, None, f"invalid UTF-8 (bytes {bad} at column {col}); re-encode the file as UTF-8"
        ) from None
    return text[1:] if text.startswith("\ufeff") else text


def _iter_json_array(text: str, path: Path) -> Iterator[tuple[int, object]]:
    decoder = json.JSONDecoder()
    i = _WS.match(text, 0).end() + 1  # past '['
    line, counted = 1, 0

    def advance(pos: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, pos)
        counted = pos
        return line

    i = _WS.match(text, i).end()
    if text.startswith("]", i):
        return
    while True:
        start_line = advance(i)
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            raise DataError(str(path), exc.lineno, None, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
        yield start_line, obj
        i = _WS.match(text, end).end()
        if text.startswith(",", i):
            i = _WS.match(text, i + 1).end()
            continue
        if text.startswith("]", i) and not text[i + 1 :].strip():
            return
        raise DataError(str(path), advance(i), None, "invalid JSON: expected ',' or ']' between array elements")


def iter_records(path: str | Path) -> Iterator[tuple[int, object]]:
    """Yield ``(line, record)`` for every record of a data file.

    JSON Lines files yield a :class:`DataError` *as the record* for a line that does not parse, so that the
    caller can skip it under ``on_error: skip``; a JSON array that does not parse raises (nothing after the
    error can be trusted). Para files yield dicts ``{"id", "source", "targets"}``.

    Raises:
        DataError: unreadable file, invalid UTF-8, or a JSON array that does not parse.
    """
    path = Path(path)
    data = _read_bytes(path)
    head = data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    stem_suffix = Path(path.stem).suffix if path.suffix == ".gz" else path.suffix
    if head == b"[":
        yield from _iter_json_array(_decode(data, path), path)
    elif head == b"{" or stem_suffix in (".json", ".jsonl"):
        yield from _iter_json_lines(data, path)
    elif stem_suffix in PARA_SUFFIXES or b"\t" in data[:4096]:
        yield from _iter_para(_decode(data, path), path)
    elif not head:
        raise DataError(str(path), None, None, "the file is empty")
    else:
        raise DataError(str(path), 1, None, "not JSON, JSON Lines or a tab-separated para file")


def _iter_json_lines(data: bytes, path: Path) -> Iterator[tuple[int, object]]:
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            text = _decode(raw, path, lineno)
        except DataError as exc:
            yield lineno, exc
            continue
        try:
            yield lineno, json.loads(text)
        except json.JSONDecodeError as exc:
            yield lineno, DataError(str(path), lineno, None, f"invalid JSON: {exc.msg} (column {exc.colno})")


def _tab_rows(text: str) -> Iterator[tuple[int, list[str]]]:
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r").replace("\ufeff", "")  # byte-order marks of concatenated files too
        if line.strip():
            yield lineno, line.split("\t")


def tab_lines(path: str | Path) -> Iterator[tuple[int, list[str]]]:
    """``(line, columns)`` of every non-blank line of a tab-separated (para) file, gzip or not.

    Raises:
        DataError: missing file, or invalid UTF-8 (naming the line).
    """
    path = Path(path)
    yield from _tab_rows(_decode(_read_bytes(path), path))


def _iter_para(text: str, path: Path) -> Iterator[tuple[int, object]]:
    for lineno, cols in _tab_rows(text):
        if len(cols) == 1:
            yield lineno, {"id": str(lineno), "source": cols[0], "targets": []}
        else:
            yield lineno, {"id": cols[0], "source": cols[1], "targets": cols[2:]}
