"""torch.optim optimizers without their torch.compile wrappers, so building and stepping them never imports
torch._dynamo.

Why: torch 2.x wraps `Optimizer.add_param_group` and `zero_grad` in `torch._disable_dynamo`, and the `step` of
Adam(W), SGD and Adagrad in `_use_grad_for_differentiable`; the first call of either imports `torch._dynamo`
(and with it sympy, the FX tracer and FSDP's modules): 0.9-1.3 s on these machines, measured with
`python -X importtime`, about a tenth of the demo's whole process (`trainer train --config configs/demo.toml`)
and of every rank's start under torchrun. The wrappers only matter when an optimizer step is traced by
torch.compile, which this trainer never does. The classes here call the same functions unwrapped (their
`__wrapped__`, set by `functools.wraps`), with autograd off as the wrappers set it, so their arithmetic is
torch's, op for op (tests/unit/test_optim_split.py compares them with torch's classes step by step). Where a
torch version has no `__wrapped__` the wrapped function is called: slower to start, same results.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def _unwrapped(fn: Callable) -> Callable:
    return getattr(fn, "__wrapped__", fn)


_ADD_PARAM_GROUP = _unwrapped(torch.optim.Optimizer.add_param_group)
_ZERO_GRAD = _unwrapped(torch.optim.Optimizer.zero_grad)


class EagerOptimizer:
    """Mixin placed before a `torch.optim.Optimizer` subclass: its `add_param_group` and `zero_grad` without the
    `torch._disable_dynamo` wrapper (module docstring)."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        _ADD_PARAM_GROUP(self, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        _ZERO_GRAD(self, set_to_none)


def _eager_step(base: type[torch.optim.Optimizer]) -> Callable:
    raw = _unwrapped(base.step)

    @torch.no_grad()  # what _use_grad_for_differentiable sets (differentiable=False); a closure enables grad itself
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        return raw(self, closure)

    step.__doc__ = f"{base.__name__}.step without its torch._dynamo wrapper."
    return step


class AdamW(EagerOptimizer, torch.optim.AdamW):
    """torch.optim.AdamW, built and stepped without importing torch._dynamo."""

    step = _eager_step(torch.optim.AdamW)


class SGD(EagerOptimizer, torch.optim.SGD):
    """torch.optim.SGD, built and stepped without importing torch._dynamo."""

    step = _eager_step(torch.optim.SGD)


class Adagrad(EagerOptimizer, torch.optim.Adagrad):
    """torch.optim.Adagrad, built and stepped without importing torch._dynamo."""

    step = _eager_step(torch.optim.Adagrad)
