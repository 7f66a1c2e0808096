"""Tokenizer, deterministic hashing, and the vocabulary that maps words into the id space (see embeddings.py).

Hashes must be identical across processes, runs and machines (every rank featurizes its own documents, and a
saved model is used later for prediction), so nothing here uses Python's salted `hash()`: words are hashed with
BLAKE2b, and bigrams are mixed from the two word hashes with SplitMix64 in numpy.
"""

import functools
import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

_MASK64 = (1 << 64) - 1


DEFAULT_TOKEN_PATTERN = r"\w+(?:['’]\w+)*"
TOKENIZER_VERSION = 2


@functools.cache
def _default_pattern_with_marks() -> re.Pattern:
    """The default pattern with Unicode combining marks (category M) as word characters. Python's `\\w` does not
    match them, so Devanagari vowel signs, Arabic harakat or a decomposed accent split a word and vanish
    ("हिन्दी" -> ["ह", "न", "द"]). Built on first use (~20 ms): the code points of planes 0, 1 and 14, where
    every mark lies."""
    ranges, start = [], None
    for cp in [*range(0x20000), *range(0xE0000, 0xE1000), 0x110000]:
        mark = cp < 0x110000 and unicodedata.category(chr(cp)).startswith("M")
        if mark and start is None:
            start = cp
        elif not mark and start is not None:
            ranges.append(f"\\U{start:08x}-\\U{cp - 1:08x}")
            start = None
    word = "[\\w" + "".join(ranges) + "]"
    return re.compile(f"{word}+(?:['’]{word}+)*")


class Tokenizer:
    """Regex tokenizer (default: words with internal apostrophes), optionally lowercasing first.

    Version 2 (`data.tokenizer_version`): text that is not pure ASCII is put in Unicode NFC form first (the same
    words whether a file was written composed or decomposed, as macOS and some PDF tools do), and with the default
    pattern combining marks are word characters (`_default_pattern_with_marks`). ASCII text, most of it, takes
    the plain pattern. Version 1 is the tokenizer of models exported before version 2 existed."""

    def __init__(self, pattern: str, lowercase: bool, version: int = TOKENIZER_VERSION) -> None:
        try:
            self._regex = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"data.token_pattern: invalid regular expression {pattern!r}: {e}") from None
        self.pattern = pattern
        self.lowercase = lowercase
        self.version = version
        self._marks = version >= 2 and pattern == DEFAULT_TOKEN_PATTERN

    def __call__(self, text: str) -> list[str]:
        if self.lowercase:
            text = text.lower()
        if self.version >= 2 and not text.isascii():
            # after lowercasing: lower() maps code point by code point, so it can leave sequences NFC composes
            text = unicodedata.normalize("NFC", text)
            return (_default_pattern_with_marks() if self._marks else self._regex).findall(text)
        return self._regex.findall(text)


def stable_hash64(text: str) -> int:
    """64-bit hash of a string, the same everywhere (BLAKE2b of its UTF-8 bytes)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays: a cheap, well-mixed, platform-independent hash step."""
    with np.errstate(over="ignore"):
        x = x.astype(np.uint64, copy=True)
        x += np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def bigram_buckets(token_hashes: np.ndarray, num_buckets: int) -> np.ndarray:
    """Bucket ids of consecutive token pairs: order-sensitive mix of the two word hashes, modulo num_buckets."""
    if len(token_hashes) < 2 or num_buckets <= 0:
        return np.zeros(0, dtype=np.int64)
    with np.errstate(over="ignore"):
        left = splitmix64(token_hashes[:-1])
        mixed = splitmix64(left * np.uint64(31) + token_hashes[1:])
    return (mixed % np.uint64(num_buckets)).astype(np.int64)


def char_ngrams(word: str, minn: int, maxn: int) -> list[str]:
    """fastText-style subwords: n-grams of `<word>` with lengths minn..maxn (the whole `<word>` excluded)."""
    wrapped = f"<{word}>"
    out = []
    for n in range(minn, maxn + 1):
        for i in range(len(wrapped) - n + 1):
            gram = wrapped[i : i + n]
            if gram != wrapped:
                out.append(gram)
    return out


def char_ngram_buckets(word: str, minn: int, maxn: int, num_buckets: int) -> np.ndarray:
    grams = char_ngrams(word, minn, maxn)
    return np.array([stable_hash64(g) % num_buckets for g in grams], dtype=np.int64)


@dataclass
class Vocabulary:
    """Words in id order (pretrained words first), where each pretrained word's row lives in the source file,
    training counts, and the label set.

    `words[i]` for i < num_pretrained has a frozen row (`pretrained_rows[i]` in the source table); the rest are OOV
    words with trainable rows. Words outside the vocabulary are dropped, but still contribute character n-grams
    and bigrams when those are enabled."""

    words: list[str]
    num_pretrained: int
    pretrained_rows: np.ndarray
    counts: np.ndarray
    labels: list[str]
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.index = {w: i for i, w in enumerate(self.words)}
        self.label_index = {label: i for i, label in enumerate(self.labels)}

    @property
    def num_oov(self) -> int:
        return len(self.words) - self.num_pretrained

    def fingerprint(self, legacy: bool = False) -> str:
        """`legacy`: the formula before the list lengths were hashed, which exported models of earlier versions
        recorded (they still load)."""
        h = hashlib.blake2b(digest_size=16)
        # the lengths make the newline-joined lists unambiguous (a token pattern may match a newline)
        h.update(f"{self.num_pretrained}\n".encode() if legacy else
                 f"{self.num_pretrained}\n{len(self.words)}\n{len(self.labels)}\n".encode())
        h.update("\n".join(self.words).encode("utf-8", "surrogatepass"))
        h.update(b"\0labels\0")
        h.update("\n".join(self.labels).encode("utf-8", "surrogatepass"))
        return h.hexdigest()

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"num_pretrained": self.num_pretrained, "labels": self.labels, "fingerprint": self.fingerprint()}
        (folder / "vocab.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8",
                                            errors="surrogatepass")
        if any("\n" in w for w in self.words):  # a custom token_pattern matched a newline: one line per word fails
            (folder / "words.json").write_text(json.dumps(self.words), encoding="utf-8")
        else:
            # bytes, not text mode: text mode reads a "\r" inside a word (a custom token_pattern) as a line end
            (folder / "words.txt").write_bytes("\n".join(self.words).encode("utf-8", "surrogatepass"))
        np.save(folder / "pretrained_rows.npy", self.pretrained_rows)
        np.save(folder / "counts.npy", self.counts)

    @classmethod
    def load(cls, folder: Path) -> "Vocabulary":
        meta = json.loads((folder / "vocab.json").read_text(encoding="utf-8", errors="surrogatepass"))
        if (folder / "words.json").exists():
            words = json.loads((folder / "words.json").read_text(encoding="utf-8"))
        else:
            text = (folder / "words.txt").read_bytes().decode("utf-8", "surrogatepass")
            words = text.split("\n") if text else []
        vocab = cls(
            words=words,
            num_pretrained=meta["num_pretrained"],
            pretrained_rows=np.load(folder / "pretrained_rows.npy"),
            counts=np.load(folder / "counts.npy"),
            labels=meta["labels"],
        )
        if meta["fingerprint"] not in (vocab.fingerprint(), vocab.fingerprint(legacy=True)):
            raise ValueError(f"{folder}: vocabulary files do not match their recorded fingerprint")
        return vocab


def _id_order(word: str) -> tuple[int, str]:
    """Sort key of a word's id within its block: its stable hash (the word itself breaks a 64-bit tie)."""
    return stable_hash64(word), word


def build_vocabulary(
    counts: Mapping[str, int],
    labels: Iterable[str],
    pretrained_index: dict[str, int] | None,
    min_freq: int,
    max_vocab: int,
    full_pretrained_rows: int = 0,
) -> Vocabulary:
    """Choose the vocabulary from training counts.

    Words with a pretrained vector are kept whatever their count (their row needs no training); other words need
    `min_freq` occurrences. `max_vocab` keeps the most frequent eligible words (ties broken alphabetically, so the
    result is deterministic). With `full_pretrained_rows`, every pretrained word is in the vocabulary and its id
    is its row in the source table.

    Ids within the pretrained block and within the OOV block follow a hash of the word, not its frequency: row-wise
    sharding gives rank r a contiguous block of each table's rows, and in frequency order rank 0 would own the
    frequent words and do most of the lookup and gradient work. Demo training tokens in the first of 2 blocks:
    pretrained 99% in frequency order, 51% hashed; OOV 84% and 51%. (The mask table's rows are [pretrained | OOV],
    so its first block still holds 75% of the tokens. Full pretrained tables keep the source file's order, whose
    rows are looked up in place.)"""
    pretrained_index = pretrained_index or {}
    eligible = [(w, c) for w, c in counts.items() if w in pretrained_index or c >= min_freq]
    if max_vocab:  # rank only to cut: ids are ordered by hash below, whatever the order here
        eligible = sorted(eligible, key=lambda kv: (-kv[1], kv[0]))[:max_vocab]
    if full_pretrained_rows:
        inv = [""] * full_pretrained_rows
        for w, r in pretrained_index.items():
            inv[r] = w
        pre_words = inv
        pre_rows = np.arange(full_pretrained_rows, dtype=np.int64)
    else:
        pre_words = sorted((w for w, _ in eligible if w in pretrained_index), key=_id_order)
        pre_rows = np.array([pretrained_index[w] for w in pre_words], dtype=np.int64)
    oov_words = sorted((w for w, _ in eligible if w not in pretrained_index), key=_id_order)
    words = pre_words + oov_words
    word_counts = np.array([counts.get(w, 0) for w in words], dtype=np.int64)
    return Vocabulary(
        words=words,
        num_pretrained=len(pre_words),
        pretrained_rows=pre_rows,
        counts=word_counts,
        labels=sorted(set(labels)),
    )


def coverage(vocab: Vocabulary, counts: Mapping[str, int]) -> dict[str, float]:
    """Share of training word types and of training tokens that have a pretrained row."""
    total_tokens = sum(counts.values()) or 1
    pre_types = pre_tokens = vocab_tokens = 0
    for word, count in counts.items():
        idx = vocab.index.get(word)
        if idx is None:
            continue
        vocab_tokens += count
        if idx < vocab.num_pretrained:
            pre_types += 1
            pre_tokens += count
    return {
        "pretrained_type_coverage": pre_types / max(1, len(counts)),
        "pretrained_token_coverage": pre_tokens / total_tokens,
        "vocab_token_coverage": vocab_tokens / total_tokens,
        "num_types_seen": len(counts),
        "num_vocab": len(vocab.words),
        "num_pretrained": vocab.num_pretrained,
        "num_oov": vocab.num_oov,
    }
