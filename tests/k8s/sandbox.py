"""Run emulated pods for real: each pod a process tree in its own network namespace, on a private bridge.

    switch netns (bridge br0) --veth-- pod netns 0 (eth0 = pod IP, /etc/netns/<ns>/hosts, UTS hostname)
                              --veth-- pod netns 1 ...

What stands in for what:
  - cluster DNS: `/etc/netns/<ns>/hosts`, which `ip netns exec` mounts over /etc/hosts; it holds the kubelet's own
    line for the pod plus every name the emulated cluster DNS answers (Services, <hostname>.<subdomain>). A
    resolv.conf pointing at nothing makes every other name fail at once instead of timing out.
  - the pod's hostname: `unshare --uts` + `hostname`, then `exec` of the container's argv, so the process that
    `Popen` started *is* the container's PID 1 (torchrun): signals go to it directly.
  - volumes: every persistentVolumeClaim maps to one folder shared by all pods (and by later submissions),
    every emptyDir to a folder of the pod's own, new in each submission; /dev/shm stays the host's.
  - the image: its paths (`image_files`, e.g. /app/configs/demo.toml) map to test files; the container's argv
    and environment are rewritten through the same table; `torchrun` is the virtualenv's.

Addresses come from the emulator's private range and exist only inside these namespaces; nothing is routed to
or from the host. Names carry a per-test tag; `close()` (also on errors) kills every process left in the
namespaces, deletes them and removes their /etc/netns folders.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from cluster import Cluster, Pod

VENV_BIN = Path(sys.executable).parent
ETC_NETNS = Path("/etc/netns")
HOSTNAME_THEN_EXEC = 'hostname "$1" && shift && exec "$@"'


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def unavailable_reason() -> str | None:
    """Why pods cannot be emulated here (None when they can): root, ip, unshare, hostname, `ip netns add`."""
    if os.geteuid() != 0:
        return "pod emulation needs root (ip netns add, unshare --uts)"
    for tool in ("ip", "unshare", "hostname"):
        if shutil.which(tool) is None:
            return f"pod emulation needs `{tool}` on PATH"
    probe = f"k8sprobe{os.getpid()}"
    try:
        made = _ip("netns", "add", probe, check=False)
        if made.returncode != 0:
            return f"`ip netns add` is not permitted here: {made.stderr.strip()}"
        link = _ip("-n", probe, "link", "add", "br0", "type", "bridge", check=False)
        if link.returncode != 0:
            return f"cannot create a bridge in a network namespace: {link.stderr.strip()}"
        uts = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                probe,
                "unshare",
                "--uts",
                "--",
                "sh",
                "-c",
                HOSTNAME_THEN_EXEC,
                "sh",
                "probe-host",
                "hostname",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if uts.returncode != 0 or uts.stdout.strip() != "probe-host":
            return f"`unshare --uts` + `hostname` did not work: {uts.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def remap(value: str, table: dict[str, str]) -> str:
    """Rewrite container paths through `table` (longest prefix first), also after `--flag=`."""
    head, sep, tail = value.partition("=") if value.startswith("--") else ("", "", value)
    for prefix in sorted(table, key=len, reverse=True):
        if tail == prefix or tail.startswith(prefix.rstrip("/") + "/"):
            tail = table[prefix] + tail[len(prefix) :]
            break
    return head + sep + tail


@dataclass
class RunningPod:
    pod: Pod
    netns: str
    proc: subprocess.Popen
    log_path: Path
    argv: list[str]
    seen: dict[int, psutil.Process] = field(default_factory=dict)

    def tree(self) -> list[psutil.Process]:
        """The container's processes (torchrun and its workers), remembering every one seen."""
        try:
            root = psutil.Process(self.proc.pid)
            found = [root, *root.children(recursive=True)]
        except psutil.Error:
            found = []
        for p in found:
            self.seen.setdefault(p.pid, p)
        return found

    def alive(self) -> bool:
        self.tree()
        return self.proc.poll() is None

    def sigterm(self) -> None:
        """What the kubelet does first on deletion, eviction or pre-emption: SIGTERM to the container's PID 1."""
        self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """The pod is lost (node crash, OOM kill of the container): every process dies at once."""
        procs = self.tree() + list(self.seen.values())
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass

    def log(self, chars: int = 5000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


class Submission:
    """One `kubectl apply` of a job: every pod of `cluster` started at once, each in its own network namespace."""

    def __init__(
        self,
        cluster: Cluster,
        root: Path,
        *,
        image_files: dict[str, Path],
        extra_args: list[str],
        prefixlen: int = 24,
    ) -> None:
        self.cluster = cluster
        self.root = root
        self.image_files = {k: str(v) for k, v in image_files.items()}
        self.extra_args = extra_args
        self.prefixlen = prefixlen
        self.tag = uuid.uuid4().hex[:6]
        self.switch = f"k8s{self.tag}sw"
        self.namespaces: list[str] = []
        self.pods: list[RunningPod] = []

    # ------------------------------------------------------------------ network
    def _network(self) -> None:
        _ip("netns", "add", self.switch)
        self.namespaces.append(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, pod in enumerate(self.cluster.pods):
            ns = f"k8s{self.tag}p{i}"
            _ip("netns", "add", ns)
            self.namespaces.append(ns)
            _ip(
                "link",
                "add",
                "eth0",
                "netns",
                ns,
                "type",
                "veth",
                "peer",
                "name",
                f"v{i}",
                "netns",
                self.switch,
            )
            _ip("-n", self.switch, "link", "set", f"v{i}", "master", "br0")
            _ip("-n", self.switch, "link", "set", f"v{i}", "up")
            _ip("-n", ns, "addr", "add", f"{pod.ip}/{self.prefixlen}", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            etc = ETC_NETNS / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(self.cluster.hosts_file(pod))
            (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")

    # ------------------------------------------------------------------ pods
    def paths(self, pod: Pod) -> dict[str, str]:
        """Container path -> host path for this pod: its volumes, then the image's files."""
        table = dict(self.image_files)
        for m in pod.mounts:
            if m.kind == "persistentVolumeClaim":
                host = self.root / "claims" / m.claim / m.sub_path
            elif m.medium == "Memory" and m.path == "/dev/shm":
                continue  # the host's /dev/shm (a tmpfs already)
            else:
                # a new pod's own: Kubernetes gives a resubmitted pod new (empty) emptyDirs even where the
                # emulated name repeats, so they are per submission
                host = self.root / "pods" / pod.name / f"volumes-{self.tag}" / m.volume / m.sub_path
            host.mkdir(parents=True, exist_ok=True)
            table[m.path] = str(host).rstrip("/")
        return table

    def start(self) -> list[RunningPod]:
        try:
            self._network()
            for i, pod in enumerate(self.cluster.pods):
                self.pods.append(self._start(pod, self.namespaces[i + 1]))
        except BaseException:
            self.close()
            raise
        return self.pods

    def _start(self, pod: Pod, ns: str) -> RunningPod:
        table = self.paths(pod)
        home = self.root / "pods" / pod.name / "home"
        home.mkdir(parents=True, exist_ok=True)
        env = {k: remap(v, table) for k, v in pod.env.items()}
        env.update(
            PATH=f"{VENV_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", HOME=str(home)
        )
        argv = [remap(a, table) for a in pod.argv] + self.extra_args
        if shutil.which(argv[0], path=env["PATH"]) is None:
            raise AssertionError(f"{pod.name}: {argv[0]!r} is not on the pod's PATH {env['PATH']}")
        log = self.root / "pods" / pod.name / f"log-{self.tag}.txt"
        cwd = table.get("/app", str(home))
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    ns,
                    "unshare",
                    "--uts",
                    "--",
                    "/bin/sh",
                    "-c",
                    HOSTNAME_THEN_EXEC,
                    "sh",
                    pod.hostname,
                    *argv,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        return RunningPod(pod, ns, proc, log, argv)

    def wait(self, timeout: float) -> dict[str, int]:
        """Wait for every pod's PID 1 to exit; returns pod name -> exit code. Fails (with logs) on timeout."""
        deadline = time.monotonic() + timeout
        while any(rp.alive() for rp in self.pods):
            if time.monotonic() > deadline:
                raise AssertionError(f"pods still running after {timeout:.0f}s\n{self.logs()}")
            time.sleep(0.05)
        return {rp.pod.name: rp.proc.returncode for rp in self.pods}

    def logs(self, chars: int = 3000) -> str:
        return "\n".join(
            f"----- {rp.pod.name} (pid {rp.proc.pid}, exit {rp.proc.poll()})\n{rp.log(chars)}"
            for rp in self.pods
        )

    def close(self) -> None:
        """Kill whatever still runs in the namespaces, then remove the namespaces and their /etc/netns files."""
        for rp in self.pods:
            rp.kill()
        for ns in self.namespaces:
            pids = _ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        for rp in self.pods:
            try:
                rp.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
            psutil.wait_procs([p for p in rp.seen.values() if _running(p)], timeout=10)
        for ns in reversed(self.namespaces):
            _ip("netns", "del", ns, check=False)
            shutil.rmtree(ETC_NETNS / ns, ignore_errors=True)
        self.namespaces.clear()

    def __enter__(self) -> Submission:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
