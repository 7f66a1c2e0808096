"""Lookups into trainable tables whose backward gives the optimizer coalesced gradients.

Why: `nn.EmbeddingBag(sparse=True)` writes one gradient row per looked-up id: each segment's output gradient is
copied once for every id in it (68K x 50 floats for the demo's bigram table at batch 1024, 37K distinct rows).
The sparse optimizer then hashed those ids and summed the duplicates, reading the copies in random order: 5.5 ms
of a 10.6 ms CPU step went to `SparseSGD.step`, against 0.95 ms for the same update from a coalesced gradient
(benchmarks/profile_step.py, bag + bigrams, batch 1024, 1 thread).

- `bag_sum`: the forward groups the ids (`group_ids`: a radix sort that keeps every id's position; the
  trainer's data thread does it ahead, `Batch.groups`), and the backward sums every distinct row's gradient
  straight from the (segments x dim) output gradient, which stays in cache, into a (distinct rows x dim) block
  whose rows are sorted and distinct. Autograd drops the coalesced flag on the way to `.grad`; the optimizers
  detect such rows (`kernels.rows_are_distinct_sorted`) and skip their own grouping.
- `gather_pool`: masked_bag's pooling of E(w) * M(w), computed once per distinct word, into documents through
  each token's index, so the (tokens x dim) block of per-token rows is never made, forward or backward.

Same sums as before, bit for bit: each distinct row's gradient is 0 + its ids' gradients in their original order,
as the fused optimizer kernels summed duplicates (kernels.RowGroups). CPU float32 only; CUDA, other dtypes and
`TRAINER_FUSED_KERNELS=0` keep `F.embedding_bag` / `index_add`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from trainer import kernels

if kernels.numba is not None:
    from numba import njit

    from trainer.batch_kernels import _radix_groups, _radix_groups_many

    @njit(cache=kernels._CACHE, nogil=True, boundscheck=False)
    def _sum_rows(grad_out, offsets, inverse, weights, out):
        """out[inverse[k]] += weights[k] * grad_out[segment of id k], for ids in their original order, out zeroed
        first; `weights` empty: unweighted (a weight of 1, exact in float32, so the same sums bit for bit)."""
        out[:] = np.float32(0.0)
        n, segments = inverse.shape[0], offsets.shape[0]
        weighted = weights.shape[0] > 0
        for s in range(segments):
            end = offsets[s + 1] if s + 1 < segments else n
            src = grad_out[s]
            for k in range(offsets[s], end):
                dst = out[inverse[k]]
                w = weights[k] if weighted else np.float32(1.0)
                for j in range(dst.shape[0]):
                    dst[j] += w * src[j]

    @njit(cache=kernels._CACHE, nogil=True, boundscheck=False)
    def _add_rows(src, src_row, dst_row, dst):
        """dst[dst_row[k]] += src[src_row[k]] for every k, in order, dst zeroed first: gather_pool's forward
        (rows -> segments) and, with the indices swapped, its backward (segment gradients -> rows)."""
        dst[:] = np.float32(0.0)
        for k in range(src_row.shape[0]):
            a, b = src[src_row[k]], dst[dst_row[k]]
            for j in range(b.shape[0]):
                b[j] += a[j]


def sorted_groups(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct ids in increasing order, and for every id the index of its distinct id (np.unique's `inverse`),
    for non-negative int64 ids (row ids).

    An LSD radix sort (`_radix_groups`), linear in the number of ids. It replaced a hash table plus a numpy sort
    of the distinct ids (medians of 40 interleaved calls, one thread): 128K ids with 78K distinct from a 1M-row
    table (the bigram lookups of 2048 demo documents) 5.0 -> 2.4 ms; 123K ids of a 29K-row table 1.9 -> 1.6 ms;
    5K ids 0.047 -> 0.032 ms."""
    return _radix_groups(np.ascontiguousarray(ids, dtype=np.int64))


class _GroupedBagSum(torch.autograd.Function):
    """`F.embedding_bag(ids, weight, offsets, mode="sum", per_sample_weights=...)` with a coalesced sparse gradient
    for `weight` (none for the per-sample weights, which are data: the wide part's TF-IDF weights)."""

    @staticmethod
    def forward(ctx, weight: Tensor, ids: Tensor, offsets: Tensor, groups: tuple[Tensor, Tensor] | None,
                per_sample_weights: Tensor | None) -> Tensor:
        distinct, inverse = groups if groups is not None else group_ids(ids)
        ctx.save_for_backward(distinct, inverse, offsets, per_sample_weights)
        ctx.table_shape = weight.shape
        return F.embedding_bag(ids, weight, offsets, mode="sum", per_sample_weights=per_sample_weights)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        distinct, inverse, offsets, per_sample_weights = ctx.saved_tensors
        rows, dim = ctx.table_shape
        values = torch.empty(distinct.numel(), dim)
        if distinct.numel():
            weights = torch.empty(0) if per_sample_weights is None else per_sample_weights.contiguous()
            _sum_rows(grad_out.contiguous().float().numpy(), offsets.contiguous().numpy(), inverse.numpy(),
                      weights.numpy(), values.numpy())
        grad = torch.sparse_coo_tensor(distinct.unsqueeze(0), values, (rows, dim), is_coalesced=True,
                                       check_invariants=False)
        return grad, None, None, None, None


def group_ids_many(ids: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """`group_ids` of every tensor in `ids`, the same results; for CPU int64 ids through one numba call without
    the GIL. Why: the data thread groups a step's lookups beside the step, whose Python needs the GIL between its
    torch ops; one call per batch instead of one per table leaves fewer hand-overs of the GIL."""
    if not ids or kernels.numba is None or any(t.device.type != "cpu" or t.dtype != torch.int64 for t in ids):
        return [group_ids(t) for t in ids]
    sizes = [t.shape[0] for t in ids]
    flat = np.concatenate([t.numpy() for t in ids]) if len(ids) > 1 else ids[0].contiguous().numpy()
    distinct, distinct_bounds, inverse = _radix_groups_many(flat, np.cumsum([0, *sizes]))
    distinct, inverse = torch.from_numpy(distinct), torch.from_numpy(inverse)
    out, start = [], 0
    for i, n in enumerate(sizes):
        out.append((distinct[int(distinct_bounds[i]):int(distinct_bounds[i + 1])], inverse[start:start + n]))
        start += n
    return out


def group_ids(ids: Tensor) -> tuple[Tensor, Tensor]:
    """Distinct ids (sorted) and each id's index among them, as tensors (what `bag_sum`'s `groups` takes):
    `sorted_groups` for CPU int64 ids when numba is there, else `torch.unique`."""
    if ids.device.type == "cpu" and ids.dtype == torch.int64 and kernels.numba is not None:
        distinct, inverse = sorted_groups(ids.contiguous().numpy())
        return torch.from_numpy(distinct), torch.from_numpy(inverse)
    return torch.unique(ids, sorted=True, return_inverse=True)


class _GatherPool(torch.autograd.Function):
    """out[segment[k]] += rows[inverse[k]]: pools a (distinct rows x dim) block into segments without making the
    (ids x dim) block of per-id rows, forward or backward."""

    @staticmethod
    def forward(ctx, rows: Tensor, inverse: Tensor, segment: Tensor, num_segments: int) -> Tensor:
        ctx.save_for_backward(inverse, segment)
        ctx.num_rows = rows.shape[0]
        out = rows.new_empty(num_segments, rows.shape[1])
        _add_rows(rows.detach().contiguous().numpy(), inverse.numpy(), segment.numpy(), out.numpy())
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        inverse, segment = ctx.saved_tensors
        grad_rows = grad_out.new_empty(ctx.num_rows, grad_out.shape[1], dtype=torch.float32)
        _add_rows(grad_out.contiguous().float().numpy(), segment.numpy(), inverse.numpy(), grad_rows.numpy())
        return grad_rows, None, None, None


def gather_pool(rows: Tensor, inverse: Tensor, segment: Tensor, num_segments: int) -> Tensor:
    """Sum of `rows[inverse[k]]` over the ids k of each segment (`segment[k]`), (num_segments, dim): the pooling
    of a step's distinct rows back into documents. Same sums, in the same order, as
    `zeros.index_add(0, segment, rows[inverse])`, which it replaces on the CPU (no per-id block)."""
    if kernels.can_fuse(rows) and inverse.dtype == torch.int64 and segment.dtype == torch.int64:
        return _GatherPool.apply(rows, inverse.contiguous(), segment.contiguous(), num_segments)
    return rows.new_zeros(num_segments, rows.shape[1]).index_add(0, segment, rows[inverse])


if kernels.numba is not None:

    @njit(cache=kernels._CACHE, nogil=True, boundscheck=False)
    def _word_products(frozen, oov, mask, pre_ids, oov_ids, num_pretrained, words):
        """E(w) * M(w) for the step's distinct words [pretrained | OOV] (E: the frozen row, or the OOV row)."""
        n_pre = pre_ids.shape[0]
        for u in range(n_pre):
            a, m, w = frozen[pre_ids[u]], mask[pre_ids[u]], words[u]
            for j in range(w.shape[0]):
                w[j] = a[j] * m[j]
        for v in range(oov_ids.shape[0]):
            a, m, w = oov[oov_ids[v]], mask[num_pretrained + oov_ids[v]], words[n_pre + v]
            for j in range(w.shape[0]):
                w[j] = a[j] * m[j]

    @njit(cache=kernels._CACHE, nogil=True, boundscheck=False)
    def _word_grads(grad_words, frozen, oov, mask, pre_ids, oov_ids, num_pretrained, grad_mask, grad_oov):
        """From the words' gradient g: the mask rows' (g * E) and the OOV rows' (g * M)."""
        n_pre = pre_ids.shape[0]
        for u in range(n_pre):
            g, a, out = grad_words[u], frozen[pre_ids[u]], grad_mask[u]
            for j in range(g.shape[0]):
                out[j] = g[j] * a[j]
        for v in range(oov_ids.shape[0]):
            g, a, out = grad_words[n_pre + v], oov[oov_ids[v]], grad_mask[n_pre + v]
            for j in range(g.shape[0]):
                out[j] = g[j] * a[j]
            m, out = mask[num_pretrained + oov_ids[v]], grad_oov[v]
            for j in range(g.shape[0]):
                out[j] = g[j] * m[j]


class _MaskedWords(torch.autograd.Function):
    """masked_bag's word sums, sum over a document's words of E(w) * M(w), E the frozen row of a pretrained word or
    the OOV row of another, M its mask row: one pass for the rows and products, one for the pooling, and in the
    backward one for the pooling's gradient and one for both tables' coalesced gradients.

    Why: as separate ops (three lookups, a concatenation, a product, `gather_pool`, and their backward) the same
    arithmetic took about 2 ms of a demo step (batch 256, 2 threads). The sums are the same, in the same order, bit
    for bit (tests/unit/test_bag_lookup.py compares it with the op-by-op path)."""

    @staticmethod
    def forward(ctx, oov: Tensor, mask: Tensor, frozen: Tensor, pre_ids: Tensor, oov_ids: Tensor, inverse: Tensor,
                segment: Tensor, num_docs: int) -> Tensor:
        words = torch.empty(pre_ids.shape[0] + oov_ids.shape[0], mask.shape[1])
        _word_products(frozen.numpy(), oov.detach().numpy(), mask.detach().numpy(), pre_ids.numpy(), oov_ids.numpy(),
                       frozen.shape[0], words.numpy())
        out = torch.empty(num_docs, mask.shape[1])
        _add_rows(words.numpy(), inverse.numpy(), segment.numpy(), out.numpy())
        # the tables themselves, not copies of their rows: autograd refuses the backward if a step changed them
        ctx.save_for_backward(oov, mask, pre_ids, oov_ids, inverse, segment)
        ctx.frozen = frozen
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        oov, mask, pre_ids, oov_ids, inverse, segment = ctx.saved_tensors
        frozen = ctx.frozen
        grad_words = torch.empty(pre_ids.shape[0] + oov_ids.shape[0], mask.shape[1])
        _add_rows(grad_out.contiguous().float().numpy(), segment.numpy(), inverse.numpy(), grad_words.numpy())
        grad_mask, grad_oov = torch.empty_like(grad_words), torch.empty(oov_ids.shape[0], mask.shape[1])
        _word_grads(grad_words.numpy(), frozen.numpy(), oov.detach().numpy(), mask.detach().numpy(), pre_ids.numpy(),
                    oov_ids.numpy(), frozen.shape[0], grad_mask.numpy(), grad_oov.numpy())
        mask_rows = torch.cat([pre_ids, oov_ids + frozen.shape[0]])  # sorted and distinct: pretrained ids first
        mask_grad = torch.sparse_coo_tensor(mask_rows.unsqueeze(0), grad_mask, mask.shape, is_coalesced=True,
                                            check_invariants=False)
        oov_grad = torch.sparse_coo_tensor(oov_ids.unsqueeze(0), grad_oov, oov.shape, is_coalesced=True,
                                           check_invariants=False)
        return oov_grad, mask_grad, None, None, None, None, None, None


def masked_words(oov: Tensor, mask: Tensor, frozen: Tensor, pre_ids: Tensor, oov_ids: Tensor, inverse: Tensor,
                 segment: Tensor, num_docs: int) -> Tensor | None:
    """Per document (num_docs, dim), the sum of E(w) * M(w) over its word tokens, with coalesced sparse gradients
    for the `oov` and `mask` tables, in one fused Function (`_MaskedWords`); None where the CPU kernels do not
    apply (the caller then takes the op-by-op path).

    `pre_ids` / `oov_ids`: the step's distinct pretrained / OOV word ids, each sorted; a word's mask row is its
    pretrained id, or `frozen.shape[0]` + its OOV id. `inverse[k]`: token k's row among [pre_ids | oov_ids];
    `segment[k]`: its document."""
    index = (pre_ids, oov_ids, inverse, segment)
    if not (kernels.can_fuse(oov, mask) and frozen.device.type == "cpu" and frozen.dtype == torch.float32
            and frozen.is_contiguous() and all(t.dtype == torch.int64 and t.device.type == "cpu" for t in index)):
        return None
    # the kernels do not check bounds: the checks that cost O(1) (the id lists are sorted)
    if (inverse.shape != segment.shape or mask.shape[0] != frozen.shape[0] + oov.shape[0]
            or not frozen.shape[1] == oov.shape[1] == mask.shape[1]) or any(
            ids.numel() and (int(ids[0]) < 0 or int(ids[-1]) >= rows)
            for ids, rows in ((pre_ids, frozen.shape[0]), (oov_ids, oov.shape[0]))):
        raise ValueError(f"masked_words: inconsistent lookup ({pre_ids.numel()} pretrained and {oov_ids.numel()} OOV "
                         f"words for tables of {frozen.shape[0]} and {oov.shape[0]} rows, mask {mask.shape[0]} rows; "
                         f"{inverse.numel()} tokens, {segment.numel()} segment indices)")
    return _MaskedWords.apply(oov, mask, frozen, *(t.contiguous() for t in index), num_docs)


def bag_sum(weight: Tensor, ids: Tensor, offsets: Tensor, groups: tuple[Tensor, Tensor] | None = None,
            per_sample_weights: Tensor | None = None) -> Tensor:
    """Sum of `weight`'s rows per segment (EmbeddingBag `mode="sum"`, segments start at `offsets`; each row
    times its `per_sample_weights` entry if given, which get no gradient), with a sparse gradient for `weight`:
    coalesced through the CPU kernels above when they apply, else EmbeddingBag's own. `groups`, if given, is
    `group_ids(ids)` computed ahead (on the data thread), else the forward computes it."""
    if (weight.requires_grad and torch.is_grad_enabled() and ids.device.type == "cpu" and ids.dtype == torch.int64
            and offsets.dtype == torch.int64 and kernels.can_fuse(weight) and weight.dim() == 2
            and (per_sample_weights is None or (kernels.can_fuse(per_sample_weights)
                                                and not per_sample_weights.requires_grad))):
        return _GroupedBagSum.apply(weight, ids, offsets, groups, per_sample_weights)
    return F.embedding_bag(ids, weight, offsets, mode="sum", sparse=True, per_sample_weights=per_sample_weights)
