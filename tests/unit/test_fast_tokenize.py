"""trainer.fast_tokenize: the numba tokenizer gives what the Python tokenizer (`features._tokenize_chunk`) gives,
array for array: the same tokens, the same type numbering, the same document lengths, on any text."""

import random
import string

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainer import fast_tokenize, features
from trainer.features import _tokenize_chunk, tokenize
from trainer.vocab import DEFAULT_TOKEN_PATTERN, Tokenizer

pytestmark = pytest.mark.skipif(not fast_tokenize.available, reason="numba is not installed: Python's re is used")

# ASCII word characters, the apostrophes, separators, and the non-ASCII cases the Python path owns: accents,
# a combining mark (NFC), the Kelvin sign (lowercases to ASCII "k"), dotted I (lowercases to two code points),
# a lone surrogate, CJK
ALPHABET = list("aZ09_'’ \n\t.,-") + ["é", "e\u0301", "\u212a", "İ", "\ud800", "日本", "ß"]
TEXTS = st.lists(st.lists(st.sampled_from(ALPHABET), max_size=40).map("".join), max_size=12)


def assert_same(texts, tokenizer, max_tokens, block_chars=fast_tokenize.BLOCK_CHARS, workers=1):
    expected = _tokenize_chunk(texts, tokenizer, max_tokens)
    got = fast_tokenize.tokenize_default_pattern(texts, tokenizer, max_tokens, workers, block_chars=block_chars)
    assert got.type_words == expected.type_words
    assert np.array_equal(got.types, expected.types)
    assert got.types.dtype == expected.types.dtype == np.int32  # features.type_dtype
    assert np.array_equal(got.doc_lengths, expected.doc_lengths)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts=TEXTS, lowercase=st.booleans(), version=st.sampled_from([1, 2]), max_tokens=st.sampled_from([1, 3, 20000]))
def test_random_text_tokenizes_as_python_does(texts, lowercase, version, max_tokens):
    assert_same(texts, Tokenizer(DEFAULT_TOKEN_PATTERN, lowercase, version), max_tokens)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts=TEXTS, block_chars=st.integers(1, 100))
def test_text_tokenized_in_blocks_numbers_its_words_as_in_one_piece(texts, block_chars):
    """Blocks of a few characters: many blocks, words first seen in a later block, blocks of one document, empty
    documents at a block's edge."""
    assert_same(texts, Tokenizer(DEFAULT_TOKEN_PATTERN, True, 2), 20000, block_chars)


def test_blocks_end_where_the_text_reaches_each_multiple_of_block_chars(monkeypatch):
    seen = []
    real = fast_tokenize._tokenize_block
    monkeypatch.setattr(fast_tokenize, "_tokenize_block", lambda texts, *a: seen.append(list(texts)) or real(texts, *a))
    texts = ["aaaa", "bb", "cccc", "d", "eeeeeeeeeeee", "f"]  # text ends at 4, 6, 10, 11, 23, 24
    got = fast_tokenize.tokenize_default_pattern(texts, Tokenizer(DEFAULT_TOKEN_PATTERN, True), 100, block_chars=5)
    assert seen == [["aaaa", "bb"], ["cccc"], ["d", "eeeeeeeeeeee"], ["f"]]
    assert got.type_words == texts and got.types.tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("text", [
    "", "'", "''", "a'", "'a", "a'b", "a''b", "a'b'c", "don't'", "a'b'", "a' b", "_", "__init__", "x'_'y",
    "It's   DON'T\nstop", "a’b", "café's", "naïve", "e\u0301t\u00e9", "\u212aelvin", "İstanbul", "a\ud800b",
])
@pytest.mark.parametrize("lowercase", [True, False])
def test_edge_cases(text, lowercase):
    assert_same([text, text + " " + text, "plain words"], Tokenizer(DEFAULT_TOKEN_PATTERN, lowercase), 20000)


def test_many_types_and_dense_tokens_grow_every_buffer():
    """More distinct words than the first hash table holds (65,536 slots, half full at most), and tokens denser
    than the first guess of the span arrays' size (one a 6 bytes): both grow, the result does not change."""
    rng = random.Random(0)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(1, 9))) for _ in range(60_000)]
    texts = [" ".join(rng.choices(words, k=200)) for _ in range(500)]
    texts += ["a b c d e f g h i j " * 50] * 20  # one token every 2 bytes
    texts += ["Ünïcode " + t for t in texts[:20]]  # documents on the Python path among them
    assert_same(texts, Tokenizer(DEFAULT_TOKEN_PATTERN, True), 20000)
    assert_same(texts, Tokenizer(DEFAULT_TOKEN_PATTERN, True), 150)
    assert_same(texts, Tokenizer(DEFAULT_TOKEN_PATTERN, True), 150, block_chars=20_000)  # 33 blocks
    # the blocks shared by 3 forked workers, 11 each (test_parallel.py covers a worker that dies)
    assert_same(texts, Tokenizer(DEFAULT_TOKEN_PATTERN, True), 150, block_chars=20_000, workers=3)


def test_tokenize_takes_the_kernel_for_large_input_and_keeps_its_result(monkeypatch):
    texts = ["The cat's hat", "ÉTÉ été", "dogs and cats"] * 50
    tokenizer = Tokenizer(DEFAULT_TOKEN_PATTERN, True)
    calls = []
    real = fast_tokenize.tokenize_default_pattern
    monkeypatch.setattr(fast_tokenize, "tokenize_default_pattern", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(fast_tokenize, "_warm", False)
    monkeypatch.setattr(fast_tokenize, "MIN_CHARS", 10**9)
    python = tokenize(texts, tokenizer, 20000)
    assert calls == []  # small input, numba not loaded by this path yet: Python's re
    monkeypatch.setattr(fast_tokenize, "MIN_CHARS", 0)
    kernel = tokenize(texts, tokenizer, 20000)
    assert calls == [1]
    assert kernel.type_words == python.type_words and np.array_equal(kernel.types, python.types)
    monkeypatch.setattr(fast_tokenize, "MIN_CHARS", 10**9)
    tokenize(texts[:2], tokenizer, 20000)
    assert calls == [1, 1]  # warm now: any size
    custom = Tokenizer(r"[a-z]+", True)
    assert not fast_tokenize.applies(custom, 20000, 10**9)  # another pattern: Python's re
    tokenize(texts, custom, 20000)
    assert calls == [1, 1]


def test_non_ascii_documents_go_through_forked_workers_with_the_same_result(monkeypatch):
    rng = random.Random(1)
    texts = [" ".join(rng.choices(["naïve", "Ünïcode", "plain", "it's", "été", "x"], k=30)) for _ in range(400)]
    tokenizer = Tokenizer(DEFAULT_TOKEN_PATTERN, True)
    monkeypatch.setattr(features, "TOKENIZE_MIN_DOCS_PER_WORKER", 50)
    expected = _tokenize_chunk(texts, tokenizer, 20000)
    calls = []
    real = fast_tokenize.chunked_map
    monkeypatch.setattr(fast_tokenize, "chunked_map", lambda *a: calls.append(a[2:]) or real(*a))
    got = fast_tokenize.tokenize_default_pattern(texts, tokenizer, 20000, workers=2)
    assert calls == [(2, 50)]
    assert got.type_words == expected.type_words and np.array_equal(got.types, expected.types)
    assert np.array_equal(got.doc_lengths, expected.doc_lengths)
