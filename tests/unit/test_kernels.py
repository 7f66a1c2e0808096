"""Fused CPU optimizer kernels (trainer/kernels.py) against the torch-op path they replace."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer import kernels
from trainer.sparse_optim import FastSparseAdam, RowWiseAdagrad, SparseSGD

pytestmark = [
    pytest.mark.filterwarnings("ignore:Sparse invariant checks"),
    pytest.mark.skipif(not kernels.fused_kernels_enabled(), reason="numba not installed"),
]


def grads(rows: int, dim: int, nnz: int, steps: int, seed: int, coalesced: bool = False) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        n = 0 if step == 2 else nnz  # an empty gradient still advances Adam's step count
        ids = torch.randint(0, max(1, rows // 2), (n,), generator=gen)
        ids = torch.cat([ids, ids[: n // 3]])  # repeated rows, not adjacent
        g = torch.sparse_coo_tensor(ids.view(1, -1), torch.randn(ids.numel(), dim, generator=gen), (rows, dim))
        out.append(g.coalesce() if coalesced else g)
    return out


def run(make, w0: torch.Tensor, steps: list[torch.Tensor], fused: bool, monkeypatch) -> tuple[torch.Tensor, dict]:
    monkeypatch.setenv("TRAINER_FUSED_KERNELS", "1" if fused else "0")
    p = torch.nn.Parameter(w0.clone())
    opt = make([p])
    for g in steps:
        p.grad = g.clone()
        opt.step()
    return p.detach(), opt.state[p]


OPTIMIZERS = {
    "sparse_adam": lambda ps: FastSparseAdam(ps, lr=0.05, betas=(0.8, 0.99)),
    "sparse_adam_maximize": lambda ps: FastSparseAdam(ps, lr=0.05, maximize=True),
    "rowwise_adagrad": lambda ps: RowWiseAdagrad(ps, lr=0.3),
    "rowwise_adagrad_wd": lambda ps: RowWiseAdagrad(ps, lr=0.3, weight_decay=0.05),
    "sgd": lambda ps: SparseSGD(ps, lr=0.5),
    "sparse_adam_decay": lambda ps: FastSparseAdam(ps, lr=0.05, weight_decay=0.3),
    "sparse_adam_decay_to_1": lambda ps: FastSparseAdam(ps, lr=0.05, weight_decay=0.3, decay_to=1.0),
    "rowwise_adagrad_wd_to_1": lambda ps: RowWiseAdagrad(ps, lr=0.3, weight_decay=0.05, decay_to=1.0),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize(("rows", "dim", "nnz"), [(40, 3, 30), (20_000, 16, 8_000), (7, 50, 0)])
@pytest.mark.parametrize("coalesced", [False, True])
def test_fused_step_matches_torch_ops(name, rows, dim, nnz, coalesced, threads, monkeypatch) -> None:
    w0 = torch.randn(rows, dim, generator=torch.Generator().manual_seed(1))
    steps = grads(rows, dim, nnz, steps=5, seed=rows + dim, coalesced=coalesced)
    calls = []
    real = {k: getattr(kernels, k) for k in ("sparse_adam_step", "rowwise_adagrad_step", "sgd_step")}
    for k, fn in real.items():
        monkeypatch.setattr(kernels, k, lambda *a, _fn=fn, **kw: calls.append(1) or _fn(*a, **kw))
    want_w, want_state = run(OPTIMIZERS[name], w0, steps, fused=False, monkeypatch=monkeypatch)
    assert not calls, "TRAINER_FUSED_KERNELS=0 must keep the torch ops"
    got_w, got_state = run(OPTIMIZERS[name], w0, steps, fused=True, monkeypatch=monkeypatch)
    assert len(calls) == 5, "the fused kernel must run for contiguous float32 CPU tables"
    # Rounding only: duplicate rows summed in another order, a sqrt (torch's vectorised sqrt is not always
    # correctly rounded), row-wise Adagrad's row mean (torch sums in blocks, the kernel in order).
    torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)
    for key, value in want_state.items():
        if isinstance(value, torch.Tensor) and value.numel() > 1:
            torch.testing.assert_close(got_state[key], value, rtol=1e-5, atol=1e-6)
        else:
            assert int(got_state[key]) == int(value)
    touched = set()
    for g in steps:
        touched.update(g.coalesce().indices()[0].tolist())
    untouched = [r for r in range(rows) if r not in touched]
    assert torch.equal(got_w[untouched], w0[untouched]), "rows without gradient must stay bit-identical"


def test_sparse_adam_state_is_bit_identical_without_duplicate_rows(monkeypatch) -> None:
    """exp_avg / exp_avg_sq involve no sqrt: with no duplicate rows to sum (whose order differs), the fused kernel
    reproduces torch's float32 ops exactly."""
    gen = torch.Generator().manual_seed(5)
    w0 = torch.randn(300, 8, generator=gen)
    steps = []
    for _ in range(4):
        ids = torch.randperm(300, generator=gen)[:200]  # unique but unsorted: the uncoalesced path
        steps.append(torch.sparse_coo_tensor(ids.view(1, -1), torch.randn(200, 8, generator=gen), (300, 8)))
    _, want = run(OPTIMIZERS["sparse_adam"], w0, steps, fused=False, monkeypatch=monkeypatch)
    _, got = run(OPTIMIZERS["sparse_adam"], w0, steps, fused=True, monkeypatch=monkeypatch)
    assert torch.equal(got["exp_avg"], want["exp_avg"])
    assert torch.equal(got["exp_avg_sq"], want["exp_avg_sq"])


@pytest.mark.parametrize("n", [0, 1, 7, 5000])
def test_group_rows_groups_every_id_once_in_original_order(n) -> None:
    gen = torch.Generator().manual_seed(n)
    ids = torch.randint(0, max(1, n // 3), (n,), generator=gen) * 1_000_003  # large, collision-prone ids
    g = kernels.RowGroups(torch.sparse_coo_tensor(ids.view(1, -1), torch.zeros(n, 2), (10**12, 2)))
    assert len(set(g.rows.tolist())) == len(g) == len(set(ids.tolist()))
    for u, row in enumerate(g.rows.tolist()):
        members = g.order[g.starts[u] : g.starts[u + 1]].tolist()
        assert members == [k for k, i in enumerate(ids.tolist()) if i == row]
    assert g.starts[-1] == n and sorted(g.order.tolist()) == list(range(n))


def test_can_fuse_only_contiguous_float32_cpu(monkeypatch) -> None:
    t = torch.zeros(4, 3)
    assert kernels.can_fuse(t)
    assert not kernels.can_fuse(t.double())
    assert not kernels.can_fuse(t.t())
    monkeypatch.setenv("TRAINER_FUSED_KERNELS", "0")
    assert not kernels.can_fuse(t)


def test_sgd_with_momentum_falls_back_to_torch(monkeypatch) -> None:
    """What the kernel does not implement must not silently change meaning: weight decay goes to torch's step."""
    p = torch.nn.Parameter(torch.ones(5, 2))
    opt = SparseSGD([p], lr=0.1, weight_decay=0.5)
    monkeypatch.setattr(kernels, "sgd_step", lambda *a, **k: pytest.fail("fused kernel used with weight decay"))
    p.grad = torch.sparse_coo_tensor(torch.tensor([[1]]), torch.ones(1, 2), (5, 2))
    with pytest.raises(RuntimeError):  # torch's SGD refuses weight decay with sparse gradients
        opt.step()


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("center", [0.0, 1.0])
def test_sparse_adam_decay_equals_adamw_when_every_row_is_touched(fused, center, monkeypatch) -> None:
    """Lazy decay is AdamW's decoupled decay on the touched rows: with every row touched every step the two agree
    (up to where Adam and SparseAdam put eps). A center c decays w towards c: AdamW on w - c."""
    monkeypatch.setenv("TRAINER_FUSED_KERNELS", "1" if fused else "0")
    gen = torch.Generator().manual_seed(4)
    rows, dim = 30, 5
    w0 = torch.randn(rows, dim, generator=gen)
    ours = torch.nn.Parameter(w0.clone())
    ref = torch.nn.Parameter(w0.clone() - center)
    opt = FastSparseAdam([ours], lr=0.05, weight_decay=0.5, decay_to=center, eps=1e-12)
    opt_ref = torch.optim.AdamW([ref], lr=0.05, weight_decay=0.5, eps=1e-12)
    for _ in range(6):
        g = torch.randn(rows, dim, generator=gen)
        ours.grad = torch.sparse_coo_tensor(torch.arange(rows).view(1, -1), g.clone(), (rows, dim))
        ref.grad = g
        opt.step()
        opt_ref.step()
    torch.testing.assert_close(ours.detach(), ref.detach() + center, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours.detach(), w0, atol=1e-3)


def test_decay_leaves_untouched_rows_alone() -> None:
    p = torch.nn.Parameter(torch.ones(10, 4) * 3)
    opt = FastSparseAdam([p], lr=0.1, weight_decay=1.0)
    p.grad = torch.sparse_coo_tensor(torch.tensor([[2, 5]]), torch.zeros(2, 4), (10, 4))
    opt.step()
    assert torch.all(p[[2, 5]] < 3) and torch.equal(p.detach()[[0, 1, 3, 4, 6, 7, 8, 9]], torch.full((8, 4), 3.0))


def test_a_kernel_launch_keeps_torchs_thread_count() -> None:
    """numba's OpenMP layer shares the runtime with torch; starting it used to reset torch to all cores."""
    import subprocess
    import sys

    code = (
        "import torch; torch.set_num_threads(1)\n"
        "from trainer.sparse_optim import FastSparseAdam\n"
        "p = torch.nn.Parameter(torch.randn(100, 4)); o = FastSparseAdam([p])\n"
        "p.grad = torch.sparse_coo_tensor(torch.tensor([[1, 2, 1]]), torch.ones(3, 4), (100, 4))\n"
        "o.step(); print(torch.get_num_threads())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1"


def test_compiled_kernels_are_cached_under_trainer_cache_dir(tmp_path) -> None:
    """Not next to the package (read-only for a container's non-root user) and not only under $HOME: numba refuses
    to import a cached kernel module when it finds no writable place."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env.update(TRAINER_CACHE_DIR=str(tmp_path), HOME=str(tmp_path / "no-home"))
    code = (
        "import torch\n"
        "from trainer.sparse_optim import FastSparseAdam\n"
        "p = torch.nn.Parameter(torch.randn(100, 4)); o = FastSparseAdam([p])\n"
        "p.grad = torch.sparse_coo_tensor(torch.tensor([[1, 2, 1]]), torch.ones(3, 4), (100, 4))\n"
        "o.step()\n"
    )
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, timeout=300)
    cached = list((tmp_path / "numba").rglob("*.nbi"))
    assert cached, "no compiled kernel index written under TRAINER_CACHE_DIR/numba"


def test_load_numba_loads_a_cached_kernel_and_can_be_called_again():
    kernels.load_numba()
    kernels.load_numba()
    assert kernels.hash_groups.signatures  # the kernel it calls is compiled (or loaded from the cache) now


def test_a_seed_is_copied_whole_into_a_folder_named_after_its_contents(tmp_path) -> None:
    import os

    from trainer import jit

    seed, cache = tmp_path / "seed", tmp_path / "cache"
    (seed / "trainer_abc").mkdir(parents=True)
    (seed / "trainer_abc" / "k-1.py311.nbi").write_bytes(b"seed index")
    (seed / "trainer_abc" / "k-1.py311.1.nbc").write_bytes(b"seed code")
    (cache / "trainer_abc").mkdir(parents=True)
    (cache / "trainer_abc" / "k-1.py311.nbi").write_bytes(b"an older index of this machine's")

    first = Path(jit.seeded_cache_dir(str(seed), str(cache)))
    assert first.parent == cache and first.name.startswith("seed-")
    assert (first / "trainer_abc" / "k-1.py311.nbi").read_bytes() == b"seed index"  # the seed's pair, whole
    assert (first / "trainer_abc" / "k-1.py311.1.nbc").read_bytes() == b"seed code"
    assert (cache / "trainer_abc" / "k-1.py311.nbi").read_bytes() == b"an older index of this machine's"
    (first / "trainer_abc" / "new-2.py311.nbi").write_bytes(b"compiled here later")
    assert Path(jit.seeded_cache_dir(str(seed), str(cache))) == first  # made once, then used as it is
    assert (first / "trainer_abc" / "new-2.py311.nbi").exists()
    assert sorted(p.name for p in cache.iterdir()) == sorted([first.name, "trainer_abc"])  # no temporary left

    (seed / "trainer_abc" / "k-1.py311.1.nbc").write_bytes(b"another image's code")
    os.utime(seed / "trainer_abc" / "k-1.py311.1.nbc", ns=(1, 1))
    other = Path(jit.seeded_cache_dir(str(seed), str(cache)))
    assert other != first and (other / "trainer_abc" / "k-1.py311.1.nbc").read_bytes() == b"another image's code"


def test_a_process_with_a_seed_loads_its_kernels(tmp_path) -> None:
    """In a fresh process: the seed's copy becomes numba's cache folder, and a kernel in it is loaded, not compiled."""
    import os
    import subprocess
    import sys

    code = ("import numpy as np; from trainer import jit, kernels; kernels.hash_groups(np.zeros(3, dtype=np.int64));"
            " print(jit.CACHE_DIR); print(len(jit.compiled_kernels()))")
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "TRAINER_NUMBA_SEED_DIR")}
    seed = tmp_path / "seed"
    made = subprocess.run([sys.executable, "-c", code], env={**env, "NUMBA_CACHE_DIR": str(seed)},
                          capture_output=True, text=True, check=True).stdout.split()
    assert made == [str(seed), "1"]  # compiled: a fresh folder
    used = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**env, "TRAINER_CACHE_DIR": str(tmp_path / "pod"), "TRAINER_NUMBA_SEED_DIR": str(seed)},
                          ).stdout.split()
    assert Path(used[0]).parent == tmp_path / "pod" / "numba" and Path(used[0]).name.startswith("seed-")
    assert used[1] == "0"


def test_an_empty_numba_cpu_name_means_this_machines_cpu() -> None:
    """The image passes its build argument through ENV; empty must not become a CPU named "". Its empty
    NUMBA_CPU_FEATURES (a named level's own features) must not apply to this machine's CPU either: cpuid's do."""
    import os
    import subprocess
    import sys

    code = "import trainer.jit, numba; print(repr(numba.config.CPU_NAME), repr(numba.config.CPU_FEATURES))"

    def config(**variables: str) -> str:
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("NUMBA_CPU")}, **variables}
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              check=True).stdout.strip()

    assert config(NUMBA_CPU_NAME="", NUMBA_CPU_FEATURES="") == "None None"
    assert config(NUMBA_CPU_NAME="generic", NUMBA_CPU_FEATURES="") == "'generic' ''"
    assert config(NUMBA_CPU_NAME="x86-64-v2", NUMBA_CPU_FEATURES="") == "'x86-64-v2' ''"  # any x86-64 today has v2
    assert config(NUMBA_CPU_FEATURES="+avx2") == "None '+avx2'"  # a user's explicit features stay


def test_a_cpu_level_this_cpu_lacks_is_refused() -> None:
    from trainer import jit

    no_avx2 = {f: True for f in jit.CPU_LEVEL_FEATURES["x86-64-v4"]} | {"avx2": False, "bmi2": False}
    assert jit.missing_cpu_features("x86-64-v3", no_avx2) == ["avx2", "bmi2"]
    assert jit.missing_cpu_features("x86-64-v4", no_avx2) == ["avx2", "bmi2"]
    assert jit.missing_cpu_features("x86-64-v2", no_avx2) == []
    assert jit.missing_cpu_features("generic", {}) == []  # any x86-64
    assert jit.missing_cpu_features("skylake", {}) == []  # a CPU model: numba's (and the user's) business


def _fresh_python(code: str) -> str:
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_numba_starts_without_importing_scipy_and_scipy_still_imports() -> None:
    """jit keeps scipy out of numba's import (its version check, 0.12 s a process) and of its BLAS probe, and numba
    then knows it has no BLAS; scipy imports normally afterwards, and a process that imported scipy first keeps it."""
    hidden = _fresh_python(
        "import sys\nimport numpy as np\nimport trainer.jit\nbefore = 'scipy' in sys.modules\n"
        "from trainer.bag_lookup import sorted_groups\nsorted_groups(np.arange(3))\n"
        "from numba.np import arraymath\nimport scipy.linalg\n"
        "print(before, 'scipy' in sys.modules and sys.modules['scipy'] is not None, arraymath._HAVE_BLAS)")
    assert hidden == "False True False"
    usual = _fresh_python("import scipy\nimport sys\nimport trainer.jit\nprint(sys.modules['scipy'] is not None)")
    assert usual == "True"


def test_kernels_missing_from_the_cache_are_announced_before_they_compile(tmp_path) -> None:
    """A first run with a cache folder was silent for about 30 s between the embedding plan and step 1."""
    import os
    import subprocess
    import sys

    code = ("import logging, numpy as np; from trainer import jit, kernels; logging.basicConfig(level=logging.INFO);"
            " print('trainer.kernels.hash_groups' in jit.kernels_not_cached()); jit.announce_compiles(logging.getLogger('t'));"
            " kernels.hash_groups(np.zeros(3, dtype=np.int64)); print('trainer.kernels.hash_groups' in jit.kernels_not_cached())")
    env = {**{k: v for k, v in os.environ.items() if k != "TRAINER_NUMBA_SEED_DIR"}, "NUMBA_CACHE_DIR": str(tmp_path)}
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert first.stdout.split() == ["True", "False"]  # missing, then compiled and saved
    assert "does not hold all of this version's kernels yet" in first.stderr
