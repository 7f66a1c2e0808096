"""Featurizer.encode, EncodedDocs save/load and collate, checked by hand on tiny documents."""

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainer import jit
from trainer.batch import collate
from trainer.config import DataConfig
from trainer.features import EncodedDocs, Featurizer, tokenize
from trainer.jit import fused_kernels_enabled
from trainer.vocab import Tokenizer, Vocabulary, bigram_buckets, char_ngram_buckets, stable_hash64

# ids: the=0 cat=1 (pretrained) | zork=2 blip=3 (OOV); "dog" is unknown
VOCAB = Vocabulary(
    words=["the", "cat", "zork", "blip"],
    num_pretrained=2,
    pretrained_rows=np.array([7, 3]),
    counts=np.array([5, 4, 3, 2]),
    labels=["neg", "pos"],
)
P = VOCAB.num_pretrained
TEXTS = ["The cat zork", "dog", "", "blip the dog cat"]
LABELS = ["pos", "neg", "neg", "other"]


def featurizer(ngram_buckets: int = 0, char_buckets: int = 0, max_tokens: int = 100) -> Featurizer:
    return Featurizer(
        Tokenizer(DataConfig().token_pattern, True), VOCAB, ngram_buckets, char_buckets, 3, 3, max_tokens
    )


def csr(values: np.ndarray, offsets: np.ndarray) -> list[list[int]]:
    return [np.asarray(values[offsets[i] : offsets[i + 1]]).tolist() for i in range(len(offsets) - 1)]


def pair_bucket(a: str, b: str, buckets: int) -> int:
    return int(bigram_buckets(np.array([stable_hash64(a), stable_hash64(b)], dtype=np.uint64), buckets)[0])


# ---------------------------------------------------------------- encode
def test_encode_word_ids_without_ngrams():
    docs = featurizer().encode(TEXTS, LABELS)
    assert len(docs) == 4
    # unknown words are dropped when there are no character n-grams to carry them
    assert csr(docs.token_ids, docs.token_offsets) == [[0, 1, 2], [], [], [3, 0, 1]]
    assert docs.raw_tokens.tolist() == [3, 1, 0, 4]
    assert docs.labels.tolist() == [1, 0, 0, -1]  # "other" was never seen in training
    assert len(docs.bigram_ids) == 0 and docs.bigram_offsets.tolist() == [0] * 5
    assert len(docs.char_ids) == 0 and docs.char_offsets.tolist() == [0] * 5
    assert docs.char_token_counts.tolist() == [0] * 6


def test_encode_without_labels_marks_all_unknown():
    assert featurizer().encode(["the cat"]).labels.tolist() == [-1]


def test_encode_truncates_to_max_tokens():
    docs = featurizer(max_tokens=2).encode(["the cat zork blip"])
    assert csr(docs.token_ids, docs.token_offsets) == [[0, 1]]
    assert docs.raw_tokens.tolist() == [2]


def test_tokenize_once_gives_counts_and_the_same_encoding():
    # the training split is tokenized once: its word counts (for the vocabulary) and its encoding come from it
    tok = Tokenizer(DataConfig().token_pattern, True)
    tokenized = tokenize(TEXTS, tok, 3)
    assert tokenized.type_words == ["the", "cat", "zork", "dog", "blip"]  # first appearance
    assert tokenized.types.tolist() == [0, 1, 2, 3, 4, 0, 3]  # "blip the dog" (truncated to 3)
    assert tokenized.doc_lengths.tolist() == [3, 1, 0, 3]
    assert tokenized.word_counts() == {"the": 2, "cat": 1, "zork": 1, "dog": 2, "blip": 1}
    f = featurizer(ngram_buckets=97, char_buckets=50, max_tokens=3)
    direct, reused = f.encode(TEXTS, LABELS), f.encode_tokenized(tokenized, LABELS)
    for name in ("token_ids", "token_offsets", "raw_tokens", "bigram_ids", "bigram_offsets", "char_ids",
                 "char_offsets", "labels"):
        assert np.array_equal(getattr(direct, name), getattr(reused, name)), name


def test_bigrams_per_document_no_pairs_across_documents():
    buckets = 1 << 40
    docs = featurizer(ngram_buckets=buckets).encode(TEXTS, LABELS)
    per_doc = csr(docs.bigram_ids, docs.bigram_offsets)
    assert [len(b) for b in per_doc] == [2, 0, 0, 3]  # tokens - 1, unknown words included, empty doc -> 0
    assert per_doc[0] == [pair_bucket("the", "cat", buckets), pair_bucket("cat", "zork", buckets)]
    assert per_doc[3] == [
        pair_bucket("blip", "the", buckets),
        pair_bucket("the", "dog", buckets),
        pair_bucket("dog", "cat", buckets),
    ]
    # no pair joins the last token of one document to the first of the next
    straddling = {pair_bucket("zork", "dog", buckets), pair_bucket("dog", "blip", buckets)}
    assert not straddling & set(docs.bigram_ids.tolist())


def test_bigrams_with_single_token_documents_in_a_row():
    buckets = 1 << 40
    docs = featurizer(ngram_buckets=buckets).encode(["the", "cat", "zork blip", "", "dog"])
    per_doc = csr(docs.bigram_ids, docs.bigram_offsets)
    assert per_doc == [[], [], [pair_bucket("zork", "blip", buckets)], [], []]


def test_char_ids_per_token_and_unknown_words_kept():
    buckets = 1000
    docs = featurizer(char_buckets=buckets).encode(TEXTS, LABELS)
    # with char n-grams, unknown words stay as -1 so they contribute their subwords
    assert csr(docs.token_ids, docs.token_offsets) == [[0, 1, 2], [-1], [], [3, 0, -1, 1]]
    words = ["the", "cat", "zork", "dog", "blip", "the", "dog", "cat"]
    expected = [char_ngram_buckets(w, 3, 3, buckets) for w in words]
    assert docs.char_token_counts.tolist() == [len(e) for e in expected] == [len(w) for w in words]
    np.testing.assert_array_equal(docs.char_ids, np.concatenate(expected))
    per_doc = [sum(len(w) for w in doc.split()) for doc in ("the cat zork", "dog", "", "blip the dog cat")]
    assert np.diff(docs.char_offsets).tolist() == per_doc


def test_encode_empty_inputs():
    docs = featurizer(ngram_buckets=10, char_buckets=10).encode([])
    assert len(docs) == 0
    assert docs.token_offsets.tolist() == [0]
    docs = featurizer(ngram_buckets=10, char_buckets=10).encode(["", "..."])
    assert docs.token_offsets.tolist() == [0, 0, 0]
    assert docs.bigram_offsets.tolist() == [0, 0, 0] and docs.char_offsets.tolist() == [0, 0, 0]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts=st.lists(st.lists(st.sampled_from(["the", "cat", "zork", "blip", "dog", "x"]), max_size=7).map(" ".join),
                      max_size=9),
       ngram_buckets=st.sampled_from([0, 13]), char_buckets=st.sampled_from([0, 11]), max_tokens=st.sampled_from([2, 100]))
def test_encoding_in_blocks_of_documents_gives_the_one_block_arrays(texts, ngram_buckets, char_buckets, max_tokens):
    """Blocks of 1-5 tokens: documents split into blocks of their own, empty documents at a block's edge, unknown
    words (kept for their char n-grams, or dropped), bigrams that would straddle two blocks."""
    f = featurizer(ngram_buckets, char_buckets, max_tokens)
    tokenized = tokenize(texts, f.tokenizer, max_tokens)
    whole = f.encode_tokenized(tokenized, ["pos"] * len(texts), block_tokens=10**9)
    for block_tokens in (1, 2, 5):
        blocked = f.encode_tokenized(tokenized, ["pos"] * len(texts), block_tokens=block_tokens)
        for name, array in vars(whole).items():
            got = getattr(blocked, name)
            assert got.dtype == array.dtype == np.int64 and np.array_equal(got, array), (name, block_tokens)
        assert_folder_encoding_is_saves(f, tokenized, whole, block_tokens)


def assert_folder_encoding_is_saves(f, tokenized, whole, block_tokens):
    """Encoded straight into a folder (encoded.FolderSink: pieces appended block by block) = the in-memory
    arrays saved (`EncodedDocs.save`): the same files, byte for byte, and the same arrays loaded."""
    with tempfile.TemporaryDirectory() as tmp:
        whole.save(Path(tmp) / "saved")
        streamed = f.encode_tokenized(tokenized, ["pos"] * len(whole), block_tokens=block_tokens,
                                      folder=Path(tmp) / "streamed")
        saved = {p.name: p.read_bytes() for p in (Path(tmp) / "saved").iterdir()}
        written = {p.name: p.read_bytes() for p in (Path(tmp) / "streamed").iterdir()}
        assert written == saved, block_tokens
        for name, array in vars(whole).items():
            got = getattr(streamed, name)
            assert isinstance(got, np.memmap) or name == "char_token_counts", name
            assert np.array_equal(got, array), (name, block_tokens)


@pytest.mark.skipif(jit.numba is None, reason="numba is not installed: numpy makes the pairs")
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(0, 6), max_size=10), buckets=st.sampled_from([1, 7, 1_000_003, 2**40 + 5]),
       seed=st.integers(0, 2**32 - 1))
def test_document_bigrams_kernel_gives_numpys_buckets(monkeypatch, lengths, buckets, seed):
    """The monkeypatched settings are set anew in every example, so sharing the fixture between them is safe."""
    from trainer import features

    rng = np.random.default_rng(seed)
    type_hash = rng.integers(0, 2**64, size=20, dtype=np.uint64, endpoint=False)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    types = rng.integers(0, 20, size=int(offsets[-1]))
    size = int(np.maximum(np.array(lengths, dtype=np.int64) - 1, 0).sum())
    got = {}
    for threshold in (0, 10**9):  # the kernel, then numpy
        monkeypatch.setattr(features, "PAIRS_MIN_FOR_NUMBA", threshold)
        monkeypatch.setattr(features.fast_tokenize, "_warm", False)
        got[threshold] = np.full(size, -1, dtype=np.int64)
        features.document_bigrams(type_hash, types, offsets, buckets, got[threshold])
    assert np.array_equal(got[0], got[10**9]) and (got[0] >= 0).all() and (got[0] < buckets).all()
    signed = np.full(size, -1, dtype=np.int64)  # the same hashes as int64: the kernel must not mix them as floats
    monkeypatch.setattr(features, "PAIRS_MIN_FOR_NUMBA", 0)
    features.document_bigrams(type_hash.view(np.int64), types, offsets, buckets, signed)
    assert np.array_equal(signed, got[0])


@pytest.mark.parametrize(("lengths", "block", "expected"), [
    ([], 4, []),
    ([3], 1, [(0, 1)]),
    ([2, 0, 2, 5, 0, 1], 4, [(0, 3), (3, 4), (4, 6)]),  # tokens end at 2, 2, 4, 9, 9, 10
    ([0, 0], 1, [(0, 2)]),
])
def test_document_blocks(lengths, block, expected):
    from trainer.features import document_blocks

    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    assert document_blocks(offsets, block) == expected


# ---------------------------------------------------------------- save / load
@pytest.mark.parametrize("n", [0, 1, 5, 20_000])
def test_ids_saved_in_chunks_are_np_saves_bytes(tmp_path, n):
    from trainer.encoded import _save_converted

    ids = np.random.default_rng(n).integers(-1, 2**31 - 2, size=n)
    np.save(tmp_path / "whole.npy", ids.astype(np.int32))
    _save_converted(tmp_path / "chunks.npy", ids, np.dtype(np.int32), chunk=777)
    assert (tmp_path / "chunks.npy").read_bytes() == (tmp_path / "whole.npy").read_bytes()
    assert np.array_equal(np.load(tmp_path / "chunks.npy", mmap_mode="r"), ids)


def test_encoded_docs_save_load_memmap(tmp_path):
    docs = featurizer(ngram_buckets=1000, char_buckets=1000).encode(TEXTS, LABELS)
    docs.save(tmp_path / "enc")
    back = EncodedDocs.load(tmp_path / "enc")
    for name in (
        "token_ids",
        "token_offsets",
        "raw_tokens",
        "bigram_ids",
        "bigram_offsets",
        "char_ids",
        "char_token_counts",
        "char_offsets",
        "labels",
    ):
        got, want = getattr(back, name), getattr(docs, name)
        assert isinstance(got, np.memmap), name
        np.testing.assert_array_equal(got, want, err_msg=name)
    assert back.token_ids.dtype == np.int32  # ids stored compactly
    # the memory-mapped copy collates exactly like the in-memory one
    rows = np.array([3, 0])
    a, b = collate(docs, rows, P, False), collate(back, rows, P, False)
    for name in a.tables:
        for x, y in zip(a.tables[name], b.tables[name], strict=True):
            assert x.dtype == y.dtype == torch.int64
            assert torch.equal(x, y)


def test_zero_char_counts_are_not_written_and_load_as_zeros(tmp_path):
    """Without char n-grams every token's count is 0: 8 bytes a token on disk for nothing. A cache written before
    this (with the file) loads as it did."""
    docs = featurizer(ngram_buckets=1000).encode(TEXTS, LABELS)
    docs.save(tmp_path / "enc")
    assert not (tmp_path / "enc" / "char_token_counts.npy").exists()
    back = EncodedDocs.load(tmp_path / "enc")
    assert back.char_token_counts.dtype == np.int64 and np.array_equal(back.char_token_counts, docs.char_token_counts)
    assert len(back.char_token_counts) == len(back.token_ids) > 0
    rows = np.array([3, 0, 1])
    for fused in (False, True):
        a, b = collate(docs, rows, P, False, fused=fused), collate(back, rows, P, False, fused=fused)
        assert all(torch.equal(x, y) for name in a.tables for x, y in zip(a.tables[name], b.tables[name], strict=True))
    np.save(tmp_path / "enc" / "char_token_counts.npy", docs.char_token_counts)  # the earlier layout
    assert np.array_equal(EncodedDocs.load(tmp_path / "enc").char_token_counts, docs.char_token_counts)
    with_chars = featurizer(char_buckets=50).encode(TEXTS, LABELS)
    with_chars.save(tmp_path / "chars")
    (tmp_path / "chars" / "char_token_counts.npy").unlink()  # a damaged copy: counts needed, file gone
    with pytest.raises(FileNotFoundError, match="char_token_counts.npy: missing beside .* char n-gram ids"):
        EncodedDocs.load(tmp_path / "chars")


# ---------------------------------------------------------------- collate
def test_collate_bag_mode_by_hand():
    docs = featurizer(ngram_buckets=1 << 40).encode(TEXTS, ["pos", "neg", "neg", "pos"])
    batch = collate(docs, np.array([3, 1, 0]), P, token_level=False)
    pre_ids, pre_off = batch.tables["pretrained"]
    oov_ids, oov_off = batch.tables["oov"]
    # doc 3: blip(3) the(0) cat(1); doc 1: nothing; doc 0: the(0) cat(1) zork(2)
    assert pre_ids.tolist() == [0, 1, 0, 1] and pre_off.tolist() == [0, 2, 2]
    assert oov_ids.tolist() == [3 - P, 2 - P] and oov_off.tolist() == [0, 1, 1]
    big_ids, big_off = batch.tables["bigram"]
    assert big_off.tolist() == [0, 3, 3] and len(big_ids) == 5
    assert batch.tables["char"][1].tolist() == [0, 0, 0]
    assert batch.labels.tolist() == [1, 0, 1]
    # looked-up ids per document: words + bigrams (+ chars)
    assert batch.lengths.tolist() == [3 + 3, 0 + 0, 3 + 2]
    assert batch.seq_lengths.tolist() == [3, 0, 3]
    assert batch.num_docs == 3
    assert batch.num_tokens == 4 + 1 + 3  # raw tokenizer tokens, unknown words included


def test_collate_bag_mode_with_chars_counts_unknown_words_only_by_their_chars():
    docs = featurizer(char_buckets=1000).encode(["dog cat"], ["pos"])
    batch = collate(docs, np.array([0]), P, token_level=False)
    assert batch.tables["pretrained"][0].tolist() == [1]
    assert batch.tables["char"][1].tolist() == [0] and len(batch.tables["char"][0]) == 6
    assert batch.lengths.tolist() == [1 + 6]
    assert batch.seq_lengths.tolist() == [2]


@pytest.mark.parametrize("stored", [False, True])
def test_the_fused_collate_equals_the_numpy_path(tmp_path, stored):
    if not fused_kernels_enabled():
        pytest.skip("numba is not installed: both would be the numpy path")
    texts = ["The cat zork dog", "", "dog dog", "blip the dog cat cat the", "zork", "cat"] * 3
    docs = featurizer(ngram_buckets=1 << 20, char_buckets=1000).encode(texts, ["pos", "neg", "other"] * 6)
    if stored:  # int32 ids, memory-mapped, as training reads them
        docs.save(tmp_path / "docs")
        docs = EncodedDocs.load(tmp_path / "docs")
    for rows in (np.array([3, 1, 0, 17, 2, 2]), np.array([1]), np.arange(len(texts))[::-1], np.array([], dtype=np.int64)):
        fused = collate(docs, rows, P, token_level=False, fused=True)
        plain = collate(docs, rows, P, token_level=False)
        assert fused.tables.keys() == plain.tables.keys()
        for name in plain.tables:
            for x, y in zip(fused.tables[name], plain.tables[name], strict=True):
                assert x.dtype == y.dtype and torch.equal(x, y), name
        for name in ("labels", "lengths", "seq_lengths"):
            x, y = getattr(fused, name), getattr(plain, name)
            assert x.dtype == y.dtype and torch.equal(x, y), name
        assert (fused.num_docs, fused.num_tokens) == (plain.num_docs, plain.num_tokens)


def test_the_fused_collate_refuses_rows_and_offsets_out_of_range():
    if not fused_kernels_enabled():
        pytest.skip("numba is not installed")
    docs = featurizer(ngram_buckets=64).encode(TEXTS, ["pos", "neg", "neg", "pos"])
    for bad in (4, -1):
        with pytest.raises(IndexError, match="out of range"):
            collate(docs, np.array([0, bad]), P, token_level=False, fused=True)
    past_end = docs.bigram_offsets.copy()
    past_end[-1] += 5  # the last document's bigrams would run past the ids
    with pytest.raises(ValueError, match="offsets"):
        collate(EncodedDocs(**{**vars(docs), "bigram_offsets": past_end}), np.array([3]), P, False, fused=True)
    with pytest.raises(ValueError, match="disagree"):
        collate(EncodedDocs(**{**vars(docs), "raw_tokens": docs.raw_tokens[:2]}), np.array([0]), P, False, fused=True)


def test_collate_token_level_by_hand():
    docs = featurizer(char_buckets=1000).encode(TEXTS, ["pos", "neg", "neg", "pos"])
    batch = collate(docs, np.array([0, 2, 3, 1]), P, token_level=True)
    # segments are kept tokens: doc 0 [the cat zork], doc 2 [], doc 3 [blip the dog cat], doc 1 [dog]
    pre_ids, pre_off = batch.tables["pretrained"]
    oov_ids, oov_off = batch.tables["oov"]
    assert batch.seq_lengths.tolist() == [3, 0, 4, 1]
    assert pre_ids.tolist() == [0, 1, 0, 1]
    assert pre_off.tolist() == [0, 1, 2, 2, 2, 3, 3, 4]  # one segment per token: 1 if pretrained else 0
    assert oov_ids.tolist() == [0, 1]  # zork (2-P), blip (3-P)
    assert oov_off.tolist() == [0, 0, 0, 1, 2, 2, 2, 2]
    char_ids, char_off = batch.tables["char"]
    lens = [3, 3, 4, 4, 3, 3, 3, 3]  # the cat zork | blip the dog cat | dog
    assert char_off.tolist() == np.concatenate([[0], np.cumsum(lens)[:-1]]).tolist()
    assert len(char_ids) == sum(lens)
    assert batch.tables["bigram"][1].tolist() == [0] * 8 and len(batch.tables["bigram"][0]) == 0
    assert batch.lengths.tolist() == [3 + 10, 0, 3 + 13, 0 + 3]


def test_collate_empty_document_only():
    docs = featurizer().encode([""], ["pos"])
    for token_level in (False, True):
        batch = collate(docs, np.array([0]), P, token_level=token_level)
        assert batch.lengths.tolist() == [0.0]
        assert batch.seq_lengths.tolist() == [0]
        assert batch.tables["pretrained"][0].numel() == 0


def test_collate_no_rows():
    docs = featurizer().encode(TEXTS, ["pos"] * 4)
    batch = collate(docs, np.zeros(0, dtype=np.int64), P, token_level=False)
    assert batch.num_docs == 0 and batch.labels.numel() == 0
    assert batch.tables["pretrained"][1].numel() == 0


@pytest.mark.parametrize("token_level", [False, True])
def test_collate_is_a_row_selection(token_level):
    """Collating rows [a, b] equals concatenating what rows [a] and [b] give."""
    docs = featurizer(char_buckets=50).encode(TEXTS, ["pos"] * 4)
    both = collate(docs, np.array([3, 0]), P, token_level)
    a, b = collate(docs, np.array([3]), P, token_level), collate(docs, np.array([0]), P, token_level)
    for name in both.tables:
        assert torch.equal(both.tables[name][0], torch.cat([a.tables[name][0], b.tables[name][0]]))
    assert torch.equal(both.lengths, torch.cat([a.lengths, b.lengths]))


# ---------------------------------------------------------------- streamed encoding: guards
def test_folder_sink_keeps_large_bucket_ids_in_int64_and_refuses_pieces_out_of_order(tmp_path):
    from trainer.encoded import FolderSink

    sizes = {"token_ids": 3, "bigram_ids": 2, "char_ids": 0, "char_token_counts": 3}
    sink = FolderSink(tmp_path / "a", sizes, {"token_ids": 10, "bigram_ids": 2**31, "char_ids": 0}, char_ngrams=False)
    sink.span("token_ids", 0, 2)[:] = [4, 5]
    sink.span("bigram_ids", 0, 2)[:] = [2**31 - 1, 7]  # bucket 2**31 - 1 exists: 4 bytes would not hold every id
    sink.span("char_token_counts", 0, 2)[:] = 0  # without char n-grams: never written
    sink.end_block()
    sink.span("token_ids", 2, 3)[:] = [-1]
    docs = sink.finish(token_offsets=np.array([0, 3]), raw_tokens=np.array([3]), bigram_offsets=np.array([0, 2]),
                       char_offsets=np.array([0, 0]), labels=np.array([1]))
    assert docs.token_ids.dtype == np.int32 and docs.token_ids.tolist() == [4, 5, -1]
    assert docs.bigram_ids.dtype == np.int64 and docs.bigram_ids.tolist() == [2**31 - 1, 7]
    assert (tmp_path / "a" / "bigram_ids.npy").read_bytes() == _saved_bytes(tmp_path, docs.bigram_ids)
    assert not (tmp_path / "a" / "char_token_counts.npy").exists() and docs.char_token_counts.tolist() == [0, 0, 0]

    # the same bound, but ids that fit in int32 after all: converted at finish, as save stores them
    sink = FolderSink(tmp_path / "d", sizes, {"token_ids": 10, "bigram_ids": 2**31, "char_ids": 0}, char_ngrams=True)
    sink.span("token_ids", 0, 3)[:] = [1, 2, 3]
    sink.span("bigram_ids", 0, 2)[:] = [2**31 - 2, 7]
    sink.span("char_token_counts", 0, 3)[:] = 0  # with char n-grams, but all zero: removed, as save leaves it out
    docs = sink.finish(token_offsets=np.array([0, 3]), raw_tokens=np.array([3]), bigram_offsets=np.array([0, 2]),
                       char_offsets=np.array([0, 0]), labels=np.array([1]))
    assert docs.bigram_ids.dtype == np.int32 and docs.bigram_ids.tolist() == [2**31 - 2, 7]
    assert (tmp_path / "d" / "bigram_ids.npy").read_bytes() == _saved_bytes(tmp_path, docs.bigram_ids)
    assert not (tmp_path / "d" / "char_token_counts.npy").exists() and not docs.char_token_counts.any()

    sink = FolderSink(tmp_path / "b", sizes, {"token_ids": 10, "bigram_ids": 5, "char_ids": 0}, char_ngrams=False)
    sink.span("token_ids", 1, 3)
    with pytest.raises(AssertionError, match="token_ids piece at 1, 0 written so far"):
        sink.end_block()
    sink.close()
    sink = FolderSink(tmp_path / "c", sizes, {"token_ids": 10, "bigram_ids": 5, "char_ids": 0}, char_ngrams=False)
    sink.span("token_ids", 0, 2)
    with pytest.raises(AssertionError, match="not filled"):
        sink.finish(token_offsets=np.array([0, 3]))


def _saved_bytes(tmp_path, ids):
    """The bytes EncodedDocs.save writes for these ids."""
    from trainer.encoded import INT32_MAX

    path = tmp_path / "saved_ids.npy"
    ids = np.asarray(ids, dtype=np.int64)
    np.save(path, ids.astype(np.int32) if ids.max(initial=0) < INT32_MAX else ids)
    return path.read_bytes()


def test_joined_parts_are_int32_and_consumed():
    from trainer.features import TokenizedDocs

    a = TokenizedDocs(np.array([0, 1, 0], dtype=np.int32), ["x", "y"], np.array([2, 1]))
    b = TokenizedDocs(np.array([0, 1], dtype=np.int32), ["z", "x"], np.array([2]))
    parts = [a, b]
    joined = TokenizedDocs.joined(parts)
    assert parts == []  # each part is dropped once copied
    assert joined.types.dtype == np.int32 and joined.types.tolist() == [0, 1, 0, 2, 0]
    assert joined.type_words == ["x", "y", "z"] and joined.doc_lengths.tolist() == [2, 1, 2]


@settings(max_examples=60, deadline=None)
@given(texts=st.lists(st.text(alphabet="abc d\n", max_size=30), min_size=0, max_size=25),
       max_tokens=st.integers(1, 40))
def test_pieces_are_the_documents_of_their_slice_over_only_their_words(texts, max_tokens):
    """`TokenizedDocs.pieces` (trainer eval scores a batch a piece at a time): consecutive whole documents, about
    `max_tokens` tokens each, every piece the tokens of its own texts over the words it uses, each once."""
    tok = Tokenizer(r"\w+", True)
    tokenized = tokenize(texts, tok, 1000)
    covered = 0
    for docs, piece in tokenized.pieces(max_tokens):
        assert docs.start == covered and docs.stop > docs.start
        alone = tokenize(texts[docs], tok, 1000)
        assert [piece.type_words[t] for t in piece.types] == [alone.type_words[t] for t in alone.types]
        assert np.array_equal(piece.doc_lengths, alone.doc_lengths)
        assert sorted(piece.type_words) == sorted(alone.type_words)  # only its own words, each once
        assert int(piece.doc_lengths.sum()) <= max_tokens or docs.stop - docs.start == 1
        covered = docs.stop
    assert covered == len(texts)
