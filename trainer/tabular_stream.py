"""Labelled text read a chunk of rows at a time, so that a training file need not fit in memory as Python strings.

`read_chunks` yields the rows `tabular.read_table` would return, in order, as consecutive `TextTable`s of about
`chunk_bytes` of file each: CSV and TSV through pyarrow's streaming CSV reader, Parquet batch by batch. The checks
`read_table` makes of the whole table (no data rows, no row with text, null labels: the first such row by its
number in the file and how many there are) are made as the last chunk has been read, so a file gives the same
errors either way; a bad file may therefore fail after most of it was read. Hub datasets come in batches of rows
from datasets' memory-mapped Arrow files, JSON Lines a chunk of lines at a time, and a `.json` array a chunk of
records at a time, parsed from blocks of the file (`tabular_json.json_array_records`); only a `.json` file that is
one object (columns, or a single record) is parsed whole before its rows come in chunks. Why: the data-cache build tokenizes each chunk as it arrives, and 800 MB of CSV held as
Python strings took 1.2 GiB (about 10 bytes a token of the demo's text).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from trainer.tabular import (
    _CSV_BLOCK,
    READ_ERRORS,
    DataError,
    TextTable,
    _cannot_read,
    _check_columns,
    _check_rows,
    _clean_rows,
    _csv_error,
    _csv_options,
    _csv_stream,
    _larger_block,
    _local_path,
    _open,
    _tabs_in,
    _warn_tabs,
    check_not_missing_path,
    hub_batches,
    local_format,
    read_table,
    row_name,
)
from trainer.tabular_json import json_records, warn_absent_field

log = logging.getLogger(__name__)
CHUNK_BYTES = _CSV_BLOCK  # about this much file per chunk (pyarrow's CSV block; Parquet rows of about this much text)
PARQUET_MAX_ROWS = 1 << 16


def read_chunks(spec: str, text_column: str, label_column: str, split: str | None = None,
                chunk_bytes: int | None = None) -> Iterator[TextTable]:
    """`read_table(spec, text_column, label_column, split)`'s rows as consecutive tables (each one's
    `num_skipped_empty` counts its own skipped rows; a chunk may hold none of the kept rows). `chunk_bytes`:
    default CHUNK_BYTES. Raises `ReadAgain` when the caller must discard the chunks and start over (a CSV row
    longer than the chunk); `read_all_chunks` does."""
    chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    fmt = local_format(spec)
    if fmt is None and not Path(spec).is_file():  # a hub dataset, read from datasets' memory-mapped files
        check_not_missing_path(spec)
        name, _, spec_split = spec.partition(":")
        source = f"hf:{name}:{spec_split or split or 'train'}"
        batches = hub_batches(name, spec_split or split or "train", text_column, label_column, chunk_bytes)
        locate, empty_name = row_name, source
    elif fmt in ("csv", "tsv", "parquet"):
        path = _local_path(spec, fmt)
        source, empty_name = str(path), spec
        if fmt == "parquet":
            batches, locate = _parquet_batches(path, text_column, label_column, chunk_bytes), row_name
        else:
            batches = _csv_batches(path, fmt, text_column, label_column, chunk_bytes)
            locate = lambda i: f"data row {i + 1}"  # noqa: E731 - read_table's wording
    elif fmt in ("jsonl", "json"):
        yield from _json_chunks(_local_path(spec, fmt), fmt, text_column, label_column, chunk_bytes)
        return
    else:  # a file of an unsupported type (read_table says so)
        yield read_table(spec, text_column, label_column, split)
        return
    rows = kept = skipped = num_bad = 0
    first_bad: list[int] = []
    tabs, first_tab = 0, -1
    for texts, labels in batches:
        if fmt == "tsv":
            count, first = _tabs_in(texts)
            if count and not tabs:
                first_tab = rows + first
            tabs += count
        if not isinstance(texts, list):
            texts, labels = texts.to_pylist(), labels.to_pylist()
        chunk = _clean_rows(source, texts, labels, label_column, locate, start=rows)
        rows += len(texts)
        kept, skipped, num_bad = kept + len(chunk.texts), skipped + chunk.skipped, num_bad + len(chunk.bad)
        first_bad = first_bad or chunk.bad[:1]
        del texts, labels
        yield TextTable(chunk.texts, chunk.labels, source, chunk.skipped)
    pa.default_memory_pool().release_unused()  # see read_table
    if not rows:
        raise DataError(f"{empty_name}: no data rows")
    if fmt == "tsv":
        _warn_tabs(path, tabs, first_tab, rows)
    _check_rows(source, kept, skipped, first_bad, num_bad, text_column, label_column, locate)


class ReadAgain(Exception):  # noqa: N818 - a request, not an error
    """A CSV row longer than the chunk was met after rows had been given: read the file again from the start with
    `chunk_bytes` (8 times the chunk, as `tabular._read_csv` grows its block), discarding what was read.

    Why from the start rather than going on after the rows given: pyarrow parses a quoted CRLF that falls on a
    block boundary differently (the CR only), so rows must all come from one block size to be `read_table`'s."""

    def __init__(self, chunk_bytes: int) -> None:
        super().__init__(chunk_bytes)
        self.chunk_bytes = chunk_bytes


def _csv_batches(path: Path, fmt: str, text_column: str, label_column: str,
                 block: int) -> Iterator[tuple[pa.Array, pa.Array]]:
    """(texts, labels) of each block of rows. A row longer than a block fails in pyarrow ("straddling object"):
    before any row was given the block grows 8 times and the reading starts again; after, `ReadAgain` asks the
    caller to (which terminates: a row never exceeds the file)."""
    import pyarrow.csv as pacsv

    delimiter, parse, convert = _csv_options(path, fmt, text_column, label_column)
    block = max(block, 1 << 10)
    while True:
        given = False
        try:
            with _csv_stream(path) as stream:
                for batch in pacsv.open_csv(stream, pacsv.ReadOptions(block_size=block), parse, convert):
                    given = given or batch.num_rows > 0
                    yield batch.column(text_column), batch.column(label_column)
            return
        except pa.ArrowInvalid as exc:
            block = _larger_block(exc, block)
            if block and given:
                raise ReadAgain(block) from None
            if block:
                continue
            raise _csv_error(path, delimiter, exc) from None
        except READ_ERRORS as exc:
            raise _cannot_read(path, exc) from None


def _parquet_batches(path: Path, text_column: str, label_column: str,
                     chunk_bytes: int) -> Iterator[tuple[pa.Array, pa.Array]]:
    """(texts, labels) of batches of rows holding about `chunk_bytes` of text each, by the file's average."""
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(path)
        _check_columns(path, reader.schema_arrow.names, text_column, label_column)
        meta = reader.metadata
        text_bytes = sum(chunk.total_uncompressed_size for g in range(meta.num_row_groups)
                         for chunk in map(meta.row_group(g).column, range(meta.num_columns))
                         if chunk.path_in_schema == text_column)
        # the stored size understates dictionary-encoded text (a repeated text is stored once): at most
        # PARQUET_MAX_ROWS rows a batch whatever the estimate
        rows_per_batch = max(1, min(PARQUET_MAX_ROWS, chunk_bytes * max(1, meta.num_rows) // max(1, text_bytes)))
        for batch in reader.iter_batches(batch_size=rows_per_batch, columns=[text_column, label_column]):
            yield batch.column(text_column), batch.column(label_column)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a valid Parquet file: {str(exc).splitlines()[0]}") from None


def read_all_chunks(spec: str, text_column: str, label_column: str, split: str | None, start: Callable[[], Any],
                    take: Callable[[TextTable], None], chunk_bytes: int | None = None) -> None:
    """Every chunk of `read_chunks` to `take`, in order, after `start()`; when the file must be read again
    (`ReadAgain`), `start()` is called again (to discard what `take` kept) and the chunks come from the start."""
    while True:
        start()
        try:
            for chunk in read_chunks(spec, text_column, label_column, split, chunk_bytes):
                take(chunk)
            return
        except ReadAgain as again:
            log.info("%s: a row is longer than %d bytes: reading the file again with chunks of %d bytes", spec,
                     chunk_bytes or CHUNK_BYTES, again.chunk_bytes)
            chunk_bytes = again.chunk_bytes


def _json_chunks(path: Path, fmt: str, text_column: str, label_column: str, chunk_bytes: int) -> Iterator[TextTable]:
    """JSON Lines, or a `.json` file, as `tabular_json.read_json` reads them, about `chunk_bytes` of text at a
    time: the same rows, the same warnings (fields absent from some records, logged at the end) and the same
    errors. `read_json` parses every record before it looks at a row, so a bad row (a text that is a list, say)
    stops the chunks but not the parsing: a later record that is not JSON, or a column no record has, is the error
    reported, as there."""
    source = str(path)
    rows = kept = skipped = num_bad = 0
    row_error: DataError | None = None  # the first bad row's, raised once the whole file has parsed
    num_records = 0
    first_bad: dict[int, str] = {}  # the first bad row's index -> where it is ("line 7", or "record 3")
    keys: dict[str, None] = {}
    absent: dict[str, list] = {text_column: [0, ""], label_column: [0, ""]}  # records without it, the first's place
    try:
        with _open(path, "rb") as fh:
            texts: list = []
            labels: list = []
            places: list[str] = []
            size = 0
            for lineno, record in itertools.chain(json_records(path, fh, fmt), [(0, None)]):  # (0, None): the end
                if record is not None:
                    num_records += 1
                    # a record of a columns document has no line of its own (read_json's wording)
                    place = f"line {lineno}" if lineno else f"record {num_records}"
                    if text_column not in keys or label_column not in keys:
                        keys.update(dict.fromkeys(record))
                    for column, seen in absent.items():
                        if column not in record:
                            seen[0] += 1
                            seen[1] = seen[1] or place
                    texts.append(record.get(text_column))
                    labels.append(record.get(label_column))
                    places.append(place)
                    text = texts[-1]
                    size += len(text) if isinstance(text, str) else 16
                if row_error is not None:  # only parsing now: the rows are not needed
                    texts, labels, places, size = [], [], [], 0
                elif size >= chunk_bytes or (record is None and texts):
                    start = rows
                    try:
                        chunk = _clean_rows(source, texts, labels, label_column,
                                            lambda i, places=places, start=start: places[i - start], start=start)
                    except DataError as e:
                        row_error = e
                        continue
                    if chunk.bad and not first_bad:
                        first_bad[chunk.bad[0]] = places[chunk.bad[0] - start]
                    rows += len(texts)
                    kept, skipped, num_bad = kept + len(chunk.texts), skipped + chunk.skipped, num_bad + len(chunk.bad)
                    texts, labels, places, size = [], [], [], 0
                    yield TextTable(chunk.texts, chunk.labels, source, chunk.skipped)
    except READ_ERRORS as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None
    if not num_records:  # `[]`: no columns to name either
        raise DataError(f"{path}: no data rows")
    _check_columns(path, list(keys), text_column, label_column)
    for column, (count, place) in absent.items():
        if count:
            warn_absent_field(path, count, num_records, column, place)
    if row_error is not None:
        raise row_error
    if not rows:
        raise DataError(f"{path}: no data rows")
    _check_rows(source, kept, skipped, list(first_bad), num_bad, text_column, label_column,
                lambda i: first_bad[i])
