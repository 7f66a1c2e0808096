"""The data-cache build in a forked child, so that the training process imports torch meanwhile.

Kept apart from `data_cache` on purpose: this module imports neither numba nor torch, so the CLI forks
the child as soon as the configuration is read (about 0.25 s into the process). Importing `data_cache` first (numba
and the tokenizer, about 0.4 s) delayed the fork by that much, while the other core sat idle; the child now imports
them itself, beside the parent's torch import.
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import signal
import sys
import traceback

from trainer.config import Config
from trainer.parallel import can_fork

log = logging.getLogger("trainer.data_cache")


class BackgroundBuild:
    """A forked child building the data cache (`start_background_build`). `wait()` returns once it has ended, and
    raises the child's exception, if any, in this process; `cancel()` ends a child nobody will wait for."""

    def __init__(self, pid: int, report_fd: int) -> None:
        self.pid = pid
        self._report_fd = report_fd
        self._done = False

    def wait(self) -> None:
        if self._done:
            return
        try:
            report, status = self._collect()
        except BaseException:  # interrupted (Ctrl-C): the child must not go on alone
            self.cancel()
            raise
        self._done = True
        if report:
            exc_bytes, child_traceback = pickle.loads(report)
            try:
                exc = pickle.loads(exc_bytes)
            except Exception:  # noqa: BLE001 - an exception class that does not unpickle: keep its text
                exc = RuntimeError(f"building the data cache failed in a child process:\n{child_traceback}")
            raise exc
        if status:  # ended without a report (killed): the caller builds the cache itself
            log.warning("the background data-cache build ended with status %d; building it here",
                        os.waitstatus_to_exitcode(status))

    def _collect(self) -> tuple[bytes, int]:
        """The child's report and exit status. Reads until the child has exited, not until end of file: a
        grandchild (a tokenizing worker) of a child that was killed could hold the pipe open forever."""
        chunks, status = [], None
        while status is None:
            ready, _, _ = select.select([self._report_fd], [], [], 0.2)
            if ready:
                chunk = os.read(self._report_fd, 1 << 16)
                if chunk:
                    chunks.append(chunk)
                    continue
            pid, code = os.waitpid(self.pid, 0 if ready else os.WNOHANG)  # EOF: the child is ending
            if pid:
                status = code
        os.set_blocking(self._report_fd, False)
        try:  # what the child wrote just before it exited
            while chunk := os.read(self._report_fd, 1 << 16):
                chunks.append(chunk)
        except BlockingIOError:
            pass
        os.close(self._report_fd)
        return b"".join(chunks), status

    def cancel(self) -> None:
        """SIGTERM to the child, which then removes its temporary folder and stops its workers; reaped here."""
        if self._done:
            return
        self._done = True
        os.close(self._report_fd)
        try:
            os.kill(self.pid, signal.SIGTERM)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):  # already gone (and reaped)
            pass


def _end_with_parent() -> None:
    """Linux: SIGTERM to this process when its parent dies (a training process killed with SIGKILL must not leave
    a build running that a restarted one would race)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the child finishes on its own
        pass


def _terminate(signum, frame) -> None:
    raise SystemExit(128 + signum)


def start_background_build(cfg: Config) -> BackgroundBuild | None:
    """Fork a child that loads the pretrained vectors and builds the data cache, so that this process can import
    torch meanwhile; None where no child is started: `data.build_in_background` false, a rank other than global
    rank 0 (rank 0 builds the cache, the others wait for it), not Linux (`parallel.can_fork`), or torch already
    imported (a process with torch's threads running is not forked).

    The child reports an exception by pickling it back (`BackgroundBuild.wait` raises it here, so a data error is
    printed once, by the training process, as if raised there) and leaves through `os._exit`. SIGTERM (`cancel`,
    or the parent's death) ends it through SystemExit, so its temporary folder is removed and its worker pool shut
    down; its workers close the report pipe, so only the child itself holds it."""
    if (not cfg.data.build_in_background or os.environ.get("RANK", "0") != "0" or not can_fork()
            or "torch" in sys.modules):
        return None
    read_fd, write_fd = os.pipe()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    parent = os.getpid()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        return BackgroundBuild(pid, read_fd)
    # the child: everything up to its os._exit in one try, so that no exception (SIGTERM's SystemExit, Ctrl-C's
    # KeyboardInterrupt) can carry it back into the caller, where it would go on as a second training process
    code = 1
    try:
        signal.signal(signal.SIGTERM, _terminate)
        os.close(read_fd)
        _end_with_parent()
        os.register_at_fork(after_in_child=lambda: os.close(write_fd))
        if os.getppid() != parent:  # the parent died before the death signal was armed
            raise SystemExit(1)
        # numba and the data modules load here, beside the parent's torch import, not before the fork
        from trainer import data_cache, jit

        pretrained = data_cache.load_pretrained(cfg, progress=cfg.metrics.progress)
        folder = data_cache.cache_root(cfg) / f"data-{data_cache.cache_key(cfg, pretrained)}"
        if not (folder / "done.json").exists():
            data_cache.build_cache(cfg, pretrained, folder)
            jit.report_compiled(data_cache.log, "data cache build")
        code = 0
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the training process
        _report(e, write_fd)
    finally:
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            logging.shutdown()
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
        finally:
            os._exit(code)


def _report(e: BaseException, write_fd: int) -> None:
    """The child's exception, pickled with its traceback's text, to the training process (BackgroundBuild.wait)."""
    child_traceback = traceback.format_exc()
    e.add_note(f"(raised while building the data cache in a child process)\n{child_traceback}")
    try:
        exc_bytes = pickle.dumps(e)
    except Exception:  # noqa: BLE001 - an exception that does not pickle: its text still goes back
        exc_bytes = pickle.dumps(RuntimeError(f"building the data cache failed in a child process:\n{child_traceback}"))
    report = memoryview(pickle.dumps((exc_bytes, child_traceback)))
    try:
        while report:
            report = report[os.write(write_fd, report):]
    except OSError:  # the parent closed its end (cancel): nobody to tell
        pass
