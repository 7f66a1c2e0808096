"""Tests for trainer.tabular: every format, every error, and the hub path via a fake load_dataset."""

from __future__ import annotations

import bz2
import csv
import gzip
import json
import lzma
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainer.tabular import DataError, TextTable, local_format, looks_like_missing_path, read_table


def write_csv(path: Path, rows: list[list[object]], delimiter: str = ",") -> Path:
    # csv's default "\r\n" terminator makes it quote fields holding a bare "\r" (with "\n" it would
    # not, and no reader could then tell that "\r" from a line break); it also covers CRLF files.
    with open(path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh, delimiter=delimiter).writerows(rows)
    return path


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def error(spec: Path | str, text: str = "text", label: str = "label", **kw: str) -> str:
    with pytest.raises(DataError) as exc:
        read_table(str(spec), text, label, **kw)
    message = str(exc.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------- formats


def test_csv_reads_quotes_commas_newlines_and_skips_empty(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "d.csv",
        [
            ["id", "text", "label"],
            [1, 'He said "hi", twice\nand left', 0],
            [2, "", 1],
            [3, "   \t ", 1],
            [4, "NA", "01"],
            [5, "plain", " pos "],
        ],
    )
    table = read_table(str(path), "text", "label")
    assert table == TextTable(
        ['He said "hi", twice\nand left', "NA", "plain"], ["0", "01", "pos"], str(path), 2
    )
    assert len(table) == 3


def test_tsv_and_utf8_bom(tmp_path: Path) -> None:
    path = tmp_path / "d.tsv"
    path.write_text('text\tlabel\nquote " inside\tb\ncomma, here\ta\n', encoding="utf-8-sig")
    table = read_table(str(path), "text", "label")
    assert (table.texts, table.labels) == (['quote " inside', "comma, here"], ["b", "a"])


@pytest.mark.parametrize("name", ["d.jsonl", "d.json"])
def test_jsonl_label_types(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    records = [
        {"text": "a", "label": 3},
        {"text": "b", "label": 1.0},
        {"text": "c", "label": 0.5},
        {"text": "d", "label": True},
        {"text": None, "label": 1},
        {"label": 1},
        {"text": 42, "label": "x", "extra": [1, 2]},
    ]
    path.write_text("\n\n".join(json.dumps(r) for r in records) + "\n")  # blank lines are fine
    table = read_table(str(path), "text", "label")
    assert (table.texts, table.labels, table.num_skipped_empty) == (
        ["a", "b", "c", "d", "42"],
        ["3", "1", "0.5", "true", "x"],
        2,
    )


def test_json_array_and_columnar(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps([{"t": "x", "y": 1}, {"t": "z", "y": 2}], indent=2))
    (tmp_path / "c.json").write_text(json.dumps({"t": ["x", "z"], "y": [1, 2]}, indent=2))
    for name in ("a.json", "c.json"):
        table = read_table(str(tmp_path / name), "t", "y")
        assert (table.texts, table.labels) == (["x", "z"], ["1", "2"])


def test_parquet_types(tmp_path: Path) -> None:
    table = pa.table(
        {
            "text": ["a", "", "c", "d"],
            "label": pa.array(["x", "y", "x", "z"]).dictionary_encode(),
            "num": pa.array([0, 1, 2, 3], pa.int64()),
            "other": [1.5, 2.5, 3.5, 4.5],
        }
    )
    pq.write_table(table, tmp_path / "d.parquet")
    assert read_table(str(tmp_path / "d.parquet"), "text", "label").labels == ["x", "x", "z"]
    result = read_table(str(tmp_path / "d.parquet"), "text", "num")
    assert (result.texts, result.labels, result.num_skipped_empty) == (["a", "c", "d"], ["0", "2", "3"], 1)


def test_compressed_text_formats(tmp_path: Path) -> None:
    (tmp_path / "d.csv.gz").write_bytes(gzip.compress(b'text,label\n"x, y",1\n'))
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x, y", "label": 1}\n'))
    csv_bytes = b'text,label\n"x, y",1\n'
    (tmp_path / "d.csv.bz2").write_bytes(bz2.compress(csv_bytes))
    (tmp_path / "d.csv.xz").write_bytes(lzma.compress(csv_bytes))  # pyarrow does not infer .xz from the name
    (tmp_path / "d.tsv.xz").write_bytes(lzma.compress(b"text\tlabel\nx, y\t1\n"))
    (tmp_path / "d.jsonl.xz").write_bytes(lzma.compress(b'{"text": "x, y", "label": 1}\n'))
    for name in ("d.csv.gz", "d.jsonl.gz", "d.csv.bz2", "d.csv.xz", "d.tsv.xz", "d.jsonl.xz"):
        assert read_table(str(tmp_path / name), "text", "label").texts == ["x, y"], name


def test_labels_are_the_same_whatever_the_format(tmp_path: Path) -> None:
    """pandas writes a float label column as 1.0 and a bool one as True: CSV, JSONL and Parquet must agree on
    the class names, or a model trained on one format scores 0 on the other."""
    labels = [1.0, 0.0, -2.0, True, False]
    texts = ["a", "b", "c", "d", "e"]
    as_text = ["1.0", "0.0", "-2.00", "True", "FALSE"]
    write_csv(tmp_path / "d.csv", [["text", "label"], *zip(texts, as_text, strict=True)])
    write_jsonl(tmp_path / "d.jsonl", [{"text": t, "label": y} for t, y in zip(texts, labels, strict=True)])
    pq.write_table(pa.table({"text": texts[:3], "label": labels[:3]}), tmp_path / "d.parquet")
    pq.write_table(pa.table({"text": texts[3:], "label": labels[3:]}), tmp_path / "b.parquet")
    expected = ["1", "0", "-2", "true", "false"]
    assert read_table(str(tmp_path / "d.csv"), "text", "label").labels == expected
    assert read_table(str(tmp_path / "d.jsonl"), "text", "label").labels == expected
    assert (read_table(str(tmp_path / "d.parquet"), "text", "label").labels
            + read_table(str(tmp_path / "b.parquet"), "text", "label").labels) == expected
    # only integral floats and booleans: other label text stays as written
    write_csv(tmp_path / "k.csv", [["text", "label"], ["a", "1.5"], ["b", "1.0.0"], ["c", "true story"], ["d", "01"]])
    assert read_table(str(tmp_path / "k.csv"), "text", "label").labels == ["1.5", "1.0.0", "true story", "01"]


def test_upper_case_compressed_names(tmp_path: Path) -> None:
    """pyarrow infers compression only from lower-case names; an upper-case .GZ was read as raw bytes."""
    (tmp_path / "d.CSV.GZ").write_bytes(gzip.compress(b'text,label\n"x, y",1\n'))
    (tmp_path / "d.csv.BZ2").write_bytes(bz2.compress(b'text,label\n"x, y",1\n'))
    for name in ("d.CSV.GZ", "d.csv.BZ2"):
        assert read_table(str(tmp_path / name), "text", "label").texts == ["x, y"], name


@pytest.mark.parametrize("name", ["d.csv.gz", "d.csv.bz2", "d.csv.xz"])
def test_truncated_compressed_csv_names_the_file(tmp_path: Path, name: str) -> None:
    # several bz2 blocks (900 KB each), so the header decompresses and the body's end is missing
    body = b"text,label\n" + b"".join(b"document number %d here,%d\n" % (i, i % 3) for i in range(100_000))
    compress = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}[Path(name).suffix]
    blob = compress(body)
    path = tmp_path / name
    path.write_bytes(blob[: len(blob) // 2])
    assert error(path).startswith(f"{path}: cannot read")


def test_tsv_stray_quote_is_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """TSV files are often written without quoting; a field starting with a quote then swallows the rows that
    follow it. The reader cannot know, so it says where a text field holds a tab."""
    path = tmp_path / "d.tsv"
    path.write_text('text\tlabel\n"Hello" he said\tA\n"unbalanced start\tB\nnext row\tC\nlast "row"\tD\n')
    with caplog.at_level("WARNING", logger="trainer.tabular"):
        table = read_table(str(path), "text", "label")
    assert len(table) == 2
    assert "1 text field(s) hold a tab, the first in data row 2" in caplog.text
    caplog.clear()
    path.write_text('text\tlabel\n"Hello" he said\tA\nplain\tB\n')
    with caplog.at_level("WARNING", logger="trainer.tabular"):
        assert len(read_table(str(path), "text", "label")) == 2
    assert "tab" not in caplog.text


@pytest.mark.parametrize(("name", "body"), [("d.json", '[{"text": "x", "label": 1}]'),
                                            ("d.json", '{"text": "x", "label": 1}\n'),
                                            ("d.jsonl", '{"text": "x", "label": 1}\n')])
def test_json_with_byte_order_mark(tmp_path: Path, name: str, body: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    assert read_table(str(path), "text", "label").labels == ["1"]


def test_duplicate_column_is_refused(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", [["text", "label", "label"], ["x", "a", "b"]])
    assert "names label column 'label' 2 times" in error(path)
    pq.write_table(pa.Table.from_arrays([pa.array(["x"]), pa.array(["a"]), pa.array(["b"])],
                                        names=["text", "text", "label"]), tmp_path / "d.parquet")
    assert "names text column 'text' 2 times" in error(tmp_path / "d.parquet")


def test_a_file_of_empty_texts_is_an_error(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", [["text", "label"], ["", "a"], ["  ", "b"]])
    assert "no rows with text: all 2 texts in column 'text' are null, empty or whitespace" in error(path)


def test_jsonl_records_without_the_text_field_are_reported(tmp_path: Path, caplog) -> None:
    """A record without the key (not one with a null value) is likely a differently named field: say how many
    and where, rather than only counting them among the empty texts."""
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 1}, {"body": "b", "label": 2},
                                              {"text": None, "label": 3}, {"body": "c", "label": 2}])
    with caplog.at_level("WARNING", logger="trainer.tabular"):
        table = read_table(str(path), "text", "label")
    assert (table.texts, table.num_skipped_empty) == (["a"], 3)
    assert "2 of 4 records have no 'text' field (the first at line 2)" in caplog.text


def test_local_format_detection() -> None:
    assert local_format("a/b.CSV") == "csv" and local_format("x.tsv.gz") == "tsv"
    assert local_format("x.parquet") == "parquet" and local_format("x.json") == "json"
    assert local_format("ag_news") is None and local_format("user/ds:test") is None
    assert local_format("x.parquet.gz") is None


@pytest.mark.parametrize(("suffix", "first"), [(".csv", True), (".csv", False), (".tsv", False)])
def test_enormous_document(tmp_path: Path, suffix: str, first: bool) -> None:
    """A 20 MB field exceeds pyarrow's block size; the reader must grow it rather than fail."""
    big = ("word, " * 4_000_000).strip()
    rows = [["text", "label"], [big, "big"], ["small", "s"]]
    if not first:
        rows[1], rows[2] = rows[2], rows[1]
    path = write_csv(tmp_path / f"d{suffix}", rows, delimiter="\t" if suffix == ".tsv" else ",")
    table = read_table(str(path), "text", "label")
    assert sorted(map(len, table.texts)) == [5, len(big)]
    jsonl = write_jsonl(tmp_path / "d.jsonl", [{"text": big, "label": "big"}])
    assert read_table(str(jsonl), "text", "label").texts == [big]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(
        st.tuples(st.text(max_size=40), st.sampled_from(["a", "b,c", 'q"', "7", "x y"])),
        min_size=1,
        max_size=20,
    )
)
def test_round_trip_property(tmp_path_factory: pytest.TempPathFactory, rows: list[tuple[str, str]]) -> None:
    d = tmp_path_factory.mktemp("rt")
    expected = [(t, label) for t, label in rows if t.strip()]
    skipped = len(rows) - len(expected)
    paths = [
        write_csv(d / "d.csv", [["text", "label"], *rows]),
        write_csv(d / "d.tsv", [["text", "label"], *rows], delimiter="\t"),
        write_jsonl(d / "d.jsonl", [{"text": t, "label": label} for t, label in rows]),
    ]
    pq.write_table(pa.table({"text": [t for t, _ in rows], "label": [x for _, x in rows]}), d / "d.parquet")
    for path in [*paths, d / "d.parquet"]:
        if not expected:
            assert "no rows with text" in error(path)
            continue
        table = read_table(str(path), "text", "label")
        assert list(zip(table.texts, table.labels, strict=True)) == expected, path.name
        assert table.num_skipped_empty == skipped


# ----------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name", ["nope.csv", "nope.tsv", "nope.jsonl", "nope.json", "nope.parquet"])
def test_file_not_found(tmp_path: Path, name: str) -> None:
    message = error(tmp_path / name)
    assert name in message and "not found" in message


@pytest.mark.parametrize("name", ["e.csv", "e.tsv", "e.jsonl", "e.json", "e.parquet"])
def test_empty_file(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"")
    assert "empty file" in error(tmp_path / name)
    (tmp_path / name).write_bytes(b"\n\n  \n" if name.endswith(("json", "jsonl")) else b"")
    assert "empty file" in error(tmp_path / name)


def test_empty_compressed_and_header_only(tmp_path: Path) -> None:
    (tmp_path / "e.csv.gz").write_bytes(gzip.compress(b""))
    assert "empty file" in error(tmp_path / "e.csv.gz")
    write_csv(tmp_path / "h.csv", [["text", "label"]])
    assert "no data rows" in error(tmp_path / "h.csv")


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "json", "parquet"])
@pytest.mark.parametrize(("text", "label", "missing"), [("body", "label", "body"), ("text", "y", "y")])
def test_missing_column(tmp_path: Path, fmt: str, text: str, label: str, missing: str) -> None:
    rows = [{"text": "a", "label": 1, "extra": 2}]
    path = tmp_path / f"d.{fmt}"
    if fmt in ("csv", "tsv"):
        write_csv(path, [["text", "label", "extra"], ["a", 1, 2]], delimiter="\t" if fmt == "tsv" else ",")
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        write_jsonl(path, rows)
    message = error(path, text, label)
    assert str(path) in message and repr(missing) in message
    assert "'text', 'label', 'extra'" in message  # the columns that are there


def test_garbage_csv_names_line(tmp_path: Path) -> None:
    path = tmp_path / "g.csv"
    path.write_text('text,label\na,1\n"multi\nline",2\nb,3,oops\n')
    message = error(path)
    assert str(path) in message and "line 5" in message and "expected 2 fields, got 3" in message


def test_unterminated_quote_csv(tmp_path: Path) -> None:
    path = tmp_path / "q.csv"
    path.write_text('text,label\n"never closed,1\nnext,2\n')
    message = error(path)
    assert str(path) in message and "not valid CSV" in message


def test_invalid_utf8_csv(tmp_path: Path) -> None:
    path = tmp_path / "u.csv"
    path.write_bytes(b"text,label\nok,1\nbad \xff\xfe byte,2\n")
    message = error(path)
    assert str(path) in message and "line 3" in message and "UTF-8" in message
    (tmp_path / "h.csv").write_bytes(b"te\xffxt,label\n")
    assert "line 1" in error(tmp_path / "h.csv")
    assert "byte order mark" not in error(tmp_path / "h.csv")


@pytest.mark.parametrize(("name", "codec"), [(name, codec) for name in ("u.csv", "u.tsv", "u.jsonl")
                                               for codec in ("utf-16", "utf-16-be", "utf-32")
                                               if (name, codec) != ("u.jsonl", "utf-16-be")])
def test_utf16_and_utf32_files_are_named_as_such(tmp_path: Path, name: str, codec: str) -> None:
    """Excel's "Unicode text" is UTF-16: the message says so, and how to fix it. (A .json file is read as json.loads
    would read it, tests/unit/test_tabular_stream.py. A big-endian UTF-16 JSON Lines file happens to load: each
    line's bytes, split at the newline's second byte, are a line json.loads recognises as UTF-16.)"""
    path = tmp_path / name
    sep = "\t" if name.endswith(".tsv") else ","
    text = '{"text": "a b", "label": 1}\n' if name.endswith(".jsonl") else f"text{sep}label\na b{sep}1\n"
    path.write_bytes(("\ufeff" + text).encode(codec))
    message = error(path)
    assert f"{path}: line 1: not valid UTF-8 text" in message
    assert f"it starts with a {codec[:6].upper()} byte order mark; save it as UTF-8" in message


def test_binary_garbage_csv(tmp_path: Path) -> None:
    path = tmp_path / "bin.csv"
    path.write_bytes(bytes(range(256)) * 4)
    assert str(path) in error(path)


def test_garbage_jsonl_names_line(tmp_path: Path) -> None:
    path = tmp_path / "g.jsonl"
    path.write_text('{"text": "a", "label": 1}\n\n{"text": "b", "label": 2\n')
    message = error(path)
    assert str(path) in message and "line 3" in message and "not valid JSON" in message
    path.write_text('{"text": "a", "label": 1}\n[1, 2]\n')
    assert "line 2: expected a JSON object, got list" in error(path)
    path.write_bytes(b'{"text": "a", "label": 1}\n{"text": "\xff", "label": 1}\n')
    assert "line 2" in error(path)


def test_an_empty_json_array_has_no_data_rows(tmp_path: Path) -> None:
    path = tmp_path / "e.json"
    path.write_text("[]\n")
    assert f"{path}: no data rows" in error(path)


def test_json_columns_of_different_lengths_are_named(tmp_path: Path) -> None:
    path = tmp_path / "cols.json"
    path.write_text(json.dumps({"text": ["a", "b", "c"], "label": [1, 2]}))
    assert "an object of columns whose lengths differ (text 3, label 2)" in error(path)


def test_garbage_json_document(tmp_path: Path) -> None:
    path = tmp_path / "g.json"
    path.write_text('[{"text": "a", "label": 1},\n {"text": "b" "label": 2}]')
    assert "line 2" in error(path)
    path.write_text('[{"text": "a", "label": 1}, "str"]')
    assert "record 2" in error(path)


def test_garbage_parquet(tmp_path: Path) -> None:
    path = tmp_path / "g.parquet"
    path.write_bytes(b"this is not parquet at all" * 10)
    message = error(path)
    assert str(path) in message and "Parquet" in message


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_null_label_names_row(tmp_path: Path, fmt: str) -> None:
    rows = [("a", "x"), ("b", None), ("", None), ("c", "y"), ("d", None)]
    path = tmp_path / f"d.{fmt}"
    if fmt == "csv":
        write_csv(path, [["text", "label"], *[[t, "" if y is None else y] for t, y in rows]])
        where = "data row 2"
    elif fmt == "jsonl":
        write_jsonl(path, [{"text": t, "label": y} for t, y in rows])
        where = "line 2"
    else:
        pq.write_table(pa.table({"text": [t for t, _ in rows], "label": [y for _, y in rows]}), path)
        where = "row 2"
    message = error(path)
    assert str(path) in message and f"{where}:" in message and "null or empty label" in message
    assert "1 more" in message  # the empty-text row 3 is skipped, not counted as bad


def test_non_scalar_label(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": [1, 2]}])
    assert "line 1: label in column 'label' is a list" in error(path)
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": ["a"], "label": 1}])
    assert "text is a list" in error(path)


def test_unsupported_existing_file(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    message = error(tmp_path / "notes.txt")
    assert "unsupported file type" in message and ".csv" in message


def test_directory_with_format_suffix(tmp_path: Path) -> None:
    (tmp_path / "dir.csv").mkdir()
    assert "is a directory" in error(tmp_path / "dir.csv")


# -------------------------------------------------------------------------------------------- hub


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    datasets = pytest.importorskip("datasets")
    calls: list[tuple[str, str]] = []
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )

    def load_dataset(name: str, split: str | None = None, **kw: object):
        calls.append((name, split))
        if name == "missing/ds":
            raise FileNotFoundError(f"Dataset '{name}' doesn't exist on the Hub\nor cannot be accessed")
        ds = datasets.Dataset.from_dict(
            {"text": ["good", " ", "bad", "meh"], "label": [1, 0, 0, 1]}, features
        )
        return ds.select([2, 1, 0])  # an indices mapping, like a sliced split

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_split_parsing_and_class_names(fake_hub: list[tuple[str, str]]) -> None:
    table = read_table("ag_news:test", "text", "label")
    assert (table.texts, table.labels, table.num_skipped_empty) == (["bad", "good"], ["neg", "pos"], 1)
    assert table.source == "hf:ag_news:test"
    read_table("ag_news", "text", "label")
    read_table("user/ds", "text", "label", split="validation")
    read_table("user/ds:test", "text", "label", split="validation")  # the spec's own split wins
    assert fake_hub == [
        ("ag_news", "test"),
        ("ag_news", "train"),
        ("user/ds", "validation"),
        ("user/ds", "test"),
    ]


def test_hub_errors(fake_hub: list[tuple[str, str]]) -> None:
    message = error("missing/ds")
    assert "hf:missing/ds:train" in message and "FileNotFoundError" in message and "Hugging Face" in message
    message = error("ag_news", "content", "label")
    assert "'content'" in message and "'text', 'label'" in message


@pytest.mark.parametrize("spec", ["data/debian/train", "./train", "../train:test", "/data/train", "~/train",
                                  "train.txt", "user/notes.xlsx", "train.csv.zip", "dir\\train"])
def test_a_missing_path_is_not_looked_up_on_the_hub(fake_hub: list[tuple[str, str]], spec: str) -> None:
    """A hub id is `name` or `owner/name`: anything shaped like a path is a missing file, reported at once."""
    assert "file not found" in error(spec)
    assert fake_hub == []
    from trainer.tabular_stream import read_chunks

    with pytest.raises(DataError, match="file not found"):
        list(read_chunks(spec, "text", "label"))
    assert fake_hub == []


def test_hub_shaped_names_and_existing_folders_still_go_to_the_hub(
    fake_hub: list[tuple[str, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for spec in ("ag_news", "user/ds", "user/ds.v2:test", "glue"):
        assert not looks_like_missing_path(spec)
    (tmp_path / "local" / "folder").mkdir(parents=True)  # load_dataset reads a local folder of data files
    monkeypatch.chdir(tmp_path)
    assert not looks_like_missing_path("local/folder")
    read_table("local/folder", "text", "label")
    assert not looks_like_missing_path("./local/folder:test")  # an existing folder with a split
    read_table(str(tmp_path / "local" / "folder") + ":test", "text", "label")
    assert fake_hub == [("local/folder", "train"), (str(tmp_path / "local" / "folder"), "test")]


def test_each_data_role_reads_its_own_split_of_a_bare_hub_name(fake_hub: list[tuple[str, str]]) -> None:
    """data.valid = "name" must not validate on the train split (read_table's default)."""
    from trainer.config import Config
    from trainer.data_cache import read_tokenized
    from trainer.vocab import Tokenizer

    for role in ("train", "valid", "test"):
        read_tokenized("user/ds", Config(), role, Tokenizer(r"\w+", True), 1)
    read_tokenized("user/ds:dev", Config(), "valid", Tokenizer(r"\w+", True), 1)
    assert fake_hub == [("user/ds", "train"), ("user/ds", "validation"), ("user/ds", "test"), ("user/ds", "dev")]


def test_an_unset_split_does_not_key_the_data_cache_on_the_working_directory(tmp_path, monkeypatch) -> None:
    """Path("") is the current directory: its mtime changes with every file created there, and with it the cache
    key, so every run would tokenize the data again (and ranks in different directories disagree)."""
    from trainer.data_cache import _source_key

    monkeypatch.chdir(tmp_path)
    before = _source_key("")
    (tmp_path / "train.log").write_text("x")
    assert _source_key("") == before == ""


def test_the_data_cache_key_changes_when_a_copy_restores_the_old_mtime(tmp_path) -> None:
    """`cp -p`, `rsync -t` and `tar x` put the old modification time on new contents; a relabelled file of the
    same size must still miss the cache (it used to be keyed on path, size and mtime only)."""
    import os
    import shutil

    from trainer.data_cache import _source_key

    path = write_csv(tmp_path / "d.csv", [["text", "label"], ["one", "libs"], ["two", "libs"]])
    before, old = _source_key(str(path)), path.stat()
    replacement = write_csv(tmp_path / "new.csv", [["text", "label"], ["one", "LIBS"], ["two", "libs"]])
    os.utime(replacement, ns=(old.st_atime_ns, old.st_mtime_ns))
    shutil.copy2(replacement, path)  # what cp -p does: new contents, the old file's size and mtime
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (old.st_size, old.st_mtime_ns)
    assert _source_key(str(path)) != before


def test_hub_datasets_stream_in_batches_of_read_tables_rows(fake_hub: list[tuple[str, str]]) -> None:
    from trainer.tabular_stream import read_chunks

    whole = read_table("ag_news:test", "text", "label")
    chunks = list(read_chunks("ag_news:test", "text", "label", chunk_bytes=1))  # one row a batch
    assert len(chunks) == 3 and {c.source for c in chunks} == {"hf:ag_news:test"}
    assert [t for c in chunks for t in c.texts] == whole.texts == ["bad", "good"]
    assert [y for c in chunks for y in c.labels] == whole.labels == ["neg", "pos"]  # ClassLabel names
    assert sum(c.num_skipped_empty for c in chunks) == whole.num_skipped_empty == 1
    list(read_chunks("user/ds", "text", "label", split="validation"))
    assert fake_hub[-1] == ("user/ds", "validation")
    with pytest.raises(DataError, match="hf:missing/ds:train: not a local file"):
        list(read_chunks("missing/ds", "text", "label"))


def test_without_a_resolvable_hub_host_hub_names_are_read_offline() -> None:
    """Offline, datasets retried the hub five times (about 25 s) before failing; now it reads its cache at once."""
    import os
    import subprocess
    import sys

    code = ("import socket\n"
            "def fail(*a, **k): raise socket.gaierror(-2, 'Name or service not known')\n"
            "socket.getaddrinfo = fail\n"
            "import os; from trainer.tabular import _offline_without_the_hub\n"
            "_offline_without_the_hub(); print(os.environ.get('HF_HUB_OFFLINE'))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    run = lambda extra: subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True,  # noqa: E731
                                       text=True, check=True)
    offline = run({})
    assert offline.stdout.strip() == "1" and "does not resolve" in offline.stderr
    assert run({"HF_HUB_OFFLINE": "0"}).stdout.strip() == "0"  # the user's own setting is kept
    assert run({"HTTPS_PROXY": "http://proxy:3128"}).stdout.strip() == "None"  # a proxy resolves the host
