"""The default tokenizer's pattern over ASCII text, in numba: the same tokens and type numbering as `re.findall`.

Why: `Tokenizer` runs Python's `re.findall(r"\\w+(?:['’]\\w+)*", text.lower())` per document, about 0.27 us a
token: 0.8 s of the demo's 3M training tokens on one core, and the largest part of building its data cache. Over
ASCII text the pattern is simple: a token is a run of [0-9A-Za-z_], continued by "'" plus another such run as
often as one follows (Python's `\\w` is [0-9A-Za-z_] on ASCII characters, and "’" is not ASCII). Here the ASCII
documents travel as one byte buffer; one kernel finds every token's byte span, and a second numbers the distinct
tokens in order of first appearance through an open-addressing hash table keyed by the bytes themselves (the
hash only picks the slot: two different tokens are never merged). Documents with any non-ASCII character keep
the Python tokenizer (NFC normalisation, Unicode word characters) and join the same numbering.

`tokenize_default_pattern` returns exactly what `features._tokenize_chunk` returns for the same input, array
for array (tests/unit/test_fast_tokenize.py compares them on random and real text); `features.tokenize` uses it
for large inputs, and for any input once it has run in the process (numba is loaded then). The non-ASCII
documents go through Python's `re` in forked workers (`data.workers`) when there are many. Memory: a block of
the text (BLOCK_CHARS) is held about 3 times over while it runs (the lowercased copies, the joined buffer, 24 bytes
per token of spans and hashes); the result is 8 bytes per token.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from functools import partial

import numpy as np

from trainer import jit
from trainer.parallel import chunked_map
from trainer.vocab import DEFAULT_TOKEN_PATTERN, Tokenizer

available = jit.numba is not None

# Below this many characters (and until the kernels have run once in the process) Python's regex is used: numba's
# first kernel call in a process costs about 0.4 s, the time `re` takes for ~10M characters.
MIN_CHARS = 5_000_000
_warm = False


def applies(tokenizer: Tokenizer, max_tokens: int, num_chars: int) -> bool:
    """Whether `tokenize_default_pattern` can and should tokenize this input."""
    return (available and tokenizer.pattern == DEFAULT_TOKEN_PATTERN and max_tokens > 0
            and (_warm or num_chars >= MIN_CHARS))


if available:
    from numba import njit

    _WORD = np.zeros(256, dtype=np.bool_)
    for _c in b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_":
        _WORD[_c] = True
    _APOSTROPHE = ord("'")
    _NEWLINE = ord("\n")

    @njit(cache=jit._CACHE, nogil=True, boundscheck=False, inline="always")
    def _mix(h):
        """SplitMix64's finish, so that FNV-1a's low bits (the slot) depend on every byte."""
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return h ^ (h >> np.uint64(31))

    @njit(cache=jit._CACHE, nogil=True, boundscheck=False, inline="always")
    def _fnv(h, byte):
        return (h ^ np.uint64(byte)) * np.uint64(0x100000001B3)

    @njit(cache=jit._CACHE, nogil=True, boundscheck=False)
    def _scan(buf, doc_starts, doc_ends, word, separated, max_tokens, counts, starts, ends, hashes, d, k):
        """Token spans (start, end) of documents buf[doc_starts[d]:doc_ends[d]] from document d on, at most
        max_tokens each, written from starts[k] on, documents one after another; each token's hash (FNV-1a of
        its bytes, mixed); counts[d] = the document's number of tokens. A document marked `separated` holds
        tokens found already, joined by newlines: its tokens are the runs between them. Stops before a document
        that might not fit in the outputs; returns (next document, tokens written), for the caller to grow them."""
        room = starts.shape[0]
        while d < doc_starts.shape[0]:
            i, end, n = doc_starts[d], doc_ends[d], 0
            if k + min(max_tokens, (end - i + 1) // 2) > room:  # a token and its separator: >= 2 bytes
                return d, k
            while i < end and n < max_tokens:
                h = np.uint64(0xCBF29CE484222325)
                if separated[d]:
                    s = i
                    while i < end and buf[i] != _NEWLINE:
                        h = _fnv(h, buf[i])
                        i += 1
                    e = i
                    i += 1
                    if e == s:
                        continue
                else:
                    if not word[buf[i]]:
                        i += 1
                        continue
                    s = i
                    while i < end and word[buf[i]]:
                        h = _fnv(h, buf[i])
                        i += 1
                    # "'" continues the token only when a word character follows it
                    while i + 1 < end and buf[i] == _APOSTROPHE and word[buf[i + 1]]:
                        h = _fnv(h, _APOSTROPHE)
                        i += 1
                        while i < end and word[buf[i]]:
                            h = _fnv(h, buf[i])
                            i += 1
                    e = i
                starts[k] = s
                ends[k] = e
                hashes[k] = _mix(h)
                k += 1
                n += 1
            counts[d] = n
            d += 1
        return d, k

    @njit(cache=jit._CACHE, nogil=True, boundscheck=False)
    def _number(buf, starts, ends, hashes):
        """Type index of every span, types numbered in order of first appearance, and the types' bytes (type i is
        store[offsets[i]:offsets[i + 1]]). Spans are the same type when their bytes are equal: the hash picks the
        slot and spares most byte comparisons, and the comparisons read the compact store, not the whole buffer
        (0.125 -> 0.079 s for the demo's 3M tokens)."""
        n = starts.shape[0]
        types = np.empty(n, dtype=np.int32)  # features.type_dtype: a block has far fewer than 2**31 types
        cap = 1 << 16
        slots = np.full((cap, 2), -1, dtype=np.int64)  # (type, hash >> 1) side by side: one cache line a probe
        store = np.empty(1 << 16, dtype=np.uint8)
        offsets = np.zeros(1025, dtype=np.int64)
        num_types = 0
        for t in range(n):
            s, e = starts[t], ends[t]
            key = np.int64(hashes[t] >> np.uint64(1))  # non-negative, so -1 marks an empty slot
            mask = cap - 1
            j = key & mask
            while True:
                ty = slots[j, 0]
                if ty < 0:
                    break
                if slots[j, 1] == key and offsets[ty + 1] - offsets[ty] == e - s:
                    a = offsets[ty]
                    same = True
                    for q in range(e - s):
                        if store[a + q] != buf[s + q]:
                            same = False
                            break
                    if same:
                        break
                j = (j + 1) & mask
            if ty >= 0:
                types[t] = ty
                continue
            ty = num_types
            num_types += 1
            if ty + 2 > offsets.shape[0]:
                grown = np.zeros(2 * offsets.shape[0], dtype=np.int64)
                grown[: ty + 1] = offsets[: ty + 1]
                offsets = grown
            a = offsets[ty]
            if a + (e - s) > store.shape[0]:
                bigger = np.empty(2 * (a + (e - s)), dtype=np.uint8)
                bigger[:a] = store[:a]
                store = bigger
            store[a : a + (e - s)] = buf[s:e]
            offsets[ty + 1] = a + (e - s)
            slots[j, 0] = ty
            slots[j, 1] = key
            types[t] = ty
            if 2 * num_types > cap:  # keep the table at most half full: rehash into twice the slots
                cap *= 2
                mask = cap - 1
                rehashed = np.full((cap, 2), -1, dtype=np.int64)
                for old in range(slots.shape[0]):
                    if slots[old, 0] >= 0:
                        k = slots[old, 1] & mask
                        while rehashed[k, 0] >= 0:
                            k = (k + 1) & mask
                        rehashed[k, 0] = slots[old, 0]
                        rehashed[k, 1] = slots[old, 1]
                slots = rehashed
        return types, store[: offsets[num_types]].copy(), offsets[: num_types + 1].copy()


def _newline_joined_tokens(texts: Sequence[str], tokenizer: Tokenizer, max_tokens: int) -> list[str]:
    # the Python tokenizer (NFC, Unicode word characters); its tokens hold no newline
    return ["\n".join(tokenizer(text)[:max_tokens]) for text in texts]


# Characters of text tokenized at a time. Why blocks: the joined text, its lowercased copies and 24 bytes per token
# of spans and hashes are held for one block, not the whole input; an 800 MB CSV (1.9M documents, 120M tokens) took
# the build to 7.4 GiB of resident memory in one piece. Each block's distinct words join one numbering through a
# dict (about 0.03 s per block of 64M characters), so the result is the one-block result.
BLOCK_CHARS = 64 << 20


def tokenize_default_pattern(texts: Sequence[str], tokenizer: Tokenizer, max_tokens: int, workers: int = 1,
                             block_chars: int = BLOCK_CHARS):
    """`features._tokenize_chunk(texts, tokenizer, max_tokens)`, computed by the kernels above (see the module
    docstring); needs `applies(...)`. `workers`: processes for the non-ASCII documents (`parallel.chunked_map`).
    The documents go in blocks of about `block_chars` characters (BLOCK_CHARS)."""
    from trainer.features import TokenizedDocs  # features imports this module

    num_chars = sum(map(len, texts))
    if workers > 1 and num_chars >= 2 * block_chars:
        # more than one block: the blocks go to forked workers, a contiguous share each (`parallel.chunked_map`),
        # each worker tokenizing its share block by block; their numberings join in share order
        docs_per_worker = max(1, len(texts) * block_chars // num_chars)
        parts = chunked_map(partial(_tokenize_blocks, tokenizer=tokenizer, max_tokens=max_tokens, workers=1,
                                    block_chars=block_chars), texts, workers, docs_per_worker)
        return parts[0] if len(parts) == 1 else TokenizedDocs.joined(parts)
    return _tokenize_blocks(texts, tokenizer, max_tokens, workers, block_chars)


def _tokenize_blocks(texts: Sequence[str], tokenizer: Tokenizer, max_tokens: int, workers: int, block_chars: int):
    from trainer.features import TokenizedDocs, document_blocks

    char_offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, texts), dtype=np.int64, count=len(texts)), out=char_offsets[1:])
    blocks = document_blocks(char_offsets, block_chars)
    if len(blocks) <= 1:
        return _tokenize_block(texts, tokenizer, max_tokens, workers)
    return TokenizedDocs.joined([_tokenize_block(texts[a:b], tokenizer, max_tokens, workers) for a, b in blocks])


def _tokenize_block(texts: Sequence[str], tokenizer: Tokenizer, max_tokens: int, workers: int):
    from trainer.features import TOKENIZE_MIN_DOCS_PER_WORKER, TokenizedDocs

    global _warm
    num_docs = len(texts)
    parts = list(texts)
    separated = np.zeros(num_docs, dtype=np.bool_)
    num_bytes = np.empty(num_docs, dtype=np.int64)
    others = []
    for d, text in enumerate(parts):
        if text.isascii():
            if tokenizer.lowercase:
                parts[d] = text.lower()  # ASCII in, ASCII out, the same length
            num_bytes[d] = len(text)
        else:
            others.append(d)
    if others:
        chunks = chunked_map(partial(_newline_joined_tokens, tokenizer=tokenizer, max_tokens=max_tokens),
                             [texts[d] for d in others], workers, TOKENIZE_MIN_DOCS_PER_WORKER)
        for d, joined in zip(others, itertools.chain.from_iterable(chunks), strict=True):
            parts[d] = joined
            separated[d] = True
            num_bytes[d] = len(joined.encode("utf-8", "surrogatepass"))
    # "\n" is no word character: no token spans two documents
    buf = np.frombuffer("\n".join(parts).encode("utf-8", "surrogatepass"), dtype=np.uint8)
    doc_starts = np.zeros(num_docs, dtype=np.int64)
    np.cumsum(num_bytes[:-1] + 1, out=doc_starts[1:])
    doc_ends = doc_starts + num_bytes

    doc_lengths = np.zeros(num_docs, dtype=np.int64)
    size = len(buf) // 6 + 16  # English text: about one token per 6.5 bytes
    starts, ends = np.empty(size, dtype=np.int64), np.empty(size, dtype=np.int64)
    hashes = np.empty(size, dtype=np.uint64)
    d = k = 0
    while True:
        d, k = _scan(buf, doc_starts, doc_ends, _WORD, separated, max_tokens, doc_lengths, starts, ends, hashes, d, k)
        if d == num_docs:
            break
        size = 2 * size + min(max_tokens, int(doc_ends[d] - doc_starts[d] + 1) // 2)
        starts, ends, hashes = (np.concatenate([x[:k], np.empty(size - k, dtype=x.dtype)]) for x in (starts, ends, hashes))
    starts, ends, hashes = starts[:k], ends[:k], hashes[:k]
    types, store, offsets = _number(buf, starts, ends, hashes)
    _warm = True
    raw = store.tobytes()
    bounds = offsets.tolist()
    type_words = [raw[a:b].decode("utf-8", "surrogatepass") for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return TokenizedDocs(types, type_words, doc_lengths)
