"""Process setup under torchrun: a MASTER_ADDR that does not resolve (torchrun advertising a hostname nobody can
look up, as in `docker run --network none`) and more local ranks than GPUs."""

import pytest

from trainer.config import ConfigError
from trainer.distributed import resolve_master_addr


def torchrun_env(monkeypatch, addr: str, world: int, local_world: int) -> None:
    monkeypatch.setenv("MASTER_ADDR", addr)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))


def test_a_resolvable_address_is_kept(monkeypatch):
    torchrun_env(monkeypatch, "localhost", 4, 2)
    assert resolve_master_addr() == "localhost"
    import os

    assert os.environ["MASTER_ADDR"] == "localhost"


def test_one_node_falls_back_to_loopback(monkeypatch):
    torchrun_env(monkeypatch, "nowhere.invalid", 2, 2)
    assert resolve_master_addr() == "127.0.0.1"
    import os

    assert os.environ["MASTER_ADDR"] == "127.0.0.1"  # what init_process_group's env:// rendezvous then reads


@pytest.mark.parametrize("local_world", [1, 2])
def test_several_nodes_are_refused_naming_the_fix(monkeypatch, local_world):
    torchrun_env(monkeypatch, "nowhere.invalid", 4, local_world)
    with pytest.raises(ConfigError, match=r"MASTER_ADDR 'nowhere.invalid' does not resolve.*--local-addr"):
        resolve_master_addr()


def test_more_local_ranks_than_gpus_is_refused(monkeypatch):
    """A node showing 2 GPUs and a third local rank: NCCL would fail on a shared GPU; the trainer says why."""
    import torch

    from trainer.distributed import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda", 1) == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="local rank 2 has no GPU of its own.*--nproc-per-node"):
        pick_device("cuda", 2)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # a GPU per process (CUDA_VISIBLE_DEVICES)
    assert pick_device("cuda", 3) == torch.device("cuda", 0)
