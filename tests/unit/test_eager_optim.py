"""trainer.eager_optim: torch's dense optimizers without their torch._dynamo wrappers: the same steps, and no
torch._dynamo import when the trainer builds and steps its optimizers."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from trainer import eager_optim

ROOT = Path(__file__).resolve().parents[2]

CASES = [
    (eager_optim.AdamW, torch.optim.AdamW, {"lr": 0.05, "weight_decay": 0.01}),
    (eager_optim.AdamW, torch.optim.AdamW, {"lr": 0.05, "amsgrad": True}),
    (eager_optim.SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.001}),
    (eager_optim.SGD, torch.optim.SGD, {"lr": 0.1}),
    (eager_optim.Adagrad, torch.optim.Adagrad, {"lr": 0.1}),
]


@pytest.mark.parametrize("ours, theirs, kwargs", CASES)
def test_steps_equal_torchs_bit_for_bit(ours, theirs, kwargs):
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(4, 3, generator=gen), torch.randn(3, generator=gen)]
    runs = []
    for cls in (ours, theirs):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = cls(params, **kwargs)
        data = torch.Generator().manual_seed(1)
        for _ in range(5):
            x = torch.randn(8, 4, generator=data)
            loss = ((x @ params[0] + params[1]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        runs.append((params, opt.state_dict()))
    (ours_params, ours_state), (their_params, their_state) = runs
    for a, b in zip(ours_params, their_params, strict=True):
        assert torch.equal(a, b)
    assert ours_state["param_groups"] == their_state["param_groups"]
    for key, state in their_state["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(ours_state["state"][key][name]), torch.as_tensor(value)), name


def test_closure_runs_with_grad_enabled_and_its_loss_is_returned():
    p = torch.nn.Parameter(torch.ones(2))
    opt = eager_optim.AdamW([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p * p).sum()
        loss.backward()  # fails if the step had left autograd off for the closure
        return loss

    assert opt.step(closure).item() == 2.0
    assert not torch.equal(p.detach(), torch.ones(2))


def test_zero_grad_sets_to_none_or_zeroes():
    p = torch.nn.Parameter(torch.ones(2))
    opt = eager_optim.SGD([p], lr=0.1)
    p.sum().backward()
    opt.zero_grad(set_to_none=False)
    assert p.grad is not None and not p.grad.any()
    opt.zero_grad()
    assert p.grad is None


def _trained(step, steps=4):
    """Weights after `steps` AdamW steps taken through `step(opt)`."""
    params = [torch.nn.Parameter(torch.linspace(-1, 1, 12).reshape(4, 3)), torch.nn.Parameter(torch.ones(3))]
    opt = eager_optim.AdamW(params, lr=0.05)
    data = torch.Generator().manual_seed(3)
    for _ in range(steps):
        opt.zero_grad()
        ((torch.randn(8, 4, generator=data) @ params[0] + params[1]) ** 2).mean().backward()
        step(opt)
    return params, opt


def test_run_step_is_the_step_without_the_profiler_range():
    ours, opt = _trained(eager_optim.run_step)
    theirs, _ = _trained(lambda o: o.step())
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    assert getattr(type(opt).step, "hooked", False)  # torch's wrapper is on the class: run_step went under it


def test_run_step_still_calls_step_hooks_and_opens_the_profiler_range():
    calls = []
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    handle = register_optimizer_step_pre_hook(lambda opt, args, kwargs: calls.append("global"))
    try:
        _trained(eager_optim.run_step, steps=2)
    finally:
        handle.remove()
    assert calls == ["global", "global"]
    params, opt = _trained(eager_optim.run_step, steps=1)
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("own"))
    eager_optim.run_step(opt)
    assert calls[-1] == "own"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        eager_optim.run_step(opt)
        opt.zero_grad()
    names = {e.name for e in prof.events()}
    assert "Optimizer.step#AdamW.step" in names and "Optimizer.zero_grad#AdamW.zero_grad" in names


def test_run_step_calls_a_step_replaced_on_the_instance():
    """A torch LR scheduler wraps `opt.step` on the instance to count steps: run_step must go through it."""
    import warnings

    params, opt = _trained(eager_optim.run_step, steps=1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Detected call of `lr_scheduler.step()` before `optimizer.step()`"
        eager_optim.run_step(opt)
        scheduler.step()
    assert opt.param_groups[0]["lr"] == 0.05 * 0.5


def test_add_param_group_checks_as_torch_does():
    a, b = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))
    opt = eager_optim.AdamW([a], lr=0.1)
    opt.add_param_group({"params": [b], "lr": 0.2})
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.2]
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [a]})


def test_a_differentiable_optimizer_steps_with_autograd_on_as_torchs_does():
    # torch's wrapper turns autograd on for differentiable=True: an in-place update of a leaf that requires grad
    # then fails the same way in both
    for cls in (torch.optim.SGD, eager_optim.SGD):
        p = torch.nn.Parameter(torch.ones(2))
        opt = cls([p], lr=0.1, differentiable=True)
        p.grad = torch.ones(2)
        with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
            opt.step()


def test_state_dict_round_trip_equals_torchs():
    def run(cls):
        p = torch.nn.Parameter(torch.arange(3.0))
        opt = cls([p], lr=0.1)
        (p * p).sum().backward()
        opt.step()
        state = opt.state_dict()
        q = torch.nn.Parameter(p.detach().clone())
        again = cls([q], lr=0.5)
        again.load_state_dict(state)
        (q * q).sum().backward()
        again.step()
        return q, again.state_dict()

    (ours, ours_state), (theirs, their_state) = run(eager_optim.AdamW), run(torch.optim.AdamW)
    assert torch.equal(ours, theirs)
    assert ours_state["param_groups"] == their_state["param_groups"]
    assert torch.equal(ours_state["state"][0]["exp_avg_sq"], their_state["state"][0]["exp_avg_sq"])


def test_steps_unwrap_to_torchs_own_function_whatever_was_built_first():
    """torch puts a profiling hook on a class's `step` when its first instance is built: built before this module
    is imported, one `__wrapped__` layer would have been the hook, leaving the dynamo wrapper in place."""
    script = textwrap.dedent("""
        import torch
        p = torch.nn.Parameter(torch.ones(1))
        for cls in (torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad):
            cls([p], lr=0.1)  # patches cls.step with torch's hook before eager_optim exists
        from trainer import eager_optim
        for ours in (eager_optim.AdamW, eager_optim.SGD, eager_optim.Adagrad):
            raw = ours.step._raw_step
            assert not hasattr(raw, "__wrapped__"), ours
            assert raw.__qualname__ in ("Adam.step", "SGD.step", "Adagrad.step"), raw.__qualname__
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "ok", out.stderr


def test_the_trainers_optimizers_do_not_import_dynamo():
    """Build every dense / sparse optimizer pair the config allows, create their state as a resume does, step
    them and round-trip their state_dict, in a fresh interpreter: torch._dynamo must stay unimported (it costs
    about a second of every start)."""
    script = textwrap.dedent("""
        import sys
        import torch
        from trainer.config import OptimConfig
        from trainer.optim import OptimizerContainer
        from tests.unit.test_optim_split import backward, make_model
        for sparse, lr in (("sgd", 1.0), ("sparse_adam", 0.01), ("rowwise_adagrad", 0.01), ("adagrad", 0.01)):
            for dense in ("adamw", "sgd"):
                model = make_model()
                model.delta_active = True
                opts = OptimizerContainer(model, OptimConfig(sparse=sparse, sparse_lr=lr, dense=dense), 10, 0)
                opts.init_state()
                for step in range(2):
                    opts.zero_grad()
                    backward(model)
                    opts.step(step)
                for opt in opts.optimizers.values():  # a state_dict round trip, as a user's own save might do
                    opt.load_state_dict(opt.state_dict())
        print("dynamo" if "torch._dynamo" in sys.modules else "no dynamo")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "no dynamo", out.stderr


def test_sparse_adagrad_steps_without_torchs_invariant_warning():
    """torch warns "Sparse invariant checks are implicitly disabled" once per process, on Adagrad's first sparse
    step: a fresh interpreter, so an earlier test cannot have used up the warning."""
    script = textwrap.dedent("""
        import warnings
        import torch
        from trainer import eager_optim
        warnings.simplefilter("error")
        emb = torch.nn.Embedding(10, 4, sparse=True)
        opt = eager_optim.Adagrad(emb.parameters(), lr=0.1)
        before = emb.weight.detach().clone()
        emb(torch.tensor([1, 2, 2])).sum().backward()
        opt.step()
        changed = (emb.weight.detach() != before).any(dim=1).nonzero().flatten().tolist()
        assert changed == [1, 2], changed
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "ok", out.stderr
