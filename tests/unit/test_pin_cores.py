"""dist.pin_cores: each local rank's block of cores (trainer/distributed.py)."""

import json
import os
import subprocess
import sys

import pytest

from trainer.distributed import core_block


@pytest.mark.parametrize(
    ("cores", "world", "want"),
    [
        (range(8), 2, [[0, 1, 2, 3], [4, 5, 6, 7]]),
        (range(7), 3, [[0, 1, 2], [3, 4], [5, 6]]),  # the first len % world blocks are one core larger
        ([5, 1, 3, 7], 2, [[1, 3], [5, 7]]),  # sorted first: an affinity set has no order
        (range(2), 2, [[0], [1]]),
        (range(2), 3, [[0], [1], [0]]),  # fewer cores than ranks: round-robin, one core each
        (range(4), 1, [[0, 1, 2, 3]]),
    ],
)
def test_core_blocks_partition_the_cores(cores, world, want) -> None:
    blocks = [core_block(list(cores), r, world) for r in range(world)]
    assert blocks == want
    if len(list(cores)) >= world:  # disjoint and covering
        flat = sorted(c for b in blocks for c in b)
        assert flat == sorted(cores)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux only")
def test_pin_to_cores_pins_the_process_and_the_threads_it_starts() -> None:
    """In a child process (pinning this one would slow the rest of the suite): the last local rank of 2 gets the
    upper block of the visible cores, and a thread started afterwards (as torch's pools and the data thread are)
    inherits it."""
    code = (
        "import json, os, threading\n"
        "from trainer.distributed import pin_to_cores\n"
        "block = pin_to_cores(1, 2)\n"
        "seen = []\n"
        "t = threading.Thread(target=lambda: seen.append(sorted(os.sched_getaffinity(0))))\n"
        "t.start(); t.join()\n"
        "print(json.dumps([block, sorted(os.sched_getaffinity(0)), seen[0]]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    block, process, thread = json.loads(out.stdout)
    want = core_block(list(os.sched_getaffinity(0)), 1, 2)
    assert block == process == thread == want
