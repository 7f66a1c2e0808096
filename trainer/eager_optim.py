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

`zero_grad` and `run_step` also leave out the `record_function` that torch opens around every `zero_grad` and
`step` for its profiler, unless a profiler is running or step hooks are registered (then torch's own code runs):
each call entered and left a profiler range, about 20-40 us on these machines, four a training step (two
optimizers), for nothing when nobody profiles.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
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


def _profiling() -> bool:
    """Whether a torch profiler is recording (where torch does not say, assume it is: torch's code then runs)."""
    enabled = getattr(torch._C._autograd, "_profiler_enabled", None)
    return enabled is None or bool(enabled())


def _step_hooked(opt: torch.optim.Optimizer) -> bool:
    """Whether any optimizer step hook is registered, globally or on `opt` (unknown: assume so)."""
    module = sys.modules.get(torch.optim.Optimizer.__module__)  # torch.optim.optimizer, which torch.optim hides
    hooks = (getattr(module, "_global_optimizer_pre_hooks", None), getattr(module, "_global_optimizer_post_hooks", None),
             getattr(opt, "_optimizer_step_pre_hooks", None), getattr(opt, "_optimizer_step_post_hooks", None))
    return any(h is None or len(h) for h in hooks)


def run_step(opt: torch.optim.Optimizer) -> Any:
    """`opt.step()`; where torch's profiling wrapper is on the class's step (`Optimizer.__init__` puts it there)
    and neither a profiler nor a step hook is there for it to serve, the step under it (module docstring)."""
    step = type(opt).step
    inner = getattr(step, "__wrapped__", None) if getattr(step, "hooked", False) else None
    # a step replaced on the instance (a torch LR scheduler counts steps so) is called as it is
    if inner is None or "step" in vars(opt) or _profiling() or _step_hooked(opt):
        return opt.step()
    out = inner(opt)
    opt._optimizer_step_code()  # what the wrapper calls after the step (a no-op kept for profilers)
    return out


class EagerOptimizer:
    """Mixin placed before a `torch.optim.Optimizer` subclass: its `add_param_group`, `zero_grad`, `state_dict`
    and `load_state_dict` without the `torch._disable_dynamo` wrapper (module docstring)."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        _ADD_PARAM_GROUP(self, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not set_to_none or _profiling():
            _ZERO_GRAD(self, set_to_none)
            return
        for group in self.param_groups:  # torch's loop with set_to_none, without its profiler range
            for p in group["params"]:
                if p.grad is not None:
                    p.grad = None

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
