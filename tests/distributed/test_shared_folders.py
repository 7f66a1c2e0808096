"""check_shared_folders: every rank must see what rank 0 writes in the run folder (checkpoints, the data cache);
a node with a folder of its own stops every rank with a message instead of waiting for a cache nobody builds."""

from pathlib import Path

import pytest
from harness import run_distributed

from trainer.distributed import DistInfo


def _check(info: DistInfo, root: str, per_rank: bool) -> str:
    from trainer import distributed
    from trainer.config import ConfigError

    distributed.SHARED_CHECK_WAIT_S = 0.5
    run_dir = Path(root) / (f"node{info.rank}" if per_rank else "shared") / "run"
    try:
        distributed.check_shared_folders({"run.dir": run_dir, "data.cache_dir": Path(root) / "cache"}, info)
    except ConfigError as e:
        return str(e)
    distributed.barrier(info)  # rank 0 removes the check's files as it returns
    return "ok:" + ",".join(sorted(p.name for p in run_dir.iterdir()))  # they are gone


@pytest.mark.slow
def test_shared_folders_pass_and_a_node_of_its_own_stops_every_rank(tmp_path: Path):
    assert run_distributed(_check, 2, str(tmp_path), False) == ["ok:", "ok:"]
    messages = run_distributed(_check, 2, str(tmp_path), True)
    assert messages[0] == messages[1]  # both ranks stop, with the same message
    assert messages[0].startswith(f"run.dir {tmp_path / 'node1' / 'run'}: rank 1 on ")  # its path, as it sees it
    assert "(1 of 2 ranks" in messages[0] and "ReadWriteMany" in messages[0]
    assert not any((tmp_path / "cache").iterdir())  # the shared one passed, and its file is gone
