"""Helpers shared by the reliability tests: the real CLI in a subprocess, user-error checks, run-folder snapshots,
and one completed tiny run to point bad invocations at."""

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from conftest import make_texts, tiny_config_text, write_csv, write_glove

DIST_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "GROUP_RANK",
)
# small and quick: 2 epochs x ceil(300 / 64) = 10 steps, checkpoints at the epoch ends (steps 5 and 10)
SHARED_RUN = {
    "train": {"epochs": 2, "batch_size": 64, "threads": 1},
    "metrics": {"log_every_steps": 2, "progress": False, "projector_words": 0},
}


def clean_env(root: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in DIST_VARS and not k.startswith(("PET_", "TORCHELASTIC_"))
    }
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TRAINER_CACHE_DIR=str(root / "trainer-cache"))
    env.update(extra)
    return env


def cli(root: Path, *args, stdin: str | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """`python -m trainer ARGS` with a clean environment; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "trainer", *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_env(root),
    )


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    )
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    return proc


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def user_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Assert the one-line user error contract and return the message (without `error: `)."""
    detail = f"exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 2, detail
    assert "Traceback" not in proc.stderr, detail
    lines = proc.stderr.rstrip("\n").splitlines()
    assert lines and lines[-1].startswith("error: "), detail
    assert sum(line.startswith("error: ") for line in lines) == 1, detail
    message = lines[-1][len("error: ") :]
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    assert proc.stdout == "", detail
    return message


def snapshot(folder: Path, exclude: tuple[str, ...] = ("cache",)) -> dict[str, str]:
    """relative path -> SHA-256 of every file under `folder` (top-level entries in `exclude` left out)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and rel.parts[0] not in exclude:
            out[str(rel)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def debris(folder: Path) -> list[str]:
    """Temporary files or folders a failed command left behind."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp" in p.name)


@dataclass
class World:
    root: Path
    data: dict[str, Path]
    config: Path  # the shared run's config
    run: Path  # a completed run (checkpoints at steps 5 and 10, exported model)

    def cli(self, *args, **kwargs) -> subprocess.CompletedProcess:
        return cli(self.root, *args, **kwargs)

    def train(self, *args, **kwargs) -> subprocess.CompletedProcess:
        return self.cli("train", "--config", self.config, *args, **kwargs)

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.root / "inputs" / name
        path.parent.mkdir(exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return path


def make_world(root: Path, train: bool = True, **sections) -> World:
    folder = root / "data"
    folder.mkdir(parents=True)
    write_csv(folder / "train.csv", make_texts(300, 1))
    write_csv(folder / "valid.csv", make_texts(60, 2))
    write_csv(folder / "test.csv", make_texts(60, 3))
    write_glove(folder / "glove.txt")
    data = {
        "train": folder / "train.csv",
        "valid": folder / "valid.csv",
        "test": folder / "test.csv",
        "glove": folder / "glove.txt",
        "dir": folder,
    }
    merged = {k: dict(v) for k, v in SHARED_RUN.items()}
    for section, values in sections.items():
        merged.setdefault(section, {}).update(values)
    config = root / "shared.toml"
    config.write_text(tiny_config_text(data, root / "run", **merged))
    world = World(root, data, config, root / "run")
    if train:
        result = last_json(ok(world.train()).stdout)
        assert result["step"] == 10, result
    return world
