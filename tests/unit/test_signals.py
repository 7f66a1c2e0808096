"""SIGTERM / SIGINT: the first asks for a checkpoint at the next step boundary, a second exits at once."""

import os
import signal

import pytest

from trainer.trainer import StopFlag


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_first_signal_requests_stop_second_exits(sig):
    flag = StopFlag()
    before = signal.getsignal(sig)
    flag.install()
    try:
        os.kill(os.getpid(), sig)
        assert flag.requested  # handler ran: training would checkpoint at the next step boundary
        with pytest.raises(SystemExit) as exc:
            os.kill(os.getpid(), sig)
        assert exc.value.code == 128 + sig
    finally:
        flag.uninstall()
    assert signal.getsignal(sig) is before
