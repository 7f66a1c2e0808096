"""tabular_stream.read_chunks: the rows (and errors) of tabular.read_table, a chunk at a time."""

import csv
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainer import tabular, tabular_json
from trainer.tabular import DataError, read_table
from trainer.tabular_stream import ReadAgain, read_all_chunks, read_chunks

ROWS = [
    ("a first text", "pos"),
    ("", "neg"),  # empty text: skipped
    ("multi\nline, with a comma", "1.0"),
    ("   ", "x"),  # whitespace only: skipped
    ("café naïve", "True"),
    ("x" * 5000, "neg"),  # longer than the tiny blocks below: pyarrow's "straddling object" path
    ("last", "pos"),
]


def write(path, rows, fmt="csv"):
    if fmt == "parquet":
        pq.write_table(pa.table({"text": [t for t, _ in rows], "label": [y for _, y in rows]}), path,
                       row_group_size=2)
        return path
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t" if fmt == "tsv" else ",")
        w.writerow(["text", "label"])
        w.writerows(rows)
    return path


def joined(spec, chunk_bytes):
    """The rows of every chunk, as the data-cache build takes them (read_all_chunks: started over on ReadAgain)."""
    chunks = []
    read_all_chunks(str(spec), "text", "label", None, chunks.clear, chunks.append, chunk_bytes=chunk_bytes)
    texts = [t for c in chunks for t in c.texts]
    labels = [y for c in chunks for y in c.labels]
    return texts, labels, sum(c.num_skipped_empty for c in chunks), len(chunks)


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet"])
@pytest.mark.parametrize("chunk_bytes", [1, 64, 1 << 20])
def test_chunks_join_into_read_tables_rows(tmp_path, fmt, chunk_bytes):
    path = write(tmp_path / f"d.{fmt}", ROWS, fmt)
    whole = read_table(str(path), "text", "label")
    texts, labels, skipped, num_chunks = joined(path, chunk_bytes)
    assert (texts, labels, skipped) == (whole.texts, whole.labels, whole.num_skipped_empty)
    assert labels == ["pos", "1", "true", "neg", "pos"] and skipped == 2
    if chunk_bytes == 1 and fmt == "parquet":  # several batches (CSV: the long row has the file read again with
        assert num_chunks > 1  # 8 KiB blocks, which hold it whole; the next test has CSVs of many chunks)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=300),
                               st.sampled_from(["a", "b", "7", "2.0"])), min_size=1, max_size=40),
       chunk_bytes=st.sampled_from([1, 300, 5000]))
def test_random_csv_reads_the_same_in_chunks(tmp_path, rows, chunk_bytes):
    """read_table starting from the same block size (pyarrow parses a quoted "\r\n" on a block boundary as "\r",
    so the rows depend on the block size; ReadAgain keeps them to one size, as read_table's rereading does)."""
    path = write(tmp_path / "r.csv", rows)
    saved = tabular._CSV_BLOCK
    tabular._CSV_BLOCK = max(chunk_bytes, 1 << 10)  # the streaming reader's floor
    try:
        whole = read_table(str(path), "text", "label")
    except DataError as e:
        with pytest.raises(DataError) as got:
            joined(path, chunk_bytes)
        assert str(got.value) == str(e)
        return
    finally:
        tabular._CSV_BLOCK = saved
    assert joined(path, chunk_bytes)[:3] == (whole.texts, whole.labels, whole.num_skipped_empty)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_errors_are_read_tables(tmp_path, fmt):
    """The first null label by its row number in the file, and how many more, although later chunks hold them."""
    cases = {
        "labels": ROWS + [("no label", ""), ("a", "b"), ("another", "")],
        "all_empty": [("", "a"), (" ", "b")],
    }
    for name, rows in cases.items():
        path = write(tmp_path / f"{name}.{fmt}", rows, fmt)
        with pytest.raises(DataError) as whole:
            read_table(str(path), "text", "label")
        with pytest.raises(DataError) as chunked:
            joined(path, 1)
        assert str(chunked.value) == str(whole.value), name
    assert "null or empty label" in str(chunked.value) or "no rows with text" in str(chunked.value)
    header_only = tmp_path / "h.csv"
    header_only.write_text("text,label\n")
    with pytest.raises(DataError, match="no data rows"):
        joined(header_only, 1)
    with pytest.raises(DataError, match="no text column 'body'"):
        list(read_chunks(str(write(tmp_path / f"c.{fmt}", ROWS, fmt)), "body", "label"))


def test_tabs_in_tsv_text_are_reported_once_with_the_first_row_in_the_file(tmp_path, caplog):
    path = write(tmp_path / "t.tsv", [("plain", "a")] * 30 + [("with\ttab", "b"), ("again\there", "a")], "tsv")
    with caplog.at_level(logging.WARNING, logger="trainer.tabular"):
        joined(path, 1)
    warnings = [r.getMessage() for r in caplog.records if "hold a tab" in r.getMessage()]
    assert len(warnings) == 1 and "2 text field(s)" in warnings[0] and "data row 31" in warnings[0]


def test_a_json_array_comes_in_chunks_and_so_do_a_columns_documents_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(tabular_json, "BLOCK_BYTES", 7)  # records cut by every block boundary
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"text": f"doc {i}", "label": i % 3} for i in range(40)], indent=2))
    chunks = list(read_chunks(str(path), "text", "label", chunk_bytes=20))
    assert len(chunks) == 10  # 4 records of 5 characters a chunk
    assert [t for c in chunks for t in c.texts] == [f"doc {i}" for i in range(40)]
    assert [y for c in chunks for y in c.labels] == [str(i % 3) for i in range(40)]
    path.write_text(json.dumps({"text": ["one", "two"], "label": [1, 2]}))
    assert joined(path, 1)[:2] == (["one", "two"], ["1", "2"])  # parsed whole (one value), then chunked


def test_a_json_array_is_parsed_a_block_at_a_time(tmp_path, monkeypatch):
    """What streaming is for: the text held at once stays about a block, not the file (one record per line, and
    the whole array on one line, as json.dump writes it)."""
    monkeypatch.setattr(tabular_json, "BLOCK_BYTES", 1 << 12)
    held = []
    read = tabular_json._JsonText.read
    monkeypatch.setattr(tabular_json._JsonText, "read",
                        lambda self, size: (read(self, size), held.append(len(self.text)))[0])
    records = [{"text": f"document number {i} " * 5, "label": i % 7} for i in range(5000)]
    path = tmp_path / "big.json"
    for indent in (None, 1):
        path.write_text(json.dumps(records, indent=indent))
        assert path.stat().st_size > 500_000
        held.clear()
        texts, labels, _, _ = joined(path, 1 << 14)
        assert texts == [r["text"] for r in records] and labels == [str(r["label"]) for r in records]
        assert max(held) < 200_000


def test_json_array_errors_name_the_line(tmp_path, monkeypatch):
    monkeypatch.setattr(tabular_json, "BLOCK_BYTES", 5)
    path = tmp_path / "d.json"
    records = [{"text": f"doc {i}", "label": "a"} for i in range(30)]
    records[20]["label"] = None
    text = json.dumps(records, indent=2)
    path.write_text(text)
    line = text[: text.rindex("{", 0, text.index('"doc 20"'))].count("\n") + 1  # where the record starts
    for read in (lambda: read_table(str(path), "text", "label"), lambda: joined(path, 1)):
        with pytest.raises(DataError, match=rf"d.json: line {line}: null or empty label"):
            read()
    path.write_text('[{"text": "a", "label": 1},\n\n  "a string"]')
    with pytest.raises(DataError, match=r"d.json: line 3: record 2: expected a JSON object, got str"):
        joined(path, 1)
    path.write_bytes(b'[{"text": "a", "label": 1},\n {"text": "\xff", "label": 2}]')
    with pytest.raises(DataError, match=r"d.json: line 2: not valid UTF-8 text"):
        joined(path, 1)
    path.write_bytes(b'{"text": ["a",\n "b\xff"],\n "label": [1, 2]}')  # not taken for broken JSON Lines
    with pytest.raises(DataError, match=r"d.json: line 2: not valid UTF-8 text"):
        joined(path, 1)
    path.write_text(" [ ]\n")
    with pytest.raises(DataError, match=r"d.json: no data rows"):
        joined(path, 1)


@pytest.mark.parametrize("block", [1, 3, 1 << 20])
def test_json_is_decoded_as_json_loads_decodes_bytes(tmp_path, monkeypatch, block):
    """Surrogates encoded as bytes pass (json.loads decodes with surrogatepass), UTF-16 and UTF-32 are detected with
    or without a byte order mark, blank lines before the array included, and a number cut by a block after its "."
    or "e" is still read whole."""
    monkeypatch.setattr(tabular_json, "BLOCK_BYTES", block)
    path = tmp_path / "d.json"
    cases = [b'[{"text": "smile \xed\xa0\xbd\xed\xb8\x80", "label": 1}]',
             '[{"text": "caf\u00e9 \U0001F600", "label": 1.5}]'.encode("utf-16-le"),
             *('\n\n [{"text": "caf\u00e9", "label": 1}]'.encode(codec) for codec in ("utf-16", "utf-16-be", "utf-32")),
             '\ufeff{"text": ["a"], "label": [1]}'.encode("utf-16-be"),
             b'{"text": ["a", "b"],\n "label": [1E+2, 2.25]}']
    for raw in cases:
        path.write_bytes(raw)
        expected = json.loads(raw)
        expected = expected if isinstance(expected, list) else [
            dict(zip(expected, row, strict=True)) for row in zip(*expected.values(), strict=True)]
        with open(path, "rb") as fh:
            got = [r for _, r in tabular_json.json_records(path, fh, "json")]
        assert got == expected and all(type(a["label"]) is type(b["label"]) for a, b in zip(got, expected, strict=True))
        assert joined(path, 1)[0] == [r["text"] for r in expected]
    for raw, record in ((b"[1.5]", 1), (b'[{"text": "a", "label": 1}, 1E+2]', 2)):
        path.write_bytes(raw)
        with pytest.raises(DataError, match=f"record {record}: expected a JSON object, got float"):
            joined(path, 1)


RECORDS = st.lists(st.fixed_dictionaries({"text": st.text(max_size=30), "label": st.sampled_from(["a", "b", 1])}),
                   min_size=0, max_size=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=RECORDS, indent=st.sampled_from([None, 0, 2]), block=st.sampled_from([1, 2, 3, 7, 64, 1 << 20]),
       cut=st.floats(0, 1), edit=st.sampled_from(["none", "cut", "delete", "insert"]),
       junk=st.sampled_from(list(',:[]{}"\\ x1-e.n\n')))
def test_random_json_arrays_parse_as_json_loads(tmp_path, monkeypatch, records, indent, block, cut, edit, junk):
    """A block at a time, the records json.loads gives, or its error at the same line and column (for text cut
    short, a character dropped or one put in anywhere), or a record that is not an object."""
    monkeypatch.setattr(tabular_json, "BLOCK_BYTES", block)
    monkeypatch.setattr(tabular_json, "DROP_AFTER", 4)  # parsed text dropped as soon as can be: the column counts
    text = json.dumps(records, indent=indent)
    at = int(cut * len(text))
    text = {"none": text, "cut": text[:at], "delete": text[:at] + text[at + 1 :],
            "insert": text[:at] + junk + text[at:]}[edit]
    if not text.lstrip().startswith("["):
        return
    path = tmp_path / "r.json"
    path.write_text(text, encoding="utf-8")
    try:
        expected, expected_error = json.loads(text), None
    except json.JSONDecodeError as e:
        expected, expected_error = None, e
    try:
        with open(path, "rb") as fh:
            got, error = [r for _, r in tabular_json.json_array_records(path, fh)], None
    except DataError as e:
        got, error = None, str(e)
    if error is None:
        assert expected_error is None and got == expected
    elif "not valid JSON" in error:
        assert expected_error is not None, error
        assert f"line {expected_error.lineno}: not valid JSON (" in error, (error, expected_error)
        assert f"({expected_error.msg} at column {expected_error.colno})" in error, (error, expected_error)
    else:
        assert "expected a JSON object" in error
        assert expected_error is not None or any(not isinstance(r, dict) for r in expected)


JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=False, width=32),
                        st.text(max_size=20), st.lists(st.integers(), max_size=2))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(st.one_of(
    st.fixed_dictionaries({"text": st.one_of(st.text(max_size=40), JSON_VALUES), "label": JSON_VALUES}),
    st.fixed_dictionaries({"text": st.text(max_size=40)}),  # no label field: read as null
    st.fixed_dictionaries({"label": st.sampled_from(["a", "b"])}),  # no text field
    st.fixed_dictionaries({"text": st.text(min_size=1, max_size=40), "label": st.sampled_from(["a", "b"])}),
    st.just("blank"), st.just("not json"), st.just("[1]"),
), min_size=0, max_size=30), chunk_bytes=st.sampled_from([1, 30, 1 << 20]))
def test_random_jsonl_reads_the_same_in_chunks(tmp_path, caplog, records, chunk_bytes):
    """Rows, errors (a bad row before a line that is not JSON: the line's error, as read_table parses first) and
    the absent-field warnings of read_table."""
    import json

    path = tmp_path / "r.jsonl"
    path.write_text("".join("\n" if r == "blank" else (r if isinstance(r, str) else json.dumps(r)) + "\n"
                            for r in records))
    outcomes = []
    for read in (lambda: read_table(str(path), "text", "label"), lambda: joined(path, chunk_bytes)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="trainer.tabular"):
            try:
                got = read()
                rows = (got.texts, got.labels, got.num_skipped_empty) if hasattr(got, "texts") else got[:3]
            except DataError as e:
                rows = str(e)
        outcomes.append((rows, sorted(r.getMessage() for r in caplog.records)))
    assert outcomes[1] == outcomes[0]


def test_jsonl_comes_in_chunks_with_line_numbers_in_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [f'{{"text": "doc {i}", "label": "a"}}' for i in range(50)] + ['{"text": "x", "label": ""}', "",
                                                                             '{"text": "y", "label": null}']
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl: line 51: null or empty label in column 'label' \(and 1 more rows\)"):
        joined(path, 20)
    path.write_text("\n".join(lines[:50]) + "\n")
    chunks = list(read_chunks(str(path), "text", "label", chunk_bytes=20))
    assert len(chunks) > 10 and [t for c in chunks for t in c.texts] == [f"doc {i}" for i in range(50)]


def test_a_row_longer_than_the_block_has_the_file_read_again_with_a_larger_block(tmp_path, monkeypatch):
    import pyarrow.csv as pacsv

    blocks = []
    open_csv = pacsv.open_csv
    monkeypatch.setattr(pacsv, "open_csv", lambda *a, **k: blocks.append(a[1].block_size) or open_csv(*a, **k))
    rows = [(f"row {i}", "a") for i in range(200)] + [("y" * 20_000, "b")] + [(f"after {i}", "c") for i in range(50)]
    path = write(tmp_path / "long.csv", rows)
    texts, labels, _, _ = joined(path, 1)
    assert blocks == [1024, 8192, 65536]  # read again twice: 8 KiB is still too small
    assert texts == [t for t, _ in rows] and labels == [y for _, y in rows]
    with pytest.raises(ReadAgain) as again:  # what read_all_chunks handles
        list(read_chunks(str(path), "text", "label", chunk_bytes=1))
    assert again.value.chunk_bytes == 8192


def test_quoted_crlf_rows_are_read_tables_when_the_file_is_read_again(tmp_path, monkeypatch):
    """Rows from one block size only (a quoted CRLF on a block boundary parses differently at another)."""
    monkeypatch.setattr(tabular, "_CSV_BLOCK", 1024)
    rows = [(f"line {i}\r\nsecond {i}", "a") for i in range(120)] + [("z" * 20_000, "b"), ("end", "a")]
    path = write(tmp_path / "crlf.csv", rows)
    whole = read_table(str(path), "text", "label")
    assert joined(path, 1)[:2] == (whole.texts, whole.labels)


def test_parquet_batches_of_repeated_text_are_capped_in_rows(tmp_path, monkeypatch):
    """A repeated text is stored once (dictionary encoding), so the stored size would size batches of every row."""
    from trainer import tabular_stream

    monkeypatch.setattr(tabular_stream, "PARQUET_MAX_ROWS", 1000)
    path = tmp_path / "same.parquet"
    pq.write_table(pa.table({"text": ["the same long text " * 50] * 5000, "label": ["a", "b"] * 2500}), path)
    chunks = list(read_chunks(str(path), "text", "label"))
    assert [len(c) for c in chunks] == [1000] * 5


@pytest.mark.parametrize("name", ["d.jsonl", "d.json"])
def test_json_files_may_start_with_many_blank_lines(tmp_path, name):
    path = tmp_path / name
    path.write_text("\n" * 70_000 + '{"text": "one", "label": "a"}\n{"text": "two", "label": "b"}\n')
    assert read_table(str(path), "text", "label").texts == ["one", "two"]
    assert joined(path, 1 << 20)[:2] == (["one", "two"], ["a", "b"])
    path.write_text("\n" * 70_000)
    with pytest.raises(DataError, match="empty file"):
        joined(path, 1 << 20)


def test_stream_tokenized_hands_each_batch_over_once_and_restarts_when_the_file_is_read_again(tmp_path, monkeypatch):
    """`data_cache.stream_tokenized` (trainer eval): every row's tokens reach `take` once, in order, after the last
    `restart` (a row longer than the chunk has the file read again); nothing is kept between batches."""
    from trainer import data_cache
    from trainer.config import Config
    from trainer.vocab import Tokenizer

    monkeypatch.setattr(data_cache, "tokenizing_batch", lambda workers, max_chars=None: (50, 50))
    monkeypatch.setattr(tabular, "_CSV_BLOCK", 1024)
    rows = [(f"row {i} text", "a" if i % 2 else "b") for i in range(300)] + [("long " * 4000, "c"), ("end", "a")]
    path = write(tmp_path / "long.csv", rows)
    taken, restarts = [], []

    def take(tokenized, labels):
        taken.append((tokenized.doc_lengths.tolist(), labels))

    def restart():
        restarts.append(len(taken))
        taken.clear()

    monkeypatch.setattr("trainer.tabular_stream.CHUNK_BYTES", 1024)
    source, skipped = data_cache.stream_tokenized(str(path), Config(), "test", Tokenizer(r"\w+", True), 1, take,
                                                  restart)
    # started, then read again with 8 and 64 KiB blocks (the first pass had handed over several batches)
    assert len(restarts) == 3 and restarts[1] > 1
    assert source == str(path) and skipped == 0
    assert [y for _, labels in taken for y in labels] == [y for _, y in rows]
    assert [n for lengths, _ in taken for n in lengths] == [len(t.split()) for t, _ in rows]
