"""Sparse optimizers for trainable tables: math against references, state creation for checkpoint loads, and
the guarantee that a step's cost (and temporaries) track the touched rows, not the table."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from trainer import eager_optim
from trainer.sparse_optim import (
    SPARSE_OPTIMIZERS,
    FastSparseAdam,
    RowWiseAdagrad,
    SparseSGD,
    Workspace,
    _coalesced_rows,
    build_sparse_optimizer,
    init_optimizer_state,
    optimizer_state_tensors,
)

pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks")


def sparse_grad(rows: int, dim: int, ids: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Uncoalesced row-sparse gradient, as nn.Embedding(sparse=True) produces (duplicates kept)."""
    values = torch.randn(ids.numel(), dim, generator=gen)
    return torch.sparse_coo_tensor(ids.view(1, -1), values, (rows, dim))


def ids_with_duplicates(n: int, high: int, gen: torch.Generator) -> torch.Tensor:
    ids = torch.randint(0, high, (n,), generator=gen)
    return torch.cat([ids, ids[: n // 4]])  # guaranteed repeats, not adjacent


def rowwise_reference(
    w: torch.Tensor, acc: torch.Tensor, grad: torch.Tensor, lr: float, eps: float, wd: float
) -> None:
    """Row-wise Adagrad, one touched row at a time, in float64 (w, acc are float64 and updated in place)."""
    grad = grad.coalesce() if grad.is_sparse else grad.to_sparse(1).coalesce()
    for row, g in zip(grad.indices()[0].tolist(), grad.values().double(), strict=True):
        g = g + wd * w[row]
        acc[row] += (g * g).mean()
        w[row] -= lr * g / (acc[row].sqrt() + eps)


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_rowwise_adagrad_matches_float64_reference_and_leaves_untouched_rows(wd: float, threads: int) -> None:
    gen = torch.Generator().manual_seed(1)
    rows, dim, lr, eps, init_acc = 60, 16, 0.3, 1e-10, 0.1
    w0 = torch.randn(rows, dim, generator=gen)
    p = torch.nn.Parameter(w0.clone())
    opt = RowWiseAdagrad([p], lr=lr, eps=eps, weight_decay=wd, initial_accumulator_value=init_acc)
    w64, acc64 = w0.double(), torch.full((rows,), init_acc, dtype=torch.float64)
    for step in range(6):
        grad = sparse_grad(
            rows, dim, ids_with_duplicates(30, rows - 10, gen), gen
        )  # rows >= 50 never touched
        if step == 3:
            grad = grad.coalesce()  # the already-coalesced path
        p.grad = grad
        opt.step()
        rowwise_reference(w64, acc64, grad, lr, eps, wd)
    torch.testing.assert_close(p.detach(), w64.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt.state[p]["sum"], acc64.float(), rtol=1e-5, atol=1e-7)
    assert torch.equal(p.detach()[rows - 10 :], w0[rows - 10 :])  # bit-identical
    assert torch.equal(opt.state[p]["sum"][rows - 10 :], torch.full((10,), init_acc))


@pytest.mark.parametrize("dim", [32, 64, 300])
def test_rowwise_adagrad_state_is_one_float32_per_row(dim: int) -> None:
    rows = 1000
    p = torch.nn.Parameter(torch.zeros(rows, dim))
    opt = RowWiseAdagrad([p], lr=0.1)
    init_optimizer_state(opt)
    p.grad = sparse_grad(rows, dim, torch.tensor([3, 3, 7]), torch.Generator().manual_seed(0))
    opt.step()
    state = opt.state[p]
    assert list(state) == ["sum"]
    assert state["sum"].shape == (rows,) and state["sum"].dtype == torch.float32
    state_bytes = sum(t.numel() * t.element_size() for t in state.values())
    assert state_bytes <= 0.05 * p.numel() * p.element_size()


def test_rowwise_adagrad_dense_gradient_matches_reference_and_sparse_path() -> None:
    gen = torch.Generator().manual_seed(2)
    rows, dim, lr = 20, 8, 0.2
    w0 = torch.randn(rows, dim, generator=gen)
    dense, sparse = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt_d, opt_s = RowWiseAdagrad([dense], lr=lr), RowWiseAdagrad([sparse], lr=lr)
    w64, acc64 = w0.double(), torch.zeros(rows, dtype=torch.float64)
    for _ in range(4):
        grad = sparse_grad(rows, dim, ids_with_duplicates(10, rows, gen), gen)
        dense.grad, sparse.grad = grad.to_dense(), grad
        opt_d.step()
        opt_s.step()
        rowwise_reference(w64, acc64, grad, lr, 1e-10, 0.0)
    torch.testing.assert_close(dense.detach(), w64.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dense.detach(), sparse.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(opt_d.state[dense]["sum"], opt_s.state[sparse]["sum"], rtol=1e-6, atol=1e-7)


def test_rowwise_adagrad_real_embedding_bag_and_empty_gradient() -> None:
    torch.manual_seed(0)
    bag = torch.nn.EmbeddingBag(100, 12, mode="sum", sparse=True)
    w0 = bag.weight.detach().clone()
    opt = RowWiseAdagrad(bag.parameters(), lr=0.5)
    bag(torch.tensor([[1, 2, 2, 5], [5, 5, 9, 1]])).pow(2).sum().backward()
    grad = bag.weight.grad.clone()
    opt.step()
    w64, acc64 = w0.double(), torch.zeros(100, dtype=torch.float64)
    rowwise_reference(w64, acc64, grad, 0.5, 1e-10, 0.0)
    torch.testing.assert_close(bag.weight.detach(), w64.float(), rtol=1e-5, atol=1e-6)
    before = bag.weight.detach().clone()
    opt.zero_grad()
    bag(torch.empty(0, dtype=torch.long), torch.zeros(1, dtype=torch.long)).sum().backward()  # one empty bag
    opt.step()
    assert torch.equal(bag.weight.detach(), before)


@given(
    rows=st.integers(1, 40),
    dim=st.integers(1, 5),
    ids=st.lists(st.integers(0, 39), max_size=60),
    coalesced=st.booleans(),
)
@settings(max_examples=60, deadline=None)
def test_coalesced_rows_is_bit_identical_to_coalesce(
    rows: int, dim: int, ids: list[int], coalesced: bool
) -> None:
    idx = torch.tensor([i % rows for i in ids], dtype=torch.long)
    grad = sparse_grad(rows, dim, idx, torch.Generator().manual_seed(len(ids)))
    grad = grad.coalesce() if coalesced else grad
    want = grad.coalesce()
    got_rows, got_values = _coalesced_rows(grad, Workspace(), "g")
    assert torch.equal(got_rows, want.indices()[0])
    assert torch.equal(got_values, want.values())


@pytest.mark.parametrize(("rows", "nnz"), [(50, 40), (20_000, 12_800)])
@pytest.mark.parametrize("maximize", [False, True])
def test_fast_sparse_adam_is_bit_identical_to_torch(
    rows: int, nnz: int, maximize: bool, threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The torch-op path (CUDA, or CPU with the fused kernels off) is torch's SparseAdam bit for bit; the fused
    CPU kernel agrees to an ulp (its sqrt rounds correctly, torch's may not): tests/unit/test_kernels.py."""
    monkeypatch.setenv("TRAINER_FUSED_KERNELS", "0")
    gen = torch.Generator().manual_seed(3)
    dim = 6
    w0 = [torch.randn(rows, dim, generator=gen), torch.randn(rows // 2, dim, generator=gen)]
    ref = [torch.nn.Parameter(w.clone()) for w in w0]
    ours = [torch.nn.Parameter(w.clone()) for w in w0]
    opt_ref = torch.optim.SparseAdam(ref, lr=0.05, betas=(0.8, 0.99), maximize=maximize)
    opt_ours = FastSparseAdam(ours, lr=0.05, betas=(0.8, 0.99), maximize=maximize)
    for step in range(6):
        for r, o in zip(ref, ours, strict=True):
            n = 0 if step == 2 else nnz  # an empty gradient still advances `step` (torch semantics)
            grad = sparse_grad(r.shape[0], dim, ids_with_duplicates(n, r.shape[0] // 2, gen), gen)
            r.grad, o.grad = grad, grad.clone()
        opt_ref.step()
        opt_ours.step()
    for r, o in zip(ref, ours, strict=True):
        assert torch.equal(r, o)
        assert torch.equal(opt_ref.state[r]["exp_avg"], opt_ours.state[o]["exp_avg"])
        assert torch.equal(opt_ref.state[r]["exp_avg_sq"], opt_ours.state[o]["exp_avg_sq"])
        assert opt_ref.state[r]["step"] == int(opt_ours.state[o]["step"]) == 6


@pytest.mark.parametrize("name", ["sparse_adam", "rowwise_adagrad"])
def test_empty_shard_table(name: str) -> None:
    """A rank may own zero rows of a sharded table: state, step and state export must still work."""
    p = torch.nn.Parameter(torch.zeros(0, 8))
    opt = build_sparse_optimizer(name, [p], lr=0.1)
    init_optimizer_state(opt)
    p.grad = torch.sparse_coo_tensor(torch.zeros(1, 0, dtype=torch.long), torch.zeros(0, 8), (0, 8))
    opt.step()
    tensors = optimizer_state_tensors(opt, {p: "shard"})
    assert all(t.shape[0] == 0 for k, t in tensors.items() if not k.endswith("/step"))


def test_fast_sparse_adam_rejects_dense_gradients() -> None:
    p = torch.nn.Parameter(torch.zeros(3, 2))
    p.grad = torch.ones(3, 2)
    with pytest.raises(RuntimeError, match="dense gradients"):
        FastSparseAdam([p]).step()


# name -> (optimizer factory, whether its gradients are sparse)
KINDS: dict[str, tuple[Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer], bool]] = {
    "torch_sparse_adam": (lambda ps: torch.optim.SparseAdam(ps, lr=0.05), True),
    "fast_sparse_adam": (lambda ps: FastSparseAdam(ps, lr=0.05), True),
    "adagrad": (lambda ps: torch.optim.Adagrad(ps, lr=0.05, initial_accumulator_value=0.1), True),
    "sgd": (lambda ps: torch.optim.SGD(ps, lr=0.05), True),
    "sgd_momentum": (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01), False),
    "rowwise_adagrad": (lambda ps: RowWiseAdagrad(ps, lr=0.05, weight_decay=0.01), True),
    "adamw": (lambda ps: torch.optim.AdamW(ps, lr=0.05), False),
    "adamw_amsgrad": (lambda ps: torch.optim.AdamW(ps, lr=0.05, amsgrad=True), False),
}


def make_params(gen: torch.Generator) -> list[torch.nn.Parameter]:
    return [
        torch.nn.Parameter(torch.randn(30, 4, generator=gen)),
        torch.nn.Parameter(torch.randn(10, 3, generator=gen)),
    ]


def set_grads(params: list[torch.nn.Parameter], sparse: bool, gen: torch.Generator) -> None:
    for p in params:
        g = sparse_grad(p.shape[0], p.shape[1], ids_with_duplicates(8, p.shape[0], gen), gen)
        p.grad = g if sparse else g.to_dense()


def assert_same(opt_a: torch.optim.Optimizer, pa: list, opt_b: torch.optim.Optimizer, pb: list) -> None:
    for a, b in zip(pa, pb, strict=True):
        assert torch.equal(a, b)
        sa, sb = opt_a.state[a], opt_b.state[b]
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), key


@pytest.mark.parametrize("kind", list(KINDS))
def test_init_optimizer_state_then_step_equals_fresh_step(kind: str) -> None:
    factory, sparse = KINDS[kind]
    gen = torch.Generator().manual_seed(4)
    fresh = make_params(gen)
    inited = [torch.nn.Parameter(p.detach().clone()) for p in fresh]
    opt_fresh, opt_inited = factory(fresh), factory(inited)
    init_optimizer_state(opt_inited)
    for p, q in zip(fresh, inited, strict=True):
        assert q.grad is None and torch.equal(p, q)  # no grad left behind, values untouched
        assert (len(opt_inited.state[q]) > 0) == (kind != "sgd")  # plain SGD has no state
    init_optimizer_state(opt_inited)  # idempotent
    grad_gen = torch.Generator().manual_seed(5)
    set_grads(fresh, sparse, grad_gen)
    for p, q in zip(fresh, inited, strict=True):
        q.grad = p.grad.clone()
    opt_fresh.step()
    opt_inited.step()
    assert_same(opt_fresh, fresh, opt_inited, inited)
    for p, q in zip(
        fresh, inited, strict=True
    ):  # same state types as torch creates (int vs tensor step, dtypes)
        for key, value in opt_fresh.state[p].items():
            other = opt_inited.state[q][key]
            assert type(value) is type(other)
            if isinstance(value, torch.Tensor):
                assert (value.dtype, value.shape, value.device) == (other.dtype, other.shape, other.device)


@pytest.mark.parametrize("kind", list(KINDS))
def test_state_tensors_round_trip_reproduces_next_step(kind: str) -> None:
    factory, sparse = KINDS[kind]
    gen = torch.Generator().manual_seed(6)
    params = make_params(gen)
    names = {p: f"table{i}" for i, p in enumerate(params)}
    opt = factory(params)
    for _ in range(3):
        set_grads(params, sparse, gen)
        opt.step()
    saved = {k: v.clone() for k, v in optimizer_state_tensors(opt, names).items()}
    assert all(v.dim() == 0 for k, v in saved.items() if k.endswith("/step"))

    restored = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = factory(restored)
    init_optimizer_state(opt2)
    live = optimizer_state_tensors(opt2, {q: names[p] for p, q in zip(params, restored, strict=True)})
    assert live.keys() == saved.keys()
    for key, tensor in live.items():
        tensor.copy_(saved[key])

    set_grads(params, sparse, gen)
    for p, q in zip(params, restored, strict=True):
        q.grad = p.grad.clone()
    opt.step()
    opt2.step()
    assert_same(opt, params, opt2, restored)


def test_state_tensors_are_live_and_need_every_name() -> None:
    p = torch.nn.Parameter(torch.zeros(5, 2))
    opt = RowWiseAdagrad([p])
    init_optimizer_state(opt)
    optimizer_state_tensors(opt, {p: "t"})["t/sum"].fill_(7.0)
    assert torch.equal(opt.state[p]["sum"], torch.full((5,), 7.0))
    with pytest.raises(KeyError, match="no name"):
        optimizer_state_tensors(opt, {})


def test_torch_sparse_adam_with_tensor_step_is_bit_identical() -> None:
    """optimizer_state_tensors turns SparseAdam's int `step` into a float64 tensor; its math must not change."""
    gen = torch.Generator().manual_seed(7)
    a = torch.nn.Parameter(torch.randn(40, 5, generator=gen))
    b = torch.nn.Parameter(a.detach().clone())
    opt_a, opt_b = torch.optim.SparseAdam([a], lr=0.1), torch.optim.SparseAdam([b], lr=0.1)
    init_optimizer_state(opt_b)
    optimizer_state_tensors(opt_b, {b: "b"})
    assert isinstance(opt_b.state[b]["step"], torch.Tensor)
    for _ in range(5):
        a.grad = sparse_grad(40, 5, ids_with_duplicates(12, 40, gen), gen)
        b.grad = a.grad.clone()
        opt_a.step()
        opt_b.step()
    assert torch.equal(a, b)
    assert int(opt_b.state[b]["step"]) == opt_a.state[a]["step"] == 5


def test_build_sparse_optimizer_names_and_errors() -> None:
    p = [torch.nn.Parameter(torch.zeros(4, 2))]
    expected = {
        "sparse_adam": FastSparseAdam,
        "sgd": SparseSGD,
        "adagrad": eager_optim.Adagrad,  # torch.optim.Adagrad without its torch._dynamo wrappers
        "rowwise_adagrad": RowWiseAdagrad,
    }
    assert set(expected) == set(SPARSE_OPTIMIZERS)
    for name, cls in expected.items():
        opt = build_sparse_optimizer(name, p, lr=0.25)
        assert type(opt) is cls and opt.param_groups[0]["lr"] == 0.25
    assert build_sparse_optimizer("sparse_adam", p, 0.1, betas=(0.5, 0.9)).param_groups[0]["betas"] == (
        0.5,
        0.9,
    )
    assert (
        build_sparse_optimizer("rowwise_adagrad", p, 0.1, weight_decay=0.1).param_groups[0]["weight_decay"]
        == 0.1
    )
    with pytest.raises(ValueError, match="optim.sparse"):
        build_sparse_optimizer("adam", p, 0.1)
    with pytest.raises(ValueError, match="momentum"):
        build_sparse_optimizer("sgd", p, 0.1, momentum=0.9)
    with pytest.raises(ValueError, match="weight_decay"):
        build_sparse_optimizer("adagrad", p, 0.1, weight_decay=0.01)


class _RecordOutputs(TorchDispatchMode):
    """Largest tensor created by any op, ignoring results that alias the parameter or optimizer state."""

    def __init__(self, owned: list[torch.Tensor]) -> None:
        super().__init__()
        self.owned = {t.untyped_storage().data_ptr() for t in owned}
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if (
                isinstance(t, torch.Tensor)
                and not t.is_sparse
                and t.untyped_storage().data_ptr() not in self.owned
            ):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("name", SPARSE_OPTIMIZERS)
def test_step_creates_no_table_sized_temporaries(name: str) -> None:
    rows, dim, touched = 100_000, 2, 10
    p = torch.nn.Parameter(torch.zeros(rows, dim))
    opt = build_sparse_optimizer(name, [p], lr=0.1)
    init_optimizer_state(opt)
    gen = torch.Generator().manual_seed(8)
    for _ in range(2):  # the second step runs with warm workspace blocks
        p.grad = sparse_grad(rows, dim, ids_with_duplicates(touched, rows, gen), gen)
        owned = [p] + [v for v in opt.state[p].values() if isinstance(v, torch.Tensor)]
        with _RecordOutputs(owned) as rec:
            opt.step()
        assert rec.largest <= 4 * touched * dim, (
            f"{name}: a {rec.largest}-element temporary for a {rows}-row table"
        )


def test_workspace_blocks_are_reused_across_steps() -> None:
    gen = torch.Generator().manual_seed(9)
    p = torch.nn.Parameter(torch.zeros(500, 16))
    opt = FastSparseAdam([p])
    ptrs = []
    for n in (300, 200, 300):
        p.grad = sparse_grad(500, 16, ids_with_duplicates(n, 500, gen), gen)
        opt.step()
        ptrs.append({k: b.data_ptr() for k, b in opt._ws._blocks.items()})
    assert ptrs[0] == ptrs[1] == ptrs[2]
