"""torch.optim optimizers without their torch.compile wrappers, so building and stepping them never imports
torch._dynamo.

Why: torch 2.x wraps `Optimizer.add_param_group` and `zero_grad` in `torch._disable_dynamo`, and the `step` of
Adam(W), SGD and Adagrad in `_use_grad_for_differentiable`; the first call of either imports `torch._dynamo`
(and with it sympy, the FX tracer and FSDP's modules): 0.9-1.3 s on these machines, measured with
`python -X importtime`, about a tenth of the demo's whole process (`trainer train --config configs/demo.toml`).
The wrappers only matter when an optimizer step is traced by torch.compile, which this trainer never does. The
classes here call the same functions under every `functools.wraps` layer (`inspect.unwrap`), with the autograd
mode the wrappers set (off unless the optimizer is `differentiable`), so their arithmetic is torch's, op for op
(tests/unit/test_eager_optim.py compares them with torch's classes step by step). Where a torch version wraps
without `functools.wraps`, the wrapped function is called: slower to start, same results. Under torchrun DDP's
constructor imports torch._dynamo anyway.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from typing import Any

import torch


def _unwrapped(fn: Callable) -> Callable:
    """The function under every `functools.wraps` layer: torch's dynamo wrappers, and the profiling hook that
    `Optimizer.__init__` puts on a class's `step` the first time one of its instances is built (so the result
    does not depend on whether a torch optimizer was built before this module was imported)."""
    return inspect.unwrap(fn)


_ADD_PARAM_GROUP = _unwrapped(torch.optim.Optimizer.add_param_group)
_ZERO_GRAD = _unwrapped(torch.optim.Optimizer.zero_grad)
_STATE_DICT = _unwrapped(torch.optim.Optimizer.state_dict)
_LOAD_STATE_DICT = _unwrapped(torch.optim.Optimizer.load_state_dict)


class EagerOptimizer:
    """Mixin placed before a `torch.optim.Optimizer` subclass: its `add_param_group`, `zero_grad`, `state_dict`
    and `load_state_dict` without the `torch._disable_dynamo` wrapper (module docstring)."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        _ADD_PARAM_GROUP(self, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        _ZERO_GRAD(self, set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return _STATE_DICT(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _LOAD_STATE_DICT(self, state_dict)


def _eager_step(base: type[torch.optim.Optimizer],
                context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> Callable:
    """`base.step` without its dynamo wrapper, run inside `context()`."""
    raw = _unwrapped(base.step)

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        # autograd as _use_grad_for_differentiable sets it: off, unless the optimizer is differentiable; a closure
        # turns it on for itself
        with torch.set_grad_enabled(bool(self.defaults.get("differentiable", False))), context():
            return raw(self, closure)

    step.__doc__ = f"{base.__name__}.step without its torch._dynamo wrapper."
    step._raw_step = raw  # for tests; not `__wrapped__`, which would let inspect.unwrap skip the grad mode above
    return step


class AdamW(EagerOptimizer, torch.optim.AdamW):
    """torch.optim.AdamW, built and stepped without importing torch._dynamo."""

    step = _eager_step(torch.optim.AdamW)


class SGD(EagerOptimizer, torch.optim.SGD):
    """torch.optim.SGD, built and stepped without importing torch._dynamo."""

    step = _eager_step(torch.optim.SGD)


class Adagrad(EagerOptimizer, torch.optim.Adagrad):
    """torch.optim.Adagrad, built and stepped without importing torch._dynamo."""

    # Its sparse update builds tensors from the gradient's own (valid) indices; with the invariant checks left at
    # their default (off), torch warned "Sparse invariant checks are implicitly disabled" on a user's first step.
    # Off explicitly: the same computation, no warning.
    step = _eager_step(torch.optim.Adagrad, lambda: torch.sparse.check_sparse_tensor_invariants(enable=False))
