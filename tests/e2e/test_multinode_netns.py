"""Two nodes, each in its own network namespace with its own address and a Debian-style /etc/hosts (the hostname on
127.0.1.1), started through launch/multinode.sh.

Without GLOO_SOCKET_IFNAME, gloo would listen on 127.0.1.1, and the other node then retried that address until the
process-group timeout ("connectFullMesh failed ... remote=[127.0.1.1]"): both nodes must stop at once, naming
GLOO_SOCKET_IFNAME. With it, they must train together. Needs root and `ip netns` (CI has both); skipped otherwise.
"""

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import make_tiny_data, tiny_config_text

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
MULTINODE = REPO / "launch" / "multinode.sh"
ETC_NETNS = Path("/etc/netns")
MASTER = "10.77.0.1"
HOSTNAME_THEN_EXEC = 'hostname "$1" && shift && exec "$@"'
STEPS = 6


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _unavailable() -> str | None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root (ip netns add, unshare --uts)"
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return "needs ip (iproute2) and unshare"
    probe = f"mnprobe{uuid.uuid4().hex[:6]}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode:
        return f"`ip netns add` is not permitted here: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@pytest.fixture
def nodes(tmp_path):
    """Two namespaces on a private bridge: eth0 = 10.77.0.1 and .2, hostnames node0 / node1 on 127.0.1.1."""
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    tag = uuid.uuid4().hex[:5]
    names, bridge = [f"mn{tag}{i}" for i in range(2)], f"mb{tag}"
    try:
        _ip("link", "add", bridge, "type", "bridge")
        _ip("link", "set", bridge, "up")
        for i, ns in enumerate(names):
            _ip("netns", "add", ns)
            host_end = f"mv{tag}{i}"
            _ip("link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", host_end, "master", bridge)
            _ip("link", "set", host_end, "up")
            _ip("-n", ns, "addr", "add", f"10.77.0.{i + 1}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            etc = ETC_NETNS / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 node{i}\n")
            (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        yield names
    finally:
        for ns in names:
            for pid in _ip("netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", ns, check=False)
            shutil.rmtree(ETC_NETNS / ns, ignore_errors=True)
        _ip("link", "del", bridge, check=False)


def _launch(nodes: list[str], config: Path, run_dir: Path, logs: Path, **env_extra: str) -> list[tuple[int, str]]:
    """multinode.sh on each node (node 0 hosts the rendezvous at 10.77.0.1); (exit code, log) per node."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                            "MASTER_ADDR", "MASTER_PORT", "GLOO_SOCKET_IFNAME")}
    env.update(PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}", NNODES="2", MASTER_ADDR=MASTER,
               MASTER_PORT="29500", NPROC_PER_NODE="1", DEVICE="cpu", **env_extra)
    procs = []
    for i, ns in enumerate(nodes):
        log = (logs / f"node{i}.log").open("w")
        argv = ["ip", "netns", "exec", ns, "unshare", "--uts", "sh", "-c", HOSTNAME_THEN_EXEC, "sh", f"node{i}",
                str(MULTINODE), "--config", str(config), "--run.dir", str(run_dir), "--train.threads", "1",
                "--dist.timeout_s", "60"]
        procs.append((subprocess.Popen(argv, env={**env, "NODE_RANK": str(i)}, cwd=REPO, stdout=log,
                                       stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + 180
    out = []
    for i, (proc, log) in enumerate(procs):
        try:
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        log.close()
        out.append((code, (logs / f"node{i}.log").read_text(errors="replace")))
    return out


def _setup(tmp_path: Path) -> tuple[Path, Path]:
    files = make_tiny_data(tmp_path / "data")
    run = tmp_path / "run"
    config = tmp_path / "config.toml"
    config.write_text(tiny_config_text(files, run, train={"max_steps": STEPS, "epochs": 1},
                                       checkpoint={"enabled": False}, metrics={"tensorboard": False,
                                                                              "projector_words": 0}))
    return config, run


def test_a_node_whose_hostname_is_on_loopback_stops_at_once_naming_the_fix(nodes, tmp_path):
    config, run = _setup(tmp_path)
    started = time.monotonic()
    results = _launch(nodes, config, run, tmp_path)
    took = time.monotonic() - started
    for i, (code, log) in enumerate(results):
        assert code != 0, f"node{i} trained although gloo would listen on loopback:\n{log[-2000:]}"
        assert f"this node's hostname 'node{i}' resolves first to 127.0.1.1" in log, log[-3000:]
        assert "GLOO_SOCKET_IFNAME" in log
    assert took < 60, f"took {took:.0f} s: the nodes waited instead of stopping at once"


def test_with_gloo_socket_ifname_the_two_nodes_train_together(nodes, tmp_path):
    config, run = _setup(tmp_path)
    results = _launch(nodes, config, run, tmp_path, GLOO_SOCKET_IFNAME="eth0")
    for i, (code, log) in enumerate(results):
        assert code == 0, f"node{i} failed:\n{log[-3000:]}"
    assert "world size 2" in results[0][1]
    assert (run / "result.json").is_file() and (run / "model" / "weights.pt").is_file()
