"""The controller emulator against golden values: the pods each controller creates from the shipped manifests
(names, hostnames, subdomains, DNS, PET_* and the other injected variables, argv), and its rules on small
made-up manifests (what each controller adds, what the API or a webhook would refuse)."""

import copy
from pathlib import Path

import pytest
import yaml
from emulator import (
    Image,
    Unsupported,
    emulate,
    expand,
    image_from_dockerfile,
    load_documents,
    trainjob_to_jobset,
)

REPO = Path(__file__).resolve().parents[2]
JOBS = REPO / "k8s" / "jobs"
IMAGE = image_from_dockerfile(REPO / "Dockerfile")
ARGV = [
    "torchrun",
    "-m",
    "trainer",
    "train",
    "--config=/app/configs/demo.toml",
    "--data.train=/data/debian/train.csv",
    "--data.valid=/data/debian/valid.csv",
    "--data.test=/data/debian/test.csv",
    "--run.dir=/runs/demo",
    "--metrics.progress=false",
]
IMAGE_ENV = {
    "PYTHONUNBUFFERED": "1",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PIP_NO_CACHE_DIR": "1",
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
    "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "150",
    "NUMBA_CPU_NAME": "generic",  # the ARG's default
    "NUMBA_CPU_FEATURES": "",
    "TRAINER_NUMBA_SEED_DIR": "/opt/trainer/numba-seed",
}
OWN_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "OMP_NUM_THREADS": "2", "TRAINER_CACHE_DIR": "/cache",
           "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "150", "PET_RDZV_CONF": "timeout=1800"}

# (controller, pod name prefix, hostname, subdomain, name other pods use, injected environment)
GOLDEN = {
    "indexed-job/indexed-job.yaml": [
        (
            "Job",
            "trainer-indexed-0-",
            "trainer-indexed-0",
            "trainer-indexed",
            "trainer-indexed-0.trainer-indexed",
            {
                "PET_NNODES": "2",
                "PET_NPROC_PER_NODE": "2",
                "PET_NODE_RANK": "0",
                "JOB_COMPLETION_INDEX": "0",
                "PET_MASTER_ADDR": "trainer-indexed-0.trainer-indexed",
                "PET_MASTER_PORT": "29500",
            },
        ),
        (
            "Job",
            "trainer-indexed-1-",
            "trainer-indexed-1",
            "trainer-indexed",
            "trainer-indexed-1.trainer-indexed",
            {
                "PET_NNODES": "2",
                "PET_NPROC_PER_NODE": "2",
                "PET_NODE_RANK": "1",
                "JOB_COMPLETION_INDEX": "1",
                "PET_MASTER_ADDR": "trainer-indexed-0.trainer-indexed",
                "PET_MASTER_PORT": "29500",
            },
        ),
    ],
    "jobset/jobset.yaml": [
        (
            "JobSet",
            "trainer-jobset-node-0-0-",
            "trainer-jobset-node-0-0",
            "trainer-jobset",
            "trainer-jobset-node-0-0.trainer-jobset",
            {
                "PET_NNODES": "2",
                "PET_NPROC_PER_NODE": "2",
                "PET_NODE_RANK": "0",
                "JOB_COMPLETION_INDEX": "0",
                "PET_MASTER_ADDR": "trainer-jobset-node-0-0.trainer-jobset",
                "PET_MASTER_PORT": "29500",
            },
        ),
        (
            "JobSet",
            "trainer-jobset-node-0-1-",
            "trainer-jobset-node-0-1",
            "trainer-jobset",
            "trainer-jobset-node-0-1.trainer-jobset",
            {
                "PET_NNODES": "2",
                "PET_NPROC_PER_NODE": "2",
                "PET_NODE_RANK": "1",
                "JOB_COMPLETION_INDEX": "1",
                "PET_MASTER_ADDR": "trainer-jobset-node-0-0.trainer-jobset",
                "PET_MASTER_PORT": "29500",
            },
        ),
    ],
    "pytorchjob/pytorchjob.yaml": [
        (
            "PyTorchJob",
            "trainer-pytorchjob-master-0",
            "trainer-pytorchjob-master-0",
            "",
            "trainer-pytorchjob-master-0",
            {
                "PET_NNODES": "2",
                "PET_NPROC_PER_NODE": "2",
                "PET_NODE_RANK": "0",
                "RANK": "0",
                "WORLD_SIZE": "4",
                "PET_MASTER_ADDR": "trainer-pytorchjob-master-0",
                "PET_MASTER_PORT": "29500",
                "MASTER_ADDR": "trainer-pytorchjob-master-0",
                "MASTER_PORT": "29500",
                "PYTHONUNBUFFERED": "1",
            },
        ),
        (
            "PyTorchJob",
            "trainer-pytorchjob-worker-0",
            "trainer-pytorchjob-worker-0",
            "",
            "trainer-pytorchjob-worker-0",
            {
                "PET_NNODES": "2",
                "PET_NPROC_PER_NODE": "2",
                "PET_NODE_RANK": "1",
                "RANK": "1",
                "WORLD_SIZE": "4",
                "PET_MASTER_ADDR": "trainer-pytorchjob-master-0",
                "PET_MASTER_PORT": "29500",
                "MASTER_ADDR": "trainer-pytorchjob-master-0",
                "MASTER_PORT": "29500",
                "PYTHONUNBUFFERED": "1",
            },
        ),
    ],
    "trainjob/trainjob.yaml": [
        (
            "TrainJob",
            "trainer-trainjob-node-0-0-",
            "trainer-trainjob-node-0-0",
            "trainer-trainjob",
            "trainer-trainjob-node-0-0.trainer-trainjob",
            {
                "PET_NNODES": "2",
                "PET_NPROC_PER_NODE": "2",
                "PET_NODE_RANK": "0",
                "JOB_COMPLETION_INDEX": "0",
                "PET_MASTER_ADDR": "trainer-trainjob-node-0-0.trainer-trainjob",
                "PET_MASTER_PORT": "29500",
            },
        ),
        (
            "TrainJob",
            "trainer-trainjob-node-0-1-",
            "trainer-trainjob-node-0-1",
            "trainer-trainjob",
            "trainer-trainjob-node-0-1.trainer-trainjob",
            {
                "PET_NNODES": "2",
                "PET_NPROC_PER_NODE": "2",
                "PET_NODE_RANK": "1",
                "JOB_COMPLETION_INDEX": "1",
                "PET_MASTER_ADDR": "trainer-trainjob-node-0-0.trainer-trainjob",
                "PET_MASTER_PORT": "29500",
            },
        ),
    ],
}
# Services: (name, headless, selector, made by)
GOLDEN_SERVICES = {
    "indexed-job/indexed-job.yaml": [
        ("trainer-indexed", True, {"batch.kubernetes.io/job-name": "trainer-indexed"}, "manifest")
    ],
    "jobset/jobset.yaml": [
        ("trainer-jobset", True, {"jobset.sigs.k8s.io/jobset-name": "trainer-jobset"}, "JobSet")
    ],
    "pytorchjob/pytorchjob.yaml": [
        (
            f"trainer-pytorchjob-{r}-0",
            True,
            {
                "training.kubeflow.org/job-name": "trainer-pytorchjob",
                "training.kubeflow.org/replica-type": r,
                "training.kubeflow.org/replica-index": "0",
            },
            "PyTorchJob",
        )
        for r in ("master", "worker")
    ],
    "trainjob/trainjob.yaml": [
        ("trainer-trainjob", True, {"jobset.sigs.k8s.io/jobset-name": "trainer-trainjob"}, "JobSet")
    ],
}


@pytest.mark.parametrize("manifest", sorted(GOLDEN))
def test_pods_match_golden_values(manifest):
    cluster = emulate(load_documents([JOBS / manifest]), image=IMAGE)
    assert len(cluster.pods) == len(GOLDEN[manifest])
    for pod, (controller, prefix, hostname, subdomain, dns, injected) in zip(
        cluster.pods, GOLDEN[manifest], strict=True
    ):
        assert (pod.controller, pod.hostname, pod.subdomain) == (controller, hostname, subdomain)
        assert pod.name.startswith(prefix) and len(pod.name) == len(prefix) + (
            5 if prefix.endswith("-") else 0
        )
        assert cluster.lookup(dns, "default") == [pod], f"{dns} should name {pod.name}"
        assert cluster.lookup(f"{dns}.default.svc.cluster.local", "default") == [pod]
        own = dict(OWN_ENV)
        if manifest.startswith("trainjob/"):  # a TrainJob's trainer env may not set PET_* (the runtime owns them)
            own.pop("PET_RDZV_CONF")
        expected_env = {**IMAGE_ENV, "HOSTNAME": hostname, **own, **injected}
        assert pod.env == expected_env
        assert pod.argv == ARGV
        assert pod.image == "trainer:0.1.0"
        assert pod.grace_period_s == 180
        assert [(m.path, m.kind, m.claim or m.medium) for m in pod.mounts] == [
            ("/data", "persistentVolumeClaim", "trainer-data"),
            ("/runs", "persistentVolumeClaim", "trainer-runs"),
            ("/dev/shm", "emptyDir", "Memory"),
            ("/cache", "emptyDir", ""),
        ]
        if controller != "PyTorchJob":
            assert (
                pod.annotations["batch.kubernetes.io/job-completion-index"]
                == injected["JOB_COMPLETION_INDEX"]
            )
    services = [(s.name, s.headless, s.selector, s.created_by) for s in cluster.services]
    assert services == GOLDEN_SERVICES[manifest]


def test_hosts_file_has_the_kubelet_line_and_every_cluster_name():
    cluster = emulate(load_documents([JOBS / "indexed-job/indexed-job.yaml"]), image=IMAGE)
    pod0, pod1 = cluster.pods
    hosts = cluster.hosts_file(pod1)
    lines = hosts.splitlines()
    assert lines[:2] == [
        "127.0.0.1\tlocalhost",
        f"{pod1.ip}\ttrainer-indexed-1.trainer-indexed.default.svc.cluster.local\ttrainer-indexed-1",
    ]
    names_of_pod0 = [line.split()[1:] for line in lines[2:] if line.split()[0] == pod0.ip][0]
    assert "trainer-indexed-0.trainer-indexed" in names_of_pod0
    assert "trainer-indexed-0" not in names_of_pod0, "a bare pod hostname is not a cluster DNS name"


# ------------------------------------------------------------------------------------------------ rules
def indexed_job(**spec_overrides) -> dict:
    doc = yaml.safe_load((JOBS / "indexed-job/indexed-job.yaml").read_text().split("\n---\n")[1])
    doc["spec"].update(spec_overrides)
    return doc


def test_a_subdomain_without_its_service_has_no_dns_name():
    cluster = emulate([indexed_job()], image=IMAGE)  # the Job alone, without the headless Service
    assert cluster.lookup("trainer-indexed-0.trainer-indexed", "default") == []


def test_only_indexed_jobs_are_modelled():
    with pytest.raises(Unsupported, match="Indexed"):
        emulate([indexed_job(completionMode="NonIndexed")], image=IMAGE)


def test_pod_failure_policy_needs_restart_policy_never():
    job = indexed_job()
    job["spec"]["template"]["spec"]["restartPolicy"] = "OnFailure"
    with pytest.raises(Unsupported, match="restartPolicy Never"):
        emulate([job], image=IMAGE)


def test_first_wave_is_min_of_parallelism_and_completions():
    assert len(emulate([indexed_job(parallelism=1)], image=IMAGE).pods) == 1
    assert len(emulate([indexed_job(completions=3, parallelism=3)], image=IMAGE).pods) == 3


def test_downward_api_values_are_resolved():
    job = indexed_job()
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["env"] += [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "CPUS", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
        {
            "name": "MEM_MI",
            "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}},
        },
        {"name": "MISSING", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['nope']"}}},
        {"name": "ADDR", "value": "$(PET_MASTER_ADDR):$(PET_MASTER_PORT) $$(KEPT) $(UNDEFINED)"},
    ]
    pod = emulate([job], image=IMAGE).pods[1]
    assert pod.env["POD_NAME"] == pod.name and pod.env["POD_IP"] == pod.ip
    assert (pod.env["CPUS"], pod.env["MEM_MI"], pod.env["MISSING"]) == ("4", "8192", "")
    assert pod.env["ADDR"] == "trainer-indexed-0.trainer-indexed:29500 $(KEPT) $(UNDEFINED)"
    container["env"].append({"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}})
    with pytest.raises(Unsupported, match="secretKeyRef"):
        emulate([job], image=IMAGE)


def test_argv_expansion_and_image_defaults():
    assert expand("--node=$(PET_NODE_RANK) $$(HOME)", {"PET_NODE_RANK": "3"}) == "--node=3 $(HOME)"
    job = indexed_job()
    container = job["spec"]["template"]["spec"]["containers"][0]
    del container["command"], container["args"]
    assert emulate([job], image=IMAGE).pods[0].argv == list(IMAGE.entrypoint + IMAGE.cmd)
    container["args"] = ["--run.dir=/runs/$(JOB_COMPLETION_INDEX)"]
    assert emulate([job], image=IMAGE).pods[1].argv == [*IMAGE.entrypoint, "--run.dir=/runs/1"]
    with pytest.raises(Unsupported, match="no command"):
        del container["args"]
        emulate([job], image=None)


def test_a_volume_mount_must_name_a_volume():
    job = indexed_job()
    job["spec"]["template"]["spec"]["volumes"].pop()
    with pytest.raises(Unsupported, match="names no volume"):
        emulate([job], image=IMAGE)


def test_jobset_subdomain_and_replicas():
    doc = load_documents([JOBS / "jobset/jobset.yaml"])[0]
    doc["spec"]["network"]["subdomain"] = "gang"
    doc["spec"]["replicatedJobs"][0]["replicas"] = 2
    cluster = emulate([doc], image=IMAGE)
    assert [p.hostname for p in cluster.pods] == [
        f"trainer-jobset-node-{j}-{i}" for j in (0, 1) for i in (0, 1)
    ]
    assert {p.subdomain for p in cluster.pods} == {"gang"} and [s.name for s in cluster.services] == ["gang"]
    assert [p.annotations["jobset.sigs.k8s.io/job-index"] for p in cluster.pods] == ["0", "0", "1", "1"]
    doc["spec"]["network"]["enableDNSHostnames"] = False
    cluster = emulate([doc], image=IMAGE)
    assert cluster.services == [] and {p.subdomain for p in cluster.pods} == {""}


def test_pytorchjob_rules():
    doc = load_documents([JOBS / "pytorchjob/pytorchjob.yaml"])[0]
    doc["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] = 3
    pods = emulate([doc], image=IMAGE).pods
    assert [(p.name, p.env["PET_NODE_RANK"], p.env["PET_NNODES"]) for p in pods] == [
        ("trainer-pytorchjob-master-0", "0", "4"),
        ("trainer-pytorchjob-worker-0", "1", "4"),
        ("trainer-pytorchjob-worker-1", "2", "4"),
        ("trainer-pytorchjob-worker-2", "3", "4"),
    ]
    for role in ("Master", "Worker"):
        doc["spec"]["pytorchReplicaSpecs"][role]["template"]["spec"]["containers"][0]["ports"] = []
    assert (
        emulate([doc], image=IMAGE).pods[0].env["PET_MASTER_PORT"] == "23456"
    )  # the operator's default port
    renamed = copy.deepcopy(doc)
    renamed["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["name"] = "trainer"
    with pytest.raises(Unsupported, match="pytorch"):
        emulate([renamed], image=IMAGE)
    del doc["spec"]["runPolicy"]
    with pytest.raises(Unsupported, match="runPolicy"):
        emulate([doc], image=IMAGE)


def trainjob() -> dict:
    return load_documents([JOBS / "trainjob/trainjob.yaml"])[0]


def test_trainjob_builds_the_runtime_jobset():
    jobset = trainjob_to_jobset(trainjob())
    (rj,) = jobset["spec"]["replicatedJobs"]
    job = rj["template"]["spec"]
    assert (rj["name"], job["completions"], job["parallelism"]) == ("node", 2, 2)
    pod = job["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "node" and container["image"] == "trainer:0.1.0"
    assert [e["name"] for e in container["env"]] == [
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE",
        "OMP_NUM_THREADS",
        "TRAINER_CACHE_DIR",
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT",
        "PET_NNODES",
        "PET_NPROC_PER_NODE",
        "PET_NODE_RANK",
        "PET_MASTER_ADDR",
        "PET_MASTER_PORT",
    ]
    assert pod["terminationGracePeriodSeconds"] == 180
    assert [v["name"] for v in pod["volumes"]] == ["data", "runs", "dshm", "cache"]
    assert [m["mountPath"] for m in container["volumeMounts"]] == ["/data", "/runs", "/dev/shm", "/cache"]


def test_trainjob_rules():
    doc = trainjob()
    doc["spec"]["trainer"]["env"].append({"name": "PET_NNODES", "value": "3"})
    with pytest.raises(Unsupported, match="reserved"):
        trainjob_to_jobset(doc)
    doc = trainjob()
    doc["spec"]["runtimePatches"][0]["manager"] = "manifests"
    with pytest.raises(Unsupported, match="domain-prefixed"):
        trainjob_to_jobset(doc)
    doc = trainjob()
    doc["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
        "name"
    ] = "x"
    with pytest.raises(Unsupported, match="not in the runtime"):
        trainjob_to_jobset(doc)
    doc = trainjob()
    doc["spec"]["runtimeRef"]["name"] = "deepspeed-distributed"
    with pytest.raises(Unsupported, match="torch-distributed"):
        trainjob_to_jobset(doc)
    doc = trainjob()
    del doc["spec"]["trainer"]["numProcPerNode"]
    nproc = [
        e["value"]
        for e in trainjob_to_jobset(doc)["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"][
            "containers"
        ][0]["env"]
        if e["name"] == "PET_NPROC_PER_NODE"
    ]
    assert nproc == ["4"], "without numProcPerNode, the torch plugin uses the CPU request on CPU nodes"


def test_dockerfile_parsing(tmp_path):
    assert IMAGE.entrypoint == ("torchrun", "-m", "trainer", "train") and IMAGE.workdir == "/app"
    shell = tmp_path / "Dockerfile"
    shell.write_text("FROM python:3.11-slim\nENTRYPOINT torchrun -m trainer train\n")
    with pytest.raises(Unsupported, match="shell form"):
        image_from_dockerfile(shell)
    staged = tmp_path / "Dockerfile.staged"
    staged.write_text('FROM a AS build\nENV A=1\nCMD ["x"]\nFROM b\nENV B="two words"\nWORKDIR app\n')
    assert image_from_dockerfile(staged) == Image((), (), (("B", "two words"),), "/app", "")
    with_args = tmp_path / "Dockerfile.args"
    with_args.write_text("ARG X=before\nFROM a\nARG CPU=generic\nARG EMPTY\nENV C=${CPU} D=$CPU-${EMPTY}x E=${X}\n")
    assert dict(image_from_dockerfile(with_args).env) == {"C": "generic", "D": "generic-x", "E": ""}
    assert dict(IMAGE.env)["NUMBA_CPU_NAME"] == "generic"
