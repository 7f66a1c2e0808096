"""JSON Lines and JSON documents for `tabular.read_table` (and `tabular_stream`), in the conventions of
`trainer.tabular`'s docstring: parsed with the stdlib, since exact line numbers in errors matter more here than
speed, and labels whose JSON type varies between rows are read as they are.

A JSON Lines file is parsed a line at a time. A `.json` file that is an array of records is parsed a record at a
time from blocks of the file (`json_array_records`), so that a file larger than memory can still be streamed
(`tabular_stream.read_chunks`): json.loads of a whole 1 GB array held the file's bytes, its text and every
record's objects at once. Only a `.json` file that is one object (columns of equal length, or a single record)
is read whole, since its first value is the whole file.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from trainer.tabular import READ_ERRORS, DataError, _check_columns, _open, _Read, log, utf8_hint

_BOM = b"\xef\xbb\xbf"  # UTF-8 byte order mark, which some editors put at the start of a file
BLOCK_BYTES = 1 << 20  # of a JSON document, read at a time
DROP_AFTER = 1 << 16  # parsed characters kept before they are dropped (and at most half the text read)
_SKIP_WHITESPACE = re.compile(r"[ \t\n\r]*").match  # JSON's whitespace
# json's error messages for text that may only be cut short by the end of the block read so far (with the longest
# token, "-Infinity", the "Expecting value" of a cut literal sits up to 9 characters before the end)
_NEAR_END = 16


def first_content(fh: IO[bytes]) -> str:
    """The file's first character that is not whitespace, "" if it has none: its content starts there, however many
    blank lines come first. Decoded as json.loads decodes bytes (`json.detect_encoding`: UTF-8, or UTF-16 / UTF-32
    by their byte order mark or zero bytes; a mark is not content), so a UTF-16 `[...]` file is seen as an array."""
    head = fh.read(4)
    # bytes that are not text in that encoding read as U+FFFD here: the reader chosen reports them, with their line
    decoder = codecs.getincrementaldecoder(json.detect_encoding(head))("replace")
    block = head + fh.read(1 << 16)
    while block:
        text = decoder.decode(block).lstrip(" \t\n\r")
        if text:
            return text[0]
        block = fh.read(1 << 16)
    return ""


class _NotJson(DataError):
    """Text json.loads refuses (where a `{` file may still be JSON Lines)."""


def _trailing_comma() -> tuple[str, bool]:
    """json's error for `[..., ]` in this Python: its message, and whether it points at the comma (3.13 names the
    comma; 3.11 expects a value at the bracket)."""
    try:
        json.loads("[1, ]")
    except json.JSONDecodeError as e:
        return e.msg, e.pos == 2
    raise AssertionError("json.loads accepted a trailing comma")


_TRAILING_COMMA = _trailing_comma()


class _JsonText:
    """A JSON file's text decoded a block at a time, for parsing one value after another: `text[pos:]` is read but
    not yet parsed. Parsed text is dropped as `pos` moves on, so memory holds about a block (or about twice the
    longest value, read in doubling blocks) whatever the file's size; line and column numbers still count from
    the file's start. Decoded as json.loads decodes bytes: the encoding its first 4 bytes show (UTF-8 unless they
    are UTF-16 or UTF-32; a byte order mark selects a codec that drops it), surrogates passed through."""

    def __init__(self, path: Path, fh: IO[bytes]) -> None:
        self.path, self.fh = path, fh
        self.head = fh.read(4)
        self.encoding = json.detect_encoding(self.head)
        self.decoder = codecs.getincrementaldecoder(self.encoding)("surrogatepass")
        self.keep_from: int | None = None  # text from here on is not dropped (an error may point there)
        self.text, self.pos, self.eof = "", 0, False
        self.line_base, self.column_base = 1, 0  # text[0]'s line, and how many characters of it were dropped
        self._counted, self._lines = 0, 0  # newlines in text[:_counted], so that line numbers cost O(new text)
        self.scan_once = json.JSONDecoder().scan_once  # what raw_decode calls, without its frame per value

    def read(self, size: int) -> bool:
        """Append up to `size` more bytes of the file; False at its end."""
        if self.eof:
            return False
        raw = self.fh.read(size)
        if self.head:
            raw, self.head = self.head + raw, b""
        pending = len(self.decoder.getstate()[0])
        try:
            chunk = self.decoder.decode(raw, final=not raw)
        except UnicodeDecodeError as exc:
            at = self.line_at(len(self.text)) + raw[: max(0, exc.start - pending)].count(b"\n")
            name = "UTF-8" if self.encoding.startswith("utf-8") else self.encoding.upper()
            raise DataError(f"{self.path}: line {at}: not valid {name} text") from None
        self.eof = not raw
        self._drop_parsed()
        self.text += chunk
        return True

    def _drop_parsed(self) -> None:
        cut = self.pos if self.keep_from is None else min(self.pos, self.keep_from)
        if cut < DROP_AFTER or cut < len(self.text) // 2:  # amortised: each character is copied O(1) times
            return
        dropped = self.text[:cut]
        newlines = self.line_at(cut) - self.line_base
        last = dropped.rfind("\n")
        self.column_base = cut - last - 1 if last >= 0 else self.column_base + cut
        self.line_base += newlines
        self.text, self.pos, self._counted, self._lines = self.text[cut:], self.pos - cut, 0, 0
        if self.keep_from is not None:
            self.keep_from -= cut

    def line_at(self, i: int) -> int:
        """The line number of text[i]."""
        if i < self._counted:
            self._counted, self._lines = 0, 0
        self._lines += self.text.count("\n", self._counted, i)
        self._counted = i
        return self.line_base + self._lines

    def next_char(self) -> str:
        """The next character that is not whitespace, with `pos` on it ("" at the end of the file)."""
        while True:
            text = self.text
            self.pos = i = _SKIP_WHITESPACE(text, self.pos).end()
            if i < len(text) or not self.read(BLOCK_BYTES):
                return text[i] if i < len(text) else ""

    def fail(self, message: str, at: int | None = None) -> DataError:
        """json.loads' error for text[at] (default: pos), with the file's line and column."""
        at = self.pos if at is None else at
        line = self.line_at(at)
        start = self.text.rfind("\n", 0, at) + 1
        column = at - start + 1 + (self.column_base if line == self.line_base else 0)
        return _NotJson(f"{self.path}: line {line}: not valid JSON ({message} at column {column})")

    def value(self) -> tuple[int, Any]:
        """The next JSON value and the line it starts on. A value cut short by the end of the text read so far is
        parsed again with more (twice as much each time, so a value larger than a block costs linear time)."""
        if not self.next_char():
            raise self.fail("Expecting value")
        size = BLOCK_BYTES
        while True:
            try:
                value, end = self.scan_once(self.text, self.pos)
            except (json.JSONDecodeError, StopIteration) as exc:
                # (StopIteration: no value starts at pos; raw_decode says "Expecting value" there)
                msg, at = (exc.msg, exc.pos) if isinstance(exc, json.JSONDecodeError) else ("Expecting value", exc.value)
                if (at >= len(self.text) - _NEAR_END or msg.startswith("Unterminated string")) and self.read(size):
                    size *= 2
                    continue
                raise self.fail(msg, at) from None
            # a number or literal may go on in the next block ("1." + "5"; scan_once stops before a "." or "e" it
            # cannot complete yet); an object, array or string ends with its own closing character
            if not isinstance(value, dict | list | str) and end >= len(self.text) - _NEAR_END and self.read(size):
                size *= 2
                continue
            line = self.line_at(self.pos)
            self.pos = end
            return line, value


def json_array_records(path: Path, fh: IO[bytes]) -> Iterator[tuple[int, dict]]:
    """(line it starts on, object) of every element of a file that is one JSON array, parsed an element at a time
    (module docstring). Text json.loads refuses is an error with its message, line and column; an element that is
    not an object is an error when it is reached (json.loads of the whole file would name a later syntax error
    first)."""
    src = _JsonText(path, fh)
    if src.next_char() != "[":
        raise src.fail("Expecting value")
    src.pos += 1
    if src.next_char() == "]":
        src.pos += 1
    else:
        index = 0
        while True:
            line, value = src.value()
            index += 1
            if not isinstance(value, dict):
                raise DataError(f"{path}: line {line}: record {index}: expected a JSON object, got "
                                f"{type(value).__name__}")
            yield line, value
            c = src.next_char()
            if c == "]":
                src.pos += 1
                break
            if c != ",":
                raise src.fail("Expecting ',' delimiter")
            src.keep_from = src.pos  # the comma: a trailing one is an error that may point at it
            src.pos += 1
            if src.next_char() == "]":
                message, at_comma = _TRAILING_COMMA
                raise src.fail(message, src.keep_from if at_comma else None)
            src.keep_from = None
    if src.next_char():
        raise src.fail("Extra data")


def _one_document(path: Path, fh: IO[bytes]) -> Any | None:
    """The file's value if the whole file is one JSON value, else None (JSON Lines, or not JSON)."""
    src = _JsonText(path, fh)
    try:
        _, value = src.value()
    except _NotJson:
        return None
    return None if src.next_char() else value


def json_records(path: Path, fh: IO[bytes], fmt: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) of every record of a JSON Lines file (`fmt` "jsonl"), or of a `.json` file (`fmt`
    "json"): an array of records (streamed), an object of equal-length columns (line number 0: the rows have no
    line of their own) or one record, or else JSON Lines."""
    head = first_content(fh)
    fh.seek(0)
    if not head:
        raise DataError(f"{path}: empty file")
    if fmt == "json" and head == "[":
        yield from json_array_records(path, fh)
        return
    if fmt == "json" and head == "{":
        obj = _one_document(path, fh)
        if obj is not None:
            columns = list(obj.values())
            if columns and all(isinstance(c, list) and len(c) == len(columns[0]) for c in columns):
                yield from ((0, dict(zip(obj, row, strict=True))) for row in zip(*columns, strict=True))
            elif len(columns) > 1 and all(isinstance(c, list) for c in columns):
                lengths = ", ".join(f"{k} {len(c)}" for k, c in obj.items())
                raise DataError(f"{path}: an object of columns whose lengths differ ({lengths}); every column needs "
                                "one value per record")
            else:
                yield 1, obj
            return
        fh.seek(0)
    yield from jsonl_records(path, fh)


def read_json(path: Path, fmt: str, text_column: str, label_column: str) -> _Read:
    """JSON Lines (one object per line), or for ``.json`` also a top-level array of objects.

    Parsed with the stdlib one line at a time: exact line numbers in errors matter more here than
    pyarrow's speed, and it tolerates labels whose JSON type varies between rows.
    """
    try:
        with _open(path, "rb") as fh:
            records = list(json_records(path, fh, fmt))
    except READ_ERRORS as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None
    if not records:  # `[]`: no columns to name either
        raise DataError(f"{path}: no data rows")
    keys: dict[str, None] = {}
    for _, record in records:
        keys.update(dict.fromkeys(record))
        if text_column in keys and label_column in keys:
            break
    _check_columns(path, list(keys), text_column, label_column)
    lines = [line for line, _ in records]
    for column in (text_column, label_column):  # absent, not null: probably a differently named field
        absent = [i for i, (_, r) in enumerate(records) if column not in r]
        if absent:
            where = f"line {lines[absent[0]]}" if lines[absent[0]] else f"record {absent[0] + 1}"
            warn_absent_field(path, len(absent), len(records), column, where)
    return (
        [r.get(text_column) for _, r in records],
        [r.get(label_column) for _, r in records],
        lambda i: f"line {lines[i]}" if lines[i] else f"record {i + 1}",
    )


def jsonl_records(path: Path, fh: IO[bytes]) -> Iterator[tuple[int, dict]]:
    """(line number, object) of every non-blank line, in order; a line that is not a JSON object is an error."""
    for lineno, raw in enumerate(fh, 1):
        if lineno == 1:
            raw = raw.removeprefix(_BOM)
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}: line {lineno}: not valid JSON ({exc.msg} at column {exc.colno})"
            ) from None
        except UnicodeDecodeError:
            raise DataError(f"{path}: line {lineno}: not valid UTF-8 text{utf8_hint(raw) if lineno == 1 else ''}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}: line {lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def warn_absent_field(path: Path, count: int, records: int, column: str, where: str) -> None:
    log.warning("%s: %d of %d records have no %r field (the first at %s); they are read as null",
                path, count, records, column, where)
