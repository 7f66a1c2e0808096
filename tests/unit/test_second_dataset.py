"""Tests for benchmarks/second_dataset.py (WordNet synsets -> lexicographer file) on tiny in-repo samples.

Nothing is downloaded: the data lines below are real lines of WordNet 3.0's data files (trimmed pointer lists
are still valid wndb(5WN) lines), and the .deb is built here in the ar + tar.xz layout Debian uses.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("second_dataset", ROOT / "benchmarks" / "second_dataset.py")
sd = importlib.util.module_from_spec(_spec)
sys.modules["second_dataset"] = sd
_spec.loader.exec_module(sd)

HEADER = "  1 This software and database is being provided to you, the LICENSEE, by  \n"
VERB = (
    "00001740 29 v 04 breathe 0 take_a_breath 0 respire 0 suspire 3 002 * 00005041 v 0000 ^ 00004227 v 0103 "
    '02 + 02 00 + 08 00 | draw air into, and expel out of, the lungs; "I can breathe better when the air is clean"  \n'
)
ADJ = (
    "00001740 00 a 01 able 0 001 ! 00002098 a 0101 | (usually followed by `to') having the necessary means or "
    'skill or know-how or authority to do something; "able to swim"  \n'
)
SATELLITE = "00004980 00 s 02 fabulous(a) 0 mythic 0 000 | based on or told of in traditional stories  \n"
NOUNS = [
    "01321123 05 n 01 dog 0 000 | a member of the genus Canis  \n",
    "01321456 05 n 01 cat 0 000 | feline mammal usually having thick soft fur  \n",
    "02121620 05 n 01 wolf 0 000 | any of various wild canines  \n",
    "03121620 06 n 01 hammer 0 000 | a hand tool with a heavy head  \n",
    "03121621 06 n 01 saw 0 000 | a hand tool with a toothed blade  \n",
    "03121622 06 n 01 drill 0 000 | a tool with a rotating bit  \n",
]


def test_parse_verb_line():
    s = sd.parse_data_line(VERB.rstrip("\n"))
    assert s.offset == "00001740" and s.pos == "v" and s.lexname == "verb.body"
    assert s.lemmas == ("breathe", "take a breath", "respire", "suspire")
    assert (
        s.gloss == 'draw air into, and expel out of, the lungs; "I can breathe better when the air is clean"'
    )
    assert s.text.startswith("breathe, take a breath, respire, suspire: draw air into")


def test_parse_adjectives_and_markers():
    assert sd.parse_data_line(ADJ).lexname == "adj.all"
    s = sd.parse_data_line(SATELLITE)
    assert s.pos == "s" and s.lemmas == ("fabulous", "mythic")  # "(a)" marker dropped
    assert s.text == "fabulous, mythic: based on or told of in traditional stories"


def test_header_and_blank_lines_are_skipped():
    assert sd.parse_data_line(HEADER) is None
    assert sd.parse_data_line("") is None
    assert len(list(sd.iter_synsets(io.StringIO(HEADER + VERB + ADJ)))) == 2


def test_lexnames_are_wordnet_30():
    assert len(sd.LEXNAMES) == 45
    assert sd.LEXNAMES[0] == "adj.all" and sd.LEXNAMES[3] == "noun.Tops" and sd.LEXNAMES[44] == "adj.ppl"


@pytest.mark.parametrize(
    "line",
    [
        "00001740 99 n 01 dog 0 000 | bad lex_filenum",
        "00001740 05 x 01 dog 0 000 | bad ss_type",
        "00001740 05 n 03 dog 0 000 | w_cnt larger than the words",
        "garbage",
    ],
)
def test_malformed_line_names_file_and_line(line):
    with pytest.raises(sd.WordNetFormatError, match=r"data\.noun:7"):
        sd.parse_data_line(line, "data.noun:7")


def test_dedupe_drops_conflicts_and_repeats():
    S = sd.Synset
    rows, repeats, conflicts = sd.dedupe(
        [
            S("1", "noun.animal", "n", ("dog",), "a canine"),
            S("2", "noun.animal", "n", ("Dog",), "a  canine"),  # same text up to case/space, same label
            S("3", "noun.animal", "n", ("bank",), "a slope"),
            S("4", "noun.object", "n", ("bank",), "a slope"),  # same text, other label: dropped everywhere
            S("5", "verb.body", "v", ("breathe",), "draw air"),
        ]
    )
    assert rows == [("dog: a canine", "noun.animal"), ("breathe: draw air", "verb.body")]
    assert (repeats, conflicts) == (1, 1)


def _files() -> dict[str, str]:
    return {
        "data.noun": HEADER + "".join(NOUNS),
        "data.verb": HEADER + VERB,
        "data.adj": HEADER + ADJ + SATELLITE,
        "data.adv": HEADER,
    }


def _read(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_build_writes_disjoint_deterministic_splits(tmp_path):
    summary = sd.build(tmp_path / "a", _files(), {"source": "test"}, valid_fraction=0.2, test_fraction=0.2)
    sd.build(tmp_path / "b", _files(), {"source": "test"}, valid_fraction=0.2, test_fraction=0.2)
    assert summary["examples"] == summary["synsets_read"] == 9
    assert summary["classes"] == {"noun.animal": 3, "noun.artifact": 3, "adj.all": 2, "verb.body": 1}
    texts = {}
    for split in sd.SPLITS:
        rows = _read(tmp_path / "a" / f"{split}.csv")
        assert rows == _read(tmp_path / "b" / f"{split}.csv")  # same inputs, same seed, same files
        texts[split] = {r["text"] for r in rows}
    assert not (texts["train"] & texts["valid"]) and not (texts["train"] & texts["test"])
    assert not (texts["valid"] & texts["test"])
    assert sum(map(len, texts.values())) == 9
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["splits"] == summary["splits"]


def _ar(members: list[tuple[str, bytes]]) -> bytes:
    out = bytearray(b"!<arch>\n")
    for name, data in members:
        header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        assert len(header) == 60
        out += header + data + (b"\n" if len(data) % 2 else b"")
    return bytes(out)


def _deb(path: Path, files: dict[str, str]) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"./usr/share/wordnet/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(
        _ar([("debian-binary", b"2.0\n"), ("control.tar.xz", b"x"), ("data.tar.xz", buf.getvalue())])
    )
    return path


def test_read_deb_and_main(tmp_path, capsys):
    deb = _deb(tmp_path / "wordnet-base_3.0-37_all.deb", _files())
    assert sd.read_deb(deb) == _files()
    assert sd.main(["--deb", str(deb), "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["origin"]["source"] == "--deb" and len(summary["origin"]["deb_sha256"]) == 64
    assert "9 examples in 4 classes" in capsys.readouterr().err


def test_missing_inputs_are_one_line_errors(tmp_path, capsys):
    assert sd.main(["--wordnet-dir", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "needs data.noun" in capsys.readouterr().err
    assert sd.main(["--deb", str(tmp_path / "nope.deb"), "--out", str(tmp_path / "out")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "bad.deb").write_bytes(b"not an archive")
    assert sd.main(["--deb", str(tmp_path / "bad.deb"), "--out", str(tmp_path / "out")]) == 2
    assert "not a .deb" in capsys.readouterr().err
    partial = _deb(tmp_path / "partial.deb", {"data.noun": HEADER})
    assert sd.main(["--deb", str(partial), "--out", str(tmp_path / "out")]) == 2
    assert "no data.verb" in capsys.readouterr().err
