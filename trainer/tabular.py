"""Read labelled text for the trainer from CSV/TSV/JSONL/JSON/Parquet files or the Hugging Face hub.

The trainer only ever needs two columns as Python strings, so this module reads just those, as fast
as the format allows (pyarrow for CSV and Parquet), and turns every way a data file can be wrong into
a :class:`DataError` whose one-line message names the file and, where known, the line or row. A bad
file should cost the user one glance at the message, not a stack trace from deep inside pyarrow.

Conventions, chosen so the same data gives the same table whatever the format:

* labels become ``str`` (``1`` -> ``"1"``, ``1.0`` -> ``"1"``, ``true`` -> ``"true"``; hub
  ``ClassLabel`` columns give their names), stripped of surrounding whitespace; label text is read the
  same way (``"1.0"`` -> ``"1"``, ``"True"`` -> ``"true"``: pandas writes float and bool columns so);
* rows whose text is null, empty or whitespace-only are skipped and counted, never an error;
* among the kept rows a null/empty label is an error naming the first such row.
"""

from __future__ import annotations

import bz2
import codecs
import csv
import gzip
import io
import logging
import lzma
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pyarrow as pa

LOCAL_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
_COMPRESSIONS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_CSV_BLOCK = 16 << 20  # pyarrow's default of 1 MiB fails on any row longer than that
_MAX_BLOCK = (1 << 31) - 1  # pyarrow block sizes are int32
_DIAGNOSE_MAX_BYTES = 1 << 30

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A data file (or hub dataset) cannot be used; the message is one line naming the source."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


@dataclass
class TextTable:
    """Texts and their string labels, in file order, with empty-text rows already removed."""

    texts: list[str]
    labels: list[str]
    source: str
    num_skipped_empty: int

    def __len__(self) -> int:
        return len(self.texts)


def read_table(spec: str, text_column: str, label_column: str, split: str | None = None) -> TextTable:
    """Read ``text_column``/``label_column`` from a local file or a hub dataset.

    ``spec`` is a path ending in ``.csv``, ``.tsv``, ``.jsonl``, ``.json`` or ``.parquet`` (the
    text formats may add ``.gz``/``.bz2``/``.xz``), or else a hub dataset name, optionally
    ``name:split``; ``split`` is the hub split when the spec names none (default ``train``) and is
    ignored for local files.
    """
    fmt = local_format(spec)
    if fmt is None:
        path = Path(spec)
        if path.is_file():
            raise DataError(f"{spec}: unsupported file type; expected {_supported()}")
        check_not_missing_path(spec)
        name, _, spec_split = spec.partition(":")
        return _read_hub(name, spec_split or split or "train", text_column, label_column)
    path = _local_path(spec, fmt)
    if fmt in ("json", "jsonl"):
        from trainer.tabular_json import read_json as reader  # the JSON half of this module (its size)
    else:
        reader = {"csv": _read_csv, "tsv": _read_csv, "parquet": _read_parquet}[fmt]
    texts, labels, locate = reader(path, fmt, text_column, label_column)
    # the Arrow buffers are Python strings now; pyarrow's allocator keeps freed memory for reuse unless told (an 800
    # MB CSV: resident memory 1.93 -> 1.10 GiB with this)
    pa.default_memory_pool().release_unused()
    if not texts:
        raise DataError(f"{spec}: no data rows")
    return _finish(str(path), texts, labels, text_column, label_column, locate)


def _local_path(spec: str, fmt: str) -> Path:
    """The file `spec` names, checked to be one that is not empty."""
    path = Path(spec)
    if not path.exists():
        raise DataError(f"{spec}: file not found")
    if path.is_dir():
        raise DataError(f"{spec}: is a directory, not a {fmt} file")
    if path.stat().st_size == 0:
        raise DataError(f"{spec}: empty file")
    return path


# Extensions of files, never of hub dataset names: a missing `train.txt` is a typo to report, not a name to look up
_FILE_ONLY_SUFFIXES = {".txt", ".text", ".xlsx", ".xls", ".zip", ".tar", ".tgz", ".arrow", ".feather", ".orc",
                       ".avro", ".pkl", ".pickle", ".npy", ".npz", ".h5", ".hdf5", ".xml", ".html", ".md"}


def looks_like_missing_path(spec: str) -> bool:
    """True when `spec` names no existing file or folder and cannot be a hub dataset id either. A hub id is `name`
    or `owner/name`, optionally with `:split`, so an absolute, `./`, `../` or `~` path, one with two or more
    slashes, or one ending in a file-only extension is a local path that is missing. Without this, a mistyped
    path went to `datasets.load_dataset`, which spends about 25 s in network retries offline before failing."""
    name = spec.partition(":")[0]
    if Path(spec).expanduser().exists() or Path(name).expanduser().exists():  # a file, or a folder with `:split`
        return False
    if name.startswith(("/", "./", "../", "~")) or name in (".", "..") or name.count("/") >= 2 or "\\" in name:
        return True
    suffixes = [s.lower() for s in Path(name).suffixes]
    return bool(suffixes) and (suffixes[-1] in _FILE_ONLY_SUFFIXES or suffixes[-1] in _COMPRESSIONS)


def check_not_missing_path(spec: str, setting: str = "") -> None:
    """DataError "file not found" for a spec that `looks_like_missing_path`; `setting` names the flag that set it."""
    if looks_like_missing_path(spec):
        where = f" ({setting})" if setting else ""
        raise DataError(f"{spec}: file not found{where}; a local data file ends in {_supported()}, and a hub "
                        "dataset is named `name` or `owner/name`, optionally with `:split`")


def check_data_path(spec: str, setting: str) -> None:
    """DataError naming `setting` when `spec` is a local data file that is missing, or shaped like a path that does
    not exist (`looks_like_missing_path`); hub names pass unchecked."""
    where = f"{setting}{relative_to_cwd(spec)}"
    if local_format(spec) is not None and not Path(spec).exists():
        raise DataError(f"{spec}: file not found ({where})")
    check_not_missing_path(spec, where)


def relative_to_cwd(spec: str) -> str:
    return "" if Path(spec).expanduser().is_absolute() else f", a path relative to the working folder {os.getcwd()}"


def local_format(spec: str) -> str | None:
    """The local format ``spec`` names by its extension (``"csv"``, ...), or None for a hub name."""
    suffixes = [s.lower() for s in Path(spec).suffixes]
    if suffixes and suffixes[-1] in _COMPRESSIONS:
        suffixes.pop()
        if suffixes and suffixes[-1] == ".parquet":
            return None  # Parquet compresses internally; an outer .gz is not readable as Parquet
    return LOCAL_FORMATS.get(suffixes[-1]) if suffixes else None


def _supported() -> str:
    return ", ".join(LOCAL_FORMATS) + " (text formats optionally .gz/.bz2/.xz)"


def _columns_error(source: object, missing: str, what: str, present: Sequence[str]) -> DataError:
    shown = ", ".join(repr(c[:60]) for c in list(present)[:30]) + (" ..." if len(present) > 30 else "")
    return DataError(f"{source}: no {what} column {missing!r} (data.{what}_column); columns present: "
                     f"{shown or '(none)'}")


def _check_columns(source: object, present: Sequence[str], text_column: str, label_column: str) -> None:
    for column, what in ((text_column, "text"), (label_column, "label")):
        if column not in present:
            raise _columns_error(source, column, what, present)
        if list(present).count(column) > 1:  # readers would silently take one of them
            raise DataError(f"{source}: the header names {what} column {column!r} {list(present).count(column)} "
                            "times; rename all but one")


_Read = tuple[list[Any], list[Any], Callable[[int], str]]


# --------------------------------------------------------------------------------------------------
# CSV / TSV
# --------------------------------------------------------------------------------------------------


def _read_csv(path: Path, fmt: str, text_column: str, label_column: str) -> _Read:
    """pyarrow's multi-threaded reader, with every column read as string so labels stay verbatim."""
    import pyarrow.csv as pacsv

    delimiter, parse, convert = _csv_options(path, fmt, text_column, label_column)
    # A single row longer than a block fails ("straddling object"): grow the block until the
    # largest row fits, which terminates because a row can never exceed the file's size.
    block = _CSV_BLOCK
    while True:
        try:
            with _csv_stream(path) as source:
                table = pacsv.read_csv(source, pacsv.ReadOptions(block_size=block), parse, convert)
            break
        except pa.ArrowInvalid as exc:
            block = _larger_block(exc, block)
            if block:
                continue
            raise _csv_error(path, delimiter, exc) from None
        except READ_ERRORS as exc:
            raise _cannot_read(path, exc) from None
    if fmt == "tsv":
        _warn_tabs_in_text(path, table.column(text_column))
    return (
        table.column(text_column).to_pylist(),
        table.column(label_column).to_pylist(),
        lambda i: f"data row {i + 1}",
    )


# A truncated or corrupt compressed file fails with one of these while it is read.
READ_ERRORS = (OSError, EOFError, lzma.LZMAError)


def _cannot_read(path: Path, exc: BaseException) -> DataError:
    return DataError(f"{path}: cannot read: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")


def _larger_block(exc: BaseException, block: int) -> int:
    """The block to read with next when pyarrow failed on a row longer than `block` ("straddling object"): 8
    times larger, which terminates because a row never exceeds the file; 0 for any other failure."""
    return min(block * 8, _MAX_BLOCK) if "straddl" in str(exc) and block < _MAX_BLOCK else 0


def _csv_options(path: Path, fmt: str, text_column: str, label_column: str) -> tuple[str, Any, Any]:
    """The delimiter and pyarrow's parse and convert options, once the header is known to name both columns."""
    import pyarrow.csv as pacsv

    delimiter = "\t" if fmt == "tsv" else ","
    _check_columns(path, _csv_header(path, delimiter), text_column, label_column)
    parse = pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True)
    convert = pacsv.ConvertOptions(
        column_types={text_column: pa.string(), label_column: pa.string()},
        include_columns=[text_column, label_column],
        null_values=[""],
        strings_can_be_null=True,
    )
    return delimiter, parse, convert


def _csv_stream(path: Path) -> IO[Any]:
    """The file's decompressed bytes for pyarrow, which infers compression only from lower-case .gz / .bz2 names
    and has no .xz codec."""
    suffix = path.suffix.lower()
    if suffix == ".xz":
        return _open(path, "rb")
    return pa.input_stream(str(path), compression={".gz": "gzip", ".bz2": "bz2"}.get(suffix))


def _warn_tabs_in_text(path: Path, texts: pa.ChunkedArray | pa.Array) -> None:
    _warn_tabs(path, *_tabs_in(texts), len(texts))


def _tabs_in(texts: pa.ChunkedArray | pa.Array) -> tuple[int, int]:
    """How many text fields hold a tab, and the index of the first (-1 if none)."""
    import pyarrow.compute as pc

    has_tab = pc.fill_null(pc.match_substring(texts, "\t"), False)
    count = pc.sum(has_tab).as_py() or 0
    return count, (pc.index(has_tab, True).as_py() if count else -1)


def _warn_tabs(path: Path, count: int, first: int, rows: int) -> None:
    """A tab inside a TSV text field can only come from quoting, and a stray quote at the start of a field
    (common in TSV files written without quoting) swallows every row up to the next quote: say where."""
    if count:
        log.warning(
            "%s: %d text field(s) hold a tab, the first in data row %d: a quoted field, or a stray '\"' at the "
            "start of a field that merged the rows after it into one (%d rows read)", path, count, first + 1, rows,
        )


def _csv_header(path: Path, delimiter: str) -> list[str]:
    """The first record, via the csv module so a huge first row cannot hit a block-size limit."""
    limit = csv.field_size_limit()
    csv.field_size_limit(sys.maxsize)
    try:
        with io.TextIOWrapper(_open(path, "rb"), encoding="utf-8-sig", newline="") as fh:
            header = next(csv.reader(fh, delimiter=delimiter), None)
    except UnicodeDecodeError as exc:  # decoding runs ahead of the header: locate the bad line
        raise _csv_error(path, delimiter, exc) from None
    except (csv.Error, OSError, EOFError, lzma.LZMAError) as exc:
        raise DataError(f"{path}: line 1: cannot read the header: {exc}") from None
    finally:
        csv.field_size_limit(limit)
    if not header:
        raise DataError(f"{path}: empty file")
    return header


def utf8_hint(head: bytes) -> str:
    """What to do about a file that is not UTF-8 because it starts with another encoding's byte order mark (Excel's
    "Unicode text" and Windows tools write UTF-16), for the end of the error message; "" otherwise."""
    for mark, name in ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),  # before UTF-16's: FF FE 00 00
                       (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16")):
        if head.startswith(mark):
            return f": it starts with a {name} byte order mark; save it as UTF-8"
    return ""


def _csv_error(path: Path, delimiter: str, exc: Exception) -> DataError:
    """Re-parse with the csv module (no field size limit) to say *where* the file is broken."""
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "Empty CSV" in message:
        return DataError(f"{path}: empty file")
    kind = "TSV" if delimiter == "\t" else "CSV"
    if path.stat().st_size > _DIAGNOSE_MAX_BYTES:  # re-reading is only worth it for modest files
        return DataError(f"{path}: not valid {kind}: {message}")
    limit = csv.field_size_limit()
    csv.field_size_limit(sys.maxsize)
    try:
        with _open(path, "rb") as raw:
            data = raw.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            line = data.count(b"\n", 0, err.start) + 1
            return DataError(f"{path}: line {line}: not valid UTF-8 text (byte offset {err.start}){utf8_hint(data)}")
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
        width = None
        for row in reader:
            if width is None:
                width = len(row)
            elif row and len(row) != width:
                return DataError(
                    f"{path}: line {reader.line_num}: not valid {kind}: expected {width} fields, got {len(row)}"
                )
    except csv.Error as err:
        return DataError(f"{path}: line {reader.line_num}: not valid {kind}: {err}")
    finally:
        csv.field_size_limit(limit)
    return DataError(f"{path}: not valid {kind}: {message}")


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def _open(path: Path, mode: str) -> IO[Any]:
    opener = _COMPRESSIONS.get(path.suffix.lower(), open)
    return opener(path, mode)


# --------------------------------------------------------------------------------------------------
# Parquet and the hub
# --------------------------------------------------------------------------------------------------


def _read_parquet(path: Path, fmt: str, text_column: str, label_column: str) -> _Read:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        _check_columns(path, names, text_column, label_column)
        table = pq.read_table(path, columns=[text_column, label_column])
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a valid Parquet file: {str(exc).splitlines()[0]}") from None
    return (
        table.column(text_column).to_pylist(),
        table.column(label_column).to_pylist(),
        lambda i: f"row {i + 1}",
    )


def _read_hub(name: str, split: str, text_column: str, label_column: str) -> TextTable:
    """``datasets.load_dataset(name, split=split)``; needs the network unless already cached."""
    source = f"hf:{name}:{split}"
    texts: list[Any] = []
    labels: list[Any] = []
    for batch_texts, batch_labels in hub_batches(name, split, text_column, label_column, chunk_bytes=None):
        texts += batch_texts
        labels += batch_labels
    if not texts:
        raise DataError(f"{source}: no data rows")
    return _finish(source, texts, labels, text_column, label_column, row_name)


def row_name(i: int) -> str:
    return f"row {i + 1}"


def _offline_without_the_hub() -> None:
    """HF_HUB_OFFLINE=1 when the hub's host name does not resolve (no network, as on clusters without internet):
    datasets then reads its local cache at once, or fails at once, instead of spending about 25 s in five retries
    of a lookup that cannot succeed. Only before huggingface_hub is imported (it reads the variable then), and
    never over a setting the user made."""
    if "HF_HUB_OFFLINE" in os.environ or "HF_DATASETS_OFFLINE" in os.environ or "huggingface_hub" in sys.modules:
        return
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return  # behind a proxy the host need not resolve locally for downloads to work
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:
        log.warning("%s does not resolve (%s): reading hub datasets from the local cache only (HF_HUB_OFFLINE=1)",
                    host, e.strerror or e)
        os.environ["HF_HUB_OFFLINE"] = "1"


def hub_batches(name: str, split: str, text_column: str, label_column: str,
                chunk_bytes: int | None) -> Iterator[tuple[list[Any], list[Any]]]:
    """The split's (texts, labels) as Python lists, in batches of rows of about `chunk_bytes` of Arrow data by the
    table's average (None: all at once); ClassLabel columns give their names. The dataset itself is datasets'
    memory-mapped Arrow files: a batch is what is held."""
    source = f"hf:{name}:{split}"
    if not name:
        raise DataError(f"{source}: empty dataset name")
    _offline_without_the_hub()
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # network, auth, unknown name or split: all mean "cannot use this spec"
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise DataError(
            f"{source}: not a local file ending in {_supported()}, and loading it from the "
            f"Hugging Face hub failed: {type(exc).__name__}: {detail}"
        ) from None
    _check_columns(source, ds.column_names, text_column, label_column)
    arrow = ds.with_format("arrow")  # honours any indices mapping, unlike ds.data
    feature = ds.features.get(label_column)
    table = ds.data  # the Arrow table under any indices mapping: for the average row size
    step = len(arrow) if chunk_bytes is None else chunk_bytes * table.num_rows // max(1, table.nbytes)
    step = max(1, step)
    for lo in range(0, len(arrow), step):
        batch = arrow[lo : lo + step]
        texts, labels = batch[text_column].to_pylist(), batch[label_column].to_pylist()
        if isinstance(feature, datasets.ClassLabel):  # names are what a human (and the report) wants
            labels = [None if v is None or v < 0 else feature.int2str(v) for v in labels]
        yield texts, labels


# --------------------------------------------------------------------------------------------------
# Common validation
# --------------------------------------------------------------------------------------------------


_INTEGRAL_FLOAT = re.compile(r"[+-]?\d+\.0*")


def _label_str(value: Any) -> str | None:
    """One canonical string per label value, whatever type the format stored it as."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        # text formats carry the typed formats' values as written: pandas writes a float column's 1.0 and a bool
        # column's True to CSV, which JSON / Parquet read as 1.0 -> "1" and true -> "true" above
        value = value.strip()
        if _INTEGRAL_FLOAT.fullmatch(value):
            return str(int(value.partition(".")[0]))
        return value.lower() if value in ("True", "False", "TRUE", "FALSE") else value or None
    raise TypeError(type(value).__name__)


@dataclass
class _Rows:
    """Rows of a table (or of a chunk of one) cleaned: kept texts and labels, empty texts skipped, null labels."""

    texts: list[str]
    labels: list[str]
    skipped: int
    bad: list[int]  # indices (as `locate` takes them) of kept rows with a null or empty label


def _clean_rows(
    source: str, texts: list[Any], labels: list[Any], label_column: str, locate: Callable[[int], str], start: int = 0,
) -> _Rows:
    """Rows `start`, `start + 1`, ... of `source`: the conventions of the module docstring. Label strings are shared
    among equal labels (one object per distinct label, not one per row)."""
    out = _Rows([], [], 0, [])
    shared: dict[str, str] = {}
    for i, (text, label) in enumerate(zip(texts, labels, strict=True), start):
        if text is None or (isinstance(text, str) and not text.strip()):
            out.skipped += 1
            continue
        if not isinstance(text, str):
            if isinstance(text, list | dict | bytes):
                raise DataError(f"{source}: {locate(i)}: text is a {type(text).__name__}, expected a string")
            text = str(text)
        try:
            label_str = _label_str(label)
        except TypeError as exc:
            raise DataError(
                f"{source}: {locate(i)}: label in column {label_column!r} is a {exc}, expected a scalar"
            ) from None
        if label_str is None:
            out.bad.append(i)
            continue
        out.texts.append(text)
        out.labels.append(shared.setdefault(label_str, label_str))
    return out


def _check_rows(source: str, kept: int, skipped: int, bad: list[int], num_bad: int, text_column: str,
                label_column: str, locate: Callable[[int], str]) -> None:
    """The whole table's checks: no null labels among kept rows (the first named, `num_bad` in all), some text."""
    if num_bad:
        more = f" (and {num_bad - 1} more rows)" if num_bad > 1 else ""
        raise DataError(f"{source}: {locate(bad[0])}: null or empty label in column {label_column!r}{more}")
    if not kept:  # an evaluation would report accuracy 0 over n = 0 and exit 0
        raise DataError(f"{source}: no rows with text: all {skipped} texts in column {text_column!r} are null, empty "
                        "or whitespace")


def _finish(
    source: str, texts: list[Any], labels: list[Any], text_column: str, label_column: str,
    locate: Callable[[int], str],
) -> TextTable:
    rows = _clean_rows(source, texts, labels, label_column, locate)
    _check_rows(source, len(rows.texts), rows.skipped, rows.bad, len(rows.bad), text_column, label_column, locate)
    return TextTable(rows.texts, rows.labels, os.fspath(source), rows.skipped)
