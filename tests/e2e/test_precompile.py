"""`python -m trainer precompile` into a seed folder, then training in a fresh cache seeded from it: no kernel is
compiled. A fresh cache without the seed compiles them (and says so), which is what the seed saves a pod."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

pytest.importorskip("numba")

DISTRIBUTED_ONLY = {"trainer.sharding._pack_rows_kernel", "trainer.sharding._merge_rows_kernel",
                    "trainer.row_wise._route_kernel"}


def run(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "trainer", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc


def test_a_seeded_cache_compiles_nothing(tiny_config, tmp_path: Path) -> None:
    base = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "TRAINER_NUMBA_SEED_DIR")}
    seed = tmp_path / "seed"
    made = run(["precompile", "--no-distributed"], {**base, "NUMBA_CACHE_DIR": str(seed)})
    demo = re.search(r"demo .*: (\d+) kernels? compiled", made.stdout)
    assert demo and int(demo.group(1)) > 0, made.stdout
    ready = re.search(r"(\d+) of (\d+) kernels cached", made.stdout)
    assert ready and int(ready.group(1)) > 0, made.stdout
    # without the 2-process runs only their exchange kernels are left for a first multi-process run
    missing = re.search(r"compiled on first use: (.*)$", made.stdout, re.M)
    assert set(missing.group(1).split(", ") if missing else ()) <= DISTRIBUTED_ONLY, made.stdout
    assert list(seed.rglob("*.nbi")), "precompile wrote no kernel index"

    config = tiny_config("run", train={"epochs": 1}, embeddings={"ngram_buckets": 64},
                         model={"encoder": "masked_bag"}, optim={"sparse": "sgd", "sparse_lr": 10.0})
    seeded_cache = tmp_path / "seeded"
    seeded = run(["train", "--config", str(config), "--run.dir", str(tmp_path / "seeded-run"), "--train.threads", "1"],
                 {**base, "TRAINER_CACHE_DIR": str(seeded_cache), "TRAINER_NUMBA_SEED_DIR": str(seed)})
    assert "numba compiled" not in seeded.stderr, seeded.stderr
    assert list((seeded_cache / "numba").rglob("*.nbi")), "the seed was not copied into TRAINER_CACHE_DIR/numba"

    cold = run(["train", "--config", str(config), "--run.dir", str(tmp_path / "cold-run"), "--train.threads", "1"],
               {**base, "TRAINER_CACHE_DIR": str(tmp_path / "cold")})
    assert re.search(r"training: numba compiled \d+ kernels not in its cache", cold.stderr), cold.stderr
