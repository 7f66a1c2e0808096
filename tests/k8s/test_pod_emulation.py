"""The shipped manifests, run for real: the pods the emulator derives from each job kind, each pod a process tree
in its own network namespace (sandbox.py), all running the real `torchrun -m trainer train` argv on tiny data.

Indexed Job, the whole failure matrix, over three submissions that share the runs claim:
  1. a node is drained: SIGTERM to one pod's torchrun. Every rank checkpoints at the same step boundary and the
     pod exits well inside terminationGracePeriodSeconds; the Job then fails (backoffLimit 0) and its controller
     deletes the other pods: SIGTERM, then SIGKILL when the grace period ends. No model is exported. (Their
     workers exit at once; their torchrun may sit in its exit barrier, deaf to SIGTERM, until the SIGKILL.)
  2. resubmission resumes from that checkpoint (the first step it logs is the next one); then the rank-0 pod is
     lost (SIGKILL to its whole process tree) and the surviving pod exits on its own, without hanging.
  3. resubmission resumes from the newest checkpoint, runs only the remaining steps and succeeds: every pod
     exits 0, one shared checkpoint holds a shard from every rank of both pods, TensorBoard events and the
     exported model are on the claim.
JobSet, PyTorchJob, TrainJob: SIGTERM to every pod (deletion or pre-emption of the whole gang) checkpoints in
time, and resubmission resumes and succeeds with only the remaining steps.

Needs root and `ip netns`; skipped with the reason where either is missing.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w
from conftest import make_texts, write_csv, write_glove
from emulator import emulate, image_from_dockerfile, load_documents
from sandbox import Submission, unavailable_reason

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = {
    "Job": "indexed-job/indexed-job.yaml",
    "JobSet": "jobset/jobset.yaml",
    "PyTorchJob": "pytorchjob/pytorchjob.yaml",
    "TrainJob": "trainjob/trainjob.yaml",
}
EXTRA_ARGS = ["--train.threads", "1"]
CHECKPOINT_EVERY = 5
START_TIMEOUT_S = 150  # import torch x 6 processes, data preparation, rendezvous, on 2 shared cores
RUN_TIMEOUT_S = 240
SURVIVOR_EXIT_S = 60  # gloo survivors notice a dead peer within seconds; this only bounds a hang


@pytest.fixture(scope="module")
def namespaces_permitted():
    reason = unavailable_reason()
    if reason:
        print(f"pod emulation skipped: {reason}")
        pytest.skip(reason)


IMAGE = image_from_dockerfile(REPO / "Dockerfile")


@pytest.fixture(scope="module")
def image_seed(namespaces_permitted, tmp_path_factory) -> Path:
    """The image's numba kernel seed, made as the Dockerfile makes it (`python -m trainer precompile` with the
    image's NUMBA_CPU_NAME), for the pods to copy into their emptyDir caches."""
    image_env = dict(IMAGE.env)
    seed = tmp_path_factory.mktemp("image") / "numba-seed"
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "TRAINER_NUMBA_SEED_DIR")}
    env.update(NUMBA_CACHE_DIR=str(seed), NUMBA_CPU_NAME=image_env.get("NUMBA_CPU_NAME", ""))
    done = subprocess.run([sys.executable, "-m", "trainer", "precompile"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"precompile failed:\n{done.stdout}\n{done.stderr[-4000:]}"
    return seed


class World:
    """The claims and the image of one test: tiny data on the data claim, an empty runs claim, and the image's
    /app with a tiny configs/demo.toml in place of the demo configuration, and its numba kernel seed."""

    def __init__(self, root: Path, total_steps: int, seed: Path) -> None:
        self.root = root
        self.image_files = {"/app": None, dict(IMAGE.env)["TRAINER_NUMBA_SEED_DIR"]: str(seed)}
        self.total = total_steps
        data = root / "claims" / "trainer-data"
        (data / "debian").mkdir(parents=True)
        write_csv(data / "debian" / "train.csv", make_texts(300, 1))
        write_csv(data / "debian" / "valid.csv", make_texts(60, 2))
        write_csv(data / "debian" / "test.csv", make_texts(60, 3))
        write_glove(data / "glove.txt")
        self.app = root / "image-app"
        (self.app / "configs").mkdir(parents=True)
        (self.app / "configs" / "demo.toml").write_text(
            tomli_w.dumps(
                {
                    "embeddings": {"pretrained": str(data / "glove.txt"), "min_freq": 1, "ngram_buckets": 64},
                    "optim": {"sparse_lr": 0.05, "dense_lr": 0.05, "warmup_steps": 2},
                    "train": {"max_steps": total_steps, "batch_size": 32, "seed": 0, "device": "cpu"},
                    "checkpoint": {
                        "every_steps": CHECKPOINT_EVERY,
                        "at_epoch_end": False,
                        "keep_latest_k": 2,
                    },
                    "metrics": {"log_every_steps": 1, "projector_words": 0},
                    "dist": {"timeout_s": 60},
                }
            )
        )
        self.run = root / "claims" / "trainer-runs" / "demo"
        self.image = IMAGE
        self.image_files["/app"] = str(self.app)

    def submit(self, kind: str) -> Submission:
        """A fresh submission of the shipped manifest: new pods, new network, the same claims."""
        cluster = emulate(load_documents([REPO / "k8s" / "jobs" / MANIFESTS[kind]]), image=self.image)
        sub = Submission(cluster, self.root, image_files=self.image_files, extra_args=EXTRA_ARGS)
        sub.start()
        return sub

    def rows(self) -> list[dict | None]:
        """metrics.jsonl, one entry per line (None for a line cut short by a killed writer)."""
        path = self.run / "metrics.jsonl"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                out.append(None)
        return out

    def steps(self, since: int = 0) -> list[int]:
        """Training steps logged (every step: log_every_steps = 1) from line `since` on."""
        return [r["step"] for r in self.rows()[since:] if r and "loss/train" in r]

    def checkpoints(self) -> list[int]:
        from trainer.checkpoint import valid_steps

        return valid_steps(self.run / "checkpoints")

    def wait_for_step(self, sub: Submission, step: int, since: int) -> int:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (self.steps(since) and self.steps(since)[-1] >= step):
            exited = [rp.pod.name for rp in sub.pods if not rp.alive()]
            assert not exited, f"{exited} exited before step {step}\n{sub.logs()}"
            assert time.monotonic() < deadline, f"step {step} not reached in {START_TIMEOUT_S}s\n{sub.logs()}"
            time.sleep(0.02)
        return self.steps(since)[-1]


def wait_exit(sub: Submission, names: set[str], within_s: float, what: str) -> dict[str, float]:
    """Seconds until each named pod's PID 1 exited; fails if one outlives `within_s`."""
    t0 = time.monotonic()
    exited: dict[str, float] = {}
    while len(exited) < len(names):
        for rp in sub.pods:
            if rp.pod.name in names and rp.pod.name not in exited and not rp.alive():
                exited[rp.pod.name] = time.monotonic() - t0
        assert time.monotonic() - t0 < within_s, (
            f"{what}: {sorted(names - set(exited))} still running after {within_s:.0f}s\n{sub.logs()}"
        )
        time.sleep(0.02)
    return exited


def terminate_like_the_kubelet(pods: list, settle_s: float = 30, agent_s: float = 3) -> list[str]:
    """SIGTERM, then SIGKILL when the grace period ends; returns the pods that were still there to be killed.

    Accepted only for the case torch 2.13 has: the workers are gone (they checkpointed and exited 0) and the pod's
    torchrun waits in its exit barrier for an agent that was killed (up to 300 s, not settable from torchrun),
    inside a blocking store call that defers its SIGTERM handler. Waiting out the real grace period would only
    cost time: once a pod's workers are gone and its torchrun has had `agent_s` more to leave, the test does
    what the kubelet does at the deadline."""
    for rp in pods:
        rp.sigterm()
    deadline = time.monotonic() + min(settle_s, *(rp.pod.grace_period_s for rp in pods))
    workers_gone: dict[str, float] = {}
    while time.monotonic() < deadline:
        for rp in pods:
            if rp.alive() and rp.pod.name not in workers_gone and not _live(rp.tree()[1:]):
                workers_gone[rp.pod.name] = time.monotonic()
        if all(
            not rp.alive() or time.monotonic() - workers_gone.get(rp.pod.name, 1e18) > agent_s for rp in pods
        ):
            break
        time.sleep(0.05)
    lingering = []
    for rp in pods:
        if rp.alive():
            assert rp.pod.name in workers_gone, (
                f"{rp.pod.name}: workers still running {settle_s:.0f}s after SIGTERM\n{rp.log()}"
            )
            lingering.append(rp.pod.name)
            rp.kill()  # what the kubelet does when terminationGracePeriodSeconds runs out
    return lingering


def _live(procs: list) -> list:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != "zombie":
                out.append(p)
        except Exception:  # noqa: BLE001 - psutil.NoSuchProcess and friends: gone
            pass
    return out


def assert_stopped_with_checkpoint(world: World, seen: int) -> int:
    saved = world.checkpoints()
    logged = world.steps()
    assert saved, "no checkpoint after SIGTERM"
    k = saved[-1]
    assert k == logged[-1], f"the last logged step is {logged[-1]} but the newest checkpoint is step {k}"
    assert seen <= k < world.total, f"SIGTERM after step {seen}: checkpoint at {k}, not mid-run"
    state = json.loads((world.run / "checkpoints" / f"step-{k}" / "trainer_state.json").read_text())
    assert (state["step"], state["world_size"]) == (k, 4)
    assert not (world.run / "model").exists() and not (world.run / "result.json").exists()
    return k


def assert_resumed_and_finished(world: World, sub: Submission, since: int, resumed_from: int) -> None:
    codes = sub.wait(RUN_TIMEOUT_S)
    assert set(codes.values()) == {0}, f"exit codes {codes}\n{sub.logs()}"
    this_run = world.steps(since)
    assert this_run == list(range(resumed_from + 1, world.total + 1)), (
        f"resumed from step {resumed_from}: expected steps {resumed_from + 1}..{world.total} once each, "
        f"logged {this_run}"
    )
    result = json.loads((world.run / "result.json").read_text())
    assert (result["step"], result["steps_this_run"]) == (world.total, world.total - resumed_from)
    final = world.run / "checkpoints" / f"step-{world.total}"
    shards = sorted(p.name for p in final.glob("*.distcp"))
    assert len(shards) == 4, (
        f"one shard per rank (2 pods x 2 processes) expected in the shared checkpoint: {shards}"
    )
    assert list((world.run / "tb").glob("events.out.tfevents.*")), "no TensorBoard events on the runs claim"
    assert (world.run / "model" / "weights.pt").is_file(), "no exported model"
    rank0_log = next(rp for rp in sub.pods if rp.pod.node_rank == 0).log(20000)
    assert f"resumed from step {resumed_from}" in rank0_log
    # the pod's /cache is a fresh emptyDir: every kernel came from the image's seed
    assert "numba compiled" not in rank0_log, rank0_log


def test_indexed_job_drain_loss_and_resume(namespaces_permitted, image_seed, tmp_path):
    world = World(tmp_path, total_steps=120, seed=image_seed)
    t_start = time.monotonic()

    # 1. a node is drained: SIGTERM to the rank-1 pod's torchrun only
    sub = world.submit("Job")
    try:
        seen = world.wait_for_step(sub, 8, 0)
        drained = next(rp for rp in sub.pods if rp.pod.node_rank == 1)
        grace = drained.pod.grace_period_s
        drained.sigterm()
        t = wait_exit(sub, {drained.pod.name}, grace, "the drained pod")
        assert drained.proc.returncode != 0, (
            "torchrun exits non-zero after SIGTERM (the Job sees a failed pod)"
        )
        # the Job has failed (backoffLimit 0): its controller deletes the pods still running
        lingering = terminate_like_the_kubelet([rp for rp in sub.pods if rp.alive()])
    finally:
        sub.close()
    k = assert_stopped_with_checkpoint(world, seen)
    print(
        f"drain: SIGTERM after step {seen}, checkpoint at step {k}; drained pod exited after "
        f"{max(t.values()):.1f}s (grace {grace}s); pods only waiting in torchrun's exit barrier at SIGKILL "
        f"time: {lingering or 'none'}"
    )

    # 2. resubmit: resumes at k + 1; then the rank-0 pod is lost
    since = len(world.rows())
    sub = world.submit("Job")
    try:
        first = world.wait_for_step(sub, k + 1, since)
        assert world.steps(since)[0] == k + 1, (
            f"resubmission logged {world.steps(since)[:3]}, expected {k + 1}"
        )
        world.wait_for_step(sub, k + 2 * CHECKPOINT_EVERY, since)
        lost = next(rp for rp in sub.pods if rp.pod.node_rank == 0)
        lost.kill()
        survivors = {rp.pod.name for rp in sub.pods if rp is not lost}
        t = wait_exit(sub, survivors, SURVIVOR_EXIT_S, "survivors of a lost pod")
        codes = {rp.pod.name: rp.proc.returncode for rp in sub.pods}
        assert all(codes[name] != 0 for name in survivors), f"survivors must fail, not succeed: {codes}"
    finally:
        sub.close()
    c = world.checkpoints()[-1]
    assert k < c < world.total, f"checkpoint {c} after resuming from {k}"
    print(
        f"loss: resumed at step {first}, rank-0 pod killed, survivors exited after {max(t.values()):.1f}s; "
        f"newest checkpoint step {c}"
    )

    # 3. resubmit: only the remaining steps run, and the job succeeds
    since = len(world.rows())
    sub = world.submit("Job")
    try:
        assert_resumed_and_finished(world, sub, since, c)
    finally:
        sub.close()
    print(f"Indexed Job: three submissions in {time.monotonic() - t_start:.0f}s")


@pytest.mark.parametrize("kind", ["JobSet", "PyTorchJob", "TrainJob"])
def test_sigterm_then_resubmission_resumes(namespaces_permitted, image_seed, tmp_path, kind):
    world = World(tmp_path, total_steps=40, seed=image_seed)
    t_start = time.monotonic()
    sub = world.submit(kind)
    try:
        seen = world.wait_for_step(sub, 2, 0)
        for rp in sub.pods:  # deletion or pre-emption of the gang: the kubelet signals every pod
            rp.sigterm()
        grace = min(rp.pod.grace_period_s for rp in sub.pods)
        t = wait_exit(sub, {rp.pod.name for rp in sub.pods}, grace, "pods after SIGTERM")
    finally:
        sub.close()
    k = assert_stopped_with_checkpoint(world, seen)
    since = len(world.rows())
    sub = world.submit(kind)
    try:
        assert_resumed_and_finished(world, sub, since, k)
    finally:
        sub.close()
    print(
        f"{kind}: SIGTERM after step {seen}, checkpoint at {k}, all pods out in {max(t.values()):.1f}s "
        f"(grace {grace}s); resubmission ran steps {k + 1}..{world.total}; {time.monotonic() - t_start:.0f}s"
    )
