"""MASTER_ADDR that does not resolve (torchrun advertising a hostname nobody can look up, as in `docker run
--network none`): one node falls back to loopback, several nodes are refused at once instead of hanging."""

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
