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


def _check_unwritable(info: DistInfo, root: str, case: str) -> str:
    from trainer import distributed
    from trainer.config import ConfigError

    distributed.SHARED_CHECK_WAIT_S = 0.5
    cache = Path(root) / "cache"
    run_dir = Path(root) / "run"
    if case == "read_only_cache":  # a cache built before, on storage rank 0 cannot write: an entry there is looked for
        real_touch = Path.touch

        def touch(path, *a, **k):
            if path.parent == cache:
                raise PermissionError(13, "Read-only file system", str(path))
            return real_touch(path, *a, **k)

        Path.touch = touch
    elif case == "run_dir_is_a_file":
        run_dir = Path(root) / "a_file" / "run"
    try:
        distributed.check_shared_folders({"run.dir": run_dir, "data.cache_dir": cache}, info)
    except ConfigError as e:
        return str(e)
    return "ok"


@pytest.mark.slow
def test_a_read_only_cache_folder_is_checked_by_its_entries_and_an_unwritable_run_dir_stops_every_rank(tmp_path):
    (tmp_path / "cache" / "data-built-before").mkdir(parents=True)
    assert run_distributed(_check_unwritable, 2, str(tmp_path), "read_only_cache") == ["ok", "ok"]
    (tmp_path / "a_file").write_text("not a folder")
    messages = run_distributed(_check_unwritable, 2, str(tmp_path), "run_dir_is_a_file")
    assert messages[0] == messages[1] and messages[0].startswith(f"run.dir {tmp_path / 'a_file' / 'run'}: rank 0 "
                                                                 "cannot write there")
