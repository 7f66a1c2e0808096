"""SIGTERM / SIGINT: the first asks for a checkpoint at the next step boundary, a second exits at once."""

import os
import signal

import pytest

from trainer import process_exit
from trainer.run_control import StopFlag


@pytest.mark.parametrize("first", [signal.SIGTERM, signal.SIGINT])
def test_first_signal_requests_stop_a_second_sigint_exits(first):
    flag = StopFlag()
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    flag.install()
    try:
        os.kill(os.getpid(), first)
        assert flag.requested  # handler ran: training would checkpoint at the next step boundary
        with pytest.raises(SystemExit) as exc:
            os.kill(os.getpid(), signal.SIGINT)
        assert exc.value.code == 128 + signal.SIGINT
        assert process_exit.forced_exit == 128 + signal.SIGINT  # the status, however the SystemExit is wrapped
    finally:
        flag.uninstall()
        process_exit.forced_exit = None
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_repeated_sigterm_still_checkpoints():
    """Slurm signals every process of the step and torchrun forwards its own SIGTERM: the worker gets two, and
    must still save its checkpoint rather than exit at once."""
    flag = StopFlag()
    flag.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # no SystemExit
        assert flag.requested
    finally:
        flag.uninstall()
