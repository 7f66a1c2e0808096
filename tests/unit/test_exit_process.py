"""`distributed.exit_process`: how `python -m trainer` ends, so that gloo's worker threads cannot abort a finished run.

The abort itself is a race (a gloo thread frees a finished collective's tensors, which needs the GIL, while the
interpreter is finalising; 6 of 22 two-process row_wise runs here before the fix), so these tests check what
removes it: after a process group, the atexit handlers run and the streams are flushed while the interpreter is
whole, and finalisation, where the abort happened, never starts.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import atexit, os, sys
    import trainer.distributed as d
    {prelude}

    class Finalised:
        def __del__(self, write=os.write):  # bound now: module globals are gone when finalisation frees it
            write(2, b"finalised\\n")

    keep = Finalised()  # a module global: freed only when the interpreter finalises
    atexit.register(lambda: sys.stderr.write("atexit ran\\n"))
    d._joined_process_group = {joined}
    sys.stdout.write("buffered, no newline")  # a pipe: block-buffered, lost unless flushed
    d.exit_process(3)
    """
)


def run(joined: bool, env: dict | None = None, prelude: str = "") -> subprocess.CompletedProcess:
    import os

    script = SCRIPT.format(joined=joined, prelude=prelude)
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TRAINER_FINALIZE": "", **(env or {})})


def test_after_a_process_group_the_interpreter_is_not_finalised():
    proc = run(joined=True)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "buffered, no newline"
    assert "atexit ran" in proc.stderr
    assert "finalised" not in proc.stderr


def test_one_process_skips_finalisation_too_unless_asked_to_finalise():
    """Finalising torch and numba costs 0.4-0.7 s of a run's wall time with nothing to save."""
    proc = run(joined=False)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "buffered, no newline"
    assert "atexit ran" in proc.stderr
    assert "finalised" not in proc.stderr
    proc = run(joined=False, env={"TRAINER_FINALIZE": "1"})
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "buffered, no newline"
    assert "atexit ran" in proc.stderr
    assert "finalised" in proc.stderr
    proc = run(joined=True, env={"TRAINER_FINALIZE": "1"})  # never after a group: gloo's threads could abort it
    assert proc.returncode == 3 and "finalised" not in proc.stderr, proc.stderr


SLOW_WRITER = textwrap.dedent(
    """
    import threading, time
    from concurrent.futures import ThreadPoolExecutor
    def slow_writer():
        time.sleep(0.5)
        os.write(2, b"writer done\\n")
    threading.Thread(target=slow_writer).start()
    leaked = ThreadPoolExecutor(1)  # never shut down: its idle worker must not make the exit hang
    leaked.submit(int).result()
    """
)
STUCK = textwrap.dedent(
    """
    import threading
    threading.Thread(target=threading.Event().wait).start()  # non-daemon, never ends
    """
)


def test_non_daemon_threads_finish_first():
    """As finalisation would: a thread still writing (a checkpoint, say) is waited for, not cut off."""
    proc = run(joined=False, prelude=SLOW_WRITER)
    assert proc.returncode == 3, proc.stderr
    assert "writer done" in proc.stderr
    assert proc.stderr.index("writer done") < proc.stderr.index("atexit ran")


def test_after_a_process_group_a_stuck_thread_does_not_hold_the_rank():
    """A rank must end (and let torchrun restart the group) even if one of its threads never would."""
    proc = run(joined=True, prelude=STUCK)
    assert proc.returncode == 3, proc.stderr
    assert "atexit ran" in proc.stderr


def test_python_dash_m_trainer_and_the_console_script_end_through_it():
    assert "run()" in (ROOT / "trainer" / "__main__.py").read_text()
    assert 'trainer = "trainer.cli:run"' in (ROOT / "pyproject.toml").read_text()  # the console script too
    proc = subprocess.run([sys.executable, "-m", "trainer", "no-such-command"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "commands:" in proc.stderr


RUN_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import trainer.cli as cli
    import trainer.distributed as d

    class Finalised:
        def __del__(self, write=os.write):
            write(2, b"finalised\\\\n")

    keep = Finalised()
    d._joined_process_group = True

    def main():
        {body}

    cli.main = main
    cli.run()
    """
)


@pytest.mark.parametrize(("body", "code", "stderr"), [
    ("return 0", 0, ""),
    ("return None", 0, ""),
    ("return 2", 2, ""),
    ("raise RuntimeError('gloo: all-reduce failed')", 1, "RuntimeError: gloo: all-reduce failed"),
    ("raise SystemExit(130)", 130, ""),
    ("raise SystemExit('bad flag')", 1, "bad flag"),
    ("raise KeyboardInterrupt", 130, "KeyboardInterrupt"),
    # a second SIGINT during a checkpoint save: DCP wraps its SystemExit; the status stays, with no traceback
    ("import trainer.process_exit as p; p.forced_exit = 130; raise RuntimeError('wrapped')", 130, ""),
    # another rank died: one line, not gloo's traceback
    ("raise RuntimeError('[pair.cc:553] Connection closed by peer [127.0.0.1]:7074. This is typically')", 1,
     "error: rank ?: another rank ended, so this one stops ([pair.cc:553] Connection closed by peer"),
])
def test_run_ends_through_exit_process_whatever_main_does(body, code, stderr):
    """An error or a second signal after the group was joined is when gloo's threads are most likely busy: those
    exits must skip finalisation too, with the status Python would have given."""
    proc = subprocess.run([sys.executable, "-c", RUN_SCRIPT.format(body=body)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == code, proc.stderr
    assert stderr in proc.stderr
    assert "finalised" not in proc.stderr
    if "another rank ended" in stderr:
        assert "Traceback" not in proc.stderr


def test_joining_a_group_marks_the_process(monkeypatch):
    import torch.distributed as dist

    from trainer import distributed

    monkeypatch.setattr(distributed, "_joined_process_group", False)
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # as if joined: no rendezvous in a unit test
    monkeypatch.setattr(dist, "new_group", lambda **kwargs: None)  # nor the trainer's own groups
    distributed.init_distributed("cpu")
    assert distributed._joined_process_group


def test_run_training_closes_the_logger_however_fit_ends(tiny_config, monkeypatch):
    """exit_process skips finalisation, so TensorBoard's queued events must be written by an explicit close, also
    when training fails."""
    from trainer import metrics
    from trainer import trainer as trainer_module
    from trainer.config import load_config

    closed = []
    original_close = metrics.MetricsLogger.close

    def recording_close(self):
        closed.append(self.jsonl.closed)
        original_close(self)

    def failing_fit(self):
        self.build()
        self.logger.scalars({"loss/train": 1.0}, 1)
        raise RuntimeError("boom")

    monkeypatch.setattr(metrics.MetricsLogger, "close", recording_close)
    monkeypatch.setattr(trainer_module.Trainer, "fit", failing_fit)
    cfg = load_config(tiny_config("run"), ["--train.threads", "1"])
    with pytest.raises(RuntimeError, match="boom"):
        trainer_module.run_training(cfg)
    assert closed == [False]  # closed once, by run_training
