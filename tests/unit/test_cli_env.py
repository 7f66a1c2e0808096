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


def test_the_spin_setting_is_in_place_before_any_command_imports_torch():
    """`python -m trainer` (cli.run) reaches main(), which sets GOMP_SPINCOUNT, without importing torch. The exit
    path once imported it first (through trainer.distributed), so libgomp loaded with its own spin count and the
    bounded spinning silently did not apply: 2-3x slower training beside busy processes."""
    code = ("import os, sys; from trainer import cli\n"
            "def main():\n"
            "    print('torch' in sys.modules, flush=True)\n"
            "    return 0\n"
            "cli.main = main\n"
            "cli.run()")
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_help_asked_for_goes_to_stdout_and_a_usage_error_to_stderr(capsys):
    assert cli.main(["--help"]) == 0
    out, err = capsys.readouterr()
    assert "commands:" in out and not err
    assert cli.main([]) == 2
    out, err = capsys.readouterr()
    assert "commands:" in err and not out
    assert cli.main(["trian"]) == 2  # a typo says so, with the likely command, not only the usage
    out, err = capsys.readouterr()
    assert err.rstrip().endswith("error: unknown command 'trian'; did you mean 'train'?") and not out


def test_config_given_twice_is_refused(tmp_path, capsys):
    """The second --config silently replaced the first."""
    for argv in (["--config", "a.toml", "--config", "b.toml"], ["--config=a.toml", "--config=b.toml"]):
        assert cli.main(["train", *argv]) == 2
        assert "--config given twice (a.toml, b.toml); pass one file" in capsys.readouterr().err
