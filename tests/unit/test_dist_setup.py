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


def fake_resolver(monkeypatch, table: dict[str, list[str]], hostname: str = "node-a") -> None:
    import socket

    import trainer.distributed as distributed

    def getaddrinfo(host, port, *args, **kwargs):
        if host not in table:
            raise socket.gaierror(-2, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, 0)) for a in table[host]]

    monkeypatch.setattr(distributed.socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(distributed.socket, "gethostname", lambda: hostname)
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)


@pytest.mark.parametrize("node_a", [["127.0.1.1"], [], ["::1"]], ids=["debian-hosts", "unresolved", "ipv6-loopback"])
def test_a_node_that_gloo_would_bind_to_loopback_is_refused_across_nodes(monkeypatch, node_a):
    from trainer.distributed import check_gloo_address

    fake_resolver(monkeypatch, {"master": ["10.0.0.1"], **({"node-a": node_a} if node_a else {})})
    torchrun_env(monkeypatch, "master", 4, 2)
    with pytest.raises(ConfigError, match="hostname 'node-a' .*GLOO_SOCKET_IFNAME"):
        check_gloo_address()
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth0")  # the fix it names
    check_gloo_address()


def test_node_zero_named_by_its_own_loopback_hostname_is_refused(monkeypatch):
    """MASTER_ADDR is usually node 0's hostname (torchrun's c10d rendezvous, slurm.sbatch): on a Debian node 0 it
    resolves to 127.0.1.1 too, and node 0 is exactly the node whose gloo would listen there."""
    from trainer.distributed import check_gloo_address

    fake_resolver(monkeypatch, {"node-a": ["127.0.1.1"]})
    torchrun_env(monkeypatch, "node-a", 4, 2)
    with pytest.raises(ConfigError, match="GLOO_SOCKET_IFNAME"):
        check_gloo_address()


def test_gloo_takes_the_first_address_so_the_check_does(monkeypatch):
    from trainer.distributed import check_gloo_address

    torchrun_env(monkeypatch, "master", 4, 2)
    fake_resolver(monkeypatch, {"master": ["10.0.0.1"], "node-a": ["127.0.1.1", "10.0.0.2"]})
    with pytest.raises(ConfigError, match="resolves first to 127.0.1.1"):
        check_gloo_address()
    fake_resolver(monkeypatch, {"master": ["10.0.0.1"], "node-a": ["10.0.0.2", "127.0.1.1"]})
    check_gloo_address()


def test_gloo_address_checks_pass_where_loopback_is_right_or_the_host_resolves(monkeypatch):
    from trainer.distributed import check_gloo_address

    fake_resolver(monkeypatch, {"master": ["10.0.0.1"], "node-a": ["10.0.0.2"], "localhost": ["127.0.0.1"]})
    torchrun_env(monkeypatch, "master", 4, 2)
    check_gloo_address()  # the hostname has a routable address
    fake_resolver(monkeypatch, {"master": ["10.0.0.1"], "node-a": ["127.0.1.1"], "localhost": ["127.0.0.1"]})
    torchrun_env(monkeypatch, "master", 2, 2)
    check_gloo_address()  # one node: loopback reaches every rank
    torchrun_env(monkeypatch, "localhost", 4, 2)
    check_gloo_address()  # a loopback master: every "node" is this host
    torchrun_env(monkeypatch, "master", 4, 2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    check_gloo_address()  # a launch without LOCAL_WORLD_SIZE: nothing says there are other nodes

