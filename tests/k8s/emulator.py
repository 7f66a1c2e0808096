"""What the controllers would create from this project's manifests: pods, Services and what each container sees.

`emulate(docs)` takes parsed manifest documents and returns a `Cluster`: the pods of every Indexed Job, JobSet,
Kubeflow PyTorchJob (kubeflow.org/v1) and Kubeflow Trainer TrainJob (trainer.kubeflow.org/v1alpha1, on the
`torch-distributed` ClusterTrainingRuntime) among them, plus the Services that give those pods DNS names. Each pod
carries its hostname, subdomain, labels and annotations, its IP (from a private test range), and for its
container: argv (command + args, `$(VAR)` expanded), the environment with downward-API values resolved (PET_*,
JOB_COMPLETION_INDEX, ...), volume mounts and resources.

The rules follow the controllers' source, as far as these manifests use them:

    Indexed Job   pod i: hostname <job>-<i>, annotation and label batch.kubernetes.io/job-completion-index=i,
                  env JOB_COMPLETION_INDEX=i; labels batch.kubernetes.io/job-name=<job>, job-name=<job>
    JobSet        replicated job r, copy j -> Indexed Job <jobset>-<r>-<j> (so pod hostname <jobset>-<r>-<j>-<i>);
                  subdomain = spec.network.subdomain or the JobSet's name, and a headless Service of that name
                  selecting jobset.sigs.k8s.io/jobset-name=<jobset>
    PyTorchJob    pods <job>-master-0, <job>-worker-<i>, each with a headless Service of its own name; env
                  PET_MASTER_ADDR=<job>-master-0, PET_MASTER_PORT = the master's `pytorchjob-port`, PET_NNODES =
                  all replicas, PET_NODE_RANK = 0 for the master and i+1 for worker i, PET_NPROC_PER_NODE =
                  spec.nprocPerNode, WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT, PYTHONUNBUFFERED
    TrainJob      a JobSet named after the TrainJob (replicated job `node`, container `node`, numNodes pods) with
                  trainer.image/command/args/env/resourcesPerNode, PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK
                  (the completion-index annotation), PET_MASTER_ADDR=<name>-node-0-0.<name>, PET_MASTER_PORT=29500,
                  and runtimePatches applied; reserved PET_* names in trainer.env are rejected like the webhook does

Cluster DNS (`Cluster.lookup`): a headless Service `s` answers `s` with its pods' IPs, and a pod with hostname `h`
and subdomain `s` gets `h.s`; both also under `.<namespace>.svc.cluster.local`. Anything the model does not cover
raises `Unsupported` rather than guessing.
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Iterable

from cluster import (
    Addresses,
    Cluster,
    Image,
    Mount,
    Pod,
    Service,
    Unsupported,
    dns_label,
    expand,
    image_from_dockerfile,
    load_documents,
    make_pod,
    merge_by_key,
    parse_quantity,
)

__all__ = [
    "Cluster",
    "Image",
    "Mount",
    "Pod",
    "Service",
    "Unsupported",
    "emulate",
    "expand",
    "image_from_dockerfile",
    "load_documents",
    "parse_quantity",
    "trainjob_to_jobset",
]

COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
JOBSET_NAME = "jobset.sigs.k8s.io/jobset-name"
PYTORCHJOB_DEFAULT_PORT = 23456  # kubeflow training-operator v1: default of the `pytorchjob-port`
TRAINJOB_MASTER_PORT = 29500  # kubeflow trainer v2: constants.ContainerTrainerPort
TORCHRUN_RESERVED = (
    "PET_NNODES",
    "PET_NPROC_PER_NODE",
    "PET_NODE_RANK",
    "PET_MASTER_ADDR",
    "PET_MASTER_PORT",
)
# The `torch-distributed` ClusterTrainingRuntime as Kubeflow Trainer ships it (manifests/base/runtimes).
TORCH_DISTRIBUTED_RUNTIME = {
    "mlPolicy": {"numNodes": 1, "torch": {}},
    "template": {
        "spec": {
            "replicatedJobs": [
                {
                    "name": "node",
                    "template": {
                        "metadata": {"labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
                        "spec": {
                            "template": {
                                "spec": {
                                    "containers": [
                                        {
                                            "name": "node",
                                            "image": "pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime",
                                        }
                                    ]
                                }
                            }
                        },
                    },
                }
            ]
        }
    },
}


def indexed_job_pods(
    job: dict,
    *,
    namespace: str,
    addresses: Addresses,
    image: Image | None,
    controller: str | None = None,
    owner: str | None = None,
    extra_labels: dict | None = None,
) -> list[Pod]:
    name = job["metadata"]["name"]
    spec = job["spec"]
    if spec.get("completionMode") != "Indexed":
        raise Unsupported(f"Job {name}: only completionMode Indexed is modelled")
    completions = int(spec["completions"])
    parallelism = int(spec.get("parallelism", 1))
    template = spec["template"]
    if template.get("spec", {}).get("restartPolicy") not in ("Never", "OnFailure"):
        raise Unsupported(f"Job {name}: restartPolicy must be Never or OnFailure")
    if spec.get("podFailurePolicy") and template["spec"]["restartPolicy"] != "Never":
        raise Unsupported(f"Job {name}: podFailurePolicy requires restartPolicy Never")
    pods = []
    for index in range(
        min(parallelism, completions)
    ):  # the first wave: every index when parallelism >= completions
        labels = {
            **template.get("metadata", {}).get("labels", {}),
            **(extra_labels or {}),
            "batch.kubernetes.io/job-name": name,
            "job-name": name,
            COMPLETION_INDEX: str(index),
            "batch.kubernetes.io/controller-uid": f"uid-{name}",
            "controller-uid": f"uid-{name}",
        }
        annotations = {**template.get("metadata", {}).get("annotations", {}), COMPLETION_INDEX: str(index)}
        hostname = template.get("spec", {}).get("hostname") or f"{name}-{index}"
        dns_label(hostname, "pod hostname")
        subdomain = template.get("spec", {}).get("subdomain", "")
        # the Job controller adds JOB_COMPLETION_INDEX (from the same annotation) to every container
        index_env = [
            {
                "name": "JOB_COMPLETION_INDEX",
                "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX}']"}},
            }
        ]
        pods.append(
            make_pod(
                name=f"{name}-{index}-{_suffix(name, index)}",
                namespace=namespace,
                controller=controller or "Job",
                owner=owner or name,
                template=template,
                hostname=hostname,
                subdomain=subdomain,
                labels=labels,
                annotations=annotations,
                ip=addresses.next(),
                image=image,
                extra_env=index_env,
            )
        )
    return pods


def _suffix(name: str, index: int) -> str:
    """A stable stand-in for the random 5-character suffix of generated pod names."""
    alphabet = "bcdfghjklmnpqrstvwxz2456789"
    digest = hashlib.sha256(f"{name}/{index}".encode()).digest()
    return "".join(alphabet[b % len(alphabet)] for b in digest[:5])


def jobset_pods(
    jobset: dict,
    *,
    namespace: str,
    addresses: Addresses,
    image: Image | None,
    controller: str = "JobSet",
    owner: str | None = None,
) -> tuple[list[Pod], list[Service]]:
    name = jobset["metadata"]["name"]
    spec = jobset["spec"]
    network = spec.get("network", {}) or {}
    dns_hostnames = network.get("enableDNSHostnames", True)
    subdomain = (network.get("subdomain") or name) if dns_hostnames else ""
    pods: list[Pod] = []
    for rj in spec["replicatedJobs"]:
        for j in range(int(rj.get("replicas", 1))):
            job = {
                "metadata": {"name": f"{name}-{rj['name']}-{j}"},
                "spec": copy.deepcopy(rj["template"]["spec"]),
            }
            job_labels = {
                JOBSET_NAME: name,
                "jobset.sigs.k8s.io/replicatedjob-name": rj["name"],
                "jobset.sigs.k8s.io/job-index": str(j),
            }
            tpl = job["spec"]["template"]
            tpl.setdefault("metadata", {})
            tpl["metadata"]["annotations"] = {**tpl["metadata"].get("annotations", {}), **job_labels}
            if subdomain:
                tpl.setdefault("spec", {})["subdomain"] = subdomain
            pods += indexed_job_pods(
                job,
                namespace=namespace,
                addresses=addresses,
                image=image,
                controller=controller,
                owner=owner or name,
                extra_labels=job_labels,
            )
    services = []
    if subdomain:
        services.append(
            Service(
                subdomain,
                namespace,
                {JOBSET_NAME: name},
                True,
                network.get("publishNotReadyAddresses", True),
                [],
                "JobSet",
            )
        )
    return pods, services


def pytorchjob_pods(
    job: dict, *, namespace: str, addresses: Addresses, image: Image | None
) -> tuple[list[Pod], list[Service]]:
    name = job["metadata"]["name"]
    spec = job["spec"]
    replicas = spec["pytorchReplicaSpecs"]
    unknown = set(replicas) - {"Master", "Worker"}
    if unknown or "Master" not in replicas:
        raise Unsupported(
            f"PyTorchJob {name}: replica types {sorted(replicas)} (Master and Worker are modelled)"
        )
    if spec.get("elasticPolicy"):
        raise Unsupported(f"PyTorchJob {name}: elasticPolicy")
    if "runPolicy" not in spec:
        raise Unsupported(f"PyTorchJob {name}: no runPolicy (the SDK model requires one)")
    total = sum(int(r.get("replicas", 1)) for r in replicas.values())
    nproc = spec.get("nprocPerNode")
    nproc_int = int(nproc) if nproc is not None and str(nproc).isdigit() else 1
    master_tpl = replicas["Master"]["template"]
    port = PYTORCHJOB_DEFAULT_PORT
    master_main = [c for c in master_tpl["spec"]["containers"] if c["name"] == "pytorch"]
    if not master_main:
        raise Unsupported(f"PyTorchJob {name}: no container named 'pytorch'")
    for p in master_main[0].get("ports", []):
        if p.get("name") == "pytorchjob-port":
            port = int(p["containerPort"])
    master_addr = f"{name}-master-0"
    pods, services = [], []
    for rtype in ("Master", "Worker"):
        if rtype not in replicas:
            continue
        r = replicas[rtype]
        for index in range(int(r.get("replicas", 1))):
            pod_name = f"{name}-{rtype.lower()}-{index}"
            rank = index + (1 if rtype == "Worker" else 0)
            env = [
                {"name": "PYTHONUNBUFFERED", "value": "1"},
                {"name": "MASTER_PORT", "value": str(port)},
                {"name": "PET_MASTER_PORT", "value": str(port)},
                {"name": "MASTER_ADDR", "value": master_addr},
                {"name": "PET_MASTER_ADDR", "value": master_addr},
                {"name": "WORLD_SIZE", "value": str(total * nproc_int)},
                {"name": "RANK", "value": str(rank)},
                {"name": "PET_NODE_RANK", "value": str(rank)},
            ]
            if nproc is not None:
                env.append({"name": "PET_NPROC_PER_NODE", "value": str(nproc)})
            env.append({"name": "PET_NNODES", "value": str(total)})
            labels = {
                **r["template"].get("metadata", {}).get("labels", {}),
                "training.kubeflow.org/job-name": name,
                "training.kubeflow.org/operator-name": "pytorchjob-controller",
                "training.kubeflow.org/replica-type": rtype.lower(),
                "training.kubeflow.org/replica-index": str(index),
            }
            if rtype == "Master":
                labels["training.kubeflow.org/job-role"] = "master"
            tpl = copy.deepcopy(r["template"])
            tpl["spec"]["restartPolicy"] = r.get("restartPolicy", "Never")  # replica restartPolicy wins
            pods.append(
                make_pod(
                    name=pod_name,
                    namespace=namespace,
                    controller="PyTorchJob",
                    owner=name,
                    template=tpl,
                    hostname=tpl["spec"].get("hostname", pod_name),
                    subdomain=tpl["spec"].get("subdomain", ""),
                    labels=labels,
                    annotations=dict(tpl.get("metadata", {}).get("annotations", {})),
                    ip=addresses.next(),
                    image=image,
                    extra_env=env,
                    container_name="pytorch",
                )
            )
            selector = {
                k: labels[k]
                for k in (
                    "training.kubeflow.org/job-name",
                    "training.kubeflow.org/replica-type",
                    "training.kubeflow.org/replica-index",
                )
            }
            services.append(
                Service(
                    pod_name,
                    namespace,
                    selector,
                    True,
                    False,
                    [{"name": "pytorchjob-port", "port": port}],
                    "PyTorchJob",
                )
            )
    return pods, services


def trainjob_to_jobset(trainjob: dict, runtime: dict | None = None) -> dict:
    """The JobSet the Kubeflow Trainer controller builds for a TrainJob on the torch-distributed runtime."""
    name = trainjob["metadata"]["name"]
    spec = trainjob["spec"]
    ref = spec.get("runtimeRef", {})
    if runtime is None:
        if (ref.get("name"), ref.get("kind", "ClusterTrainingRuntime")) != (
            "torch-distributed",
            "ClusterTrainingRuntime",
        ):
            raise Unsupported(
                f"TrainJob {name}: runtime {ref} (only ClusterTrainingRuntime torch-distributed is known)"
            )
        runtime = TORCH_DISTRIBUTED_RUNTIME
    if "torch" not in runtime.get("mlPolicy", {}):
        raise Unsupported(f"TrainJob {name}: only the torch ML policy is modelled")
    trainer = spec.get("trainer", {}) or {}
    reserved = sorted(e["name"] for e in trainer.get("env", []) if e["name"] in TORCHRUN_RESERVED)
    if reserved:
        raise Unsupported(f"TrainJob {name}: spec.trainer.env must not have reserved envs {reserved}")
    jobset = {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": name},
        "spec": copy.deepcopy(runtime["template"]["spec"]),
    }
    rjobs = jobset["spec"]["replicatedJobs"]
    node_rj = next(
        (
            rj
            for rj in rjobs
            if rj["template"]
            .get("metadata", {})
            .get("labels", {})
            .get("trainer.kubeflow.org/trainjob-ancestor-step")
            == "trainer"
        ),
        None,
    )
    if node_rj is None:
        raise Unsupported(f"TrainJob {name}: the runtime has no trainer replicated job")
    num_nodes = int(trainer.get("numNodes", runtime["mlPolicy"].get("numNodes", 1)))
    job_spec = node_rj["template"].setdefault("spec", {})
    job_spec.update({"completionMode": "Indexed", "completions": num_nodes, "parallelism": num_nodes})
    pod_spec = job_spec["template"]["spec"]
    pod_spec.setdefault("restartPolicy", "OnFailure")  # JobSet's webhook default for its pod templates
    container = next(c for c in pod_spec["containers"] if c["name"] == "node")
    for key in ("image", "command", "args"):
        if key in trainer:
            container[key] = copy.deepcopy(trainer[key])
    if "resourcesPerNode" in trainer:
        container["resources"] = copy.deepcopy(trainer["resourcesPerNode"])
    nproc = trainer.get("numProcPerNode")
    if nproc is None:
        limits = container.get("resources", {}) or {}
        gpus = parse_quantity((limits.get("limits", {}) or {}).get("nvidia.com/gpu", 0))
        cpu = (
            (limits.get("requests", {}) or {}).get("cpu") or (limits.get("limits", {}) or {}).get("cpu") or 0
        )
        nproc = "auto" if gpus else str(max(1, int(parse_quantity(cpu))))
    pet = [
        {"name": "PET_NNODES", "value": str(num_nodes)},
        {"name": "PET_NPROC_PER_NODE", "value": str(nproc)},
        {
            "name": "PET_NODE_RANK",
            "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX}']"}},
        },
        {"name": "PET_MASTER_ADDR", "value": f"{name}-node-0-0.{name}"},
        {"name": "PET_MASTER_PORT", "value": str(TRAINJOB_MASTER_PORT)},
    ]
    container["env"] = merge_by_key(merge_by_key(container.get("env", []), trainer.get("env", [])), pet)
    container["ports"] = merge_by_key(
        container.get("ports", []), [{"containerPort": TRAINJOB_MASTER_PORT}], key="containerPort"
    )
    for patch in spec.get("runtimePatches", []) or []:
        _apply_runtime_patch(name, rjobs, patch)
    return jobset


def _apply_runtime_patch(name: str, rjobs: list[dict], patch: dict) -> None:
    manager = patch.get("manager", "")
    if not re.fullmatch(
        r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)+/[^\s/][^\s]*", manager
    ):
        raise Unsupported(
            f"TrainJob {name}: runtimePatches manager {manager!r} is not domain-prefixed (a.b/name)"
        )
    template = (patch.get("trainingRuntimeSpec") or {}).get("template") or {}
    for rp in (template.get("spec") or {}).get("replicatedJobs", []):
        target = next((rj for rj in rjobs if rj["name"] == rp["name"]), None)
        if target is None:
            raise Unsupported(
                f"TrainJob {name}: runtimePatches names replicated job {rp['name']!r}, not in the runtime"
            )
        pod_patch = ((rp.get("template") or {}).get("spec") or {}).get("template") or {}
        pod_tpl = target["template"]["spec"]["template"]
        meta = pod_patch.get("metadata") or {}
        for key in ("labels", "annotations"):
            if meta.get(key):
                pod_tpl.setdefault("metadata", {}).setdefault(key, {}).update(meta[key])
        ps = pod_patch.get("spec") or {}
        spec = pod_tpl["spec"]
        for key in ("serviceAccountName", "terminationGracePeriodSeconds", "securityContext", "affinity"):
            if key in ps:
                spec[key] = copy.deepcopy(ps[key])
        if "nodeSelector" in ps:
            spec.setdefault("nodeSelector", {}).update(ps["nodeSelector"])
        if "tolerations" in ps:
            spec["tolerations"] = spec.get("tolerations", []) + copy.deepcopy(ps["tolerations"])
        for key in ("volumes", "imagePullSecrets", "schedulingGates"):
            if key in ps:
                spec[key] = merge_by_key(spec.get(key, []), ps[key])
        for key in ("containers", "initContainers"):
            for cp in ps.get(key, []):
                existing = next((c for c in spec.get(key, []) if c["name"] == cp["name"]), None)
                if existing is None:
                    raise Unsupported(
                        f"TrainJob {name}: runtimePatches container {cp['name']!r} not in the runtime"
                    )
                if cp.get("env") and cp["name"] in ("node", "dataset-initializer", "model-initializer"):
                    raise Unsupported(
                        f"TrainJob {name}: env of container {cp['name']!r} is set through spec.trainer"
                    )
                existing["env"] = merge_by_key(existing.get("env", []), cp.get("env", []))
                existing["volumeMounts"] = merge_by_key(
                    existing.get("volumeMounts", []), cp.get("volumeMounts", [])
                )
                if "securityContext" in cp:
                    existing["securityContext"] = copy.deepcopy(cp["securityContext"])


# ------------------------------------------------------------------------------------------------ entry point
def emulate(
    docs: Iterable[dict],
    *,
    namespace: str = "default",
    subnet: str = "10.88.0.0/24",
    image: Image | None = None,
) -> Cluster:
    """Pods and Services the controllers create for `docs` (other kinds, e.g. claims, are ignored)."""
    cluster = Cluster()
    addresses = Addresses(subnet)
    for doc in docs:
        kind, api = doc.get("kind"), doc.get("apiVersion", "")
        ns = doc.get("metadata", {}).get("namespace", namespace)
        if kind == "Service" and api == "v1":
            spec = doc["spec"]
            cluster.services.append(
                Service(
                    doc["metadata"]["name"],
                    ns,
                    dict(spec.get("selector", {})),
                    spec.get("clusterIP") == "None",
                    bool(spec.get("publishNotReadyAddresses")),
                    spec.get("ports", []),
                    "manifest",
                )
            )
        elif kind == "Job" and api == "batch/v1":
            cluster.pods += indexed_job_pods(doc, namespace=ns, addresses=addresses, image=image)
        elif kind == "JobSet" and api.startswith("jobset.x-k8s.io/"):
            pods, services = jobset_pods(doc, namespace=ns, addresses=addresses, image=image)
            cluster.pods += pods
            cluster.services += services
        elif kind == "PyTorchJob" and api == "kubeflow.org/v1":
            pods, services = pytorchjob_pods(doc, namespace=ns, addresses=addresses, image=image)
            cluster.pods += pods
            cluster.services += services
        elif kind == "TrainJob" and api == "trainer.kubeflow.org/v1alpha1":
            jobset = trainjob_to_jobset(doc)
            pods, services = jobset_pods(
                jobset,
                namespace=ns,
                addresses=addresses,
                image=image,
                controller="TrainJob",
                owner=doc["metadata"]["name"],
            )
            cluster.pods += pods
            cluster.services += services
    return cluster
