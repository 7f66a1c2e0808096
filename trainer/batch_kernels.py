"""The data thread's numba kernels, torch-free: grouping a step's ids (an LSD radix sort), masked_bag's word index,
and a bag-encoder batch's collate, alone (`_collate_docs`) or with the grouping in the same call
(`_collate_grouped`).

Why one module: numba's on-disk cache notices a change only in the file that defines a cached kernel, not in the
files of the kernels it calls, so a kernel and every kernel it calls live here together (`batch.collate_grouped`
calls `_collate_docs`, `_radix_groups` and `_word_index` inside one compiled function). `bag_lookup` and `batch`
call them from Python, where that does not apply.
"""

from __future__ import annotations

import numpy as np

from trainer.jit import _CACHE, numba

if numba is not None:
    from numba import njit

    @njit(cache=_CACHE, nogil=True, boundscheck=False)
    def _radix_groups(ids):
        """11 bits a pass (2048 counters stay in L1), as many passes as the largest id needs (2 for 1M rows, 3 for
        100M); each pass is stable and carries every id with its position, so the sorted run yields the distinct
        ids and every position's distinct index in one final scan."""
        n = ids.shape[0]
        top = 0
        for k in range(n):
            if ids[k] < 0:
                raise ValueError("sorted_groups: ids must be non-negative")
            top = max(top, ids[k])
        passes = 1
        while top >> (11 * passes):
            passes += 1
        counts = np.zeros((passes, 2048), np.int64)
        for k in range(n):
            for p in range(passes):
                counts[p, (ids[k] >> (11 * p)) & 2047] += 1
        keys, where = ids.copy(), np.arange(n)
        keys_next, where_next = np.empty(n, np.int64), np.empty(n, np.int64)
        at = np.empty(2048, np.int64)
        for p in range(passes):
            total = 0
            for d in range(2048):
                at[d] = total
                total += counts[p, d]
            for j in range(n):
                d = (keys[j] >> (11 * p)) & 2047
                keys_next[at[d]] = keys[j]
                where_next[at[d]] = where[j]
                at[d] += 1
            keys, keys_next = keys_next, keys
            where, where_next = where_next, where
        distinct, inverse = np.empty(n, np.int64), np.empty(n, np.int64)
        m = -1
        for j in range(n):
            if m < 0 or keys[j] != distinct[m]:
                m += 1
                distinct[m] = keys[j]
            inverse[where[j]] = m
        return distinct[: m + 1].copy(), inverse

    @njit(cache=_CACHE, nogil=True, boundscheck=False)
    def _radix_groups_many(flat, bounds):
        """`_radix_groups` of every slice flat[bounds[i]:bounds[i + 1]], in one call without the GIL: the distinct
        ids of all slices concatenated with their bounds, and the inverses in `flat`'s layout."""
        parts = bounds.shape[0] - 1
        distinct, inverse = np.empty(flat.shape[0], np.int64), np.empty(flat.shape[0], np.int64)
        distinct_bounds = np.zeros(parts + 1, np.int64)
        for i in range(parts):
            d, inv = _radix_groups(flat[bounds[i]:bounds[i + 1]])
            inverse[bounds[i]:bounds[i + 1]] = inv
            distinct[distinct_bounds[i]:distinct_bounds[i] + d.shape[0]] = d  # packed: at most its slice's size
            distinct_bounds[i + 1] = distinct_bounds[i] + d.shape[0]
        return distinct[:distinct_bounds[parts]], distinct_bounds, inverse

    @njit(cache=_CACHE, nogil=True, boundscheck=False)
    def _word_index(pre_offsets, pre_inverse, oov_offsets, oov_inverse, num_pre_distinct):
        """masked_bag's word index from the pretrained and OOV lookups' groups: each word token's row among
        [distinct pretrained | distinct OOV], and its document (pretrained tokens first, then OOV tokens)."""
        n_pre, n_oov = pre_inverse.shape[0], oov_inverse.shape[0]
        for offsets, n in ((pre_offsets, n_pre), (oov_offsets, n_oov)):  # segment's writes stay in range
            previous = 0
            for d in range(offsets.shape[0]):
                if offsets[d] < previous or offsets[d] > n:
                    raise ValueError("word_index: offsets out of order or past their ids")
                previous = offsets[d]
        inverse, segment = np.empty(n_pre + n_oov, np.int64), np.empty(n_pre + n_oov, np.int64)
        for k in range(n_pre):
            inverse[k] = pre_inverse[k]
        for k in range(n_oov):
            inverse[n_pre + k] = oov_inverse[k] + num_pre_distinct
        for part in range(2):
            offsets, n, base = (pre_offsets, n_pre, 0) if part == 0 else (oov_offsets, n_oov, n_pre)
            docs = offsets.shape[0]
            for d in range(docs):
                end = offsets[d + 1] if d + 1 < docs else n
                for k in range(offsets[d], end):
                    segment[base + k] = d
        return inverse, segment

    @njit(cache=_CACHE, nogil=True, boundscheck=False)
    def _collate_docs(token_offsets, token_ids, bigram_offsets, bigram_ids, char_offsets, char_ids, labels,
                      raw_tokens, rows, num_pretrained):
        """`collate`'s document-level lookups in one pass without the GIL: per table (pretrained, OOV, bigram,
        char) the ids of documents `rows` in order and their start offsets; each document's kept tokens, looked-up
        ids and label; the batch's tokenizer tokens."""
        n, num_docs = rows.shape[0], labels.shape[0]
        # the kernel reads without bounds checks: the checks that keep its reads and writes in range (the CSR
        # arrays come from the data cache)
        if (token_offsets.shape[0] != num_docs + 1 or bigram_offsets.shape[0] != num_docs + 1
                or char_offsets.shape[0] != num_docs + 1 or raw_tokens.shape[0] != num_docs):
            raise ValueError("collate: the documents' arrays disagree in length")
        counts = np.zeros((5, n), np.int64)  # pretrained, oov, bigram, char, kept tokens
        for d in range(n):
            r = rows[d]
            if r < 0 or r >= num_docs:
                raise IndexError("collate: document row out of range")
            if not (0 <= token_offsets[r] <= token_offsets[r + 1] <= token_ids.shape[0]
                    and 0 <= bigram_offsets[r] <= bigram_offsets[r + 1] <= bigram_ids.shape[0]
                    and 0 <= char_offsets[r] <= char_offsets[r + 1] <= char_ids.shape[0]):
                raise ValueError("collate: a document's offsets are out of order or out of range")
            for k in range(token_offsets[r], token_offsets[r + 1]):
                t = token_ids[k]
                if t >= num_pretrained:
                    counts[1, d] += 1
                elif t >= 0:
                    counts[0, d] += 1
            counts[2, d] = bigram_offsets[r + 1] - bigram_offsets[r]
            counts[3, d] = char_offsets[r + 1] - char_offsets[r]
            counts[4, d] = token_offsets[r + 1] - token_offsets[r]
        offsets = np.zeros((4, n), np.int64)
        totals = np.zeros(4, np.int64)
        for t in range(4):
            for d in range(n):
                offsets[t, d] = totals[t]
                totals[t] += counts[t, d]
        pre, oov = np.empty(totals[0], np.int64), np.empty(totals[1], np.int64)
        bigrams, chars = np.empty(totals[2], np.int64), np.empty(totals[3], np.int64)
        lengths = np.empty(n, np.float32)
        doc_labels = np.empty(n, np.int64)
        num_tokens = 0
        a = b = c = e = 0
        for d in range(n):
            r = rows[d]
            for k in range(token_offsets[r], token_offsets[r + 1]):
                t = token_ids[k]
                if t >= num_pretrained:
                    oov[b] = t - num_pretrained
                    b += 1
                elif t >= 0:
                    pre[a] = t
                    a += 1
            for k in range(bigram_offsets[r], bigram_offsets[r + 1]):
                bigrams[c] = bigram_ids[k]
                c += 1
            for k in range(char_offsets[r], char_offsets[r + 1]):
                chars[e] = char_ids[k]
                e += 1
            lengths[d] = counts[0, d] + counts[1, d] + counts[2, d] + counts[3, d]
            doc_labels[d] = labels[r]
            num_tokens += raw_tokens[r]
        return pre, oov, bigrams, chars, offsets, counts[4].copy(), lengths, doc_labels, num_tokens

    @njit(cache=_CACHE, nogil=True, boundscheck=False)
    def _collate_grouped(token_offsets, token_ids, bigram_offsets, bigram_ids, char_offsets, char_ids, labels,
                         raw_tokens, rows, num_pretrained, group, words):
        """`_collate_docs`, then the grouping the model would do on the batch (`TextClassifier.prepare`): the
        distinct ids and inverses of every table flagged in `group` (in TABLES order; `_radix_groups`), and
        with `words` masked_bag's word index (`_word_index`, from the pretrained and OOV groups)."""
        pre, oov, bigrams, chars, offsets, token_counts, lengths, doc_labels, num_tokens = _collate_docs(
            token_offsets, token_ids, bigram_offsets, bigram_ids, char_offsets, char_ids, labels, raw_tokens, rows,
            num_pretrained)
        tables = (pre, oov, bigrams, chars)
        distinct_bounds, inverse_bounds = np.zeros(5, np.int64), np.zeros(5, np.int64)
        for t in range(4):
            inverse_bounds[t + 1] = inverse_bounds[t] + (tables[t].shape[0] if group[t] else 0)
        # each table's distinct ids (at most as many as its ids) packed after the previous table's
        distinct, inverse = np.empty(inverse_bounds[4], np.int64), np.empty(inverse_bounds[4], np.int64)
        for t in range(4):
            if group[t]:
                d, inv = _radix_groups(tables[t])
                distinct[distinct_bounds[t]:distinct_bounds[t] + d.shape[0]] = d
                inverse[inverse_bounds[t]:inverse_bounds[t + 1]] = inv
                distinct_bounds[t + 1] = distinct_bounds[t] + d.shape[0]
            else:
                distinct_bounds[t + 1] = distinct_bounds[t]
        distinct = distinct[:distinct_bounds[4]]
        if words:
            word_inverse, word_segment = _word_index(
                offsets[0], inverse[inverse_bounds[0]:inverse_bounds[1]], offsets[1],
                inverse[inverse_bounds[1]:inverse_bounds[2]], distinct_bounds[1] - distinct_bounds[0])
        else:
            word_inverse, word_segment = np.empty(0, np.int64), np.empty(0, np.int64)
        return (pre, oov, bigrams, chars, offsets, token_counts, lengths, doc_labels, num_tokens, distinct,
                distinct_bounds, inverse, inverse_bounds, word_inverse, word_segment)

    @njit(cache=_CACHE, nogil=True, boundscheck=False)
    def _wide_weights(keys, key_bounds, rows, num_docs, idf, idf_base, log_tf):
        """One block of the wide part's TF-IDF weighted lookups (`model.TextClassifier.wide_lookups`), by table:
        each document's distinct features, ascending, and their weights (1 + ln tf) x idf, with each document's
        sum of squared weights over the whole block (`_wide_normalise` then divides by the norms). Table t's
        (document, feature) pairs are keys[key_bounds[t]:key_bounds[t + 1]] = document x rows[t] + feature,
        sorted (numpy's sort, several times faster than numba's here). Returns (features, pair_starts
        (tables, docs + 1) into features, weights, sums of squares).

        The arithmetic is the torch ops' float32 arithmetic in their order, so the weights are the same bits:
        ln tf from `log_tf` (torch.log of 0..max tf), each document's squares summed table by table in feature
        order (as index_add_ sums them)."""
        num_tables = key_bounds.shape[0] - 1
        features = np.empty(keys.shape[0], np.int64)
        weights = np.empty(keys.shape[0], np.float32)
        pair_starts = np.zeros((num_tables, num_docs + 1), np.int64)
        sq = np.zeros(num_docs, np.float32)
        n = 0
        for t in range(num_tables):
            k, end, doc = key_bounds[t], key_bounds[t + 1], 0
            while k < end:
                key, tf = keys[k], 1
                while k + tf < end and keys[k + tf] == key:
                    tf += 1
                d, feature = key // rows[t], key % rows[t]
                while doc <= d:  # documents before d without features start here too
                    pair_starts[t, doc] = n
                    doc += 1
                w = (np.float32(1.0) + log_tf[tf]) * idf[idf_base[t] + feature]
                features[n], weights[n] = feature, w
                sq[d] += w * w
                n += 1
                k += tf
            while doc <= num_docs:
                pair_starts[t, doc] = n
                doc += 1
        return features[:n], pair_starts, weights[:n], sq

    @njit(cache=_CACHE, nogil=True, boundscheck=False)
    def _wide_normalise(weights, pair_starts, norm):
        """`_wide_weights`' weights divided, in place, by their document's norm (torch's sqrt of its sum of
        squares, clamped: torch's float32 sqrt is not always numpy's, and these must be the torch path's bits)."""
        num_docs = pair_starts.shape[1] - 1
        for t in range(pair_starts.shape[0]):
            for d in range(num_docs):
                for i in range(pair_starts[t, d], pair_starts[t, d + 1]):
                    weights[i] = weights[i] / norm[d]
