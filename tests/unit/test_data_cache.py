"""The data cache built in a forked child while the training process imports torch (trainer/data_cache.py).

A process that has imported torch is never forked, so everything that forks runs in a fresh interpreter
(`run_script`); pytest's own process has torch imported."""

from __future__ import annotations

import filecmp
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from trainer.config import load_config
from trainer.data_cache import build_cache, cache_key, cache_root, load_pretrained, start_background_build

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")


def run_script(body: str, *args: str) -> subprocess.CompletedProcess:
    script = "import os, sys, time\nfrom trainer.config import load_config\nfrom trainer import data_cache\n"
    return subprocess.run([sys.executable, "-c", script + textwrap.dedent(body), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def same_tree(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only or cmp.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    return not mismatch and not errors and all(same_tree(a / d, b / d) for d in cmp.common_dirs)


def test_the_modules_that_build_the_cache_and_the_cli_import_no_torch():
    proc = run_script("""
        from trainer import cli
        try:
            cli.main(["train", "--config", "/nonexistent.toml"])  # a config error: reported without torch
        except FileNotFoundError:
            pass
        assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))[:5]
    """)
    assert proc.returncode == 0, proc.stderr


def test_the_child_builds_the_cache_an_in_process_build_would(tiny_config, tmp_path):
    config = tiny_config("run", data={"cache_dir": str(tmp_path / "child")})
    proc = run_script("""
        cfg = load_config(sys.argv[1])
        build = data_cache.start_background_build(cfg)
        assert build is not None and "torch" not in sys.modules
        build.wait()
        build.wait()  # a second wait is a no-op
        print(build.pid)
    """, str(config))
    assert proc.returncode == 0, proc.stderr
    cfg = load_config(config, ["--data.cache_dir", str(tmp_path / "here")])
    pretrained = load_pretrained(cfg, progress=False)
    build_cache(cfg, pretrained, cache_root(cfg) / f"data-{cache_key(cfg, pretrained)}")
    built = list((tmp_path / "child").iterdir())
    assert [p.name for p in built] == [f"data-{cache_key(cfg, pretrained)}"]  # no temporary folder left
    assert same_tree(built[0], tmp_path / "here" / built[0].name)


def test_a_data_error_in_the_child_is_reported_once_as_the_in_process_build_reports_it(tiny_config):
    config = str(tiny_config("run"))
    runs = [subprocess.run([sys.executable, "-m", "trainer", "train", "--config", config, "--data.label_column", "nope",
                            "--data.build_in_background", flag], cwd=ROOT, capture_output=True, text=True, timeout=300)
            for flag in ("true", "false")]
    for proc in runs:
        assert proc.returncode == 2, proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "nope" in errors[0], proc.stderr
        assert "Traceback" not in proc.stderr
    assert [ln for ln in runs[0].stderr.splitlines() if ln.startswith("error:")] == \
        [ln for ln in runs[1].stderr.splitlines() if ln.startswith("error:")]


def test_a_bug_in_the_child_keeps_the_childs_traceback(tiny_config):
    proc = run_script("""
        def broken(*args):
            raise ZeroDivisionError("inside the child")
        data_cache.build_cache = broken
        build = data_cache.start_background_build(load_config(sys.argv[1]))
        try:
            build.wait()
        except ZeroDivisionError as e:
            assert "inside the child" in str(e)
            assert any("in broken" in note and "child process" in note for note in e.__notes__), e.__notes__
            print("raised here")
    """, str(tiny_config("run")))
    assert proc.returncode == 0 and "raised here" in proc.stdout, proc.stderr


def test_a_child_killed_without_a_report_leaves_the_build_to_the_training_process(tiny_config):
    proc = run_script("""
        import signal
        def killed(*args):
            os.kill(os.getpid(), signal.SIGKILL)
        data_cache.build_cache = killed
        cfg = load_config(sys.argv[1])
        data_cache.start_background_build(cfg).wait()  # no exception: the caller then builds it
        assert not data_cache.cache_root(cfg).exists()
        print("went on")
    """, str(tiny_config("run")))
    assert proc.returncode == 0 and "went on" in proc.stdout, proc.stderr
    assert "ended with status" in proc.stderr


def test_cancel_ends_a_running_child(tiny_config):
    proc = run_script("""
        def slow(*args):
            time.sleep(120)
        data_cache.build_cache = slow
        build = data_cache.start_background_build(load_config(sys.argv[1]))
        time.sleep(0.5)
        t0 = time.perf_counter()
        build.cancel()
        build.wait()  # after cancel: nothing to wait for
        assert time.perf_counter() - t0 < 10
        try:
            os.kill(build.pid, 0)
        except ProcessLookupError:
            print("gone")
    """, str(tiny_config("run")))
    assert proc.returncode == 0 and "gone" in proc.stdout, proc.stderr


def test_no_child_where_it_would_not_help(tiny_config, monkeypatch):
    cfg = load_config(tiny_config("run"))
    assert start_background_build(cfg) is None  # this process has imported torch
    proc = run_script("""
        cfg = load_config(sys.argv[1])
        assert data_cache.start_background_build(load_config(sys.argv[1], ["--data.build_in_background", "false"])) is None
        os.environ["RANK"] = "1"  # another rank: rank 0 builds the cache
        assert data_cache.start_background_build(cfg) is None
        print("none")
    """, str(tiny_config("run2")))
    assert proc.returncode == 0 and "none" in proc.stdout, proc.stderr


def test_training_through_the_cli_with_and_without_the_child_gives_the_same_model(tiny_config, tmp_path):
    results = []
    for flag in ("true", "false"):
        run_dir = tmp_path / f"run-{flag}"
        proc = subprocess.run(
            [sys.executable, "-m", "trainer", "train", "--config", str(tiny_config("base")), "--run.dir", str(run_dir),
             "--data.build_in_background", flag, "--train.epochs", "1", "--checkpoint.enabled", "false",
             "--metrics.tensorboard", "false", "--metrics.projector_words", "0"],
            cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr.count("INFO read ") == 1  # the train split read once, by one process
        results.append(run_dir)
    assert filecmp.cmp(results[0] / "model" / "weights.pt", results[1] / "model" / "weights.pt", shallow=False)


def test_a_killed_child_whose_worker_lives_on_does_not_hang_the_wait(tiny_config, tmp_path):
    """A tokenizing worker (a grandchild) outliving a killed child must not hold the report pipe open: the wait
    ends when the child does."""
    proc = run_script("""
        import signal
        def killed_with_a_worker(*args):
            worker = os.fork()
            if worker == 0:  # a worker that outlives the child (off this test's output pipes)
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, 1)
                os.dup2(null, 2)
                time.sleep(60)
                os._exit(0)
            open(sys.argv[2], "w").write(str(worker))
            os.kill(os.getpid(), signal.SIGKILL)
        data_cache.build_cache = killed_with_a_worker
        t0 = time.perf_counter()
        data_cache.start_background_build(load_config(sys.argv[1])).wait()
        print("waited %.1f s" % (time.perf_counter() - t0))
        os.kill(int(open(sys.argv[2]).read()), signal.SIGKILL)
    """, str(tiny_config("run")), str(tmp_path / "worker.pid"))
    assert proc.returncode == 0 and "waited" in proc.stdout, proc.stderr
    assert float(proc.stdout.split()[1]) < 10


def slow_fill_script(then: str) -> str:
    """A child whose cache build writes into its temporary folder and then takes long, followed by `then`."""
    return """
        def slow_fill(cfg, pretrained, tmp):
            (tmp / "partial").write_text("x")
            print("child", os.getpid(), flush=True)
            time.sleep(120)
        data_cache._fill_cache = slow_fill
        cfg = load_config(sys.argv[1])
        build = data_cache.start_background_build(cfg)
        for _ in range(200):  # until the child is inside the slow build
            if list(data_cache.cache_root(cfg).glob("*.tmp*")):
                break
            time.sleep(0.05)
    """ + then


def test_cancel_removes_the_childs_temporary_folder(tiny_config, tmp_path):
    proc = run_script(slow_fill_script("""
        build.cancel()
        root = data_cache.cache_root(cfg)  # removed with the temporary folder when the build made it
        print("left", [p.name for p in root.iterdir()] if root.exists() else [])
    """), str(tiny_config("run")))
    assert proc.returncode == 0 and "left []" in proc.stdout, proc.stdout + proc.stderr


def test_the_child_ends_and_cleans_up_when_the_training_process_dies(tiny_config, tmp_path):
    config = tiny_config("run")
    proc = run_script(slow_fill_script("""
        os.kill(os.getpid(), 9)  # the training process killed outright
    """), str(config))
    assert proc.returncode == -9
    cache = Path(load_config(config).run.dir) / "cache"
    deadline = time.time() + 20
    while time.time() < deadline and list(cache.glob("*.tmp*")):
        time.sleep(0.1)
    assert not list(cache.glob("*.tmp*"))


def test_an_exception_that_does_not_unpickle_comes_back_as_its_traceback(tiny_config):
    proc = run_script("""
        class Picky(Exception):
            def __init__(self, a, b):  # pickle re-creates it with args=(message,): a TypeError on loading
                super().__init__(f"{a}/{b}")
        def broken(*args):
            raise Picky("one", "two")
        data_cache.build_cache = broken
        try:
            data_cache.start_background_build(load_config(sys.argv[1])).wait()
        except RuntimeError as e:
            assert "Picky: one/two" in str(e) and "in broken" in str(e), str(e)
            print("text kept")
    """, str(tiny_config("run")))
    assert proc.returncode == 0 and "text kept" in proc.stdout, proc.stderr
