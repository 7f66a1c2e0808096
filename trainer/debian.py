"""Build the demo text-classification dataset from the host's Debian package index.

Every Debian machine that has run ``apt-get update`` carries ~60K labelled documents for free:
each package has a human-written description and a ``Section`` (``net``, ``libs``, ``games``, ...).
That makes a realistic, license-clean, offline dataset with a long-tailed label distribution, which is
exactly what the trainer's demo and end-to-end tests need.

``Packages`` files usually carry only the one-line description plus ``Description-md5``; the long
text lives in ``i18n/Translation-en`` keyed by that md5, so the two are joined here.  Files are parsed
as a stream of deb822 paragraphs, keeping only the handful of fields we use, because decompressed
they are tens of MB.

Usage: ``python -m trainer.debian --out data/debian``.
"""

from __future__ import annotations

import argparse
import bz2
import contextlib
import csv
import gzip
import io
import json
import lzma
import os
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

DEFAULT_LISTS_DIR = Path("/var/lib/apt/lists")
SPLITS = ("train", "valid", "test")
_COMPRESSIONS = ("", ".lz4", ".gz", ".xz", ".bz2")  # preference order when a list exists twice
_COMPONENT_PREFIXES = ("contrib/", "non-free/", "non-free-firmware/")
_PACKAGES_FIELDS = frozenset({"Package", "Version", "Section", "Description", "Description-md5"})
_TRANSLATION_FIELDS = frozenset({"Package", "Description-md5", "Description-en"})


class DebianListsMissing(RuntimeError):
    """The apt lists (Packages and/or Translation-en) needed to build the dataset are absent."""


@dataclass(slots=True)
class _Listing:
    """The fields kept from one ``Packages`` paragraph."""

    version: str
    section: str | None
    short: str
    long: str | None  # only when the Packages file itself carries the long description
    md5: str | None


def _find_lists(lists_dir: Path, stem: str) -> list[Path]:
    """Files named ``*<stem>{,.lz4,.gz,.xz,.bz2}``, one per list, in sorted (deterministic) order.

    Matching the exact suffix matters: ``*_Packages*`` also matches ``Packages.diff_Index`` and
    ``*_Translation-en*`` also matches ``Translation-en_GB``.
    """
    by_base: dict[str, Path] = {}
    if not lists_dir.is_dir():
        return []
    for ext in _COMPRESSIONS:
        for path in lists_dir.glob(f"*{stem}{ext}"):
            base = path.name[: len(path.name) - len(ext)] if ext else path.name
            if path.is_file() and base.endswith(stem):
                by_base.setdefault(base, path)
    return [by_base[base] for base in sorted(by_base)]


def _open_text(path: Path) -> IO[str]:
    """Open a (possibly compressed) list file as UTF-8 text, tolerating stray bytes."""
    name = path.name
    raw: IO[bytes]
    if name.endswith(".lz4"):
        import lz4.frame  # imported lazily: only needed for apt's default compression

        raw = lz4.frame.open(path, "rb")
    elif name.endswith(".gz"):
        raw = gzip.open(path, "rb")
    elif name.endswith(".xz"):
        raw = lzma.open(path, "rb")
    elif name.endswith(".bz2"):
        raw = bz2.open(path, "rb")
    else:
        raw = open(path, "rb")  # closed with the wrapper by the caller
    return io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline=None)


def iter_paragraphs(lines: Iterable[str], fields: frozenset[str]) -> Iterator[dict[str, str]]:
    """Yield deb822 paragraphs as ``{field: value}``, keeping only ``fields``.

    Multi-line values keep their continuation lines joined by ``\\n`` with the single leading
    space removed (so a paragraph break `` .`` becomes a line ``.``).  Skipping unwanted fields
    early is what keeps a 50 MB Packages file under a couple of seconds.
    """
    para: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in lines:
        first = line[:1]
        if first == "#":
            continue
        if not line.strip():  # blank (or whitespace-only) line: end of paragraph
            if para:
                yield {k: "\n".join(v) for k, v in para.items()}
                para = {}
            current = None
        elif first == " " or first == "\t":
            if current is not None:
                current.append(line[1:].rstrip("\r\n"))
        else:
            key, sep, value = line.partition(":")
            current = [value.strip()] if sep and key in fields else None
            if current is not None:
                para[key] = current
    if para:
        yield {k: "\n".join(v) for k, v in para.items()}


def clean_long_description(lines: list[str]) -> str:
    """Turn deb822 long-description lines into plain text.

    Lines within a paragraph are joined with a space; a ``.`` line (the encoded blank line) starts a
    new paragraph, rendered as a newline so the structure survives for anyone reading the CSV.
    """
    paragraphs: list[list[str]] = [[]]
    for line in lines:
        stripped = line.strip()
        if stripped == ".":
            if paragraphs[-1]:
                paragraphs.append([])
        elif stripped:
            paragraphs[-1].append(stripped)
    return "\n".join(" ".join(p) for p in paragraphs if p)


def _char_order(c: str) -> int:
    if not c or c.isdigit():
        return 0
    if c.isalpha():
        return ord(c)
    if c == "~":
        return -1
    return ord(c) + 256


def _compare_fragment(a: str, b: str) -> int:
    """dpkg's ``verrevcmp``: alternating non-digit (with ``~`` first) and numeric runs."""
    i = j = 0
    while i < len(a) or j < len(b):
        while (i < len(a) and not a[i].isdigit()) or (j < len(b) and not b[j].isdigit()):
            ac = _char_order(a[i] if i < len(a) else "")
            bc = _char_order(b[j] if j < len(b) else "")
            if ac != bc:
                return ac - bc
            i += 1
            j += 1
        start_i, start_j = i, j
        while i < len(a) and a[i].isdigit():
            i += 1
        while j < len(b) and b[j].isdigit():
            j += 1
        na, nb = int(a[start_i:i] or 0), int(b[start_j:j] or 0)
        if na != nb:
            return -1 if na < nb else 1
    return 0


def compare_versions(a: str, b: str) -> int:
    """Compare two Debian versions like ``dpkg --compare-versions``: negative, zero or positive."""

    def split(v: str) -> tuple[int, str, str]:
        epoch, sep, rest = v.partition(":")
        if not sep:
            epoch, rest = "0", v
        upstream, sep, revision = rest.rpartition("-")
        if not sep:
            upstream, revision = rest, ""
        return int(epoch) if epoch.isdigit() else 0, upstream, revision

    ea, ua, ra = split(a)
    eb, ub, rb = split(b)
    if ea != eb:
        return -1 if ea < eb else 1
    return _compare_fragment(ua, ub) or _compare_fragment(ra, rb)


def _missing_message(lists_dir: Path, what: str) -> str:
    return (
        f"Debian {what} missing from {lists_dir}: the dataset is built from apt's package lists. "
        "Fetch them (with English long descriptions) with "
        "`apt-get update -o Acquire::Languages=en` (as root), or pass --lists DIR."
    )


def strip_component(section: str) -> str:
    """``non-free/libs`` -> ``libs``: the archive component is not part of the topic label."""
    for prefix in _COMPONENT_PREFIXES:
        if section.startswith(prefix):
            return section[len(prefix) :]
    return section


def _read_packages(files: list[Path]) -> tuple[dict[str, _Listing], int]:
    """Newest listing per package name across all Packages files, plus the paragraphs read."""
    packages: dict[str, _Listing] = {}
    read = 0
    for path in files:
        with _open_text(path) as fh:
            for para in iter_paragraphs(fh, _PACKAGES_FIELDS):
                name = para.get("Package")
                if not name:
                    continue
                read += 1
                short, _, long = para.get("Description", "").partition("\n")
                listing = _Listing(
                    version=para.get("Version", ""),
                    section=para.get("Section"),
                    short=short.strip(),
                    long=clean_long_description(long.split("\n")) if long else None,
                    md5=para.get("Description-md5"),
                )
                old = packages.get(name)
                if old is None or compare_versions(listing.version, old.version) > 0:
                    packages[name] = listing
    return packages, read


def _read_translations(
    files: list[Path], want_md5: set[str], want_names: set[str]
) -> tuple[dict[str, tuple[str, str]], dict[str, tuple[str, str]]]:
    """(short, long) descriptions by md5 and, for listings without an md5, by package name."""
    by_md5: dict[str, tuple[str, str]] = {}
    by_name: dict[str, tuple[str, str]] = {}
    for path in files:
        with _open_text(path) as fh:
            for para in iter_paragraphs(fh, _TRANSLATION_FIELDS):
                md5, name = para.get("Description-md5"), para.get("Package")
                if md5 not in want_md5 and name not in want_names:
                    continue
                short, _, long = para.get("Description-en", "").partition("\n")
                entry = (short.strip(), clean_long_description(long.split("\n")))
                if md5 in want_md5:
                    by_md5.setdefault(md5, entry)
                if name in want_names:
                    by_name[name] = entry
    return by_md5, by_name


def _write_atomic(path: Path, write) -> None:
    """Write via a temp file in the same directory, then ``os.replace``: readers never see halves."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would surprise anyone sharing the dataset
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    def write(fh: IO[str]) -> None:
        writer = csv.writer(fh, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        writer.writerow(("text", "label"))
        # With a "\n" terminator csv would leave a bare "\r" unquoted (and unreadable); universal
        # newlines already make one impossible here, this keeps it so if the parser changes.
        writer.writerows((text.replace("\r", "\n"), label) for text, label in rows)

    _write_atomic(path, write)


def stratified_split(
    labels: list[str], valid_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[int]]:
    """Row indices per split, drawn per label so every split keeps the label distribution.

    Labels are visited in sorted order with one seeded generator, so the result depends only on
    the inputs and ``seed``; each split is finally shuffled so files are not grouped by label.
    """
    if valid_fraction < 0 or test_fraction < 0 or valid_fraction + test_fraction >= 1:
        raise ValueError("need 0 <= valid_fraction, test_fraction and valid_fraction + test_fraction < 1")
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        by_label[label].append(i)
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for label in sorted(by_label):
        idx = np.asarray(by_label[label])[rng.permutation(len(by_label[label]))]
        n_valid = round(len(idx) * valid_fraction)
        n_test = round(len(idx) * test_fraction)
        out["valid"] += idx[:n_valid].tolist()
        out["test"] += idx[n_valid : n_valid + n_test].tolist()
        out["train"] += idx[n_valid + n_test :].tolist()
    return {s: np.asarray(v, dtype=np.int64)[rng.permutation(len(v))].tolist() for s, v in out.items()}


def build_debian_dataset(
    out_dir: Path,
    lists_dir: Path = DEFAULT_LISTS_DIR,
    min_section_size: int = 200,
    valid_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> dict:
    """Write ``train.csv``/``valid.csv``/``test.csv`` (``text,label``) and ``summary.json``.

    Returns the summary: counts per split and per section, packages read, duplicates dropped.
    Raises :class:`DebianListsMissing` when the Packages or Translation-en lists are absent.
    """
    start = time.perf_counter()
    out_dir, lists_dir = Path(out_dir), Path(lists_dir)
    packages_files = _find_lists(lists_dir, "_Packages")
    translation_files = _find_lists(lists_dir, "_i18n_Translation-en")
    if not packages_files:
        raise DebianListsMissing(_missing_message(lists_dir, "Packages lists are"))
    if not translation_files:
        raise DebianListsMissing(_missing_message(lists_dir, "Translation-en lists are"))

    listings, packages_read = _read_packages(packages_files)
    need_md5 = {p.md5 for p in listings.values() if p.long is None and p.md5}
    need_names = {n for n, p in listings.items() if p.long is None and not p.md5}
    by_md5, by_name = _read_translations(translation_files, need_md5, need_names)

    no_section = no_long = 0
    seen_texts: set[str] = set()
    duplicates = 0
    texts: list[str] = []
    labels: list[str] = []
    for name in sorted(listings):  # name order makes "first duplicate wins" deterministic
        p = listings[name]
        if not p.section:
            no_section += 1
            continue
        short, long = p.short, p.long
        if long is None:
            found = by_md5.get(p.md5) if p.md5 else by_name.get(name)
            short, long = (short or found[0], found[1]) if found else (short, "")
        if not long:
            no_long += 1
        text = f"{short} {long}".strip()
        if not text:
            continue
        if text in seen_texts:
            duplicates += 1
            continue
        seen_texts.add(text)
        texts.append(text)
        labels.append(strip_component(p.section))

    section_sizes = Counter(labels)
    kept_sections = {s for s, n in section_sizes.items() if n >= min_section_size}
    keep = [i for i, label in enumerate(labels) if label in kept_sections]
    texts = [texts[i] for i in keep]
    labels = [labels[i] for i in keep]
    splits = stratified_split(labels, valid_fraction, test_fraction, seed)

    out_dir.mkdir(parents=True, exist_ok=True)
    for split, idx in splits.items():
        _write_csv(out_dir / f"{split}.csv", [(texts[i], labels[i]) for i in idx])
    summary = {
        "packages_read": packages_read,
        "unique_packages": len(listings),
        "without_section": no_section,
        "without_long_description": no_long,
        "duplicates_dropped": duplicates,
        "examples": len(texts),
        "num_sections": len(kept_sections),
        "sections": dict(sorted(Counter(labels).items(), key=lambda kv: (-kv[1], kv[0]))),
        "sections_dropped": dict(sorted((s, n) for s, n in section_sizes.items() if s not in kept_sections)),
        "splits": {s: len(idx) for s, idx in splits.items()},
        "min_section_size": min_section_size,
        "seed": seed,
        "packages_files": [p.name for p in packages_files],
        "translation_files": [p.name for p in translation_files],
        "seconds": round(time.perf_counter() - start, 2),
    }
    _write_atomic(out_dir / "summary.json", lambda fh: json.dump(summary, fh, indent=2, sort_keys=False))
    return summary


def main(argv: list[str] | None = None, prog: str = "python -m trainer.debian") -> int:
    """CLI: summary as JSON on stdout (for scripts), human-readable progress on stderr."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory for the CSV splits")
    parser.add_argument("--lists", type=Path, default=DEFAULT_LISTS_DIR, help="apt lists directory")
    parser.add_argument("--min-section-size", type=int, default=200, help="drop smaller sections")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stratified split")
    args = parser.parse_args(argv)
    made = not args.out.exists()
    try:  # before minutes of reading: a file in the way, or no permission, was a traceback at the end
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"error: --out {args.out}: cannot make it a folder ({exc.strerror or exc})", file=sys.stderr)
        return 2
    print(f"reading Debian package lists from {args.lists} ...", file=sys.stderr)
    try:
        summary = build_debian_dataset(
            args.out, lists_dir=args.lists, min_section_size=args.min_section_size, seed=args.seed
        )
    except DebianListsMissing as exc:
        if made:
            with contextlib.suppress(OSError):
                args.out.rmdir()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    s = summary["splits"]
    print(
        f"{summary['examples']} examples in {summary['num_sections']} sections "
        f"(train {s['train']}, valid {s['valid']}, test {s['test']}) from {summary['unique_packages']} "
        f"packages; {summary['duplicates_dropped']} duplicate texts dropped; "
        f"wrote {args.out} in {summary['seconds']} s",
        file=sys.stderr,
    )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
