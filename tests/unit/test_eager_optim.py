"""trainer.eager_optim: torch's dense optimizers without their torch._dynamo wrappers: the same steps, and no
torch._dynamo import when the trainer builds and steps its optimizers."""

import subprocess
import sys
import textwrap

import pytest
import torch

from trainer import eager_optim

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


def test_add_param_group_checks_as_torch_does():
    a, b = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))
    opt = eager_optim.AdamW([a], lr=0.1)
    opt.add_param_group({"params": [b], "lr": 0.2})
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.2]
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [a]})


def test_the_trainers_optimizers_do_not_import_dynamo():
    """Build the demo's optimizer split (AdamW + SparseSGD) and every sparse optimizer, step each, in a fresh
    interpreter: torch._dynamo must stay unimported (it costs about a second of every start)."""
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
                for step in range(2):
                    opts.zero_grad()
                    backward(model)
                    opts.step(step)
        print("dynamo" if "torch._dynamo" in sys.modules else "no dynamo")
    """)
    root = __import__("pathlib").Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root, check=True)
    assert out.stdout.strip() == "no dynamo", out.stderr
