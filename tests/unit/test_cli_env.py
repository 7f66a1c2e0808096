"""Process settings the CLI makes before torch loads."""

import os
import subprocess
import sys

from trainer import cli


def test_openmp_threads_wait_passively_unless_the_user_says_otherwise(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    cli._passive_openmp_threads()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    cli._passive_openmp_threads()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_cli_module_does_not_import_torch():
    """OMP_WAIT_POLICY only works if it is set before torch's OpenMP runtime loads."""
    code = "import sys, trainer.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
