"""BLAKE2b-64 of many short strings at once, in numba, bit for bit what `hashlib.blake2b(digest_size=8)` gives.

Why: every hashed feature id (a word's hash for its bigram buckets, and each of a word's char n-grams for its
char buckets: `vocab.stable_hash64`) is a BLAKE2b digest, fixed by the exported models' bucket ids. Called once
per string from Python, hashlib costs about 0.7 us a call, nearly all of it call overhead: the demo's 1.37M char
n-grams of its training words took 0.91 s. Here the strings travel as one UTF-8 buffer with offsets and the
compression function (RFC 7693: 12 rounds of G over a 16-word state, held in scalars) runs in a loop: 0.32 s.
Any length is hashed, over as many 128-byte blocks as it takes. tests/unit/test_blake2b.py compares it with
hashlib on random strings (lone surrogates included) and at the block edges. `features.word_hashes` and
`features.char_bucket_runs` use it for large inputs; small ones, and machines without numba, keep hashlib.
"""

from __future__ import annotations

import numpy as np

from trainer import jit

IV = np.array([0x6A09E667F3BCC908, 0xBB67AE8584CAA73B, 0x3C6EF372FE94F82B, 0xA54FF53A5F1D36F1,
               0x510E527FADE682D1, 0x9B05688C2B3E6C1F, 0x1F83D9ABFB41BD6B, 0x5BE0CD19137E2179], dtype=np.uint64)
SIGMA = np.array([
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
    [14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3],
    [11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4],
    [7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8],
    [9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13],
    [2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9],
    [12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11],
    [13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10],
    [6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5],
    [10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0],
], dtype=np.int64)
# parameter block word 0 for an 8-byte digest, no key, fanout 1, depth 1
PARAM0 = np.uint64(0x01010000 ^ 8)

available = jit.numba is not None

if available:
    from numba import njit

    @njit(cache=jit._CACHE, nogil=True, boundscheck=False, inline="always")
    def _rotr(x, n):
        return (x >> np.uint64(n)) | (x << np.uint64(64 - n))

    @njit(cache=jit._CACHE, nogil=True, boundscheck=False, inline="always")
    def _g(a, b, c, d, x, y):
        a = a + b + x
        d = _rotr(d ^ a, 32)
        c = c + d
        b = _rotr(b ^ c, 24)
        a = a + b + y
        d = _rotr(d ^ a, 16)
        c = c + d
        b = _rotr(b ^ c, 63)
        return a, b, c, d

    @njit(cache=jit._CACHE, nogil=True, boundscheck=False)
    def _digest(data, start, stop, iv, sigma, m):
        """BLAKE2b-64 of data[start:stop] (uint8), as the little-endian uint64 of its 8-byte digest. The state
        is held in scalars (registers), not an array: 3x faster."""
        h0, h1, h2, h3 = iv[0] ^ PARAM0, iv[1], iv[2], iv[3]
        h4, h5, h6, h7 = iv[4], iv[5], iv[6], iv[7]
        length = stop - start
        done = 0
        while True:
            last = length - done <= 128
            block = 128 if not last else length - done
            # the message block as 16 little-endian words, zero-padded past the end
            m[:] = 0
            base = start + done
            for i in range(block):
                m[i >> 3] |= np.uint64(data[base + i]) << np.uint64(8 * (i & 7))
            done += block
            v0, v1, v2, v3, v4, v5, v6, v7 = h0, h1, h2, h3, h4, h5, h6, h7
            v8, v9, v10, v11 = iv[0], iv[1], iv[2], iv[3]
            v12 = iv[4] ^ np.uint64(done)  # the byte counter's low word; strings here are far below 2**64 bytes
            v13 = iv[5]
            v14 = ~iv[6] if last else iv[6]
            v15 = iv[7]
            for r in range(12):
                s = sigma[r % 10]
                v0, v4, v8, v12 = _g(v0, v4, v8, v12, m[s[0]], m[s[1]])
                v1, v5, v9, v13 = _g(v1, v5, v9, v13, m[s[2]], m[s[3]])
                v2, v6, v10, v14 = _g(v2, v6, v10, v14, m[s[4]], m[s[5]])
                v3, v7, v11, v15 = _g(v3, v7, v11, v15, m[s[6]], m[s[7]])
                v0, v5, v10, v15 = _g(v0, v5, v10, v15, m[s[8]], m[s[9]])
                v1, v6, v11, v12 = _g(v1, v6, v11, v12, m[s[10]], m[s[11]])
                v2, v7, v8, v13 = _g(v2, v7, v8, v13, m[s[12]], m[s[13]])
                v3, v4, v9, v14 = _g(v3, v4, v9, v14, m[s[14]], m[s[15]])
            h0 ^= v0 ^ v8
            h1 ^= v1 ^ v9
            h2 ^= v2 ^ v10
            h3 ^= v3 ^ v11
            h4 ^= v4 ^ v12
            h5 ^= v5 ^ v13
            h6 ^= v6 ^ v14
            h7 ^= v7 ^ v15
            if last:
                return h0

    @njit(cache=jit._CACHE, nogil=True, boundscheck=False)
    def _hash_strings(data, offsets, iv, sigma):
        n = offsets.shape[0] - 1
        out = np.empty(n, dtype=np.uint64)
        m = np.empty(16, dtype=np.uint64)
        for k in range(n):
            out[k] = _digest(data, offsets[k], offsets[k + 1], iv, sigma, m)
        return out

    @njit(cache=jit._CACHE, nogil=True, boundscheck=False)
    def _char_gram_hashes(data, offsets, minn, maxn, iv, sigma):
        """For each word (UTF-8 bytes data[offsets[k]:offsets[k+1]]), the hashes of its char n-grams as
        `vocab.char_ngrams` lists them: of `<word>`, lengths minn..maxn in characters, by length then position,
        the whole `<word>` left out. Returns (hashes, grams per word)."""
        n = offsets.shape[0] - 1
        counts = np.zeros(n, dtype=np.int64)
        longest = 0
        for k in range(n):
            longest = max(longest, offsets[k + 1] - offsets[k])
        wrapped = np.empty(longest + 2, dtype=np.uint8)
        starts = np.empty(longest + 3, dtype=np.int64)  # byte offset of every character, and the end
        m = np.empty(16, dtype=np.uint64)
        capacity = 1024
        out = np.empty(capacity, dtype=np.uint64)
        total = 0
        for k in range(n):
            size = offsets[k + 1] - offsets[k]
            wrapped[0] = 60  # '<'
            wrapped[1 : size + 1] = data[offsets[k] : offsets[k + 1]]
            wrapped[size + 1] = 62  # '>'
            chars = 0
            for i in range(size + 2):
                if (wrapped[i] & 0xC0) != 0x80:  # not a UTF-8 continuation byte: a character starts here
                    starts[chars] = i
                    chars += 1
            starts[chars] = size + 2
            for length in range(minn, maxn + 1):
                if length >= chars:  # a gram as long as `<word>` is the whole, left out
                    break
                for i in range(chars - length + 1):
                    if total == capacity:
                        capacity *= 2
                        grown = np.empty(capacity, dtype=np.uint64)
                        grown[:total] = out[:total]
                        out = grown
                    out[total] = _digest(wrapped, starts[i], starts[i + length], iv, sigma, m)
                    total += 1
                    counts[k] += 1
        return out[:total], counts


def _utf8_buffer(strings: list[str]) -> tuple[np.ndarray, np.ndarray]:
    encoded = [s.encode("utf-8", "surrogatepass") for s in strings]  # as vocab.stable_hash64 encodes
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets


def hash_strings(strings: list[str]) -> np.ndarray:
    """`vocab.stable_hash64` of every string, as uint64."""
    data, offsets = _utf8_buffer(strings)
    return _hash_strings(data, offsets, IV, SIGMA)


def char_gram_hashes(words: list[str], minn: int, maxn: int) -> tuple[np.ndarray, np.ndarray]:
    """`vocab.stable_hash64` of every char n-gram of every word (in `vocab.char_ngrams` order), concatenated,
    and how many grams each word has."""
    data, offsets = _utf8_buffer(words)
    return _char_gram_hashes(data, offsets, minn, maxn, IV, SIGMA)
