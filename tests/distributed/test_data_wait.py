"""The other ranks wait for rank 0's data cache on a group of their own, whose timeout (dist.data_timeout_s) is not
the process group's (dist.timeout_s): a first run on a large dataset builds for longer than a collective may hang."""

import os
import time
from pathlib import Path

import pytest
from harness import DistributedRunError, run_distributed

from trainer.config import load_config
from trainer.distributed import DistInfo

GROUP_TIMEOUT_S = 1.0  # the harness's process-group timeout: rank 0 builds for longer than this
BUILD_DELAY_S = 3.0


def _write_split(path: Path, n: int) -> None:
    rows = [f"kernel{i % 7} python{i % 5} font{i % 3},{'ab'[i % 2]}" for i in range(n)]
    path.write_text("text,label\n" + "\n".join(rows) + "\n", encoding="utf-8")


def _join_as_torchrun_would(info: DistInfo) -> None:
    """init_distributed on the harness's group (already initialised: it only adds the trainer's own groups)."""
    from trainer.distributed import init_distributed

    os.environ.update(RANK=str(info.rank), LOCAL_RANK=str(info.rank), WORLD_SIZE=str(info.world_size),
                      LOCAL_WORLD_SIZE=str(info.world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    init_distributed("cpu", timeout_s=int(GROUP_TIMEOUT_S), data_timeout_s=60)


def _slow_build_rank(info: DistInfo, data: str, cache: str, use_wait_group: bool) -> int:
    import trainer.data as data_module
    from trainer.data import prepare_data

    _join_as_torchrun_would(info)
    real_build = data_module.build_cache

    def slow_build(*args):  # as a large dataset would: longer than the group's timeout
        time.sleep(BUILD_DELAY_S)
        real_build(*args)

    data_module.build_cache = slow_build
    if not use_wait_group:  # what prepare_data did before: wait on the default group
        data_module.data_wait_group = lambda: None
    cfg = load_config(None, ["--data.train", str(Path(data) / "train.csv"), "--embeddings.ngram_buckets", "0",
                             "--embeddings.min_freq", "1"])
    bundle = prepare_data(cfg, None, info, Path(cache))
    return len(bundle.vocab.words)


@pytest.mark.slow
def test_ranks_wait_for_a_build_longer_than_the_group_timeout(tmp_path: Path):
    _write_split(tmp_path / "train.csv", 40)
    words = run_distributed(_slow_build_rank, 2, str(tmp_path), str(tmp_path / "cache"), True,
                            pg_timeout_s=GROUP_TIMEOUT_S, timeout_s=120)
    assert words[0] == words[1] > 0


@pytest.mark.slow
def test_on_the_default_group_the_same_wait_times_out(tmp_path: Path):
    """The control: the delay does exceed the group's timeout, so the test above can fail."""
    _write_split(tmp_path / "train.csv", 40)
    with pytest.raises(DistributedRunError, match="(?i)timed out"):
        run_distributed(_slow_build_rank, 2, str(tmp_path), str(tmp_path / "cache"), False,
                        pg_timeout_s=GROUP_TIMEOUT_S, timeout_s=120)
