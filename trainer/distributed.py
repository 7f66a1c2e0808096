"""Process-group setup behind one function pair: `init_distributed` / `shutdown_distributed`.

Single-process mode when torchrun's variables are absent; otherwise NCCL on CUDA (one GPU per LOCAL_RANK) and gloo
on CPU, with a finite timeout so a rank that died makes the others fail instead of hanging forever.
"""

import datetime
import ipaddress
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.process_exit import end_process

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str  # "nccl", "gloo" or "none" (single process)

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1 or self.backend != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_control_group = None  # gloo group for host-side flags when the main backend is NCCL (else the default group)
_data_wait_group = None  # gloo group with a long timeout: waiting for rank 0's data cache (`data_wait_group`)
_joined_process_group = False  # whether this process ever joined one (exit_process)


def agree_any(*flags: bool, info: DistInfo) -> bool | tuple[bool, ...]:
    """For each flag, True on every rank if any rank says True (one collective for all flags). Runs on the CPU
    (a gloo group), so a CUDA step needs no host sync for it; every rank must call it at the same points."""
    if info.is_distributed:
        t = torch.tensor([1.0 if f else 0.0 for f in flags])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=host_group())
        flags = tuple(bool(v) for v in t.tolist())
    return flags[0] if len(flags) == 1 else tuple(flags)


def host_group():
    """The process group for small host-side tensors (flags, split sizes): a gloo group when the main backend is
    NCCL, so they never touch the GPU or wait for it; None (the default group) otherwise."""
    return _control_group


def data_wait_group():
    """The group the other ranks wait on while rank 0 loads the vectors and builds the data cache: gloo, with
    `dist.data_timeout_s`. Why not the default group: its timeout (`dist.timeout_s`, 10 minutes) is for hung
    collectives, and a first run on a large dataset builds for longer (the ranks died of a gloo "Timed out waiting
    ... for recv" while rank 0 was still tokenizing). A rank 0 that dies still ends the wait at once: gloo sees its
    connections close, and torchrun stops the group. Made in `init_distributed`, by every rank together, before
    rank 0 starts that work (making a group is itself a wait, bounded by the default timeout)."""
    return _data_wait_group


def _launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            from trainer.config import ConfigError

            raise ConfigError("train.device: cuda requested but torch.cuda.is_available() is false (no GPU, or a "
                              "CPU build of torch); use --train.device cpu or auto")
        gpus = torch.cuda.device_count()
        if gpus > 1 and local_rank >= gpus:  # NCCL refuses two ranks on one GPU, with a less clear message
            from trainer.config import ConfigError

            raise ConfigError(f"local rank {local_rank} has no GPU of its own: this node shows {gpus} GPUs; start "
                              f"at most {gpus} processes per node (torchrun --nproc-per-node)")
        # one GPU visible: each process may have been given its own (CUDA_VISIBLE_DEVICES per process)
        return torch.device("cuda", local_rank % gpus)
    return torch.device("cpu")


def core_block(cores: list[int], local_rank: int, local_world: int) -> list[int]:
    """This local rank's share of `cores`: contiguous blocks, the first `len % local_world` one core larger; the
    ranks share round-robin when there are fewer cores than ranks."""
    cores = sorted(cores)
    if local_world <= 0 or not cores:
        return cores
    if len(cores) < local_world:
        return [cores[local_rank % len(cores)]]
    size, extra = divmod(len(cores), local_world)
    start = local_rank * size + min(local_rank, extra)
    return cores[start : start + size + (1 if local_rank < extra else 0)]


def pin_to_cores(local_rank: int, local_world: int) -> list[int]:
    """Pin this process to its `core_block` (Linux; elsewhere a no-op returning []). Called before the process
    group and any thread pool exist: threads inherit the affinity of the thread that starts them."""
    if not hasattr(os, "sched_setaffinity"):
        return []
    block = core_block(list(os.sched_getaffinity(0)), local_rank, local_world)
    os.sched_setaffinity(0, block)
    return block


def init_distributed(device: str = "auto", timeout_s: int = 600, pin_cores: bool = False,
                     data_timeout_s: int = 86400) -> DistInfo:
    """Join the process group torchrun describes (or run alone) and pick this rank's device and backend.
    `pin_cores` (CPU only): pin the rank to its block of cores first (`dist.pin_cores`)."""
    if not _launched_by_torchrun():
        return DistInfo(0, 0, 1, pick_device(device, 0), "none")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    dev = pick_device(device, local_rank)
    resolve_master_addr()
    check_gloo_address()
    if pin_cores and dev.type == "cpu":
        pin_to_cores(local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    timeout = datetime.timedelta(seconds=timeout_s)
    global _joined_process_group
    _joined_process_group = True
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            timeout=timeout,
            device_id=dev if dev.type == "cuda" else None,
            **_restart_store(rank, world, timeout),
        )
    global _control_group, _data_wait_group
    if backend == "nccl":
        # CPU-side agreement (stop requests) without touching the GPU stream: a small gloo group
        # (its own timeout: new_group does not inherit the default group's, and would wait 30 minutes)
        _control_group = dist.new_group(backend="gloo", timeout=timeout)
    _data_wait_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=data_timeout_s))
    return DistInfo(rank, local_rank, world, dev, backend)


def resolve_master_addr() -> str:
    """Make sure the workers can reach rank 0's store: MASTER_ADDR, as torchrun set it, must resolve here.

    Why: with the c10d rendezvous (`--standalone`, or a single node without --master-port) torchrun advertises
    the node's own hostname unless given --local-addr. In a container without a network (`docker run --network
    none`) or a host whose name is in neither /etc/hosts nor DNS, that name does not resolve, and every rank
    retried connecting until the process-group timeout (10 minutes by default), printing a resolver warning each
    time. When every rank runs on this node (LOCAL_WORLD_SIZE == WORLD_SIZE) the store is local, so 127.0.0.1
    reaches it; across nodes a wrong guess would hang, so that is refused at once, naming the fix."""
    addr = os.environ["MASTER_ADDR"]
    try:
        socket.getaddrinfo(addr, None)
        return addr
    except (socket.gaierror, UnicodeError) as e:
        reason = getattr(e, "strerror", None) or str(e)
    if os.environ.get("LOCAL_WORLD_SIZE") == os.environ["WORLD_SIZE"]:
        log.info("MASTER_ADDR %r does not resolve on this host (%s); all %s ranks run here, so 127.0.0.1 is used",
                 addr, reason, os.environ["WORLD_SIZE"])
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        return "127.0.0.1"
    from trainer.config import ConfigError

    raise ConfigError(
        f"MASTER_ADDR {addr!r} does not resolve on this node ({reason}): torchrun takes it from the node that runs "
        "rank 0 (its hostname, or its --local-addr). Give torchrun --local-addr with an address every node can "
        "reach (PET_LOCAL_ADDR in the environment), or make that hostname resolvable (DNS, /etc/hosts)")


def _is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr.split("%")[0]).is_loopback
    except ValueError:
        return False


def check_gloo_address() -> None:
    """Across nodes, refuse at once a node whose gloo groups would listen on a loopback address.

    Why: gloo (the CPU backend, and the host-side groups under NCCL) listens on the address this node's hostname
    resolves to, or on loopback when it resolves to none. Debian and Ubuntu map the hostname to 127.0.1.1 in
    /etc/hosts, so on such hosts every rank announced an address no other node can reach, and the group waited
    for the process-group timeout. GLOO_SOCKET_IFNAME names the interface to use instead. Skipped on one node,
    when GLOO_SOCKET_IFNAME is set, and when MASTER_ADDR is itself a loopback address (every "node" is then this
    host, as in a test of two torchrun invocations on one machine)."""
    local_world = os.environ.get("LOCAL_WORLD_SIZE")
    if os.environ.get("GLOO_SOCKET_IFNAME") or local_world is None or local_world == os.environ["WORLD_SIZE"]:
        return  # (without LOCAL_WORLD_SIZE, e.g. a hand-made launch, nothing says there are other nodes)
    master = os.environ["MASTER_ADDR"]
    if master == "localhost" or _is_loopback(master):  # the literal: node 0's own hostname may map to 127.0.1.1
        return
    host = socket.gethostname()
    try:
        addresses = [info[4][0] for info in socket.getaddrinfo(host, None)]
    except (socket.gaierror, UnicodeError):
        addresses = []
    if addresses and not _is_loopback(addresses[0]):  # gloo takes the first address it can bind
        return
    from trainer.config import ConfigError

    found = f"resolves first to {addresses[0]}" if addresses else "does not resolve"
    raise ConfigError(
        f"this node's hostname {host!r} {found}: gloo would listen on loopback, which the other nodes cannot reach. "
        "Set GLOO_SOCKET_IFNAME to the network interface the nodes share (e.g. GLOO_SOCKET_IFNAME=eth0), or map "
        "the hostname to that interface's address in /etc/hosts")


def _restart_store(rank: int, world: int, timeout: datetime.timedelta) -> dict:
    """A fresh key space for a group that torchrun restarted on its agent's store (static rendezvous).

    torch 2.13's static rendezvous hands every restart the same agent TCPStore without a per-attempt prefix, so
    the workers of a restarted group read the previous group's gloo addresses and fail ("connectFullMesh ...
    Connection refused") or hang. Prefixing the keys with the restart count gives each attempt its own."""
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or restart == 0:
        return {}
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    client = dist.TCPStore(addr, port, world, is_master=False, timeout=timeout)
    store = dist.PrefixStore(f"/worker/restart_{restart}", client)
    return {"store": store, "rank": rank, "world_size": world}


def shutdown_distributed() -> None:
    global _control_group, _data_wait_group
    _control_group = _data_wait_group = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int | None) -> None:
    """`process_exit.end_process` for this process: whether it joined a process group is known here."""
    end_process(code, _joined_process_group)


def barrier(info: DistInfo, group=None) -> None:
    """Every rank waits here for the others, on `group` (default: `host_group()`: on the CPU, so under NCCL the
    waiting ranks neither launch GPU work nor spin on it)."""
    if info.is_distributed:
        # an all-reduce of a CPU tensor rather than dist.barrier: on a gloo subgroup of an NCCL run, barrier would
        # be dispatched for the run's CUDA device (groups inherit its bound device)
        dist.all_reduce(torch.zeros(1), group=group if group is not None else host_group())


def all_reduce_(tensor: torch.Tensor, info: DistInfo, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum or max) that is a no-op in single-process mode."""
    if info.is_distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def broadcast_object(obj, info: DistInfo, src: int = 0, group=None):
    """`obj` from rank `src` on every rank, over `group` (default: `host_group()`, as `barrier`)."""
    if not info.is_distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group if group is not None else host_group())
    return box[0]


# How long a rank keeps looking for rank 0's file before it says the folder is not shared: a network filesystem
# may show a new file to other clients a moment late.
SHARED_CHECK_WAIT_S = 10.0


def check_shared_folders(folders: dict[str, Path], info: DistInfo) -> None:
    """Stop every rank with a message unless every rank sees the files rank 0 sees in `folders` (setting name ->
    folder: the run folder, with the checkpoints, and the data cache's).

    Why: on a cluster a node whose folder is its own (a pod's emptyDir, a node-local disk) would wait out
    `dist.data_timeout_s` for a data cache nobody builds there, or resume from checkpoints the others lack. Rank 0
    writes a file named by a random token in each folder (in a folder it cannot write, a read-only cache built
    before, it names an entry already there instead); every rank looks for it, and all learn who did not see
    which, so they all stop together rather than some waiting in a collective. A run folder rank 0 cannot write
    stops every rank too."""
    if not info.is_distributed:
        return
    probes: dict[str, str | None] = {}
    unwritable = ""
    if info.is_main:
        token = f".shared-check-{secrets.token_hex(8)}"
        for setting, folder in folders.items():
            try:
                folder.mkdir(parents=True, exist_ok=True)
                (folder / token).touch()
                probes[setting] = token
            except OSError as e:
                entries = sorted(os.listdir(folder)) if folder.is_dir() and os.access(folder, os.R_OK) else []
                probes[setting] = entries[0] if entries else None
                if setting == "run.dir" or not entries:
                    unwritable = unwritable or f"{setting} {folder}: rank 0 cannot write there: {e}"
    probes, unwritable = broadcast_object((probes, unwritable), info)
    deadline = time.monotonic() + SHARED_CHECK_WAIT_S
    while True:
        missing = [(setting, str(folder)) for setting, folder in folders.items()
                   if probes.get(setting) and not (folder / probes[setting]).exists()]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    seen = [None] * info.world_size
    # on the data-wait group (long timeout): the ranks that see the files wait here for those still looking
    dist.all_gather_object(seen, (info.rank, socket.gethostname(), missing), group=data_wait_group())
    if info.is_main:  # every rank has looked
        for setting, folder in folders.items():
            if (probes.get(setting) or "").startswith(".shared-check-"):
                (folder / probes[setting]).unlink(missing_ok=True)
    from trainer.config import ConfigError

    if unwritable:
        raise ConfigError(unwritable)
    blind = [(rank, host, missing) for rank, host, missing in seen if missing]
    if blind:
        rank, host, missing = blind[0]
        hosts = sorted({h for _, h, _ in blind})
        raise ConfigError(
            f"{missing[0][0]} {missing[0][1]}: rank {rank} on {host} does not see the files rank 0 sees there "
            f"({len(blind)} of {info.world_size} ranks, on {', '.join(hosts[:5])}): every node must mount the same "
            "storage at this path (a shared filesystem or a ReadWriteMany volume, k8s/README.md), or the ranks "
            "would wait for a data cache and read checkpoints that only rank 0's node has"
        )
