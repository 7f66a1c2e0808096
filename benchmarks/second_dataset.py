"""Build the second benchmark dataset: WordNet 3.0 dictionary entries -> lexicographer file (supersense).

Issue #5 asks for a second real dataset besides the Debian package descriptions. This one is WordNet 3.0
(Princeton University, WordNet 3.0 license: free use, copy and redistribution with the notice), as packaged by
Debian in ``wordnet-base`` (bookworm: ``1:3.0-37``). Every synset in ``/usr/share/wordnet/data.{noun,verb,adj,
adv}`` is one document, labelled by the lexicographer file its authors filed it in (``lex_filenum``, the
synset's "supersense"): ``noun.animal``, ``noun.artifact``, ``verb.motion``, ``adj.all``, ... 45 classes in all,
their names fixed by WordNet's ``lexnames(5WN)``. Nothing here is synthetic: texts and labels are exactly
WordNet's.

A document is the synset's lemmas followed by its gloss (definition and usage examples), e.g.
``breathe, take a breath, respire, suspire: draw air into, and expel out of, the lungs; "I can breathe better
when the air is clean"`` -> ``verb.body``. Underscores in lemmas become spaces and the adjective markers
``(a)``, ``(p)``, ``(ip)`` are dropped. The data files' license header lines (two leading spaces) are skipped.

How it is obtained offline: the machine reaches Debian's package archive and nothing else, so the files come
from the ``wordnet-base`` .deb. In order of preference the builder reads

1. ``--wordnet-dir DIR`` (a folder holding ``data.noun`` etc.),
2. ``/usr/share/wordnet`` when ``wordnet-base`` is installed (``apt-get install wordnet-base``),
3. ``--deb FILE``, a downloaded ``wordnet-base_*.deb``,
4. otherwise it runs ``apt-get download wordnet-base`` (about 6.5 MB; needs the apt lists that the first
   dataset needs too) in a temporary folder.

A .deb is read in pure Python (an ``ar`` archive whose ``data.tar.{xz,gz,zst}`` member holds the files), so no
install and no root are needed. ``summary.json`` records which source was used and the .deb's SHA-256.

Split: duplicates are removed first (texts compared lowercased with whitespace collapsed; a text that occurs
with two different labels is dropped everywhere, one that repeats with the same label is kept once), then a
seeded stratified 80/10/10 split (``trainer.debian.stratified_split``, seed 0), so no text is in two splits
and the files are the same on every machine with the same package version.

    python benchmarks/second_dataset.py --out data/wordnet
    # -> data/wordnet/{train,valid,test}.csv (text,label) and data/wordnet/summary.json
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from trainer.debian import stratified_split  # noqa: E402  (seeded, per-label, deterministic)

PACKAGE = "wordnet-base"
INSTALLED_DIR = Path("/usr/share/wordnet")
DATA_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
SPLITS = ("train", "valid", "test")

# lexnames(5WN): lexicographer file number -> name (WordNet 3.0; the file itself is not in the Debian package)
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition",
    "verb.communication", "verb.competition", "verb.consumption", "verb.contact", "verb.creation",
    "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative",
    "verb.weather", "adj.ppl",
)  # fmt: skip

_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")


class WordNetMissing(RuntimeError):
    """The WordNet data files could not be found or fetched."""


class WordNetFormatError(ValueError):
    """A line of a data file does not follow wndb(5WN)."""


class Synset(NamedTuple):
    offset: str
    lexname: str
    pos: str  # ss_type: n, v, a, s (adjective satellite), r
    lemmas: tuple[str, ...]
    gloss: str

    @property
    def text(self) -> str:
        return f"{', '.join(self.lemmas)}: {self.gloss}" if self.gloss else ", ".join(self.lemmas)


def parse_data_line(line: str, where: str = "<line>") -> Synset | None:
    """One line of a ``data.*`` file -> :class:`Synset`; ``None`` for the license header (two leading spaces).

    wndb(5WN): ``synset_offset lex_filenum ss_type w_cnt word lex_id [word lex_id ...] p_cnt [ptr ...]
    [frames ...] | gloss``; ``w_cnt`` is two hex digits, the rest decimal.
    """
    if line.startswith("  ") or not line.strip():
        return None
    head, sep, gloss = line.partition(" | ")
    fields = head.split()
    try:
        if len(fields) < 4:
            raise ValueError("fewer than 4 fields")
        offset, lex_filenum, pos = fields[0], int(fields[1]), fields[2]
        if pos not in ("n", "v", "a", "s", "r"):
            raise ValueError(f"unknown ss_type {pos!r}")
        if not 0 <= lex_filenum < len(LEXNAMES):
            raise ValueError(f"lex_filenum {lex_filenum} outside 0..{len(LEXNAMES) - 1}")
        w_cnt = int(fields[3], 16)
        words = fields[4 : 4 + 2 * w_cnt : 2]
        if w_cnt < 1 or len(words) != w_cnt:
            raise ValueError(f"w_cnt {w_cnt} but {len(words)} words")
    except ValueError as exc:
        raise WordNetFormatError(f"{where}: not a WordNet data line ({exc}): {line[:80]!r}") from None
    lemmas = tuple(_ADJ_MARKER.sub("", w).replace("_", " ") for w in words)
    return Synset(offset, LEXNAMES[lex_filenum], pos, lemmas, " ".join(gloss.split()) if sep else "")


def iter_synsets(lines: Iterable[str], where: str = "<data>") -> Iterator[Synset]:
    for number, line in enumerate(lines, 1):
        synset = parse_data_line(line.rstrip("\n"), f"{where}:{number}")
        if synset is not None:
            yield synset


# --- getting the files -------------------------------------------------------------------------------------


def _ar_members(blob: bytes) -> Iterator[tuple[str, bytes]]:
    """Members of a System V / GNU ``ar`` archive (a .deb is one): (name, bytes)."""
    if not blob.startswith(b"!<arch>\n"):
        raise WordNetMissing("not a .deb (ar) archive")
    pos = 8
    while pos + 60 <= len(blob):
        header = blob[pos : pos + 60]
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        yield name, blob[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)


def _open_data_tar(member: str, payload: bytes) -> tarfile.TarFile:
    if member.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise WordNetMissing(
                f"{member} is zstd-compressed: pip install zstandard, or pass --wordnet-dir"
            ) from None
        payload = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(payload)).read()
        return tarfile.open(fileobj=io.BytesIO(payload), mode="r:")
    return tarfile.open(fileobj=io.BytesIO(payload), mode="r:*")


def read_deb(deb: Path) -> dict[str, str]:
    """``{data.noun: text, ...}`` from a ``wordnet-base`` .deb, read in memory."""
    blob = deb.read_bytes()
    for name, payload in _ar_members(blob):
        if name.startswith("data.tar"):
            out: dict[str, str] = {}
            with _open_data_tar(name, payload) as tar:
                for info in tar:
                    base = info.name.rsplit("/", 1)[-1]
                    if info.isfile() and base in DATA_FILES and "/wordnet/" in info.name:
                        out[base] = tar.extractfile(info).read().decode("utf-8", "replace")
            missing = [f for f in DATA_FILES if f not in out]
            if missing:
                raise WordNetMissing(
                    f"{deb}: no {', '.join(missing)} under usr/share/wordnet/ in the package"
                )
            return out
    raise WordNetMissing(f"{deb}: no data.tar member")


def apt_download(dest: Path) -> Path:
    """``apt-get download wordnet-base`` into ``dest``; the .deb's path."""
    print(f"downloading {PACKAGE} from the Debian archive (apt-get download, ~6.5 MB) ...", file=sys.stderr)
    try:
        proc = subprocess.run(
            ["apt-get", "download", PACKAGE], cwd=dest, capture_output=True, text=True, timeout=600
        )
    except FileNotFoundError:
        raise WordNetMissing(
            "apt-get not found: install wordnet-base some other way and pass --wordnet-dir or --deb"
        ) from None
    except subprocess.TimeoutExpired:
        raise WordNetMissing("apt-get download wordnet-base took over 10 minutes") from None
    debs = sorted(dest.glob(f"{PACKAGE}_*.deb"))
    if proc.returncode != 0 or not debs:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise WordNetMissing(
            f"apt-get download {PACKAGE} failed (exit {proc.returncode}): {detail[-1] if detail else 'no output'}"
            " -- run 'apt-get update' first, or pass --wordnet-dir / --deb"
        )
    return debs[-1]


def load_wordnet(wordnet_dir: Path | None, deb: Path | None) -> tuple[dict[str, str], dict]:
    """The four data files' text and a description of where they came from."""
    if wordnet_dir is not None:
        if not all((wordnet_dir / f).is_file() for f in DATA_FILES):
            raise WordNetMissing(f"--wordnet-dir {wordnet_dir}: needs {', '.join(DATA_FILES)}")
        return _read_dir(wordnet_dir), {"source": "directory", "path": str(wordnet_dir)}
    if deb is None and all((INSTALLED_DIR / f).is_file() for f in DATA_FILES):
        return _read_dir(INSTALLED_DIR), {"source": "installed wordnet-base", "path": str(INSTALLED_DIR)}
    with tempfile.TemporaryDirectory(prefix="wordnet-deb-") as tmp:
        if deb is None:
            deb = apt_download(Path(tmp))
            how = "apt-get download wordnet-base"
        else:
            if not deb.is_file():
                raise WordNetMissing(f"--deb {deb}: no such file")
            how = "--deb"
        print(f"reading {deb.name} ...", file=sys.stderr)
        files = read_deb(deb)
        origin = {"source": how, "deb": deb.name, "deb_sha256": hashlib.sha256(deb.read_bytes()).hexdigest()}
    return files, origin


def _read_dir(path: Path) -> dict[str, str]:
    return {f: (path / f).read_text(encoding="utf-8", errors="replace") for f in DATA_FILES}


# --- the dataset -------------------------------------------------------------------------------------------


def _dedup_key(text: str) -> str:
    return " ".join(text.lower().split())


def dedupe(synsets: Iterable[Synset]) -> tuple[list[tuple[str, str]], int, int]:
    """(text, label) rows with duplicates removed; (rows, same-label repeats dropped, conflicting dropped)."""
    first: dict[str, tuple[str, str]] = {}
    conflicting: set[str] = set()
    repeats = 0
    for s in synsets:
        key = _dedup_key(s.text)
        if key in first:
            if first[key][1] != s.lexname:
                conflicting.add(key)
            else:
                repeats += 1
            continue
        first[key] = (s.text, s.lexname)
    rows = [row for key, row in first.items() if key not in conflicting]
    conflict_rows = sum(1 for key in first if key in conflicting)
    return rows, repeats, conflict_rows


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        writer.writerow(("text", "label"))
        writer.writerows(rows)
    os.replace(tmp, path)


def build(
    out_dir: Path,
    files: dict[str, str],
    origin: dict,
    valid_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> dict:
    """Write ``{train,valid,test}.csv`` and ``summary.json`` under ``out_dir``; returns the summary."""
    synsets: list[Synset] = []
    for name in DATA_FILES:  # fixed order: "first duplicate wins" is deterministic
        before = len(synsets)
        synsets.extend(iter_synsets(io.StringIO(files[name]), name))
        print(f"  {name}: {len(synsets) - before} synsets", file=sys.stderr)
    rows, repeats, conflicts = dedupe(synsets)
    labels = [label for _, label in rows]
    split = stratified_split(labels, valid_fraction, test_fraction, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        _write_csv(out_dir / f"{name}.csv", [rows[i] for i in split[name]])
        print(f"  wrote {out_dir / f'{name}.csv'}: {len(split[name])} rows", file=sys.stderr)
    summary = {
        "dataset": "WordNet 3.0 synset (lemmas: gloss) -> lexicographer file",
        "origin": origin,
        "synsets_read": len(synsets),
        "same_label_repeats_dropped": repeats,
        "conflicting_texts_dropped": conflicts,
        "examples": len(rows),
        "num_classes": len(set(labels)),
        "classes": dict(Counter(labels).most_common()),
        "splits": {name: len(split[name]) for name in SPLITS},
        "valid_fraction": valid_fraction,
        "test_fraction": test_fraction,
        "seed": seed,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "data" / "wordnet", help="output folder")
    ap.add_argument("--wordnet-dir", type=Path, help="folder with data.noun, data.verb, data.adj, data.adv")
    ap.add_argument("--deb", type=Path, help="a downloaded wordnet-base_*.deb")
    ap.add_argument("--seed", type=int, default=0, help="seed of the stratified split")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    try:
        files, origin = load_wordnet(args.wordnet_dir, args.deb)
        print(f"parsing WordNet data files ({origin['source']}) ...", file=sys.stderr)
        summary = build(args.out, files, origin, seed=args.seed)
    except (WordNetMissing, WordNetFormatError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"{summary['examples']} examples in {summary['num_classes']} classes "
        f"(train {summary['splits']['train']}, valid {summary['splits']['valid']}, "
        f"test {summary['splits']['test']}) in {time.perf_counter() - start:.1f}s -> {args.out}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
