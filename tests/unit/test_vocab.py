"""Tokenizer, stable hashing, bigram and character n-gram buckets, vocabulary construction and coverage."""

import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from trainer.config import DataConfig
from trainer.features import tokenize
from trainer.vocab import (
    Tokenizer,
    Vocabulary,
    bigram_buckets,
    build_vocabulary,
    char_ngram_buckets,
    char_ngrams,
    coverage,
    stable_hash64,
)


def default_tokenizer(lowercase: bool = True) -> Tokenizer:
    return Tokenizer(DataConfig().token_pattern, lowercase)


# ---------------------------------------------------------------- tokenizer
def test_default_tokenizer_lowercases_and_keeps_internal_apostrophes():
    tok = default_tokenizer()
    assert tok("Don't STOP, it's 'quoted' rock’n’roll!") == ["don't", "stop", "it's", "quoted", "rock’n’roll"]


def test_default_tokenizer_without_lowercase():
    assert default_tokenizer(lowercase=False)("Hello World") == ["Hello", "World"]


def test_default_tokenizer_edge_cases():
    tok = default_tokenizer()
    assert tok("") == []
    assert tok("  ...  ") == []
    assert tok("a1 b_2 x'") == ["a1", "b_2", "x"]


def test_combining_marks_stay_inside_words_and_either_normal_form_gives_the_same_words():
    """Python's \\w does not match combining marks: version 1 split Hindi, Arabic and decomposed accents and dropped
    the marks; version 2 keeps them, and NFC- and NFD-written text give the same tokens."""
    import unicodedata

    tok = default_tokenizer()
    assert tok("हिन्दी भाषा") == ["हिन्दी", "भाषा"]
    assert tok("كَتَبَ") == ["كَتَبَ"]
    assert tok(unicodedata.normalize("NFD", "Café RÉSUMÉ")) == tok("Café RÉSUMÉ") == ["café", "résumé"]
    legacy = Tokenizer(DataConfig().token_pattern, True, version=1)
    assert legacy("हिन्दी") == ["ह", "न", "द"] and legacy(unicodedata.normalize("NFD", "café")) == ["cafe"]
    ascii_text = "Don't STOP, it's rock’n’roll 42"
    assert tok(ascii_text) == legacy(ascii_text)  # ASCII text: unchanged
    # a custom pattern is the user's: normalised, but no marks added to it
    assert Tokenizer(r"[a-zé]+", True)(unicodedata.normalize("NFD", "Café")) == ["café"]


def test_custom_pattern():
    tok = Tokenizer(r"[a-z]+", lowercase=True)
    assert tok("Foo42bar baz") == ["foo", "bar", "baz"]


def test_invalid_regex_names_flag():
    with pytest.raises(ValueError, match=r"data\.token_pattern: invalid regular expression"):
        Tokenizer(r"(unclosed", lowercase=True)


# ---------------------------------------------------------------- hashing
def test_stable_hash64_deterministic_and_in_range():
    values = [stable_hash64(w) for w in ("", "a", "where", "ü", "don't")]
    assert values == [stable_hash64(w) for w in ("", "a", "where", "ü", "don't")]
    assert all(0 <= v < 2**64 for v in values)
    assert len(set(values)) == len(values)


def test_stable_hash64_same_in_another_process_with_other_hash_seed():
    words = ["where", "ü", "don't", "", "a b"]
    code = (
        "from trainer.vocab import stable_hash64\n"
        f"print(' '.join(str(stable_hash64(w)) for w in {words!r}))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert [int(x) for x in out.stdout.split()] == [stable_hash64(w) for w in words]
    # sanity: Python's own hash() of a string would differ across these seeds
    env2 = {**os.environ, "PYTHONHASHSEED": "54321"}
    h = [
        subprocess.run(
            [sys.executable, "-c", "print(hash('where'))"], capture_output=True, text=True, env=e, check=True
        ).stdout
        for e in (env, env2)
    ]
    assert h[0] != h[1]


def hashes(words: list[str]) -> np.ndarray:
    return np.array([stable_hash64(w) for w in words], dtype=np.uint64)


def test_bigram_buckets_count_range_and_determinism():
    words = "the cat sat on the mat".split()
    ids = bigram_buckets(hashes(words), 1000)
    assert ids.dtype == np.int64 and len(ids) == len(words) - 1
    assert ((ids >= 0) & (ids < 1000)).all()
    np.testing.assert_array_equal(ids, bigram_buckets(hashes(words), 1000))
    # "the cat" and "the mat" are different pairs; the pair depends only on its two words
    assert bigram_buckets(hashes(["on", "the"]), 1000)[0] == ids[3]


def test_bigram_buckets_order_sensitive():
    big = 2**61 - 1
    ab = bigram_buckets(hashes(["new", "york"]), big)
    ba = bigram_buckets(hashes(["york", "new"]), big)
    assert ab[0] != ba[0]


def test_bigram_buckets_short_inputs():
    assert len(bigram_buckets(hashes([]), 10)) == 0
    assert len(bigram_buckets(hashes(["one"]), 10)) == 0
    assert len(bigram_buckets(hashes(["a", "b"]), 0)) == 0


def test_char_ngrams_match_fasttext_definition():
    assert char_ngrams("where", 3, 3) == ["<wh", "whe", "her", "ere", "re>"]
    assert char_ngrams("where", 3, 4) == ["<wh", "whe", "her", "ere", "re>", "<whe", "wher", "here", "ere>"]
    # the whole wrapped word is excluded (fastText adds it as the word itself)
    assert "<a>" not in char_ngrams("a", 1, 3)
    assert char_ngrams("a", 1, 3) == ["<", "a", ">", "<a", "a>"]


def test_char_ngram_buckets_are_the_hashes_of_the_grams():
    ids = char_ngram_buckets("where", 3, 3, 97)
    np.testing.assert_array_equal(ids, [stable_hash64(g) % 97 for g in ["<wh", "whe", "her", "ere", "re>"]])
    assert ids.dtype == np.int64


# ---------------------------------------------------------------- vocabulary
PRETRAINED = {"the": 5, "cat": 2, "sat": 9, "rare": 0}


def test_pretrained_words_first_and_min_freq_only_for_oov():
    counts = Counter({"the": 10, "cat": 3, "rare": 1, "zork": 4, "blip": 1, "qux": 2})
    vocab = build_vocabulary(counts, ["b", "a", "b"], PRETRAINED, min_freq=2, max_vocab=0)
    # pretrained (even "rare", seen once) then OOV words with >= 2 occurrences; hashed order within each block
    pre, oov = sorted(["the", "cat", "rare"], key=stable_hash64), sorted(["zork", "qux"], key=stable_hash64)
    assert vocab.words == pre + oov
    assert vocab.num_pretrained == 3 and vocab.num_oov == 2
    np.testing.assert_array_equal(vocab.pretrained_rows, [PRETRAINED[w] for w in pre])
    np.testing.assert_array_equal(vocab.counts, [counts[w] for w in pre + oov])
    assert vocab.labels == ["a", "b"]
    assert vocab.label_index == {"a": 0, "b": 1}
    assert "sat" not in vocab.index  # pretrained but never seen in training


def test_max_vocab_keeps_most_frequent_with_alphabetical_ties():
    counts = Counter({"the": 1, "zork": 5, "bb": 3, "aa": 3, "cat": 3, "dd": 2})
    vocab = build_vocabulary(counts, ["x"], PRETRAINED, min_freq=1, max_vocab=3)
    # ranked: zork 5, aa 3, bb 3, cat 3, dd 2, the 1 -> keep zork, aa, bb; no pretrained word made it
    assert vocab.words == sorted(["zork", "aa", "bb"], key=stable_hash64)
    assert vocab.num_pretrained == 0
    vocab4 = build_vocabulary(counts, ["x"], PRETRAINED, min_freq=1, max_vocab=4)
    assert vocab4.words == ["cat", *sorted(["zork", "aa", "bb"], key=stable_hash64)] and vocab4.num_pretrained == 1


def test_ids_spread_frequent_words_over_row_blocks():
    """Row-wise sharding gives each rank a contiguous block of ids: the most frequent words must not all land in
    the first block (they did in frequency order)."""
    counts = Counter({f"w{i:05d}": 100_000 // (i + 1) for i in range(20_000)})  # Zipf-like
    vocab = build_vocabulary(counts, ["x"], None, min_freq=1, max_vocab=0)
    ids = np.array([vocab.index[f"w{i:05d}"] for i in range(20_000)])
    top = ids[:200]  # the 200 most frequent words
    per_half = np.bincount(top // 10_000, minlength=2)
    assert per_half.min() >= 70, per_half  # about 100 each; frequency order would put all 200 in the first half
    tokens = np.bincount(ids // 10_000, weights=[counts[f"w{i:05d}"] for i in range(20_000)])
    assert tokens.min() / tokens.max() > 0.6, tokens


def test_build_vocabulary_is_deterministic_whatever_the_counter_order():
    items = [(f"w{i}", i % 4 + 1) for i in range(40)]
    a = build_vocabulary(Counter(dict(items)), ["x"], None, 2, 10)
    b = build_vocabulary(Counter(dict(reversed(items))), ["x"], None, 2, 10)
    assert a.words == b.words
    assert a.fingerprint() == b.fingerprint()


def test_full_pretrained_ids_are_source_rows():
    index = {"d": 3, "a": 0, "c": 2, "b": 1}
    counts = Counter({"c": 1, "zork": 2, "once": 1})
    vocab = build_vocabulary(counts, ["y"], index, min_freq=2, max_vocab=0, full_pretrained_rows=4)
    assert vocab.words[:4] == ["a", "b", "c", "d"]
    np.testing.assert_array_equal(vocab.pretrained_rows, [0, 1, 2, 3])
    assert all(vocab.index[w] == r for w, r in index.items())
    assert vocab.words[4:] == ["zork"] and vocab.num_pretrained == 4
    np.testing.assert_array_equal(vocab.counts, [0, 0, 1, 0, 2])


def test_vocabulary_save_load_round_trip(tmp_path):
    counts = Counter({"the": 10, "cat": 3, "zörk": 4, "don't": 2})
    vocab = build_vocabulary(counts, ["neg", "pos"], PRETRAINED, 1, 0)
    vocab.save(tmp_path / "v")
    back = Vocabulary.load(tmp_path / "v")
    assert back.words == vocab.words
    assert back.num_pretrained == vocab.num_pretrained
    np.testing.assert_array_equal(back.pretrained_rows, vocab.pretrained_rows)
    np.testing.assert_array_equal(back.counts, vocab.counts)
    assert back.labels == vocab.labels
    assert back.fingerprint() == vocab.fingerprint()
    assert back.index == vocab.index


def test_empty_vocabulary_round_trip(tmp_path):
    vocab = build_vocabulary(Counter(), ["a", "b"], None, 1, 0)
    vocab.save(tmp_path / "v")
    assert Vocabulary.load(tmp_path / "v").words == []


def test_fingerprint_changes_with_words_labels_and_split(tmp_path):
    base = build_vocabulary(Counter({"the": 2, "zork": 2}), ["a", "b"], PRETRAINED, 1, 0)
    other_label = build_vocabulary(Counter({"the": 2, "zork": 2}), ["a", "c"], PRETRAINED, 1, 0)
    no_pre = build_vocabulary(Counter({"the": 2, "zork": 2}), ["a", "b"], {"zork": 0}, 1, 0)
    assert len({base.fingerprint(), other_label.fingerprint(), no_pre.fingerprint()}) == 3


def test_words_with_newlines_round_trip(tmp_path):
    """A custom token_pattern can match a newline; the saved vocabulary must not split such a word in two (every
    later id would shift by one in the exported model)."""
    vocab = build_vocabulary(Counter({"a\nb": 3, "c": 2, "d\r": 2}), ["x"], None, 1, 0)
    vocab.save(tmp_path / "v")
    back = Vocabulary.load(tmp_path / "v")
    assert back.words == vocab.words and back.index == vocab.index
    split = Vocabulary(words=["a", "b", "c", "d\r"], num_pretrained=0, pretrained_rows=np.zeros(0, np.int64),
                       counts=np.zeros(4, np.int64), labels=["x"])
    assert split.fingerprint() != vocab.fingerprint()  # the joined texts are equal; the word counts are not


def test_words_with_carriage_returns_round_trip(tmp_path):
    """Without a newline in any word the vocabulary is one word per line (words.txt); a word holding a "\r"
    (a custom token_pattern) must come back as it was, not as two lines."""
    vocab = build_vocabulary(Counter({"first\rsecond": 3, "c": 2, "d\r\u2028e": 2}), ["x"], None, 1, 0)
    vocab.save(tmp_path / "v")
    assert (tmp_path / "v" / "words.txt").exists()
    back = Vocabulary.load(tmp_path / "v")
    assert back.words == vocab.words and back.index == vocab.index


def test_load_accepts_the_fingerprint_of_earlier_versions(tmp_path):
    """Exported models recorded the fingerprint without the list lengths; they still load (and tampering with
    them is still caught)."""
    vocab = build_vocabulary(Counter({"the": 2, "zork": 2}), ["a", "b"], PRETRAINED, 1, 0)
    vocab.save(tmp_path / "v")
    meta_file = tmp_path / "v" / "vocab.json"
    meta = json.loads(meta_file.read_text())
    meta["fingerprint"] = vocab.fingerprint(legacy=True)
    meta_file.write_text(json.dumps(meta))
    assert Vocabulary.load(tmp_path / "v").words == vocab.words
    (tmp_path / "v" / "words.txt").write_text("the\nzorq")
    with pytest.raises(ValueError, match="fingerprint"):
        Vocabulary.load(tmp_path / "v")


def test_load_detects_tampered_files(tmp_path):
    vocab = build_vocabulary(Counter({"the": 2, "zork": 2}), ["a", "b"], PRETRAINED, 1, 0)
    vocab.save(tmp_path / "v")
    (tmp_path / "v" / "words.txt").write_text("the\nzorq")
    with pytest.raises(ValueError, match="fingerprint"):
        Vocabulary.load(tmp_path / "v")


def test_coverage_on_hand_example():
    tok = default_tokenizer()
    counts = tokenize(["The cat the zork", "cat blip blip the"], tok, max_tokens=100).word_counts()
    assert counts == {"the": 3, "cat": 2, "blip": 2, "zork": 1}
    vocab = build_vocabulary(counts, ["x"], {"the": 0, "cat": 1}, min_freq=2, max_vocab=0)
    assert vocab.words == ["the", "cat", "blip"]
    cov = coverage(vocab, counts)
    assert cov["pretrained_type_coverage"] == pytest.approx(2 / 4)
    assert cov["pretrained_token_coverage"] == pytest.approx(5 / 8)
    assert cov["vocab_token_coverage"] == pytest.approx(7 / 8)
    assert (cov["num_types_seen"], cov["num_vocab"], cov["num_pretrained"], cov["num_oov"]) == (4, 3, 2, 1)


def test_word_counts_truncate_each_document():
    counts = tokenize(["a b c d", "a b"], default_tokenizer(), max_tokens=2).word_counts()
    assert counts == {"a": 2, "b": 2}
