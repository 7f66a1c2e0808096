"""`distributed.exit_process`: how `python -m trainer` ends, so that gloo's worker threads cannot abort a finished run.

The abort itself is a race (a gloo thread frees a finished collective's tensors, which needs the GIL, while the
interpreter is finalising; 4 of 10 two-process row_wise runs here before the fix), so these tests check what
removes it: after a process group, the atexit handlers run and the streams are flushed while the interpreter is
whole, and finalisation, where the abort happened, never starts.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import atexit, os, sys
    import trainer.distributed as d

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


def run(joined: bool) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT.format(joined=joined)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_after_a_process_group_the_interpreter_is_not_finalised():
    proc = run(joined=True)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "buffered, no newline"
    assert "atexit ran" in proc.stderr
    assert "finalised" not in proc.stderr


def test_without_a_process_group_it_is_a_normal_exit():
    proc = run(joined=False)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "buffered, no newline"
    assert "atexit ran" in proc.stderr
    assert "finalised" in proc.stderr


def test_python_dash_m_trainer_and_the_console_script_end_through_it():
    assert "run()" in (ROOT / "trainer" / "__main__.py").read_text()
    assert 'trainer = "trainer.cli:run"' in (ROOT / "pyproject.toml").read_text()  # the console script too
    proc = subprocess.run([sys.executable, "-m", "trainer", "no-such-command"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "commands:" in proc.stderr
