"""trainer.blake2b: numba's BLAKE2b-64 gives hashlib's digests, and the char n-gram hashes `vocab.char_ngrams` +
`stable_hash64` give, so hashed feature ids (and exported models' buckets) do not depend on which path ran."""

from dataclasses import fields

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainer import blake2b, features
from trainer.config import DataConfig
from trainer.features import Featurizer, char_bucket_runs, word_hashes
from trainer.vocab import Tokenizer, Vocabulary, char_ngram_buckets, char_ngrams, stable_hash64

pytestmark = pytest.mark.skipif(not blake2b.available, reason="numba is not installed: hashlib is used")


@pytest.fixture
def numba_always(monkeypatch):
    """Send inputs of any size to the numba kernels (small ones go to hashlib by default)."""
    monkeypatch.setattr(features, "BLAKE2B_MIN_STRINGS", 0)

# text that includes lone surrogates, which hypothesis's default text() leaves out
TEXT = st.lists(st.one_of(st.characters(), st.integers(0xD800, 0xDFFF).map(chr)), max_size=300).map("".join)

EDGE_STRINGS = [
    "", "a", "<a>", "x" * 127, "x" * 128, "x" * 129, "y" * 255, "y" * 256, "y" * 257, "z" * 1000,  # block edges
    "naïve", "日本語のテキスト", "हिन्दी", "e\u0301", "😀" * 40, "it's", "\ud800", "a\udfffb",  # non-ASCII, lone surrogates
]


def expected_hashes(strings: list[str]) -> np.ndarray:
    return np.array([stable_hash64(s) for s in strings], dtype=np.uint64)


def test_edge_strings_hash_as_hashlib_does():
    assert np.array_equal(blake2b.hash_strings(EDGE_STRINGS), expected_hashes(EDGE_STRINGS))


@settings(max_examples=60, deadline=None)
@given(st.lists(TEXT, max_size=30))
def test_random_strings_hash_as_hashlib_does(strings):
    assert np.array_equal(blake2b.hash_strings(strings), expected_hashes(strings))


@pytest.mark.parametrize("minn, maxn", [(3, 5), (1, 1), (2, 6), (1, 40), (5, 3 + 2)])
def test_char_gram_hashes_follow_char_ngrams(minn, maxn):
    words = [w[:30] for w in EDGE_STRINGS] + ["ab", "abc", "abcdefgh"]
    hashes, counts = blake2b.char_gram_hashes(words, minn, maxn)
    grams = [char_ngrams(w, minn, maxn) for w in words]
    assert counts.tolist() == [len(g) for g in grams]
    assert np.array_equal(hashes, expected_hashes([g for per_word in grams for g in per_word]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])  # a constant
@given(st.lists(TEXT.map(lambda t: t[:25]), max_size=20), st.integers(1, 4), st.integers(0, 4))
def test_char_bucket_runs_equal_char_ngram_buckets(numba_always, words, minn, extra):
    ids, counts = char_bucket_runs(words, minn, minn + extra, 1009, workers=1)
    per_word = [char_ngram_buckets(w, minn, minn + extra, 1009) for w in words]
    assert counts.tolist() == [len(a) for a in per_word]
    assert ids.dtype == np.int64
    assert ids.tolist() == [int(x) for a in per_word for x in a]


def test_word_hashes_with_and_without_numba(numba_always, monkeypatch):
    words = EDGE_STRINGS * 3
    fast = word_hashes(words, workers=1)
    monkeypatch.setattr(blake2b, "available", False)
    assert np.array_equal(word_hashes(words, workers=1), fast)


def test_encoding_is_the_same_without_numba(numba_always, monkeypatch):
    vocab = Vocabulary(words=["the", "cat", "naïve"], num_pretrained=1, pretrained_rows=np.array([0]),
                       counts=np.array([3, 2, 1]), labels=["a", "b"])
    texts = ["The naïve cat sat", "日本語 cat", "", "it's the cat's café"]

    def encode():
        return Featurizer(Tokenizer(DataConfig().token_pattern, True), vocab, 97, 89, 2, 5, 100).encode(texts)

    calls = []
    real = blake2b.char_gram_hashes
    monkeypatch.setattr(blake2b, "char_gram_hashes", lambda *a: calls.append(1) or real(*a))
    fast = encode()
    assert calls  # the numba path ran
    monkeypatch.setattr(features.blake2b, "available", False)
    slow = encode()
    for f in fields(fast):
        assert np.array_equal(getattr(fast, f.name), getattr(slow, f.name)), f.name
