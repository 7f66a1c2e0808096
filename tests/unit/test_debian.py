"""Tests for trainer.debian: tiny fake apt lists in every compression, end to end through the CSVs."""

from __future__ import annotations

import bz2
import csv
import gzip
import json
import lzma
from pathlib import Path

import lz4.frame
import pandas as pd
import pytest

from trainer.debian import (
    DebianListsMissing,
    build_debian_dataset,
    clean_long_description,
    compare_versions,
    iter_paragraphs,
    main,
    stratified_split,
)

PKG = "deb.example.org_debian_dists_{suite}_main_binary-amd64_Packages"
TR = "deb.example.org_debian_dists_{suite}_main_i18n_Translation-en"
WRITERS = {
    "": lambda p, data: p.write_bytes(data),
    ".gz": lambda p, data: p.write_bytes(gzip.compress(data)),
    ".xz": lambda p, data: p.write_bytes(lzma.compress(data)),
    ".lz4": lambda p, data: p.write_bytes(lz4.frame.compress(data)),
    ".bz2": lambda p, data: p.write_bytes(bz2.compress(data)),
}


def pkg_para(name: str, section: str, short: str, md5: str | None = None, version: str = "1.0-1") -> str:
    lines = [f"Package: {name}", f"Version: {version}", "Architecture: amd64", f"Description: {short}"]
    if md5:
        lines.append(f"Description-md5: {md5}")
    lines += ["Tag: role::program,", " use::testing", f"Section: {section}", "Priority: optional"]
    return "\n".join(lines) + "\n\n"


def tr_para(name: str, md5: str, short: str, long_lines: list[str]) -> str:
    body = "".join(f" {line}\n" for line in long_lines)
    return f"Package: {name}\nDescription-md5: {md5}\nDescription-en: {short}\n{body}\n"


def write_lists(
    lists: Path, packages: list[tuple[str, str, str, list[str]]], suite: str = "bookworm", ext: str = ""
) -> None:
    """packages: (name, section, short, long lines). md5 is derived from the name."""
    lists.mkdir(parents=True, exist_ok=True)
    p = "".join(pkg_para(n, s, short, md5=f"md5-{n}") for n, s, short, _ in packages)
    t = "".join(tr_para(n, f"md5-{n}", short, long) for n, _, short, long in packages)
    WRITERS[ext](lists / (PKG.format(suite=suite) + ext), p.encode())
    WRITERS[ext](lists / (TR.format(suite=suite) + ext), t.encode())


def synthetic(n_per_section: dict[str, int]) -> list[tuple[str, str, str, list[str]]]:
    out = []
    for section, n in n_per_section.items():
        for i in range(n):
            name = f"{section.replace('/', '-')}-pkg{i:03d}"
            out.append((name, section, f"{section} tool {i}", [f"Long text number {i} about {section}."]))
    return out


def read_split(out: Path, split: str) -> list[list[str]]:
    with open(out / f"{split}.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["text", "label"]
    return rows[1:]


@pytest.mark.parametrize("ext", ["", ".gz", ".xz", ".lz4", ".bz2"])
def test_join_short_and_long_every_compression(tmp_path: Path, ext: str) -> None:
    lists = tmp_path / "lists"
    write_lists(
        lists,
        [("hello", "utils", "greet the world", ["Prints a greeting.", ".", "Second para", "  verbatim"])],
        ext=ext,
    )
    summary = build_debian_dataset(
        tmp_path / "out", lists, min_section_size=1, valid_fraction=0, test_fraction=0
    )
    assert read_split(tmp_path / "out", "train") == [
        ["greet the world Prints a greeting.\nSecond para verbatim", "utils"]
    ]
    assert summary["packages_read"] == 1 and summary["splits"] == {"train": 1, "valid": 0, "test": 0}


def test_packages_with_inline_long_description_and_no_md5(tmp_path: Path) -> None:
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / PKG.format(suite="s")).write_text(
        "Package: a\nVersion: 1\nDescription: short a\n inline long\n .\n more\nSection: net\n\n"
        "Package: b\nVersion: 1\nDescription: short b\nSection: net\n"
    )
    # b has no md5: joined by package name instead
    (lists / TR.format(suite="s")).write_text(
        "Package: b\nDescription-md5: zz\nDescription-en: short b\n long b\n"
    )
    build_debian_dataset(tmp_path / "out", lists, min_section_size=1, valid_fraction=0, test_fraction=0)
    rows = sorted(read_split(tmp_path / "out", "train"))
    assert rows == [["short a inline long\nmore", "net"], ["short b long b", "net"]]


def test_component_prefix_stripped(tmp_path: Path) -> None:
    lists = tmp_path / "lists"
    pk = [
        ("a", "contrib/games", "a", ["x a"]),
        ("b", "non-free/games", "b", ["x b"]),
        ("c", "non-free-firmware/kernel", "c", ["x c"]),
        ("d", "games", "d", ["x d"]),
    ]
    write_lists(lists, pk)
    summary = build_debian_dataset(
        tmp_path / "out", lists, min_section_size=1, valid_fraction=0, test_fraction=0
    )
    assert summary["sections"] == {"games": 3, "kernel": 1}


def test_newest_listing_wins_across_files(tmp_path: Path) -> None:
    lists = tmp_path / "lists"
    lists.mkdir()
    # the security suite sorts first but carries the newer version; a third file has an older one
    for suite, version, section in [
        ("a-security", "1:2.0-1+deb12u1", "net"),
        ("b", "1:2.0-1", "web"),
        ("c", "2.5", "misc"),
    ]:
        (lists / (PKG.format(suite=suite) + ".gz")).write_bytes(
            gzip.compress(pkg_para("curl", section, "transfer", "m1", version).encode())
        )
    (lists / TR.format(suite="b")).write_text(tr_para("curl", "m1", "transfer", ["URLs."]))
    summary = build_debian_dataset(
        tmp_path / "out", lists, min_section_size=1, valid_fraction=0, test_fraction=0
    )
    assert summary["packages_read"] == 3 and summary["unique_packages"] == 1
    assert read_split(tmp_path / "out", "train") == [["transfer URLs.", "net"]]


@pytest.mark.parametrize(
    ("a", "b", "sign"),
    [
        ("1.0", "1.0", 0),
        ("1.0-1", "1.0-2", -1),
        ("1.0~rc1", "1.0", -1),
        ("1.0", "1.0+deb12u1", -1),
        ("1:0.1", "2.0", 1),
        ("1.10", "1.9", 1),
        ("2.0-1+deb12u1", "2.0-1", 1),
        ("1.0a", "1.0", 1),
        ("1.0~~", "1.0~", -1),
        ("1.01", "1.1", 0),
    ],
)
def test_compare_versions(a: str, b: str, sign: int) -> None:
    result = compare_versions(a, b)
    assert (result > 0) - (result < 0) == sign
    assert -((result > 0) - (result < 0)) == ((r := compare_versions(b, a)) > 0) - (r < 0)


def test_duplicate_texts_kept_once_first_by_name(tmp_path: Path) -> None:
    lists = tmp_path / "lists"
    same = ["Exactly the same long text."]
    write_lists(
        lists,
        [("zeta", "libs", "dup", same), ("alpha", "devel", "dup", same), ("mid", "libs", "other", same)],
    )
    summary = build_debian_dataset(
        tmp_path / "out", lists, min_section_size=1, valid_fraction=0, test_fraction=0
    )
    assert summary["duplicates_dropped"] == 1
    assert sorted(read_split(tmp_path / "out", "train")) == [
        ["dup Exactly the same long text.", "devel"],  # alpha < zeta
        ["other Exactly the same long text.", "libs"],
    ]


def test_small_sections_dropped(tmp_path: Path) -> None:
    lists = tmp_path / "lists"
    write_lists(lists, synthetic({"libs": 30, "net": 10, "tiny": 9}))
    summary = build_debian_dataset(tmp_path / "out", lists, min_section_size=10)
    assert summary["num_sections"] == 2 and set(summary["sections"]) == {"libs", "net"}
    assert summary["sections_dropped"] == {"tiny": 9}
    assert sum(summary["splits"].values()) == summary["examples"] == 40
    labels = {r[1] for s in ("train", "valid", "test") for r in read_split(tmp_path / "out", s)}
    assert labels == {"libs", "net"}


def test_split_is_deterministic_and_stratified(tmp_path: Path) -> None:
    lists = tmp_path / "lists"
    write_lists(lists, synthetic({"libs": 100, "net": 40, "games": 20}), ext=".lz4")
    build_debian_dataset(tmp_path / "a", lists, min_section_size=1, seed=7)
    build_debian_dataset(tmp_path / "b", lists, min_section_size=1, seed=7)
    build_debian_dataset(tmp_path / "c", lists, min_section_size=1, seed=8)
    for split in ("train", "valid", "test"):
        assert (tmp_path / "a" / f"{split}.csv").read_bytes() == (
            tmp_path / "b" / f"{split}.csv"
        ).read_bytes()
    assert (tmp_path / "a" / "valid.csv").read_bytes() != (tmp_path / "c" / "valid.csv").read_bytes()
    counts = {
        s: pd.Series([r[1] for r in read_split(tmp_path / "a", s)]).value_counts().to_dict()
        for s in ("train", "valid", "test")
    }
    assert counts["valid"] == counts["test"] == {"libs": 10, "net": 4, "games": 2}
    assert counts["train"] == {"libs": 80, "net": 32, "games": 16}
    texts = [r[0] for s in ("train", "valid", "test") for r in read_split(tmp_path / "a", s)]
    assert len(texts) == len(set(texts)) == 160  # a partition: nothing lost, nothing repeated


def test_stratified_split_rejects_bad_fractions() -> None:
    with pytest.raises(ValueError):
        stratified_split(["a"] * 10, 0.5, 0.5, 0)


def test_csv_round_trip_with_commas_quotes_newlines(tmp_path: Path) -> None:
    lists = tmp_path / "lists"
    nasty = [
        ("q", "text", 'say "hi", then "bye"', ["Commas, \"quotes\" and 'single' ones;", ".", "new para"]),
        ("c", "text", "a,b,c", ["tab\there, semicolon; backslash \\ done"]),
        ("u", "text", "unicode ‘quotes’ — ünïcødé", ["NA"]),
    ]
    write_lists(lists, nasty)
    build_debian_dataset(tmp_path / "out", lists, min_section_size=1, valid_fraction=0, test_fraction=0)
    expected = sorted(read_split(tmp_path / "out", "train"))
    assert any("\n" in t for t, _ in expected) and any('"' in t for t, _ in expected)
    df = pd.read_csv(tmp_path / "out" / "train.csv", keep_default_na=False)
    assert sorted(map(list, zip(df["text"], df["label"], strict=True))) == expected

    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset(
        "csv", data_files={"train": str(tmp_path / "out" / "train.csv")}, cache_dir=str(tmp_path / "hf")
    )["train"]
    assert sorted(map(list, zip(ds["text"], ds["label"], strict=True))) == expected


def test_outputs_and_no_temp_files_left(tmp_path: Path) -> None:
    lists = tmp_path / "lists"
    write_lists(lists, synthetic({"libs": 5}))
    summary = build_debian_dataset(tmp_path / "out", lists, min_section_size=1)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "summary.json",
        "test.csv",
        "train.csv",
        "valid.csv",
    ]
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk["splits"] == summary["splits"]


def test_ignores_diff_index_and_other_languages(tmp_path: Path) -> None:
    lists = tmp_path / "lists"
    write_lists(lists, [("a", "net", "a", ["long a"])], ext=".xz")
    (lists / (PKG.format(suite="bookworm") + ".diff_Index")).write_text("SHA256-Current: x 1\n")
    (lists / "deb.example.org_debian_dists_bookworm_main_i18n_Translation-en_GB").write_text(
        "Package: a\nDescription-md5: md5-a\nDescription-en: a\n colour\n"
    )
    build_debian_dataset(tmp_path / "out", lists, min_section_size=1, valid_fraction=0, test_fraction=0)
    assert read_split(tmp_path / "out", "train") == [["a long a", "net"]]


def test_missing_lists_error(tmp_path: Path) -> None:
    with pytest.raises(DebianListsMissing, match=r"apt-get update -o Acquire::Languages=en") as exc:
        build_debian_dataset(tmp_path / "out", tmp_path / "nope")
    assert "Packages" in str(exc.value)
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / PKG.format(suite="s")).write_text(pkg_para("a", "net", "a", "m"))
    with pytest.raises(DebianListsMissing, match=r"Translation-en.*Acquire::Languages=en"):
        build_debian_dataset(tmp_path / "out", lists)
    assert not (tmp_path / "out").exists()


def test_main_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lists = tmp_path / "lists"
    write_lists(lists, synthetic({"libs": 20, "net": 3}), ext=".gz")
    rc = main(
        ["--out", str(tmp_path / "out"), "--lists", str(lists), "--min-section-size", "5", "--seed", "3"]
    )
    captured = capsys.readouterr()
    assert rc == 0
    summary = json.loads(captured.out)
    assert summary["splits"] == {"train": 16, "valid": 2, "test": 2} and summary["seed"] == 3
    assert "examples" in captured.err

    rc = main(["--out", str(tmp_path / "out2"), "--lists", str(tmp_path / "missing")])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == "" and "Acquire::Languages=en" in captured.err


def test_iter_paragraphs_keeps_only_wanted_fields() -> None:
    text = "A: 1\nB: x\n y\n .\n z\nC: 3\n\n\n# comment\nA: 2\n  \nA: 3\r\nB: w\r\n"
    paras = list(iter_paragraphs(text.splitlines(keepends=True), frozenset({"A", "B"})))
    assert paras == [{"A": "1", "B": "x\ny\n.\nz"}, {"A": "2"}, {"A": "3", "B": "w"}]
    assert clean_long_description(["one", "two", ".", ".", "three", "."]) == "one two\nthree"


def test_cli_out_that_cannot_be_a_folder_is_one_line_before_any_reading(tmp_path: Path, capsys) -> None:
    from trainer.debian import main

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert main(["--out", str(a_file), "--lists", str(tmp_path / "no_lists")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {a_file}: cannot make it a folder") and "reading" not in err
    out = tmp_path / "new"
    assert main(["--out", str(out), "--lists", str(tmp_path / "no_lists")]) == 2  # lists missing
    assert "lists are missing" in capsys.readouterr().err and not out.exists()  # the folder it made is gone
