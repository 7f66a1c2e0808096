"""The one place that splits parameters into optimizers, and the learning-rate schedule.

Groups, by parameter name:
  - `sparse`:     trainable embedding tables (OOV words, n-gram buckets, masks): optim.sparse at optim.sparse_lr
  - `pretrained`: the correction to pretrained rows (`pretrained_delta`): optim.sparse at optim.pretrained_lr,
                  stepped only once unfrozen
  - `dense`:      everything else (LSTM, head): optim.dense (AdamW or SGD) at optim.dense_lr
The frozen pretrained table is not a parameter at all; `OptimizerContainer` proves that every trainable parameter
is in exactly one optimizer and that no optimizer holds the frozen table's storage.
"""

import logging
import math

import torch
from torch import nn

from trainer import eager_optim
from trainer.config import OptimConfig
from trainer.sparse_optim import (
    SparseSGD,
    build_sparse_optimizer,
    init_optimizer_state,
    optimizer_state_tensors,
)

log = logging.getLogger(__name__)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def clean_name(name: str) -> str:
    """Parameter names without DDP's `module.` wrappers, so checkpoints do not depend on the wrapping."""
    return name.replace("module.", "")


def _decay_groups(named: list[tuple[str, nn.Parameter]]) -> list[dict]:
    """Sparse-table param groups by the value their rows decay towards: the mask (M starts at 1, and M = 1 means
    "the pretrained row as is") towards 1, every other table towards 0. One group when there is no mask."""
    groups = [
        {"params": [p for n, p in named if not _is_mask(n)], "decay_to": 0.0},
        {"params": [p for n, p in named if _is_mask(n)], "decay_to": 1.0},
    ]
    return [g for g in groups if g["params"]]


def _is_mask(name: str) -> bool:
    return name.split(".")[-2:-1] == ["mask"]  # tables.bags.mask.weight


def group_of(name: str) -> str:
    if name.startswith("tables.") and ".wide_" in name:
        return "wide"
    if name.startswith("tables."):
        return "pretrained" if ".pretrained_delta." in name else "sparse"
    return "dense"


def lr_multiplier(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Linear warm-up to 1, then linear / cosine decay to min_lr_ratio at total_steps (or constant)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant" or total_steps <= cfg.warmup_steps:
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    if cfg.schedule == "cosine":
        shape = 0.5 * (1 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


class OptimizerContainer:
    """Dense + sparse (+ pretrained-correction) optimizers stepped together, with one schedule."""

    def __init__(
        self,
        model: nn.Module,
        cfg: OptimConfig,
        total_steps: int,
        unfreeze_step: int,
        frozen: torch.Tensor | None = None,
    ) -> None:
        self.cfg = cfg
        self.total_steps = total_steps
        self.unfreeze_step = unfreeze_step
        named: dict[str, list[tuple[str, nn.Parameter]]] = {"dense": [], "sparse": [], "pretrained": [], "wide": []}
        self.names: dict[nn.Parameter, str] = {}
        for raw_name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            name = clean_name(raw_name)
            named[group_of(name)].append((name, param))
            self.names[param] = name
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        if named["dense"]:
            params = [p for _, p in named["dense"]]
            if cfg.dense == "adamw":
                self.optimizers["dense"] = eager_optim.AdamW(params, lr=cfg.dense_lr, weight_decay=cfg.weight_decay)
            else:
                self.optimizers["dense"] = eager_optim.SGD(
                    params, lr=cfg.dense_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
                )
        if named["sparse"]:
            self.optimizers["sparse"] = build_sparse_optimizer(
                cfg.sparse, _decay_groups(named["sparse"]), cfg.sparse_lr, weight_decay=cfg.sparse_weight_decay
            )
        if named["wide"]:  # linear tables: plain SGD (SparseAdam and Adagrad were worse on the demo)
            self.optimizers["wide"] = build_sparse_optimizer("sgd", [p for _, p in named["wide"]], cfg.wide_lr)
        if named["pretrained"]:
            if cfg.sparse == "sgd" and cfg.pretrained_lr * 1000 < cfg.sparse_lr:
                # the correction shares the tables' optimizer type; the default pretrained_lr is on Adam's scale
                log.warning("optim.pretrained_lr = %g with optim.sparse = sgd at optim.sparse_lr = %g: the pretrained "
                            "rows' correction will barely move (SGD rates here are on the sparse_lr scale; the demo's "
                            "late unfreeze used sparse_lr / 100)", cfg.pretrained_lr, cfg.sparse_lr)
            self.optimizers["pretrained"] = build_sparse_optimizer(
                cfg.sparse, [p for _, p in named["pretrained"]], cfg.pretrained_lr
            )
        self._fused = None  # fuse_tables
        self.base_lr = {name: [g["lr"] for g in opt.param_groups] for name, opt in self.optimizers.items()}
        self.group_names = {g: [n for n, _ in named[g]] for g in named}
        self._check_coverage(model, frozen)

    def _check_coverage(self, model: nn.Module, frozen: torch.Tensor | None) -> None:
        seen: dict[int, str] = {}
        for group, opt in self.optimizers.items():
            for pg in opt.param_groups:
                for p in pg["params"]:
                    if id(p) in seen:
                        raise AssertionError(f"parameter {self.names[p]} is in optimizers {seen[id(p)]} and {group}")
                    seen[id(p)] = group
                    if frozen is not None and frozen.numel() and p.untyped_storage().data_ptr() == frozen.untyped_storage().data_ptr():
                        raise AssertionError(f"optimizer {group} holds the frozen pretrained table")
        missing = [clean_name(n) for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
        if missing:
            raise AssertionError(f"trainable parameters in no optimizer: {missing}")

    def describe(self) -> str:
        lines = []
        for group, names in self.group_names.items():
            if not names:
                continue
            opt = self.optimizers[group]
            numel = sum(p.numel() for pg in opt.param_groups for p in pg["params"])
            fused = (" (fused with the lookups' backward: fused_sgd.py)"
                     if self._fused and (group == "sparse" or (group == "wide" and self._fused.wide)) else "")
            lines.append(f"  {group:<10} {type(opt).__name__:<16} lr={self.base_lr[group][0]:g} "
                         f"params={numel:,} [{', '.join(names)}]{fused}")
        return "optimizer split:\n" + "\n".join(lines)

    def pretrained_active(self, step: int) -> bool:
        return self.unfreeze_step >= 0 and step >= self.unfreeze_step

    def set_lr(self, step: int) -> None:
        mult = lr_multiplier(step, self.cfg, self.total_steps)
        for name, opt in self.optimizers.items():
            for pg, base in zip(opt.param_groups, self.base_lr[name], strict=True):
                pg["lr"] = base * mult

    def lrs(self, step: int) -> dict[str, float]:
        """The learning rate each optimizer stepped with at `step`: 0 for the pretrained correction before the
        unfreeze step (its optimizer is not stepped then)."""
        return {name: 0.0 if name == "pretrained" and not self.pretrained_active(step) else opt.param_groups[0]["lr"]
                for name, opt in self.optimizers.items()}

    def zero_grad(self) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        if self._fused is not None:  # the fused tables' kept gradients go too, as their .grad would
            self._fused.pending.clear()

    def dense_params(self) -> list[nn.Parameter]:
        opt = self.optimizers.get("dense")
        return [p for pg in opt.param_groups for p in pg["params"]] if opt else []

    def clip_dense(self, max_norm: float) -> torch.Tensor:
        """Clip the dense group only (clip_grad_norm_ cannot handle sparse gradients); returns the norm as a
        tensor without a host sync. Where every gradient shares one device and dtype (always, in this trainer),
        clip_grad_norm_'s own ops, without its grouping by device and dtype: the same norm and scaled gradients
        bit for bit (tests/unit/test_optim_split.py), about a third of its 130 us for the demo's head."""
        params = [p for p in self.dense_params() if p.grad is not None]
        if not params:
            return torch.zeros(())
        grads = [p.grad for p in params]
        kinds = {(g.device, g.dtype) for g in grads}
        if len(kinds) > 1 or next(iter(kinds))[0].type not in ("cpu", "cuda"):
            if max_norm > 0:
                return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
            return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        with torch.no_grad():
            total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
            if max_norm > 0:
                torch._foreach_mul_(grads, torch.clamp(float(max_norm) / (total + 1e-6), max=1.0))
        return total

    def fuse_tables(self, fused) -> None:
        """Let `fused` (fused_sgd.FusedTableSGD) update the sparse (and wide) optimizers' tables at each step, from
        the pooled sums' (and wide logits') gradient, at those optimizers' learning rates (the tables keep no
        `.grad`, so their own steps skip them). Every table it updates must be in one of them: it stays their one
        optimizer."""
        opts = [self.optimizers[k] for k in ("sparse", "wide") if k in self.optimizers]
        groups = {id(p): g for opt in opts for g in opt.param_groups for p in g["params"]}
        missing = [n for n, p in fused.params().items() if id(p) not in groups]
        if missing or not opts or not all(isinstance(opt, SparseSGD) for opt in opts):
            raise AssertionError(f"fused sgd: tables {missing} not stepped by the sparse (or wide) optimizer's "
                                 "SparseSGD")
        self._fused = fused
        self._fused_groups = {name: groups[id(p)] for name, p in fused.params().items()}

    def step(self, step: int) -> None:
        for name, opt in self.optimizers.items():
            if name == "pretrained" and not self.pretrained_active(step):
                continue
            eager_optim.run_step(opt)
        if self._fused is not None:
            self._fused.apply({name: g["lr"] for name, g in self._fused_groups.items()})

    def init_state(self) -> None:
        """Create every optimizer's state before a checkpoint is loaded into it (a fresh SparseAdam has none)."""
        for opt in self.optimizers.values():
            init_optimizer_state(opt)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Flat `group/param_name/state_key` -> live state tensor, for the checkpoint."""
        out: dict[str, torch.Tensor] = {}
        for group, opt in self.optimizers.items():
            for key, tensor in optimizer_state_tensors(opt, self.names).items():
                out[f"{group}/{key}"] = tensor
        return out
