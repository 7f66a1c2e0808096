"""Shared fixtures: a small, learnable labelled dataset and a matching small GloVe-style vector file.

Everything is generated on the fly (no network, no downloads) and deterministic."""

import atexit
import csv
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

# One numba cache for the whole session, subprocesses included (set before anything imports numba): each test's
# TRAINER_CACHE_DIR is its own folder (below), and the kernels' cache would otherwise follow it, so every CLI,
# torchrun and pod test compiled every kernel again, several seconds each. A new folder per session, removed at
# its end: kernels compiled from an earlier checkout's files are never loaded. tests/unit/test_kernels.py checks
# the cache's own placement with the variable removed.
_NUMBA_CACHE = tempfile.mkdtemp(prefix="trainer-tests-numba-")
atexit.register(shutil.rmtree, _NUMBA_CACHE, ignore_errors=True)
os.environ.setdefault("NUMBA_CACHE_DIR", _NUMBA_CACHE)

TOPICS = {
    "sports": "ball goal match team score player coach league referee stadium tennis soccer".split(),
    "tech": "computer software chip network server code compiler kernel laptop python linux router".split(),
    "food": "bread cheese pasta soup recipe oven garlic tomato butter salad spice noodle".split(),
}
COMMON = "the a of and to in is it with for on this that very new good".split()
# words with no pretrained vector: the OOV table must learn them
OOV = {"sports": ["zorbleball", "goalzz"], "tech": ["kubectlish", "gpuzz"], "food": ["pastaroni", "soupzz"]}


def make_texts(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    labels = sorted(TOPICS)
    for i in range(n):
        label = labels[i % len(labels)]
        words = rng.choices(TOPICS[label], k=rng.randint(3, 6)) + rng.choices(COMMON, k=rng.randint(3, 8))
        if rng.random() < 0.5:
            words += rng.choices(OOV[label], k=1)
        rng.shuffle(words)
        rows.append((" ".join(words).capitalize() + ".", label))
    return rows


def write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)


def write_glove(path: Path, dim: int = 8, seed: int = 0) -> list[str]:
    """A GloVe text file for the topic and common words (not the OOV words), plus unrelated filler words."""
    rng = np.random.default_rng(seed)
    words = sorted({w for ws in TOPICS.values() for w in ws} | set(COMMON)) + [f"filler{i}" for i in range(40)]
    with path.open("w") as f:
        for w in words:
            f.write(w + " " + " ".join(f"{v:.5f}" for v in rng.normal(0, 0.4, dim)) + "\n")
    return words


def make_tiny_data(folder: Path) -> dict[str, Path]:
    """Write the tiny train/valid/test splits and the GloVe file into a new `folder`; return their paths."""
    folder.mkdir()
    write_csv(folder / "train.csv", make_texts(300, 1))
    write_csv(folder / "valid.csv", make_texts(60, 2))
    write_csv(folder / "test.csv", make_texts(60, 3))
    write_glove(folder / "glove.txt")
    return {"train": folder / "train.csv", "valid": folder / "valid.csv", "test": folder / "test.csv",
            "glove": folder / "glove.txt", "dir": folder}


@pytest.fixture
def tiny_data(tmp_path: Path) -> dict[str, Path]:
    return make_tiny_data(tmp_path / "data")


def tiny_config_text(files: dict[str, Path], run_dir: Path, **sections) -> str:
    base = {
        "data": {"train": str(files["train"]), "valid": str(files["valid"]), "test": str(files["test"])},
        "embeddings": {"pretrained": str(files["glove"]), "min_freq": 1, "vectors_cache_dir": str(run_dir.parent / "vcache")},
        "optim": {"sparse_lr": 0.05, "dense_lr": 0.05, "warmup_steps": 2},
        "train": {"epochs": 4, "batch_size": 32, "seed": 0},
        "metrics": {"log_every_steps": 5, "progress": False},
        "run": {"dir": str(run_dir)},
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    import tomli_w

    return tomli_w.dumps(base)


@pytest.fixture
def tiny_config(tmp_path: Path, tiny_data: dict[str, Path]):
    """Returns a function(run_name, **section_overrides) -> config path."""

    def make(run_name: str = "run", **sections) -> Path:
        path = tmp_path / f"{run_name}.toml"
        path.write_text(tiny_config_text(tiny_data, tmp_path / run_name, **sections))
        return path

    return make


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """Keep caches inside the test's folder and torchrun variables out of single-process tests."""
    monkeypatch.setenv("TRAINER_CACHE_DIR", str(tmp_path / "trainer-cache"))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if var in os.environ and not os.environ.get("TRAINER_TEST_KEEP_DIST"):
            monkeypatch.delenv(var)


# Property tests explore new random examples on every local run; CI runs a fixed, reproducible set so that a
# submission's result does not depend on the draw (a failure found locally becomes a regression test).
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    _hypothesis_settings.load_profile("ci")
