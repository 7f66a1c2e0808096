"""Process settings the CLI makes before torch loads."""

import os
import subprocess
import sys

from trainer import cli


def test_openmp_spinning_is_bounded_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    cli._bounded_openmp_spinning()
    assert os.environ["GOMP_SPINCOUNT"] == "100000"
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    cli._bounded_openmp_spinning()
    assert "GOMP_SPINCOUNT" not in os.environ and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"


def test_cli_module_does_not_import_torch():
    """OpenMP settings only work if they are set before torch's OpenMP runtime loads."""
    code = "import sys, trainer.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
