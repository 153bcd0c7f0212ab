"""Read raw records from data files as a stream, keeping the line each record starts on.

Handles JSON arrays, JSON Lines (whatever the extension says), gzip-compressed versions of both, and
tab-separated parallel ("para") files ``id<TAB>source<TAB>ref...``. Every record comes with its 1-based line
number so that any later error can name ``file:line``. Files are read in blocks, never whole: memory stays bounded
by the largest record, not by the file (a 2 GB BELLE file streams like a 2 kB one). This module only parses; what
a record *means* is decided in :mod:`zhtune.data.formats`.
"""

from __future__ import annotations

import codecs
import gzip
import json
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from zhtune.errors import DataError

_WS = re.compile(r"[ \t\n\r]*")
PARA_SUFFIXES = (".para", ".tsv", ".txt")
BLOCK_BYTES = 1 << 20  # read size; a record may span any number of blocks
MAX_RECORD_CHARS = 1 << 28  # a JSON array element larger than this is refused rather than buffered forever
_HEAD_BYTES = 1 << 16


def _open(path: Path) -> BinaryIO:
    """Open ``path`` for binary reading, transparently gunzipping (by suffix or magic bytes)."""
    try:
        raw = path.open("rb")
    except FileNotFoundError:
        raise DataError(str(path), None, None, "file not found") from None
    except IsADirectoryError:
        raise DataError(str(path), None, None, "is a directory, expected a data file") from None
    if path.suffix == ".gz" or raw.read(2) == b"\x1f\x8b":
        raw.seek(0)
        return gzip.GzipFile(fileobj=raw, mode="rb")
    raw.seek(0)
    return raw


def _blocks(handle: BinaryIO, path: Path) -> Iterator[bytes]:
    """Blocks of the (decompressed) file; a corrupt gzip stream is a :class:`DataError`."""
    with handle:
        while True:
            try:
                block = handle.read(BLOCK_BYTES)
            except (OSError, EOFError, zlib.error) as exc:
                raise DataError(str(path), None, None, f"not a valid gzip file ({exc})") from None
            if not block:
                return
            yield block


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """``(line number, raw line without the newline)`` for every line, read block by block."""
    lineno, tail = 0, b""
    for block in _blocks(_open(path), path):
        parts = (tail + block).split(b"\n")
        tail = parts.pop()
        for part in parts:
            lineno += 1
            yield lineno, part
    if tail:
        yield lineno + 1, tail


def _utf8_error(exc: UnicodeDecodeError, data: bytes, path: Path, line: int, column_base: int = 0) -> DataError:
    line += data.count(b"\n", 0, exc.start)
    last_newline = data.rfind(b"\n", 0, exc.start)
    col = exc.start - (last_newline + 1) + 1 + (column_base if last_newline < 0 else 0)
    bad = data[exc.start : exc.end].hex(" ")
    return DataError(str(path), line, None, f"invalid UTF-8 (bytes {bad} at column {col}); re-encode the file as UTF-8")


def _decode_line(raw: bytes, path: Path, lineno: int) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _utf8_error(exc, raw, path, lineno) from None
    return text[1:] if text.startswith("\ufeff") else text


def _text_blocks(path: Path) -> Iterator[str]:
    """Decoded text blocks of the file (a multi-byte character split between blocks is handled)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, column = 1, 0  # where the current block starts, for error messages
    first = True
    for block in _blocks(_open(path), path):
        try:
            text = decoder.decode(block)
        except UnicodeDecodeError as exc:
            raise _utf8_error(exc, exc.object, path, line, column) from None
        newlines = block.count(b"\n")
        column = len(block) - block.rfind(b"\n") - 1 if newlines else column + len(block)
        line += newlines
        if first and text.startswith("\ufeff"):
            text = text[1:]
        first = False
        yield text
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        raise _utf8_error(exc, exc.object, path, line, column) from None


class _Window:
    """A sliding window of decoded text over a file, with the line and column its first character is on."""

    def __init__(self, path: Path):
        self.blocks, self.path = _text_blocks(path), path
        self.buf, self.eof = "", False
        self.line0, self.col0 = 1, 0
        self._counted, self._line = 0, 1  # line number at buf[_counted], advanced lazily

    def more(self) -> bool:
        """Append the next block; False at the end of the file."""
        if self.eof:
            return False
        block = next(self.blocks, None)
        if block is None:
            self.eof = True
            return False
        self.buf += block
        return True

    def skip_ws(self, pos: int) -> int:
        """Position of the next non-whitespace character at or after ``pos`` (reading on as needed)."""
        while True:
            pos = _WS.match(self.buf, pos).end()
            if pos < len(self.buf) or not self.more():
                return pos

    def line_at(self, pos: int) -> int:
        self._line += self.buf.count("\n", self._counted, pos)
        self._counted = pos
        return self._line

    def drop(self, pos: int) -> int:
        """Forget ``buf[:pos]`` (already parsed); returns the new position of ``pos`` (0)."""
        dropped = self.buf[:pos]
        newlines = dropped.count("\n")
        self.col0 = pos - dropped.rfind("\n") - 1 if newlines else self.col0 + pos
        self.line0 += newlines
        self.buf = self.buf[pos:]
        self._counted, self._line = 0, self.line0
        return 0


def _needs_more(exc: json.JSONDecodeError, window: _Window) -> bool:
    # A record cut at the end of the window fails either at the window's end or, for a string, where it starts.
    return not window.eof and (exc.msg.startswith("Unterminated string") or exc.pos >= len(window.buf) - 6)


def _iter_json_array(path: Path) -> Iterator[tuple[int, object]]:
    decoder = json.JSONDecoder()
    win = _Window(path)
    pos = win.skip_ws(0) + 1  # past '['
    pos = win.skip_ws(pos)
    if win.buf.startswith("]", pos):
        _check_trailing(win, pos + 1)
        return
    while True:
        start_line = win.line_at(pos)
        try:
            obj, end = decoder.raw_decode(win.buf, pos)
        except json.JSONDecodeError as exc:
            if _needs_more(exc, win):
                if len(win.buf) - pos > MAX_RECORD_CHARS:
                    raise DataError(
                        str(path), start_line, None, f"a record longer than {MAX_RECORD_CHARS} characters"
                    ) from None
                win.more()
                continue
            col = exc.colno + (win.col0 if exc.lineno == 1 else 0)
            line = win.line0 + exc.lineno - 1
            raise DataError(str(path), line, None, f"invalid JSON: {exc.msg} (column {col})") from None
        yield start_line, obj
        if end > BLOCK_BYTES:
            end = win.drop(end)
        pos = win.skip_ws(end)
        if win.buf.startswith(",", pos):
            pos = win.skip_ws(pos + 1)
            continue
        if win.buf.startswith("]", pos):
            _check_trailing(win, pos + 1)
            return
        raise DataError(str(path), win.line_at(pos), None, "invalid JSON: expected ',' or ']' between array elements")


def _check_trailing(win: _Window, pos: int) -> None:
    """Only whitespace may follow the closing bracket (read to the end of the file to be sure)."""
    while True:
        if win.buf[pos:].strip():
            raise DataError(str(win.path), win.line_at(pos), None, "invalid JSON: extra data after the array")
        pos = len(win.buf)
        if not win.more():
            return


def _head(path: Path) -> tuple[bytes, bytes]:
    """The first non-blank byte (b'' for an empty file) and the first block, to decide how to read the file."""
    head = b""
    for block in _blocks(_open(path), path):
        head += block
        stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n")
        if stripped or len(head) >= _HEAD_BYTES:
            return stripped[:1], head[:4096]
    return head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1], head[:4096]


def iter_records(path: str | Path) -> Iterator[tuple[int, object]]:
    """Yield ``(line, record)`` for every record of a data file, streaming it block by block.

    JSON Lines files yield a :class:`DataError` *as the record* for a line that does not parse, so that the
    caller can skip it under ``on_error: skip``; a JSON array that does not parse raises (nothing after the
    error can be trusted). Para files yield dicts ``{"id", "source", "targets"}``.

    Raises:
        DataError: unreadable file, invalid UTF-8, or a JSON array that does not parse.
    """
    path = Path(path)
    first, head = _head(path)
    stem_suffix = Path(path.stem).suffix if path.suffix == ".gz" else path.suffix
    if first == b"[":
        yield from _iter_json_array(path)
    elif first == b"{" or stem_suffix in (".json", ".jsonl"):
        yield from _iter_json_lines(path)
    elif stem_suffix in PARA_SUFFIXES or b"\t" in head:
        yield from _iter_para(path)
    elif not first:
        raise DataError(str(path), None, None, "the file is empty")
    else:
        raise DataError(str(path), 1, None, "not JSON, JSON Lines or a tab-separated para file")


def _iter_json_lines(path: Path) -> Iterator[tuple[int, object]]:
    for lineno, raw in _lines(path):
        if not raw.strip():
            continue
        try:
            text = _decode_line(raw, path, lineno)
        except DataError as exc:
            yield lineno, exc
            continue
        try:
            yield lineno, json.loads(text)
        except json.JSONDecodeError as exc:
            yield lineno, DataError(str(path), lineno, None, f"invalid JSON: {exc.msg} (column {exc.colno})")


def tab_lines(path: str | Path) -> Iterator[tuple[int, list[str]]]:
    """``(line, columns)`` of every non-blank line of a tab-separated (para) file, gzip or not, streamed.

    Raises:
        DataError: missing file, or invalid UTF-8 (naming the line).
    """
    path = Path(path)
    for lineno, raw in _lines(path):
        line = _decode_line(raw, path, lineno).rstrip("\r").replace("\ufeff", "")  # BOMs of concatenated files too
        if line.strip():
            yield lineno, line.split("\t")


def _iter_para(path: Path) -> Iterator[tuple[int, object]]:
    for lineno, cols in tab_lines(path):
        if len(cols) == 1:
            yield lineno, {"id": str(lineno), "source": cols[0], "targets": []}
        else:
            yield lineno, {"id": cols[0], "source": cols[1], "targets": cols[2:]}
