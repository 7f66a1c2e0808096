"""What a pod is, to the tests: the objects controllers create and what a container in them sees.

`Pod` (hostname, subdomain, IP, labels, annotations, the resolved environment, argv, mounts), `Service`, and
`Cluster`, which answers DNS questions the way cluster DNS does (`lookup`) and writes the /etc/hosts that stands in
for it (`hosts_file`). `make_pod` turns a pod template into a `Pod`: the image's ENV then the container's `env`
in order, `$(VAR)` expansion, downward-API `fieldRef` / `resourceFieldRef` values, command + args (or the image's
ENTRYPOINT + CMD), volume mounts. `image_from_dockerfile` reads the image configuration a container starts with.
emulator.py decides which pods each controller creates.
"""

from __future__ import annotations

import copy
import ipaddress
import math
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

CLUSTER_DOMAIN = "cluster.local"


class Unsupported(ValueError):
    """The manifest uses something this model of the controllers does not cover (or the API would reject)."""


@dataclass(frozen=True)
class Image:
    """The parts of an image's configuration that a container sees."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    workdir: str = "/"
    user: str = ""


@dataclass(frozen=True)
class Mount:
    path: str
    volume: str
    kind: str  # "persistentVolumeClaim" or "emptyDir"
    claim: str = ""  # the claim name for persistentVolumeClaim
    medium: str = ""  # "Memory" for an in-memory emptyDir
    size_limit: str = ""
    read_only: bool = False
    sub_path: str = ""


@dataclass
class Pod:
    name: str
    namespace: str
    controller: str  # Job, JobSet, PyTorchJob or TrainJob: the object the user submitted
    owner: str  # that object's name
    hostname: str
    subdomain: str
    ip: str
    labels: dict[str, str]
    annotations: dict[str, str]
    spec: dict  # the pod spec as created (before downward-API resolution)
    container: str  # name of the training container
    image: str
    argv: list[str]
    env: dict[str, str]
    mounts: list[Mount]
    resources: dict
    grace_period_s: int

    @property
    def node_rank(self) -> int:
        return int(self.env["PET_NODE_RANK"])

    @property
    def dns_name(self) -> str:
        """The name other pods in the namespace use for this pod ("" when it has none)."""
        return f"{self.hostname}.{self.subdomain}" if self.subdomain else ""

    def hosts_entry(self) -> str:
        """The line the kubelet writes for the pod itself into its /etc/hosts."""
        if self.subdomain:
            fqdn = f"{self.hostname}.{self.subdomain}.{self.namespace}.svc.{CLUSTER_DOMAIN}"
            return f"{self.ip}\t{fqdn}\t{self.hostname}"
        return f"{self.ip}\t{self.hostname}"


@dataclass
class Service:
    name: str
    namespace: str
    selector: dict[str, str]
    headless: bool
    publish_not_ready: bool
    ports: list[dict]
    created_by: str  # "manifest" or the controller that made it


@dataclass
class Cluster:
    pods: list[Pod] = field(default_factory=list)
    services: list[Service] = field(default_factory=list)

    def selected(self, service: Service) -> list[Pod]:
        return [
            p
            for p in self.pods
            if p.namespace == service.namespace
            and service.selector
            and all(p.labels.get(k) == v for k, v in service.selector.items())
        ]

    def records(self, namespace: str) -> dict[str, list[str]]:
        """Every name cluster DNS answers inside `namespace` (short and fully qualified) -> IPs."""
        out: dict[str, list[str]] = {}

        def add(short: str, ns: str, ip: str) -> None:
            fqdn = f"{short}.{ns}.svc.{CLUSTER_DOMAIN}"
            names = [fqdn, f"{short}.{ns}", f"{short}.{ns}.svc"] + ([short] if ns == namespace else [])
            for name in names:
                out.setdefault(name, [])
                if ip not in out[name]:
                    out[name].append(ip)

        for svc in self.services:
            if not svc.headless:
                continue  # a ClusterIP Service answers with a virtual IP; nothing here needs one
            for pod in self.selected(svc):
                add(svc.name, svc.namespace, pod.ip)
                if pod.subdomain == svc.name:
                    add(f"{pod.hostname}.{svc.name}", svc.namespace, pod.ip)
        return out

    def lookup(self, name: str, namespace: str) -> list[Pod]:
        ips = self.records(namespace).get(name, [])
        return [p for p in self.pods if p.ip in ips]

    def hosts_file(self, pod: Pod) -> str:
        """/etc/hosts for `pod`: the kubelet's lines plus every cluster DNS name (stand-in for cluster DNS)."""
        lines = ["127.0.0.1\tlocalhost", pod.hosts_entry()]
        by_ip: dict[str, list[str]] = {}
        for name, ips in sorted(self.records(pod.namespace).items()):
            for ip in ips:
                by_ip.setdefault(ip, []).append(name)
        lines += [f"{ip}\t{' '.join(names)}" for ip, names in by_ip.items()]
        return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ loading
def load_documents(paths: Iterable[Path]) -> list[dict]:
    docs = []
    for path in paths:
        docs += [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    return docs


def image_from_dockerfile(path: Path) -> Image:
    """ENTRYPOINT, CMD (exec form only), ENV, WORKDIR and USER of the final stage of a simple Dockerfile."""
    text = re.sub(r"\\\n", " ", Path(path).read_text())
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: dict[str, str] = {}
    workdir, user = "/", ""
    args: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        word, rest = word.upper(), rest.strip()
        if word == "FROM":
            entrypoint, cmd, env, workdir, user = (), (), {}, "/", ""  # a new stage starts afresh
            args = {}  # an ARG declared before FROM serves FROM only; the stage declares its own
        elif word == "ARG":
            name, sep, default = rest.partition("=")
            args[name] = shlex.split(default)[0] if sep and default else ""  # the default; no --build-arg here
        elif word in ("ENTRYPOINT", "CMD"):
            if not rest.startswith("["):
                raise Unsupported(f"{word} in shell form: PID 1 would be /bin/sh, not the program")
            value = tuple(yaml.safe_load(rest))
            entrypoint, cmd = (value, ()) if word == "ENTRYPOINT" else (entrypoint, value)
        elif word == "ENV":
            known = {**args, **env}  # one instruction substitutes the values from before it throughout
            for item in shlex.split(rest):
                key, sep, value = item.partition("=")
                if not sep:
                    raise Unsupported(f"ENV without '=': {line}")
                env[key] = _substitute(value, known)
        elif word == "WORKDIR":
            workdir = rest if rest.startswith("/") else f"{workdir.rstrip('/')}/{rest}"
        elif word == "USER":
            user = rest
    return Image(entrypoint, cmd, tuple(env.items()), workdir, user)


def _substitute(value: str, variables: dict[str, str]) -> str:
    """Docker's `${NAME}` / `$NAME` in ENV values (the stage's ARG defaults and earlier ENVs; unset: empty)."""
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)",
                  lambda m: variables.get(m.group(1) or m.group(2), ""), value)


# ------------------------------------------------------------------------------------------------ helpers
def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined names are replaced, `$$` escapes, anything else stays as written."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", sub, text)


def parse_quantity(value) -> float:
    """A Kubernetes quantity ("500m", "4", "8Gi", 2) as a float."""
    s = str(value)
    suffixes = {
        "m": 1e-3,
        "k": 1e3,
        "M": 1e6,
        "G": 1e9,
        "T": 1e12,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
    }
    for suffix in sorted(suffixes, key=len, reverse=True):
        if s.endswith(suffix):
            return float(s[: -len(suffix)]) * suffixes[suffix]
    return float(s)


_FIELD = re.compile(r"^metadata\.(labels|annotations)\['([^']+)'\]$")


def resolve_field(path: str, pod: Pod) -> str:
    m = _FIELD.match(path)
    if m:
        values = pod.labels if m.group(1) == "labels" else pod.annotations
        if m.group(2) not in values:
            # the kubelet resolves a missing label/annotation to "", and torchrun then fails on the empty value
            return ""
        return values[m.group(2)]
    simple = {
        "metadata.name": pod.name,
        "metadata.namespace": pod.namespace,
        "status.podIP": pod.ip,
        "spec.serviceAccountName": pod.spec.get("serviceAccountName", "default"),
    }
    if path not in simple:
        raise Unsupported(f"downward API fieldPath {path!r}")
    return simple[path]


def resolve_resource(ref: dict, container: dict) -> str:
    resource = ref["resource"]
    kind, _, name = resource.partition(".")
    value = (container.get("resources", {}).get(kind, {}) or {}).get(name)
    if value is None:
        raise Unsupported(f"resourceFieldRef {resource}: not set on container {container['name']}")
    divisor = parse_quantity(ref.get("divisor", "1"))
    return str(math.ceil(parse_quantity(value) / divisor))


def merge_by_key(base: list[dict], updates: list[dict], key: str = "name") -> list[dict]:
    """Upsert list entries by `key`, keeping the order of first appearance (strategic-merge style)."""
    out = [copy.deepcopy(x) for x in base]
    for item in updates:
        for i, existing in enumerate(out):
            if existing.get(key) == item.get(key):
                out[i] = copy.deepcopy(item)
                break
        else:
            out.append(copy.deepcopy(item))
    return out


def dns_label(name: str, what: str) -> None:
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 63:
        raise Unsupported(f"{what} {name!r} is not a DNS label (RFC 1123, at most 63 characters)")


class Addresses:
    def __init__(self, subnet: str) -> None:
        self._hosts = ipaddress.ip_network(subnet).hosts()

    def next(self) -> str:
        return str(next(self._hosts))


# ------------------------------------------------------------------------------------------------ pods
def make_pod(
    *,
    name: str,
    namespace: str,
    controller: str,
    owner: str,
    template: dict,
    hostname: str,
    subdomain: str,
    labels: dict,
    annotations: dict,
    ip: str,
    image: Image | None,
    extra_env: list[dict],
    container_name: str | None = None,
) -> Pod:
    spec = copy.deepcopy(template.get("spec", {}))
    containers = spec.get("containers", [])
    if not containers:
        raise Unsupported(f"{controller} {owner}: pod template without containers")
    main = (
        containers[0]
        if container_name is None
        else next((c for c in containers if c["name"] == container_name), None)
    )
    if main is None:
        raise Unsupported(f"{controller} {owner}: no container named {container_name!r}")
    if main.get("envFrom"):
        raise Unsupported("envFrom")
    for c in containers:
        c["env"] = list(c.get("env", [])) + copy.deepcopy(extra_env)
    pod = Pod(
        name=name,
        namespace=namespace,
        controller=controller,
        owner=owner,
        hostname=hostname,
        subdomain=subdomain,
        ip=ip,
        labels=labels,
        annotations=annotations,
        spec=spec,
        container=main["name"],
        image=main.get("image", ""),
        argv=[],
        env={},
        mounts=[],
        resources=main.get("resources", {}),
        grace_period_s=int(spec.get("terminationGracePeriodSeconds", 30)),
    )
    # environment: the image's ENV, then the container's list in order (a later duplicate wins), $(VAR) expanded
    env: dict[str, str] = dict(image.env) if image else {}
    env["HOSTNAME"] = hostname
    for item in main["env"]:
        if "value" in item or "valueFrom" not in item:
            env[item["name"]] = expand(str(item.get("value", "")), env)
            continue
        source = item["valueFrom"]
        if "fieldRef" in source:
            env[item["name"]] = resolve_field(source["fieldRef"]["fieldPath"], pod)
        elif "resourceFieldRef" in source:
            env[item["name"]] = resolve_resource(source["resourceFieldRef"], main)
        else:
            raise Unsupported(f"env {item['name']}: valueFrom {sorted(source)}")
    pod.env = env
    command = main.get("command") or (list(image.entrypoint) if image else [])
    args = (
        main.get("args")
        if main.get("args") is not None
        else ([] if main.get("command") else list(image.cmd) if image else [])
    )
    if not command and not args:
        raise Unsupported(
            f"{controller} {owner}: container {main['name']} has no command and no image is known"
        )
    pod.argv = [expand(str(a), env) for a in [*command, *args]]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for m in main.get("volumeMounts", []):
        if m["name"] not in volumes:
            raise Unsupported(f"{controller} {owner}: volumeMount {m['name']!r} names no volume of the pod")
        v = volumes[m["name"]]
        if "persistentVolumeClaim" in v:
            mount = Mount(
                m["mountPath"],
                v["name"],
                "persistentVolumeClaim",
                claim=v["persistentVolumeClaim"]["claimName"],
                read_only=bool(m.get("readOnly") or v["persistentVolumeClaim"].get("readOnly")),
                sub_path=m.get("subPath", ""),
            )
        elif "emptyDir" in v:
            ed = v["emptyDir"] or {}
            mount = Mount(
                m["mountPath"],
                v["name"],
                "emptyDir",
                medium=ed.get("medium", ""),
                size_limit=str(ed.get("sizeLimit", "")),
                read_only=bool(m.get("readOnly")),
                sub_path=m.get("subPath", ""),
            )
        else:
            raise Unsupported(f"volume {v['name']}: only persistentVolumeClaim and emptyDir are modelled")
        pod.mounts.append(mount)
    return pod
