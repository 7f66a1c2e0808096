"""Property-based tests (hypothesis) for the parsers and the featurizer.

- Vector files: GloVe text and word2vec binary written from random words and float32 values parse back exactly
  (bit for bit); random garbage, and valid files with random damage, never fail with anything but
  VectorFileError.
- Tokenizer and hashing: deterministic (also across processes with different hash seeds), bucket ids within
  range, one bigram per consecutive token pair, and a word's character n-grams are the same in any context.
"""

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainer.config import Config
from trainer.data_cache import make_featurizer
from trainer.vectors import VectorFileError, load_vectors
from trainer.vectors_text import parse_file
from trainer.vocab import (
    Tokenizer,
    Vocabulary,
    bigram_buckets,
    char_ngram_buckets,
    char_ngrams,
    stable_hash64,
)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Word characters a vector file can hold: no whitespace or control characters (those separate fields and lines),
# no BOM (stripped at the start of a file), no surrogates (not encodable).
word_chars = st.characters(
    blacklist_categories=("Cc", "Cs", "Zs", "Zl", "Zp"), blacklist_characters="\ufeff\x85"
)
words_st = st.text(word_chars, min_size=1, max_size=12)
finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@st.composite
def tables(draw, max_rows: int = 12, max_dim: int = 6) -> tuple[list[str], np.ndarray]:
    words = draw(st.lists(words_st, min_size=1, max_size=max_rows, unique=True))
    dim = draw(st.integers(1, max_dim))
    values = draw(st.lists(finite_f32, min_size=len(words) * dim, max_size=len(words) * dim))
    return words, np.array(values, dtype=np.float32).reshape(len(words), dim)


def glove_bytes(words: list[str], vectors: np.ndarray, header: bool = False) -> bytes:
    # repr of the float64 value of each float32: exact under float32(float(text))
    lines = [f"{len(words)} {vectors.shape[1]}"] if header else []
    lines += [" ".join([w, *(repr(float(v)) for v in row)]) for w, row in zip(words, vectors, strict=True)]
    return ("\n".join(lines) + "\n").encode("utf-8")


def word2vec_bytes(words: list[str], vectors: np.ndarray, newline: bool = True) -> bytes:
    out = [f"{len(words)} {vectors.shape[1]}\n".encode()]
    for w, row in zip(words, vectors, strict=True):
        out.append(w.encode("utf-8") + b" " + row.astype("<f4").tobytes() + (b"\n" if newline else b""))
    return b"".join(out)


def parse_bytes(data: bytes, name: str = "vectors"):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        return parse_file(path, name)


def load_bytes(data: bytes):
    """Through the public loader and its cache (deduplication, fingerprint, cache write and re-read)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vectors.txt"
        path.write_bytes(data)
        first = load_vectors(str(path), cache_dir=Path(tmp) / "cache")
        again = load_vectors(str(path), cache_dir=Path(tmp) / "cache")  # a cache hit
        assert again.fingerprint == first.fingerprint and again.words == first.words
        return first


def assert_same_table(parsed, words: list[str], vectors: np.ndarray) -> None:
    assert parsed.words == words
    assert parsed.vectors.shape == vectors.shape
    assert (
        parsed.vectors.tobytes() == vectors.astype(np.float32).tobytes()
    )  # bit for bit, -0.0 and subnormals too


# ------------------------------------------------------------------------------------------ vector round trips
@SETTINGS
@given(table=tables(), header=st.booleans())
def test_glove_text_round_trip(table, header):
    words, vectors = table
    parsed = parse_bytes(glove_bytes(words, vectors, header=header))
    assert parsed.format == ("fasttext_vec" if header else "glove")
    assert_same_table(parsed, words, vectors)


@SETTINGS
@given(table=tables(), newline=st.booleans())
def test_word2vec_binary_round_trip(table, newline):
    words, vectors = table
    data = word2vec_bytes(words, vectors, newline=newline)
    parsed = parse_bytes(data, "vectors.txt")  # the name says text: detection goes by content
    assert parsed.format == "word2vec_bin"
    assert_same_table(parsed, words, vectors)


@settings(max_examples=25, deadline=None)
@given(table=tables(max_rows=6))
def test_both_formats_give_one_fingerprint_through_the_cache(table):
    words, vectors = table
    text, binary = load_bytes(glove_bytes(words, vectors)), load_bytes(word2vec_bytes(words, vectors))
    assert text.fingerprint == binary.fingerprint
    assert_same_table(binary, words, vectors)


# ------------------------------------------------------------------------------------------ garbage
def only_vector_file_errors(data: bytes) -> None:
    try:
        load_bytes(data)
    except VectorFileError as e:
        message = str(e)
        assert message.startswith(str(Path(tempfile.gettempdir()))) and "\n" not in message, message


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=600))
def test_random_bytes_fail_only_with_vector_file_error(data):
    only_vector_file_errors(data)


@settings(max_examples=150, deadline=None)
@given(
    header=st.tuples(st.integers(0, 10**12), st.integers(0, 10**12)),
    body=st.one_of(
        st.binary(max_size=300),
        st.text(max_size=300).map(str.encode),
        st.builds(lambda word, rest: word + b" " + rest, st.binary(max_size=8), st.binary(max_size=300)),
    ),
)
def test_header_then_garbage_fails_only_with_vector_file_error(header, body):
    """A plausible `N D` header (including absurd sizes) over garbage: no huge allocation, no stray exception."""
    only_vector_file_errors(f"{header[0]} {header[1]}\n".encode() + body)


@settings(max_examples=150, deadline=None)
@given(
    table=tables(max_rows=5, max_dim=3),
    binary=st.booleans(),
    edits=st.lists(
        st.tuples(
            st.floats(0, 1),
            st.sampled_from(["flip", "cut", "insert", "delete"]),
            st.binary(min_size=1, max_size=3),
        ),
        min_size=1,
        max_size=4,
    ),
)
def test_damaged_valid_files_fail_only_with_vector_file_error(table, binary, edits):
    data = bytearray(word2vec_bytes(*table) if binary else glove_bytes(*table))
    for where, kind, payload in edits:
        at = int(where * max(len(data) - 1, 0))
        if kind == "flip" and data:
            data[at] ^= payload[0] or 0xFF
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = payload
        elif kind == "delete":
            del data[at : at + len(payload)]
    only_vector_file_errors(bytes(data))


# ------------------------------------------------------------------------------------------ tokenizer, hashing
texts_st = st.text(st.characters(blacklist_categories=("Cs",)), max_size=80)
ASCII_TEXT = st.text(st.sampled_from("abc xyz'’ ABC .,\t\n"), max_size=60)


@SETTINGS
@given(text=st.one_of(texts_st, ASCII_TEXT), lowercase=st.booleans())
def test_tokenizer_is_deterministic_and_lowercases(text, lowercase):
    pattern = Config().data.token_pattern
    tokens = Tokenizer(pattern, lowercase)(text)
    assert tokens == Tokenizer(pattern, lowercase)(text)
    assert all(t and not any(c.isspace() for c in t) for t in tokens)
    if lowercase:
        assert tokens == Tokenizer(pattern, False)(text.lower())


@SETTINGS
@given(words=st.lists(st.text(max_size=10), max_size=30), buckets=st.integers(1, 2**40))
def test_bigram_buckets_in_range_one_per_pair(words, buckets):
    hashes = np.array([stable_hash64(w) for w in words], dtype=np.uint64)
    ids = bigram_buckets(hashes, buckets)
    assert len(ids) == max(len(words) - 1, 0)
    assert ids.dtype == np.int64 and ((ids >= 0) & (ids < buckets)).all()
    np.testing.assert_array_equal(ids, bigram_buckets(hashes.copy(), buckets))
    if len(words) >= 2:  # a pair's bucket depends on that pair only
        np.testing.assert_array_equal(ids[1:], bigram_buckets(hashes[1:], buckets))


@SETTINGS
@given(
    word=st.text(min_size=1, max_size=15),
    minn=st.integers(1, 4),
    span=st.integers(0, 3),
    buckets=st.integers(1, 10**6),
)
def test_char_ngrams_count_and_range(word, minn, span, buckets):
    maxn = minn + span
    grams = char_ngrams(word, minn, maxn)
    wrapped = len(word) + 2
    expected = sum(max(wrapped - n + 1, 0) for n in range(minn, maxn + 1)) - (minn <= wrapped <= maxn)
    assert len(grams) == expected
    ids = char_ngram_buckets(word, minn, maxn, buckets)
    assert len(ids) == len(grams) and ((ids >= 0) & (ids < buckets)).all()


def small_vocab(words: list[str]) -> Vocabulary:
    return Vocabulary(
        words=words,
        num_pretrained=0,
        pretrained_rows=np.zeros(0, dtype=np.int64),
        counts=np.ones(len(words), dtype=np.int64),
        labels=["a", "b"],
    )


@settings(max_examples=80, deadline=None)
@given(
    docs=st.lists(st.one_of(ASCII_TEXT, texts_st), min_size=1, max_size=6),
    vocab_size=st.integers(0, 6),
    max_tokens=st.integers(1, 12),
)
def test_featurizer_per_document_and_context_free(docs, vocab_size, max_tokens):
    """Bigrams: tokens-1 per document, in range, none across documents. Char n-grams of a token are those of the
    word alone. Encoding documents together or one at a time gives the same slices."""
    cfg = Config()
    cfg.embeddings.ngram_buckets, cfg.embeddings.char_ngrams = 97, 101
    cfg.data.max_tokens_per_doc = max_tokens
    tokenizer = Tokenizer(cfg.data.token_pattern, cfg.data.lowercase)
    seen = list(dict.fromkeys(t for d in docs for t in tokenizer(d)))
    featurizer = make_featurizer(cfg, small_vocab(seen[:vocab_size]))
    together = featurizer.encode(docs)
    for d, text in enumerate(docs):
        tokens = tokenizer(text)[:max_tokens]
        assert together.raw_tokens[d] == len(tokens)
        bigrams = together.bigram_ids[together.bigram_offsets[d] : together.bigram_offsets[d + 1]]
        assert len(bigrams) == max(len(tokens) - 1, 0)
        assert ((bigrams >= 0) & (bigrams < 97)).all()
        alone = featurizer.encode([text])
        np.testing.assert_array_equal(bigrams, alone.bigram_ids)
        chars = together.char_ids[together.char_offsets[d] : together.char_offsets[d + 1]]
        np.testing.assert_array_equal(chars, alone.char_ids)
        # every token is kept (char n-grams on); its n-grams are the word's own
        counts = alone.char_token_counts
        assert len(counts) == len(tokens)
        starts = np.concatenate([[0], np.cumsum(counts)])
        for i, token in enumerate(tokens):
            own = char_ngram_buckets(token, cfg.embeddings.char_minn, cfg.embeddings.char_maxn, 101)
            np.testing.assert_array_equal(alone.char_ids[starts[i] : starts[i + 1]], own)
    again = featurizer.encode(docs)
    for name in ("token_ids", "bigram_ids", "char_ids", "char_offsets", "token_offsets"):
        np.testing.assert_array_equal(getattr(together, name), getattr(again, name))


def test_hashes_are_identical_across_processes_and_hash_seeds():
    words = ["", "the", "café", "日本語", "naïve", "a b", "x" * 200, "\udcff"]
    code = (
        "import json, sys, numpy as np\n"
        "from trainer.vocab import stable_hash64, bigram_buckets, char_ngram_buckets\n"
        "words = json.loads(sys.stdin.read())\n"
        "h = [stable_hash64(w) for w in words]\n"
        "print(json.dumps([h, bigram_buckets(np.array(h, dtype=np.uint64), 1000003).tolist(),\n"
        "                  [char_ngram_buckets(w, 2, 4, 5003).tolist() for w in words]]))\n"
    )
    here = [
        [stable_hash64(w) for w in words],
        bigram_buckets(np.array([stable_hash64(w) for w in words], dtype=np.uint64), 1000003).tolist(),
        [char_ngram_buckets(w, 2, 4, 5003).tolist() for w in words],
    ]
    for seed in ("0", "12345"):
        proc = subprocess.run(
            [sys.executable, "-c", code],
            input=json.dumps(words),
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
            check=True,
            timeout=120,
        )
        assert json.loads(proc.stdout) == here
    # pinned values: a change of hash function would silently invalidate every saved model
    assert stable_hash64("the") == int.from_bytes(hashlib.blake2b(b"the", digest_size=8).digest(), "little")
