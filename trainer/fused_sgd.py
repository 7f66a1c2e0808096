"""Plain SGD on the embedding tables fused with their lookups' backward: no table gradient is ever made.

Why: with `optim.sparse = sgd` a bag model's table update is `row -= lr * sum of its pooled gradients`, which a
kernel can apply straight from the (documents x dim) gradient of the pooled sums. The autograd path instead makes
every table's coalesced gradient (a distinct rows x dim block), wraps it as a sparse tensor, accumulates it into
`.grad`, checks its rows are sorted and groups them again, then steps: on the demo (masked_bag + bigrams, batch
256, 2 threads) lookups, backward and sparse step took about 5 ms of a 6 ms step, of which about 2.5 ms was the
kernels' own arithmetic and the rest the glue between them.

How: in training, `FusedTableSGD.pool` returns a document's word and n-gram sums (before the pooling divisor) from
one autograd Function whose backward only keeps the gradient of those sums; `OptimizerContainer.step` then calls
`apply`, which for every table sums each touched row's gradient and updates the row in place. The checks on a
step (finite loss and dense gradient) come before it, as before any optimizer step; `.grad` of the tables stays
None. The arithmetic is the autograd path's op for op: the same sums in the same order, the same products, the
same SGD update, so both paths give the same weights bit for bit (tests/unit/test_fused_sgd.py).

Where it applies (`why_not`): one CPU process (replicated ranks average table gradients, row-wise ranks exchange
them), the bag or masked_bag encoder with `combine = sum`, sgd on the tables, no pretrained-row correction, the
numba kernels on. The wide part's tables (`model.wide`, plain SGD at `optim.wide_lr`) are fused the same way:
`FusedTableSGD.wide_logits` keeps the gradient of their TF-IDF weighted sums, the logits. Anything else, and
evaluation, keeps the autograd path; `optim.fused_sgd = false` keeps it always.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from trainer import kernels
from trainer.bag_lookup import group_ids

if kernels.numba is not None:
    from numba import njit, prange

    from trainer.kernels import _prefetch_rows, counting_order

    @njit(parallel=True, cache=kernels._CACHE, nogil=True, boundscheck=False)
    def _pool_masked(frozen, oov, mask, pre_ids, oov_ids, words, inverse, pre_off, oov_off, num_oov_tokens, out):
        """masked_bag's word sums: E(w) * M(w) once per distinct word (bag_lookup._word_products), then out[d] =
        the sum of its rows over document d's pretrained tokens, then its OOV tokens, in order (the order of
        bag_lookup._add_rows, which the autograd path pools with). In parallel over words, then documents."""
        num_pre, num_pretrained = pre_ids.shape[0], frozen.shape[0]
        for u in prange(words.shape[0]):
            if u < num_pre:
                a, m = frozen[pre_ids[u]], mask[pre_ids[u]]
            else:
                a, m = oov[oov_ids[u - num_pre]], mask[num_pretrained + oov_ids[u - num_pre]]
            w = words[u]
            for j in range(w.shape[0]):
                w[j] = a[j] * m[j]
        docs = out.shape[0]
        num_pre_tokens = inverse.shape[0] - num_oov_tokens
        for d in prange(docs):
            dst = out[d]
            dst[:] = np.float32(0.0)
            end = pre_off[d + 1] if d + 1 < docs else num_pre_tokens
            for k in range(pre_off[d], end):
                src = words[inverse[k]]
                for j in range(dst.shape[0]):
                    dst[j] += src[j]
            end = oov_off[d + 1] if d + 1 < docs else num_oov_tokens
            for k in range(oov_off[d], end):
                src = words[inverse[num_pre_tokens + k]]
                for j in range(dst.shape[0]):
                    dst[j] += src[j]

    @njit(parallel=True, cache=kernels._CACHE, nogil=True, boundscheck=False)
    def _pool_bag(table, ids, offsets, first, acc, out):
        """out[d] (+)= the sum of table[ids[k]] over segment d, summed on its own first (EmbeddingBag's sum, which
        the autograd path then adds to the document's running sum); `first` writes instead of adding."""
        docs, n = out.shape[0], ids.shape[0]
        for d in prange(docs):
            a = acc[d]
            a[:] = np.float32(0.0)
            end = offsets[d + 1] if d + 1 < docs else n
            for k in range(offsets[d], end):
                _prefetch_rows(ids, k, table, None, None)
                src = table[ids[k]]
                for j in range(a.shape[0]):
                    a[j] += src[j]
            dst = out[d]
            for j in range(dst.shape[0]):
                dst[j] = a[j] if first else dst[j] + a[j]

    @njit(cache=kernels._CACHE, nogil=True, boundscheck=False, inline="always")
    def _row_grad(grad, owner, order, s, e, block_row):
        """0 + grad[owner[order[s]]] + ... + grad[owner[order[e - 1]]], in that order (bag_lookup's sums into a
        zeroed block): a distinct row's gradient from the documents (`owner`) of its ids, put in id order by
        `kernels.counting_order`. A single id's row is read in place; callers add it to 0 themselves (0 + x, as
        the zeroed block gives: -0.0 becomes +0.0), which leaves a block's sum, never -0.0, unchanged."""
        if e - s == 1:
            return grad[owner[order[s]]]
        block_row[:] = np.float32(0.0)
        for p in range(s, e):
            src = grad[owner[order[p]]]
            for j in range(block_row.shape[0]):
                block_row[j] += src[j]
        return block_row

    @njit(parallel=True, cache=kernels._CACHE, nogil=True, boundscheck=False)
    def _masked_words_sgd(grad, segment, inverse, frozen, oov, mask, pre_ids, oov_ids, starts, order, block,
                          neg_lr_mask, neg_lr_oov):
        """masked_bag's words: each distinct word's gradient g (its tokens' document gradients, in token order),
        then M(w) += -lr * g * E(w) and, for an OOV word, E(w) += -lr * g * M(w), both from the rows as they
        were. In parallel over words: each word owns its rows."""
        num_pre, num_pretrained = pre_ids.shape[0], frozen.shape[0]
        groups = num_pre + oov_ids.shape[0]
        counting_order(inverse, groups, starts, order)
        for u in prange(groups):
            g = _row_grad(grad, segment, order, starts[u], starts[u + 1], block[u])
            if u < num_pre:
                e, m = frozen[pre_ids[u]], mask[pre_ids[u]]
                for j in range(m.shape[0]):
                    m[j] = m[j] + ((np.float32(0.0) + g[j]) * e[j]) * neg_lr_mask
            else:
                v = oov_ids[u - num_pre]
                e, m = oov[v], mask[num_pretrained + v]
                for j in range(m.shape[0]):
                    zero_g = np.float32(0.0) + g[j]
                    grad_m, grad_e = zero_g * e[j], zero_g * m[j]
                    m[j] = m[j] + grad_m * neg_lr_mask
                    e[j] = e[j] + grad_e * neg_lr_oov

    @njit(cache=kernels._CACHE, nogil=True, boundscheck=False, inline="always")
    def _segments_and_order(offsets, inverse, num_distinct, segment, starts, order):
        """Each id's document (`segment`, from EmbeddingBag-style start `offsets`), and the ids of each distinct
        row in id order (`kernels.counting_order` into `starts` / `order`)."""
        docs, n = offsets.shape[0], inverse.shape[0]
        for d in range(docs):
            end = offsets[d + 1] if d + 1 < docs else n
            for k in range(offsets[d], end):
                segment[k] = d
        counting_order(inverse, num_distinct, starts, order)

    @njit(parallel=True, cache=kernels._CACHE, nogil=True, boundscheck=False)
    def _bag_sgd(grad, table, offsets, inverse, distinct, segment, starts, order, block, neg_lr):
        """A plain bag table: each distinct row's gradient (its ids' segment gradients, in id order, as
        bag_lookup._sum_rows sums them), then row += -lr * gradient. In parallel over rows."""
        _segments_and_order(offsets, inverse, distinct.shape[0], segment, starts, order)
        for u in prange(distinct.shape[0]):
            _prefetch_rows(distinct, u, table, None, None)
            g = _row_grad(grad, segment, order, starts[u], starts[u + 1], block[u])
            w = table[distinct[u]]
            for j in range(w.shape[0]):
                w[j] = w[j] + (np.float32(0.0) + g[j]) * neg_lr

    @njit(parallel=True, cache=kernels._CACHE, nogil=True, boundscheck=False)
    def _weighted_bag_sgd(grad, table, offsets, inverse, distinct, weights, segment, starts, order, block, neg_lr):
        """A wide table (one logit per class and feature, TF-IDF weighted lookups): each distinct row's gradient,
        the sum from zero of weight x its ids' document gradients in id order (as bag_lookup._sum_rows sums them),
        then row += gradient x -lr (SparseSGD's update of a coalesced gradient). In parallel over rows."""
        _segments_and_order(offsets, inverse, distinct.shape[0], segment, starts, order)
        for u in prange(distinct.shape[0]):
            _prefetch_rows(distinct, u, table, None, None)
            g = block[u]
            g[:] = np.float32(0.0)
            for p in range(starts[u], starts[u + 1]):
                k = order[p]
                w, src = weights[k], grad[segment[k]]
                for j in range(g.shape[0]):
                    g[j] += w * src[j]
            row = table[distinct[u]]
            for j in range(row.shape[0]):
                row[j] = row[j] + g[j] * neg_lr


def why_not(cfg, info, tables, model_cfg) -> str | None:
    """Why the fused update cannot run for this run (None: it can). `cfg`: the whole Config."""
    if not cfg.optim.fused_sgd:
        return "optim.fused_sgd = false"
    if cfg.optim.sparse != "sgd":
        return f"optim.sparse = {cfg.optim.sparse}"
    if info.world_size > 1:
        return "more than one process"
    if kernels.numba is None or not kernels.fused_kernels_enabled():
        return "the numba kernels are off"
    if model_cfg.encoder not in ("bag", "masked_bag") or model_cfg.combine != "sum":
        return f"model.encoder = {model_cfg.encoder}, model.combine = {model_cfg.combine}"
    if not hasattr(tables, "bags") or "pretrained_delta" in tables.bags:
        return "a trainable pretrained correction"
    if tables.frozen.device.type != "cpu" or tables.frozen.dtype != torch.float32 or not tables.frozen.is_contiguous():
        return "the pretrained table is not a float32 CPU array"
    if not all(kernels.can_fuse(bag.weight) for bag in tables.bags.values()):
        return "a table is not a contiguous float32 CPU tensor"
    return None


class _Pending:
    """One training forward's lookups, kept until the optimizer step applies their gradient."""

    def __init__(self, batch, words: tuple | None, bags: list[tuple[str, np.ndarray, np.ndarray, tuple | None]]) -> None:
        self.batch, self.words, self.bags = batch, words, bags
        self.grad: np.ndarray | None = None


class _WidePending:
    """One training forward's wide lookups (`TextClassifier.wide_lookups`), kept until the optimizer step applies
    their gradient: by table, (ids, offsets, distinct ids, inverse, weights) as numpy arrays."""

    def __init__(self, lookups: dict[str, tuple]) -> None:
        self.lookups = lookups
        self.grad: np.ndarray | None = None


class _FusedWide(torch.autograd.Function):
    """Forward: the wide part's logits, sum over tables of their rows weighted per document (EmbeddingBag with
    per-sample weights, as `bag_lookup.bag_sum`); backward: keeps the logits' gradient for `FusedTableSGD.apply`,
    gives the tables none."""

    @staticmethod
    def forward(ctx, owner: FusedTableSGD, pending: _WidePending, *weights: Tensor) -> Tensor:
        ctx.owner, ctx.pending, ctx.num_weights = owner, pending, len(weights)
        logits = None
        for name, (ids, offsets, _, _, sample_weights) in pending.lookups.items():
            z = F.embedding_bag(torch.from_numpy(ids), owner.tables.bags[name].weight.detach(),
                                torch.from_numpy(offsets), mode="sum", per_sample_weights=torch.from_numpy(sample_weights))
            logits = z if logits is None else logits + z
        return logits

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.pending.grad = grad.contiguous().float().numpy()
        ctx.owner.pending.append(ctx.pending)
        return (None, None) + (None,) * ctx.num_weights


class _FusedPool(torch.autograd.Function):
    """Forward: the per-document sums; backward: keeps their gradient for `FusedTableSGD.apply`, gives the tables
    none. The tables are inputs only so that the sums need a gradient at all."""

    @staticmethod
    def forward(ctx, owner: FusedTableSGD, pending: _Pending, *weights: Tensor) -> Tensor:
        ctx.owner, ctx.pending, ctx.num_weights = owner, pending, len(weights)
        return owner.sums(pending)

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.pending.grad = grad.contiguous().float().numpy()
        ctx.owner.pending.append(ctx.pending)
        return (None, None) + (None,) * ctx.num_weights


class FusedTableSGD:
    """The tables' SGD update applied from the pooled sums' gradient (module docstring)."""

    def __init__(self, tables, masked: bool, wide: list[str] | tuple[str, ...] = ()) -> None:
        self.tables, self.masked, self.wide = tables, masked, list(wide)
        self.pending: list[_Pending | _WidePending] = []
        self._buffers: dict[str, np.ndarray] = {}
        # plain bags, in the order the model adds them: the word bags of the bag encoder, then the n-gram tables
        words = [] if masked else ["pretrained", "oov"]
        self.bag_names = [n for n in (*words, "bigram", "char") if tables.has(n)]

    def params(self) -> dict[str, torch.nn.Parameter]:
        """The tables it updates, by name: the deep part's, and the wide part's (`model.wide`)."""
        return {name: bag.weight for name, bag in self.tables.bags.items()}

    def _deep_params(self) -> list[torch.nn.Parameter]:
        return [bag.weight for name, bag in self.tables.bags.items() if name not in self.wide]

    def wide_logits(self, lookups: dict[str, tuple[Tensor, Tensor, Tensor]], groups: dict) -> Tensor:
        """The wide part's logits from `TextClassifier.wide_lookups`' (ids, offsets, weights) by table and the
        batch's `groups` (distinct ids, inverse) of them, where prepare made them; their SGD update is applied
        by `apply` from the logits' gradient."""
        kept = {}
        for name in self.wide:
            ids, offsets, weights = lookups[name]
            distinct, inverse = groups.get(name) or group_ids(ids)
            kept[name] = tuple(t.contiguous().numpy() for t in (ids, offsets, distinct, inverse, weights.float()))
        self._check_bounds(None, [(name, ids, offsets, (distinct, inverse))
                                  for name, (ids, offsets, distinct, inverse, _) in kept.items()])
        return _FusedWide.apply(self, _WidePending(kept), *(self.tables.bags[n].weight for n in self.wide))

    def _buffer(self, key: str, rows: int, dim: int = 0, dtype=np.float32) -> np.ndarray:
        """A reused block (rows, dim), or (rows,) for dim 0: fresh pages cost more than the kernels here
        (sparse_optim.Workspace)."""
        have = self._buffers.get(key)
        if have is None or have.shape[0] < rows:
            grown = max(rows, 2 * (have.shape[0] if have is not None else 0))
            have = np.empty((grown, dim) if dim else grown, dtype=dtype)
            self._buffers[key] = have
        return have[:rows]

    def pool(self, batch, word_groups: tuple | None) -> Tensor:
        """Per document, the word sums (masked_bag's E(w) * M(w) over `word_groups`, or the bag encoder's rows) plus
        every n-gram table's sums: what `TextClassifier.embed` divides by the pooling divisor."""
        bags = []
        for name in self.bag_names:
            ids, offsets = batch.tables[name]
            groups = None
            if name != "pretrained":
                groups = batch.groups.get(name) or group_ids(ids)
            bags.append((name, ids.contiguous().numpy(), offsets.contiguous().numpy(),
                         groups and tuple(t.contiguous().numpy() for t in groups)))
        words = tuple(t.contiguous().numpy() for t in word_groups) if self.masked else None
        self._check_bounds(words, bags)
        pending = _Pending(batch, words, bags)
        return _FusedPool.apply(self, pending, *self._deep_params())

    def _check_bounds(self, words: tuple | None, bags: list) -> None:
        """The kernels do not check indices (a bad one would write outside a table): refuse ids past a table here,
        as the autograd path's lookups do. O(1) per table where the ids are sorted (the distinct ids), one pass
        over the frozen table's ids otherwise."""
        rows = {name: bag.weight.shape[0] for name, bag in self.tables.bags.items()}
        rows["pretrained"] = self.tables.frozen.shape[0]
        checks = []  # (table, ids, sorted)
        if words is not None:
            checks += [("pretrained", words[0], True), ("oov", words[1], True)]
        for name, ids, _, groups in bags:
            checks.append((name, groups[0], True) if groups is not None else (name, ids, False))
        for name, ids, ordered in checks:
            if not ids.shape[0]:
                continue
            low, high = (int(ids[0]), int(ids[-1])) if ordered else (int(ids.min()), int(ids.max()))
            if low < 0 or high >= rows[name]:
                raise ValueError(f"fused sgd: ids {low}..{high} for table {name} of {rows[name]} rows (a data "
                                 "cache that does not match the tables?)")

    def sums(self, p: _Pending) -> Tensor:
        docs, dim = p.batch.num_docs, self.tables.dim
        out = torch.empty(docs, dim)
        if docs == 0:
            return out
        o = out.numpy()
        first = True
        frozen = self.tables.frozen.numpy()
        weights = {name: bag.weight.detach().numpy() for name, bag in self.tables.bags.items()}
        if p.words is not None:
            pre_ids, oov_ids, inverse, _ = p.words
            (_, pre_off), (oov_tokens, oov_off) = p.batch.tables["pretrained"], p.batch.tables["oov"]
            words = self._buffer("words", pre_ids.shape[0] + oov_ids.shape[0], dim)
            kernels._launch(_pool_masked, frozen, weights["oov"], weights["mask"], pre_ids, oov_ids, words, inverse,
                            pre_off.contiguous().numpy(), oov_off.contiguous().numpy(), oov_tokens.shape[0], o)
            first = False
        acc = self._buffer("acc", docs, dim)
        for name, ids, offsets, _ in p.bags:
            table = frozen if name == "pretrained" else weights[name]
            if table.shape[0] == 0:  # no pretrained rows (so no pretrained ids): EmbeddingBag gives zeros
                table = np.zeros((1, dim), dtype=np.float32)
            kernels._launch(_pool_bag, table, ids, offsets, first, acc, o)
            first = False
        if first:
            out.zero_()
        return out

    def apply(self, lr_of: dict[str, float]) -> None:
        """Apply every kept gradient to the tables (SGD at `lr_of[table name]`), then forget it."""
        pending, self.pending = self.pending, []
        dim = self.tables.dim
        weights = {name: bag.weight.detach().numpy() for name, bag in self.tables.bags.items()}
        for p in pending:
            if isinstance(p, _WidePending):
                self._apply_wide(p, weights, lr_of)
                continue
            if p.grad is None or p.batch.num_docs == 0:
                continue
            if p.words is not None:
                pre_ids, oov_ids, inverse, segment = p.words
                groups = pre_ids.shape[0] + oov_ids.shape[0]
                kernels._launch(
                    _masked_words_sgd, p.grad, segment, inverse, self.tables.frozen.numpy(), weights["oov"],
                    weights["mask"], pre_ids, oov_ids, self._buffer("starts", groups + 1, dtype=np.int64),
                    self._buffer("order", inverse.shape[0], dtype=np.int64), self._buffer("block", groups, dim),
                    np.float32(-lr_of["mask"]), np.float32(-lr_of["oov"]))
            for name, _ids, offsets, groups in p.bags:
                if name == "pretrained":
                    continue
                distinct, inverse = groups
                n = inverse.shape[0]
                kernels._launch(
                    _bag_sgd, p.grad, weights[name], offsets, inverse, distinct,
                    self._buffer("segment", n, dtype=np.int64), self._buffer("starts", distinct.shape[0] + 1,
                                                                              dtype=np.int64),
                    self._buffer("order", n, dtype=np.int64), self._buffer("block", distinct.shape[0], dim),
                    np.float32(-lr_of[name]))

    def _apply_wide(self, p: _WidePending, weights: dict[str, np.ndarray], lr_of: dict[str, float]) -> None:
        if p.grad is None or p.grad.shape[0] == 0:
            return
        classes = p.grad.shape[1]
        for name, (_, offsets, distinct, inverse, sample_weights) in p.lookups.items():
            n = inverse.shape[0]
            kernels._launch(
                _weighted_bag_sgd, p.grad, weights[name], offsets, inverse, distinct, sample_weights,
                self._buffer("segment", n, dtype=np.int64),
                self._buffer("starts", distinct.shape[0] + 1, dtype=np.int64),
                self._buffer("order", n, dtype=np.int64), self._buffer(f"block{classes}", distinct.shape[0], classes),
                np.float32(-lr_of[name]))
