"""Fused CPU kernels for the sparse optimizer steps (numba): one pass over the touched rows instead of five.

Why: profiling the bag encoder on CPU (benchmarks/profile_step.py, batch 1024, 2 threads) put 89 % of a step in the
sparse optimizer, two thirds of it in `index_add_` / `index_select`. Each of those is a separate random-access
pass over rows of a table that does not fit in cache (the torch-op SparseAdam makes five: sum duplicates, read
and write exp_avg, read and write exp_avg_sq, write the table), and each pass is serial. The kernels here group
the gradient's rows by table row (a hash table, no sort) and, for every touched row, sum its duplicate gradient
rows and update the optimizer state and the table in place, in parallel over rows, prefetching rows ahead. Every
row is owned by one thread, so there are no races and no atomics.

The arithmetic is the torch optimizers' float32 arithmetic op for op, so results agree with the torch-op path to
float32 rounding (tests/unit/test_kernels.py): duplicate gradient rows are summed in their original order rather
than coalesce's sort order, one sqrt may round differently, and row-wise Adagrad's row mean is summed in order.
Results are deterministic: the same gradient always gives the same bits. The kernels run only for contiguous
float32 CPU tensors; CUDA and anything else keep the torch ops, and `TRAINER_FUSED_KERNELS=0` turns them off.
"""

from __future__ import annotations

import ctypes
import math
import sys
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from trainer.jit import _CACHE, fused_kernels_enabled, numba  # noqa: F401 - re-exported

if numba is not None:
    from numba import njit, prange


_HUGEPAGE = 2 << 20
_MADV_HUGEPAGE = 14
_HUGEPAGE_MIN_BYTES = 64 << 20


def advise_hugepages(t: Tensor) -> Tensor:
    """Ask Linux to back a large, not yet touched CPU tensor with 2 MiB pages; returns `t`.

    Why: sparse steps touch rows scattered over hundreds of MiB of table and optimizer state, and with 4 KiB pages
    nearly every row costs a TLB miss. With transparent huge pages in `madvise` mode (the common default) memory
    only gets huge pages when asked: measured 17 -> 12.6 ms for a SparseAdam step over 1M x 50 rows. Best effort:
    a no-op off Linux, for small or CUDA tensors, or when the kernel refuses.
    """
    if t.device.type != "cpu" or t.nbytes < _HUGEPAGE_MIN_BYTES or not sys.platform.startswith("linux"):
        return t
    start = (t.data_ptr() + _HUGEPAGE - 1) // _HUGEPAGE * _HUGEPAGE
    end = (t.data_ptr() + t.nbytes) // _HUGEPAGE * _HUGEPAGE
    if end > start:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE)
        except (OSError, AttributeError):
            pass
    return t


def zeros_hugepages(like: Tensor) -> Tensor:
    """`torch.zeros_like(like)` backed by huge pages where possible (see advise_hugepages)."""
    if like.device.type != "cpu":
        return torch.zeros_like(like, memory_format=torch.preserve_format)
    return advise_hugepages(torch.empty(like.shape, dtype=like.dtype)).zero_()


def can_fuse(*tensors: Tensor) -> bool:
    """Whether the fused kernels can update these tensors in place (CPU, float32, contiguous)."""
    return fused_kernels_enabled() and all(
        t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors
    )


def _launch(kernel: Callable, *args) -> None:
    """Run a parallel kernel on as many threads as torch uses (`train.threads`), leaving torch's count as it was.

    Why the restore: numba's OpenMP layer shares the OpenMP runtime with torch, and starting it (first launch) set
    torch's intra-op thread count to the core count: a run asked for 1 thread continued on 2 (measured).
    """
    want = torch.get_num_threads()
    use = max(1, min(want, numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != use:
        numba.set_num_threads(use)
    kernel(*args)
    if torch.get_num_threads() != want:
        torch.set_num_threads(want)


def row_sparse_parts(grad: Tensor) -> tuple[Tensor, Tensor]:
    """A row-sparse COO gradient's row ids and its values as (nnz, row width) rows (0-row tables included)."""
    if grad.sparse_dim() != 1:
        raise ValueError(
            "sparse gradient must be row-sparse (sparse_dim 1, as nn.Embedding(sparse=True) makes), "
            f"got sparse_dim {grad.sparse_dim()}"
        )
    idx = grad._indices()[0]
    return idx, grad._values().reshape(idx.numel(), math.prod(grad.shape[1:]))


def rows_are_distinct_sorted(grad: Tensor) -> bool:
    """Whether a row-sparse gradient's rows are already coalesced: flagged so, or strictly increasing.

    Why the check: autograd drops the flag. A parameter's first gradient is stored through
    `_sparse_coo_tensor_unsafe`, which marks it uncoalesced, so bag_lookup's coalesced gradients arrive at the
    optimizer unflagged. Checking costs one comparison per row, grouping them again a hash and a gather. Off the
    CPU only the flag counts: the check would be a host sync, and there the lookups are EmbeddingBag's anyway."""
    if grad.is_coalesced():
        return True
    if grad.device.type != "cpu":
        return False
    idx = grad._indices()[0]
    return idx.numel() < 2 or bool((idx[1:] > idx[:-1]).all())


def load_numba() -> None:
    """Pay numba's first-kernel cost now: loading its compiler registries, which the first call of any kernel in a
    process does (0.4 s here, 0.3 s of it importing scipy's BLAS where scipy is installed), through one small
    cached kernel. The trainer calls it while it waits for the data cache's child process, so the cost runs beside
    that child's work instead of in the first training step."""
    if numba is not None:
        hash_groups(np.zeros(1, dtype=np.int64))


def grouped_rows(idx: Tensor, distinct_sorted: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`RowGroups`' (rows, starts, order) for a CPU gradient's row ids: ids already distinct and sorted
    (`rows_are_distinct_sorted`) are each their own group; any others go through the hash grouping."""
    ids = idx.contiguous().numpy()
    if distinct_sorted:
        return ids, np.arange(ids.shape[0] + 1, dtype=np.int64), np.arange(ids.shape[0], dtype=np.int64)
    return _group_rows(ids)


class RowGroups:
    """A sparse row gradient's rows grouped by table row: `rows` (unique, in order of first appearance), and for the
    u-th of them the gradient rows `values[order[starts[u]:starts[u + 1]]]` to sum, in their original order."""

    def __init__(self, grad: Tensor, block: Callable[[int, int, Tensor], Tensor] | None = None) -> None:
        """`block(rows, cols, like)` returns a writable float32 block for summed duplicate rows (an optimizer's
        reused workspace; default: a fresh allocation)."""
        idx, self.values = row_sparse_parts(grad)
        groups = grouped_rows(idx, rows_are_distinct_sorted(grad))
        self.rows, self.starts, self.order = (torch.from_numpy(a) for a in groups)
        if not self.values.is_contiguous() or self.values.dtype != torch.float32:
            self.values = self.values.contiguous().float()
        shape = (self.rows.numel(), self.values.shape[1])
        self.block = block(*shape, self.values) if block is not None else torch.empty(shape)

    def __len__(self) -> int:
        return self.rows.numel()

    def arrays(self) -> tuple[np.ndarray, ...]:
        return (self.rows.numpy(), self.starts.numpy(), self.order.numpy(), self.values.detach().numpy(),
                self.block.numpy())


if numba is not None:
    from llvmlite import binding as _llvm
    from llvmlite import ir as _ir
    from numba.core import cgutils as _cgutils
    from numba.extending import intrinsic as _intrinsic

    # Opaque pointers (LLVM >= 15 as numba builds it) name the intrinsic by address space only.
    _PREFETCH = "llvm.prefetch.p0" if _llvm.llvm_version_info >= (15,) else "llvm.prefetch.p0i8"
    _AHEAD = 16  # rows prefetched ahead: measured 2-3x on 2M x 300 tables, where nearly every row is a miss

    @_intrinsic
    def _prefetch(typingctx, arr, row, col):
        """Hint the CPU to fetch the cache line of arr[row, col] for writing (llvm.prefetch, rw=1, locality 3)."""
        def codegen(context, builder, signature, args):
            aryty = signature.args[0]
            ary = context.make_array(aryty)(context, builder, args[0])
            ptr = _cgutils.get_item_pointer(context, builder, aryty, ary, [args[1], args[2]], wraparound=False)
            i8p, i32 = _ir.IntType(8).as_pointer(), _ir.IntType(32)
            fnty = _ir.FunctionType(_ir.VoidType(), [i8p, i32, i32, i32])
            fn = _cgutils.get_or_insert_function(builder.module, fnty, _PREFETCH)
            builder.call(fn, [builder.bitcast(ptr, i8p), _ir.Constant(i32, 1), _ir.Constant(i32, 3), _ir.Constant(i32, 1)])
            return context.get_dummy_value()
        return numba.types.void(arr, row, col), codegen

    @njit(cache=_CACHE, nogil=True, boundscheck=False, inline="always")
    def _prefetch_rows(rows, u, a, b, c):
        """Prefetch every cache line of row rows[u + _AHEAD] of up to three (rows, width) arrays (None skips one;
        `b` and `c` may be narrower than `a`, e.g. row-wise Adagrad's one float per row as (rows, 1)).

        Why: a sparse step touches rows scattered over tables far larger than the caches, so each row is a
        cache (and TLB) miss that the loop would otherwise wait for, one row at a time."""
        ahead = u + _AHEAD
        if ahead < rows.shape[0]:
            r = rows[ahead]
            for j in range(0, a.shape[1], 16):  # 16 floats = one 64-byte line
                _prefetch(a, r, j)
                if b is not None and j < b.shape[1]:
                    _prefetch(b, r, j)
                if c is not None and j < c.shape[1]:
                    _prefetch(c, r, j)

    @njit(cache=_CACHE, nogil=True, boundscheck=False)
    def hash_groups(ids):
        """Group equal ids with a hash table (linear probing): O(n), serial, no sort. Returns the distinct ids in
        order of first appearance and, for every id, the index of its distinct id.

        Why not torch.sort + unique_consecutive: for the 10-20K ids of a step those are short parallel ops, and
        when OpenMP threads sleep between ops (shared cores) each wake-up can cost milliseconds (measured 0.8 ms
        typical, 5 ms spikes, per table per step); this loop takes a fraction of that on one thread.
        """
        n = ids.shape[0]
        bits = 1
        while (1 << bits) < 2 * n:
            bits += 1
        mask = (1 << bits) - 1
        shift = np.uint64(64 - bits)
        keys = np.full(mask + 1, -1, dtype=np.int64)
        key_group = np.empty(mask + 1, dtype=np.int64)
        group_of = np.empty(n, dtype=np.int64)
        first_seen = np.empty(n, dtype=np.int64)
        groups = 0
        for k in range(n):
            r = ids[k]
            h = np.int64((np.uint64(r) * np.uint64(11400714819323198485)) >> shift)  # Fibonacci hashing
            while keys[h] != -1 and keys[h] != r:
                h = (h + 1) & mask
            if keys[h] == -1:
                keys[h] = r
                key_group[h] = groups
                first_seen[groups] = r
                groups += 1
            group_of[k] = key_group[h]
        return first_seen[:groups], group_of

    @njit(cache=_CACHE, nogil=True, boundscheck=False)
    def _group_rows(ids):
        """`hash_groups`, then each group's members in their original order: rows (distinct ids, in order of first
        appearance), and for the u-th of them ids[order[starts[u]:starts[u + 1]]]."""
        rows, group_of = hash_groups(ids)
        n, groups = ids.shape[0], rows.shape[0]
        starts, order = np.empty(groups + 1, dtype=np.int64), np.empty(n, dtype=np.int64)
        counting_order(group_of, groups, starts, order)
        return rows[:groups].copy(), starts, order

    @njit(cache=_CACHE, nogil=True, boundscheck=False, inline="always")
    def counting_order(group_of, groups, starts, order):
        """A counting sort of positions by group: group u's positions k (group_of[k] = u), in increasing k, are
        order[starts[u]:starts[u + 1]]. Fills `starts` (groups + 1) and `order` (len(group_of)); O(positions)."""
        starts[:] = 0
        for k in range(group_of.shape[0]):
            starts[group_of[k] + 1] += 1
        for u in range(groups):
            starts[u + 1] += starts[u]
        fill = starts[:groups].copy()
        for k in range(group_of.shape[0]):
            u = group_of[k]
            order[fill[u]] = k
            fill[u] += 1

    @njit(cache=_CACHE, nogil=True, boundscheck=False, inline="always")
    def _summed_row(u, starts, order, values, block):
        """The u-th touched row's gradient: its one gradient row (most rows), or the sum of its duplicates written
        to block[u], in their original order. Singletons are read in place: no copy."""
        s = starts[u]
        first = values[order[s]]
        if starts[u + 1] - s == 1:
            return first
        out = block[u]
        for j in range(out.shape[0]):
            out[j] = np.float32(0.0) + first[j]  # 0 + x, exactly as index_add_ into zeros (-0.0 becomes +0.0)
        for k in range(s + 1, starts[u + 1]):
            src = values[order[k]]
            for j in range(out.shape[0]):
                out[j] += src[j]
        return out

    @njit(parallel=True, cache=_CACHE, nogil=True, boundscheck=False)
    def _sparse_adam_kernel(table, exp_avg, exp_avg_sq, rows, starts, order, values, block, c1, c2, eps, neg_step,
                            sign, neg_lr_wd, center):
        # All scalars are float32 so every operation rounds as torch's float32 ops do (no float64 promotion).
        for u in prange(rows.shape[0]):
            _prefetch_rows(rows, u, table, exp_avg, exp_avg_sq)
            r = rows[u]
            g_row = _summed_row(u, starts, order, values, block)
            w, m, v = table[r], exp_avg[r], exp_avg_sq[r]
            if neg_lr_wd != 0:  # decoupled weight decay first, as torch's AdamW (see sparse_optim._decay_rows)
                for j in range(w.shape[0]):
                    w[j] = w[j] + (w[j] - center) * neg_lr_wd
            for j in range(w.shape[0]):
                g = g_row[j] * sign
                old = m[j]
                upd = (g - old) * c1
                m[j] = old + upd
                numer = upd + old
                old_sq = v[j]
                upd_sq = (g * g - old_sq) * c2
                v[j] = old_sq + upd_sq
                denom = np.float32(np.sqrt(upd_sq + old_sq)) + eps
                w[j] = w[j] + (numer / denom) * neg_step

    @njit(parallel=True, cache=_CACHE, nogil=True, boundscheck=False)
    def _rowwise_adagrad_kernel(table, acc, rows, starts, order, values, block, wd, center, inv_dim, eps, neg_lr):
        acc_2d = acc.reshape(acc.shape[0], 1)  # a view, so the row prefetch applies to the one-float state too
        for u in prange(rows.shape[0]):
            _prefetch_rows(rows, u, table, acc_2d, None)
            r = rows[u]
            g_row = _summed_row(u, starts, order, values, block)
            w = table[r]
            total = np.float32(0.0)
            for j in range(w.shape[0]):
                g = g_row[j] + (w[j] - center) * wd
                total += g * g
            s = acc[r] + total * inv_dim
            acc[r] = s
            step = neg_lr / (np.float32(np.sqrt(s)) + eps)
            for j in range(w.shape[0]):
                w[j] = w[j] + (g_row[j] + (w[j] - center) * wd) * step

    @njit(parallel=True, cache=_CACHE, nogil=True, boundscheck=False)
    def _sgd_kernel(table, rows, starts, order, values, block, neg_lr):
        for u in prange(rows.shape[0]):
            _prefetch_rows(rows, u, table, None, None)
            g_row = _summed_row(u, starts, order, values, block)
            w = table[rows[u]]
            for j in range(w.shape[0]):
                w[j] = w[j] + g_row[j] * neg_lr


def sparse_adam_step(
    table: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, groups: RowGroups,
    beta1: float, beta2: float, eps: float, step_size: float, maximize: bool, lr_wd: float = 0.0, center: float = 0.0,
) -> None:
    """torch's `sparse_adam` update of the touched rows, in one fused pass (tables as (rows, dim) views)."""
    if not len(groups):
        return
    f = np.float32
    _launch(
        _sparse_adam_kernel, table.detach().numpy(), exp_avg.numpy(), exp_avg_sq.numpy(), *groups.arrays(),
        f(1 - beta1), f(1 - beta2), f(eps), f(-step_size), f(-1.0 if maximize else 1.0), f(-lr_wd), f(center),
    )


def rowwise_adagrad_step(
    table: Tensor, acc: Tensor, groups: RowGroups, lr: float, eps: float, weight_decay: float, center: float = 0.0
) -> None:
    """Row-wise Adagrad on the touched rows in one fused pass. The row mean of g^2 is summed sequentially, torch's
    `.mean` in blocks, so results agree with the torch-op path to float32 rounding, not bit for bit."""
    if not len(groups):
        return
    f = np.float32
    _launch(
        _rowwise_adagrad_kernel, table.detach().numpy(), acc.numpy(), *groups.arrays(), f(weight_decay), f(center), f(1.0 / table.shape[1]), f(eps), f(-lr)
    )


def sgd_step(table: Tensor, groups: RowGroups, lr: float) -> None:
    """Plain SGD on the touched rows (duplicates summed first), in one fused pass."""
    if not len(groups):
        return
    _launch(_sgd_kernel, table.detach().numpy(), *groups.arrays(), np.float32(-lr))
