"""How `python -m trainer` ends: without the interpreter's finalisation (`end_process`).

No torch here: the CLI ends every command through this, and a command that never needed torch (a config error,
`--help`, `report`) must not import it (a second) just to exit.
"""

import atexit
import logging
import os
import sys
import threading

# Set by the training's signal handler when a second signal ends the process at once (trainer.run_control.StopFlag):
# its SystemExit can reach the CLI wrapped in another exception (torch.distributed.checkpoint wraps whatever
# interrupts a save in a CheckpointException), which then exits with this status and no traceback.
forced_exit: int | None = None


def end_process(code: int | None, joined_process_group: bool) -> None:
    """End the process with `code`, without the interpreter's finalisation: non-daemon threads are joined, the
    atexit handlers run and the standard streams and logs are flushed while the interpreter is whole, then the
    process ends. Every file of a run is closed explicitly before this point (loggers, checkpoints, eval files).

    Why, after a process group: gloo's worker threads destroy each finished collective's work, and with it the
    tensors it held, a moment after the caller's `wait()` returned; that needs the GIL. A rank whose last
    collective was its last work (for example the export's all_gather) reached interpreter finalisation first in 6
    of 22 row_wise runs here, and a worker thread asking for the GIL then aborted the process ("terminate called
    without an active exception", SIGABRT, core dump: `ProcessGroupGloo::runLoop` -> `~AsyncAllgatherWork` ->
    `THPVariable_dealloc` -> `take_gil` -> `pthread_exit`), so a finished run exited -6 and torchrun reported a
    failure (and would restart it). `destroy_process_group` does not stop those threads: DDP keeps a reference to
    the group (torch 2.13), so the group is never freed and its threads never joined.

    Why, in one process: finalising tears down torch's and numba's modules, 0.37 s after `import torch` alone
    and 0.7 s after a demo run here, with nothing left to save; `TRAINER_FINALIZE=1` keeps it (for tools that
    report at finalisation) where no process group was joined."""
    code = 0 if code is None else code
    if not joined_process_group and os.environ.get("TRAINER_FINALIZE") == "1":
        sys.exit(code)
    if not joined_process_group and threading.current_thread() is threading.main_thread():
        # what finalisation does first: the threading atexit hooks (they stop idle concurrent.futures workers),
        # then a join of every non-daemon thread. Not after a process group: a rank with a stuck thread must end
        # (and let torchrun restart the group), as it did before this path existed.
        threading._shutdown()
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing left to save
            pass
    os._exit(code)
