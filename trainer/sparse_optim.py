"""Optimizers for trainable embedding tables with sparse (COO) gradients.

A step must cost O(touched rows x dim), never O(table rows): tables reach millions of rows while a batch touches
~10K. torch 2.13's SparseAdam / Adagrad / SGD already touch only the gradient's rows on CPU (checked: step time is
flat from 1e4 to 5e7 rows at fixed nnz). What dominates their step on CPU is allocation: every step creates several
fresh (touched rows x dim) blocks of ~10-20 MB; glibc serves those with mmap and hands them back on free, so each
step page-faults ~35 MB in again (~9K minor faults; 60-80 % of the step on the 2-core dev VM). The classes here keep
those blocks in a per-optimizer workspace (`Workspace`) and touch state rows with `index_select` / `index_add_`
only, so the step is a handful of passes over the touched rows. FastSparseAdam is torch's SparseAdam done this way
(about 2x faster per step; bit-identical on the torch-op path, and within float32 rounding on the fused CPU kernels,
which sum duplicate gradient rows in their original order: see kernels.py); RowWiseAdagrad keeps one number per row.

State is created lazily (like torch) or eagerly through `init_optimizer_state`, which checkpoint loading needs: a
fresh optimizer has no state tensors to load into (DESIGN.md, "Sparse gradients and optimizers").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from functools import partial

import torch
from torch import Tensor

from trainer import eager_optim, kernels

SPARSE_OPTIMIZERS = ("sparse_adam", "sgd", "adagrad", "rowwise_adagrad")


def _workspace_block(optimizer: torch.optim.Optimizer, rows: int, cols: int, like: Tensor) -> Tensor:
    """A reused (rows, cols) block from the optimizer's workspace (created on first use: loaded optimizers too)."""
    ws = optimizer.__dict__.setdefault("_ws", Workspace())
    return ws.get("fused_block", rows, cols, like)


class Workspace:
    """Scratch blocks reused across steps, grown geometrically and never shrunk.

    Why not plain temporaries: see the module docstring (per-step page faults). Held memory is a few blocks of
    (max touched rows x dim), i.e. batch-sized. Not optimizer state: never checkpointed.
    """

    def __init__(self) -> None:
        self._blocks: dict[str, Tensor] = {}

    def get(self, key: str, rows: int, cols: int, like: Tensor) -> Tensor:
        need = rows * cols
        block = self._blocks.get(key)
        if block is None or block.numel() < need or block.dtype != like.dtype or block.device != like.device:
            grow = 0 if block is None else block.numel() + block.numel() // 4
            block = torch.empty(max(need, grow), dtype=like.dtype, device=like.device)
            self._blocks[key] = block
        return block[:need].view(rows, cols)


def _add_index(idx: Tensor, rows: int) -> Tensor:
    """Index for a row-wise `index_add_` (alpha 1) that stays fast when threads share cores.

    With int64 indices CPU `index_add_` switches to scatter_add's OpenMP radix-sort path: fastest on one thread,
    but its many barriers stall when the cores are shared (2-thread medians of 170 ms vs 23 ms measured on the
    2-core dev VM under load). int32 indices take the plain serial per-row loop, which rounds identically.
    """
    return idx if torch.get_num_threads() == 1 or rows >= 2**31 else idx.to(torch.int32)


def _rows_view(t: Tensor) -> Tensor:
    """(rows, -1) view of a table or of its state: row-wise optimizers treat trailing dims as one row."""
    if t.dim() == 0:
        raise ValueError("sparse/row-wise optimizers need parameters with at least one dimension (rows)")
    return t.view(t.shape[0], math.prod(t.shape[1:]))  # explicit width: a 0-row shard cannot infer -1


def _coalesced_rows(grad: Tensor, ws: Workspace, key: str) -> tuple[Tensor, Tensor]:
    """Unique touched rows (sorted) and their summed gradient rows, as a writable workspace block.

    Equivalent to `grad.coalesce()` but sums duplicates with `index_add_` into a reused block instead of a fresh
    allocation. Duplicates are summed in coalesce's order (its unstable sort), so the result is bit-identical to
    torch's (tested); the caller's gradient is not modified.
    """
    idx, values = kernels.row_sparse_parts(grad)
    if kernels.rows_are_distinct_sorted(grad):
        out = ws.get(key, idx.numel(), values.shape[1], values)
        return idx, out.copy_(values)
    # The same (unstable) sort as coalesce, hence the same order of the duplicate sums.
    sorted_idx, perm = torch.sort(idx)
    rows, inverse = torch.unique_consecutive(sorted_idx, return_inverse=True)
    src = torch.index_select(
        values, 0, perm, out=ws.get(key + "_sorted", idx.numel(), values.shape[1], values)
    )
    out = ws.get(key, rows.numel(), values.shape[1], values).zero_()
    return rows, out.index_add_(0, _add_index(inverse, out.shape[0]), src)


def _decay_rows(table: Tensor, rows: Tensor, lr_wd: float, center: float, ws: Workspace) -> None:
    """Decoupled (AdamW-style) weight decay of the touched rows only: w -= lr * wd * (w - center).

    Lazy on purpose: decaying every row every step would cost O(table) and undo the point of sparse updates. A row
    therefore decays only on steps where it gets a gradient, i.e. rare features (which overfit most) shrink per
    use. `center` is the value rows decay towards: 0, or 1 for the multiplicative mask table (its initial value).
    """
    cur = torch.index_select(table, 0, rows, out=ws.get("decay", rows.numel(), table.shape[1], table))
    table.index_add_(0, _add_index(rows, table.shape[0]), cur.sub_(center).mul_(-lr_wd))


def _run_closure(closure: Callable[[], float] | None) -> float | None:
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class RowWiseAdagrad(eager_optim.EagerOptimizer, torch.optim.Optimizer):
    """FBGEMM-style row-wise Adagrad: state is ONE float32 per row (`sum`, shape (rows,)), accumulated with the mean over the
    embedding dim of the squared (coalesced) row gradient; update row -= lr * g / (sqrt(sum_row) + eps). Accepts sparse and dense grads.
    weight_decay (L2 added to the touched rows' gradient) optional, default 0.

    Why: per-element Adagrad/Adam state is 1-2x the table; one number per row cuts optimizer memory by ~dim x, which
    is what makes very large trainable tables affordable. A sparse step touches only the gradient's rows; a dense
    gradient updates every row (it is table-sized anyway).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 0.01,
        eps: float = 1e-10,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        decay_to: float = 0.0,
    ) -> None:
        if not lr > 0.0:
            raise ValueError(f"RowWiseAdagrad: lr must be > 0, got {lr}")
        if not eps >= 0.0:
            raise ValueError(f"RowWiseAdagrad: eps must be >= 0, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"RowWiseAdagrad: weight_decay must be >= 0, got {weight_decay}")
        if not initial_accumulator_value >= 0.0:
            raise ValueError(
                f"RowWiseAdagrad: initial_accumulator_value must be >= 0, got {initial_accumulator_value}"
            )
        defaults = {
            "lr": lr,
            "eps": eps,
            "weight_decay": weight_decay,
            "initial_accumulator_value": initial_accumulator_value,
            "decay_to": decay_to,
        }
        super().__init__(params, defaults)
        self._ws = Workspace()

    def _init_state(self, p: Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["sum"] = torch.full(
                (_rows_view(p).shape[0],),
                float(group["initial_accumulator_value"]),
                dtype=torch.float32,
                device=p.device,
            )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = _run_closure(closure)
        for group in self.param_groups:
            lr, eps, wd = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
            center = float(group.get("decay_to", 0.0))
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._init_state(p, group)
                acc: Tensor = self.state[p]["sum"]
                table = _rows_view(p)
                if p.grad.is_sparse:
                    self._sparse_update(table, p.grad, acc, lr, eps, wd, center)
                else:
                    g = _rows_view(p.grad)
                    if wd:
                        g = g.add(table - center if center else table, alpha=wd)
                    acc.add_(g.square().mean(dim=1).to(acc.dtype))
                    std = acc.sqrt().add_(eps).to(g.dtype)
                    table.addcdiv_(g, std.unsqueeze(1), value=-lr)
        return loss

    def _sparse_update(
        self, table: Tensor, grad: Tensor, acc: Tensor, lr: float, eps: float, wd: float, center: float
    ) -> None:
        if kernels.can_fuse(table, acc, grad._values()):
            groups = kernels.RowGroups(grad, partial(_workspace_block, self))
            kernels.rowwise_adagrad_step(table, acc, groups, lr, eps, wd, center)
            return
        rows, g = _coalesced_rows(grad, self._ws, "grad")
        if rows.numel() == 0:
            return
        tmp = self._ws.get("tmp", g.shape[0], g.shape[1], g)
        if wd:
            current = torch.index_select(table, 0, rows, out=tmp)
            g.add_(current.sub_(center) if center else current, alpha=wd)
        row_mean_sq = torch.mul(g, g, out=tmp).mean(dim=1).to(acc.dtype)
        acc.index_add_(0, rows, row_mean_sq)
        std = acc.index_select(0, rows).sqrt_().add_(eps).to(g.dtype)
        table.index_add_(0, rows, torch.div(g, std.unsqueeze(1), out=tmp), alpha=-lr)


class FastSparseAdam(eager_optim.EagerOptimizer, torch.optim.Optimizer):
    """torch.optim.SparseAdam's math (masked Adam; one per-parameter step for the bias correction, counted even
    when the gradient is empty), with the workspace and row-indexed state access described in the module docstring.

    Same state keys as SparseAdam (`step`, `exp_avg`, `exp_avg_sq`); `step` is a 0-dim int64 tensor rather than a
    Python int, so checkpoints can load into it in place. Dense gradients are rejected, as SparseAdam does.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        maximize: bool = False,
        weight_decay: float = 0.0,
        decay_to: float = 0.0,
    ) -> None:
        if not lr > 0.0:
            raise ValueError(f"FastSparseAdam: lr must be > 0, got {lr}")
        if not weight_decay >= 0.0:
            raise ValueError(f"FastSparseAdam: weight_decay must be >= 0, got {weight_decay}")
        if not eps > 0.0:
            raise ValueError(f"FastSparseAdam: eps must be > 0, got {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"FastSparseAdam: betas must be in [0, 1), got {betas}")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "maximize": maximize, "weight_decay": weight_decay,
                    "decay_to": decay_to}
        super().__init__(params, defaults)
        self._ws = Workspace()

    def _init_state(self, p: Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.int64)
            state["exp_avg"] = kernels.zeros_hugepages(p)
            state["exp_avg_sq"] = kernels.zeros_hugepages(p)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = _run_closure(closure)
        for group in self.param_groups:
            lr, eps = float(group["lr"]), float(group["eps"])
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise RuntimeError(
                        "FastSparseAdam does not support dense gradients, please consider Adam instead"
                    )
                self._init_state(p, group)
                state = self.state[p]
                if isinstance(state["step"], Tensor):
                    state["step"] += 1
                else:  # state loaded from a torch.optim.SparseAdam state_dict
                    state["step"] = state["step"] + 1
                step = int(state["step"])
                step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
                views = [_rows_view(t) for t in (p, state["exp_avg"], state["exp_avg_sq"])]
                if kernels.can_fuse(*views, p.grad._values()):
                    kernels.sparse_adam_step(
                        *views, kernels.RowGroups(p.grad, partial(_workspace_block, self)), beta1, beta2, eps,
                        step_size, group["maximize"], lr * group.get("weight_decay", 0.0), group.get("decay_to", 0.0),
                    )
                    continue
                rows, g = _coalesced_rows(p.grad, self._ws, "grad")
                if rows.numel() == 0:
                    continue
                if group["maximize"]:
                    g.neg_()
                if group.get("weight_decay", 0.0):
                    _decay_rows(_rows_view(p), rows, lr * group["weight_decay"], group.get("decay_to", 0.0), self._ws)
                self._update(p, state, rows, g, beta1, beta2, eps, step_size)
        return loss

    def _update(
        self,
        p: Tensor,
        state: dict,
        rows: Tensor,
        g: Tensor,
        beta1: float,
        beta2: float,
        eps: float,
        step_size: float,
    ) -> None:
        """Op-for-op the float32 arithmetic of torch's `_functional.sparse_adam` (hence bit-identical results).

        State rows are updated with `index_add_` of the same deltas torch adds (`old + update`): faster on CPU
        than `index_copy_` of the new rows, and it rounds identically. Whole-block ops, not row chunks: chunking
        multiplies the OpenMP regions per step, and each one stalls when threads share cores (measured 2-3x
        slower under load, no gain when idle).
        """
        exp_avg, exp_avg_sq, table = (_rows_view(t) for t in (state["exp_avg"], state["exp_avg_sq"], p))
        add_rows = _add_index(rows, table.shape[0])
        old = torch.index_select(exp_avg, 0, rows, out=self._ws.get("old", *g.shape, like=g))
        update = torch.sub(g, old, out=self._ws.get("update", *g.shape, like=g)).mul_(1 - beta1)
        exp_avg.index_add_(0, add_rows, update)
        numer = update.add_(old)  # == the new exp_avg rows
        torch.index_select(exp_avg_sq, 0, rows, out=old)
        g.square_().sub_(old).mul_(1 - beta2)  # the exp_avg_sq update
        exp_avg_sq.index_add_(0, add_rows, g)
        denom = g.add_(old).sqrt_().add_(eps)
        table.index_add_(0, add_rows, numer.div_(denom).mul_(-step_size))


class SparseSGD(eager_optim.SGD):
    """torch's SGD whose plain sparse steps (no momentum, no weight decay) run the fused row kernel.

    Same state and state_dict as torch.optim.SGD; anything the kernel does not cover goes to torch's step.
    """

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        fused = all(
            not g["momentum"] and not g["weight_decay"] and not g["maximize"]
            and all(p.grad is None or (p.grad.is_sparse and kernels.can_fuse(_rows_view(p), p.grad._values()))
                    for p in g["params"])
            for g in self.param_groups
        )
        if not fused:
            return super().step(closure)
        loss = _run_closure(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    kernels.sgd_step(_rows_view(p), kernels.RowGroups(p.grad, partial(_workspace_block, self)), float(group["lr"]))
        return loss


def build_sparse_optimizer(
    name: str, params: list[torch.nn.Parameter], lr: float, **kw
) -> torch.optim.Optimizer:
    """Optimizer for the trainable tables by config name (`optim.sparse`).

    Settings that torch would only reject at the first step (or silently mishandle) are refused here, at build time.
    """
    if name not in SPARSE_OPTIMIZERS:
        raise ValueError(
            f"optim.sparse: unknown sparse optimizer {name!r}; expected one of {', '.join(SPARSE_OPTIMIZERS)}"
        )
    decays = name in ("sparse_adam", "rowwise_adagrad")
    if not decays and kw.get("weight_decay", 0.0):
        raise ValueError(
            f"optim.sparse_weight_decay: {name} cannot decay sparse rows; use sparse_adam or rowwise_adagrad"
        )
    if not decays:  # decay keys (also in param groups) mean nothing to torch's SGD / Adagrad
        kw = {k: v for k, v in kw.items() if k not in ("weight_decay", "decay_to")}
        params = [{k: v for k, v in g.items() if k != "decay_to"} if isinstance(g, dict) else g for g in params]
    if name == "sparse_adam":
        return FastSparseAdam(params, lr=lr, **kw)
    if name == "sgd":
        if kw.get("momentum", 0.0):
            raise ValueError(
                "optim.sparse: sgd with momentum is not supported for sparse gradients (momentum must be 0)"
            )
        return SparseSGD(params, lr=lr, **kw)
    if name == "adagrad":
        return eager_optim.Adagrad(params, lr=lr, **kw)
    return RowWiseAdagrad(params, lr=lr, **kw)


def _scalar_dtype(fused: bool | None) -> torch.dtype:
    """torch.optim's dtype for `step` tensors (mirrors torch.optim.optimizer._get_scalar_dtype)."""
    if fused:
        return torch.float32
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _init_torch_state(optimizer: torch.optim.Optimizer, p: Tensor, group: dict) -> None:
    """Create one parameter's state exactly as the optimizer's own first step would (no-op when it exists)."""
    state = optimizer.state[p]
    if state:
        return
    zeros = lambda: kernels.zeros_hugepages(p)  # noqa: E731
    if isinstance(optimizer, torch.optim.SparseAdam):
        state.update(step=0, exp_avg=zeros(), exp_avg_sq=zeros())
    elif isinstance(optimizer, torch.optim.Adagrad):
        fused = group.get("fused")
        step = (
            torch.zeros((), dtype=_scalar_dtype(fused), device=p.device)
            if fused
            else torch.tensor(0.0, dtype=_scalar_dtype(None))
        )
        init = group["initial_accumulator_value"]
        init = complex(init, init) if torch.is_complex(p) else init
        state.update(step=step, sum=torch.full_like(p, init, memory_format=torch.preserve_format))
    elif isinstance(optimizer, torch.optim.Adam):  # AdamW is a subclass of Adam in torch 2.13
        on_device = group.get("capturable") or group.get("fused")
        state["step"] = (
            torch.zeros((), dtype=_scalar_dtype(group.get("fused")), device=p.device)
            if on_device
            else torch.tensor(0.0, dtype=_scalar_dtype(None), device="cpu")
        )
        state.update(exp_avg=zeros(), exp_avg_sq=zeros())
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = zeros()
    elif isinstance(optimizer, torch.optim.SGD):
        if group["momentum"] == 0:
            return
        if group["dampening"] != 0:
            # SGD's first step copies the gradient into the buffer without dampening; a zero buffer would dampen it.
            raise ValueError(
                "init_optimizer_state: SGD with momentum and dampening != 0 cannot be pre-initialised"
            )
        state["momentum_buffer"] = zeros()  # 0 * momentum + grad == grad: the first step is unchanged
    else:
        raise TypeError(f"init_optimizer_state: unsupported optimizer {type(optimizer).__name__}")


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create every parameter's state now, with torch's shapes/dtypes, so a checkpoint can be copied into it.

    Needed because a fresh SparseAdam (and Adam/AdamW, FastSparseAdam, RowWiseAdagrad) has empty state and a load
    into it restores nothing. Only creates zeros: no gradients, no parameter change, and the next real step is
    exactly that of a fresh optimizer.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            if isinstance(optimizer, RowWiseAdagrad | FastSparseAdam):
                optimizer._init_state(p, group)
            else:
                _init_torch_state(optimizer, p, group)


def optimizer_state_tensors(
    optimizer: torch.optim.Optimizer, param_names: dict[torch.nn.Parameter, str]
) -> dict[str, torch.Tensor]:
    """Flat `<param_name>/<state_key>` -> the live state tensor (not a copy), for checkpointing in place.

    A Python-number entry (torch.optim.SparseAdam's int `step`) is replaced in the state by a 0-dim float64 tensor
    so it can be returned live; SparseAdam's arithmetic is bit-identical with it (tested).
    """
    out: dict[str, Tensor] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p not in param_names:
                raise KeyError(
                    f"optimizer_state_tensors: parameter of shape {tuple(p.shape)} has no name in param_names"
                )
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if isinstance(value, bool | int | float):
                    value = state[key] = torch.tensor(float(value), dtype=torch.float64)
                if not isinstance(value, Tensor):
                    raise TypeError(
                        f"optimizer_state_tensors: {param_names[p]}/{key} is a {type(value).__name__}"
                    )
                out[f"{param_names[p]}/{key}"] = value
    return out
