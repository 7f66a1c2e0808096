"""JSON Lines and JSON documents for `tabular.read_table` (and `tabular_stream`), in the conventions of
`trainer.tabular`'s docstring: parsed with the stdlib one line at a time, since exact line numbers in errors matter
more here than speed, and labels whose JSON type varies between rows are read as they are.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from trainer.tabular import READ_ERRORS, DataError, _check_columns, _open, _Read, log

_BOM = b"\xef\xbb\xbf"  # UTF-8 byte order mark, which some editors put at the start of a file


def first_content(fh: IO[bytes]) -> bytes:
    """The file's first bytes that are not whitespace (after a byte order mark), b"" if it has none: its content
    starts there, however many blank lines come first."""
    block = fh.read(1 << 16).removeprefix(_BOM)
    while block:
        head = block.lstrip()
        if head:
            return head
        block = fh.read(1 << 16)
    return b""


def read_json(path: Path, fmt: str, text_column: str, label_column: str) -> _Read:
    """JSON Lines (one object per line), or for ``.json`` also a top-level array of objects.

    Parsed with the stdlib one line at a time: exact line numbers in errors matter more here than
    pyarrow's speed, and it tolerates labels whose JSON type varies between rows.
    """
    try:
        with _open(path, "rb") as fh:
            head = first_content(fh)
            fh.seek(0)
            if not head:
                raise DataError(f"{path}: empty file")
            records = None
            if fmt == "json" and head[:1] in (b"[", b"{"):
                records = _parse_json_document(path, fh.read().removeprefix(_BOM), strict=head[:1] == b"[")
                fh.seek(0)
            if records is None:
                records = _parse_jsonl(path, fh)
    except READ_ERRORS as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None
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


def _parse_jsonl(path: Path, fh: IO[bytes]) -> list[tuple[int, dict]]:
    return list(jsonl_records(path, fh))


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
            raise DataError(f"{path}: line {lineno}: not valid UTF-8 text") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}: line {lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def warn_absent_field(path: Path, count: int, records: int, column: str, where: str) -> None:
    log.warning("%s: %d of %d records have no %r field (the first at %s); they are read as null",
                path, count, records, column, where)


def _parse_json_document(path: Path, data: bytes, strict: bool) -> list[tuple[int, dict]] | None:
    """A whole-file JSON document: an array of records, a dict of equal-length columns, or one
    record.  Returns None (caller tries JSON Lines) when a ``{``-file is not one JSON document."""
    try:
        obj = json.loads(data)
    except json.JSONDecodeError as exc:
        if not strict:
            return None
        raise DataError(
            f"{path}: line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})"
        ) from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not valid UTF-8 text") from None
    if isinstance(obj, dict):
        columns = list(obj.values())
        if columns and all(isinstance(c, list) and len(c) == len(columns[0]) for c in columns):
            return [(0, dict(zip(obj, row, strict=True))) for row in zip(*columns, strict=True)]
        return [(1, obj)]
    for i, record in enumerate(obj):
        if not isinstance(record, dict):
            raise DataError(f"{path}: record {i + 1}: expected a JSON object, got {type(record).__name__}")
    return [(0, record) for record in obj]
