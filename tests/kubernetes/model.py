"""The manifests as the kubelet would see them: documents, pod templates, containers' resolved
environment (literal values with $(VAR) expansion, Downward API field references) and the host
path behind a path inside a container."""

import copy
import pathlib
import re
from dataclasses import dataclass, field

import yaml

# Stand-ins for what only exists at run time, shaped like the real thing (a Deployment's pod is
# named <deployment>-<10-character hash>-<5 characters>).
SAMPLE_UID = "0f6c1d5e-7a2b-4c3d-9e8f-1a2b3c4d5e6f"
SAMPLE_NODE = "gpu-node-1"


@dataclass
class Doc:
    file: str
    obj: dict

    @property
    def kind(self) -> str:
        return self.obj.get("kind", "?")

    @property
    def name(self) -> str:
        return self.obj.get("metadata", {}).get("name", "?")

    @property
    def where(self) -> str:
        return f"{self.file}: {self.kind}/{self.name}"


@dataclass
class Pod:
    """A pod spec and the metadata its pods get, from a Pod or a workload's template."""

    doc: Doc
    meta: dict
    spec: dict
    sample_name: str
    namespace: str

    def containers(self) -> list[dict]:
        return self.spec.get("initContainers", []) + self.spec.get("containers", [])

    def volume(self, name: str) -> dict:
        return next((v for v in self.spec.get("volumes", []) if v.get("name") == name), {})

    def where(self, container: dict | None = None) -> str:
        return self.doc.where + (f" container {container.get('name')}" if container else "")


@dataclass
class Manifests:
    files: list[str]
    docs: list[Doc] = field(default_factory=list)

    @staticmethod
    def load(directory: pathlib.Path) -> "Manifests":
        files = sorted(p.name for p in directory.glob("*.yaml"))
        docs = []
        for name in files:
            for obj in yaml.safe_load_all((directory / name).read_text()):
                if obj:
                    docs.append(Doc(name, obj))
        return Manifests(files, docs)

    def copy(self) -> "Manifests":
        return Manifests(list(self.files), copy.deepcopy(self.docs))

    def find(self, kind: str, name: str) -> Doc | None:
        return next((d for d in self.docs if d.kind == kind and d.name == name), None)

    def pods(self) -> list[Pod]:
        return [p for d in self.docs if (p := pod_of(d))]


def pod_of(doc: Doc) -> Pod | None:
    obj, kind = doc.obj, doc.kind
    namespace = obj.get("metadata", {}).get("namespace", "default")
    name = doc.name
    if kind == "Pod":
        return Pod(doc, obj.get("metadata", {}), obj.get("spec", {}), name, namespace)
    template = None
    sample = {
        "Deployment": f"{name}-5d8f7c9b6d-x2x7q",
        "ReplicaSet": f"{name}-x2x7q",
        "DaemonSet": f"{name}-x2x7q",
        "StatefulSet": f"{name}-0",
        "Job": f"{name}-x2x7q",
    }.get(kind)
    if sample:
        template = obj.get("spec", {}).get("template")
    elif kind == "CronJob":
        template = obj.get("spec", {}).get("jobTemplate", {}).get("spec", {}).get("template")
        sample = f"{name}-29001234-x2x7q"
    if not template:
        return None
    return Pod(doc, template.get("metadata", {}), template.get("spec", {}), sample, namespace)


REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
FIELD_SUBSCRIPT = re.compile(r"^metadata\.(annotations|labels)\['([^']+)'\]$")


@dataclass
class Env:
    """A container's environment as the kubelet builds it. `values[name]` is None where the value
    only exists at run time (secrets, config maps); `problems` lists what cannot be right."""

    values: dict[str, str | None]
    problems: list[str]


def resolve_env(pod: Pod, container: dict) -> Env:
    values: dict[str, str | None] = {}
    problems = []
    for entry in container.get("env", []):
        name = entry.get("name", "")
        if "value" in entry:
            values[name] = expand(str(entry["value"]), values, name, problems)
        elif "fieldRef" in entry.get("valueFrom", {}):
            values[name] = field_value(pod, entry["valueFrom"]["fieldRef"].get("fieldPath", ""), name, problems)
        else:
            values[name] = None
    return Env(values, problems)


def expand(text: str, defined: dict[str, str | None], name: str, problems: list[str]) -> str:
    """Kubernetes' $(VAR) expansion: only variables defined earlier in the list expand; `$$` is
    a literal `$`; anything else stays as written (and is reported)."""

    def replace(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        ref = m.group(1)
        if defined.get(ref) is not None:
            return defined[ref]
        problems.append(f"{name} refers to $({ref}), which is not defined before it: the value stays \"$({ref})\" literally")
        return m.group(0)

    return REFERENCE.sub(replace, text)


def field_value(pod: Pod, path: str, name: str, problems: list[str]) -> str | None:
    simple = {
        "metadata.name": pod.sample_name,
        "metadata.namespace": pod.namespace,
        "metadata.uid": SAMPLE_UID,
        "spec.nodeName": SAMPLE_NODE,
        "spec.serviceAccountName": pod.spec.get("serviceAccountName", "default"),
    }
    if path in simple:
        return simple[path]
    m = FIELD_SUBSCRIPT.match(path)
    if m:
        kind, key = m.groups()
        table = pod.meta.get(kind, {}) or {}
        if key not in table:
            # The Downward API gives "" for a missing key, and gpuslice reads an empty variable as
            # unset: a misspelt annotation would silently mean "no limit".
            problems.append(f"{name} comes from {kind[:-1]} {key!r}, which the pod template does not have (it would be empty: no limit)")
            return ""
        return str(table[key])
    return None


@dataclass
class Mapped:
    """Where a path inside a container comes from on the node."""

    host_path: str | None  # None: not on a hostPath volume
    mount: dict | None
    volume: dict | None


def host_path(pod: Pod, container: dict, path: str) -> Mapped:
    mounts = sorted(container.get("volumeMounts", []), key=lambda m: len(m.get("mountPath", "")), reverse=True)
    for mount in mounts:
        mount_path = mount.get("mountPath", "").rstrip("/")
        if not mount_path:
            continue  # the schema check reports it
        if path == mount_path or path.startswith(mount_path + "/"):
            volume = pod.volume(mount.get("name", ""))
            host = volume.get("hostPath", {}).get("path")
            if host is None:
                return Mapped(None, mount, volume)
            base = host.rstrip("/") + (("/" + mount["subPath"]) if mount.get("subPath") else "")
            return Mapped(base + path[len(mount_path):], mount, volume)
    return Mapped(None, None, None)


def effective(pod: Pod, container: dict, key: str):
    """A securityContext field as it applies to the container (its own wins over the pod's)."""
    own = (container.get("securityContext") or {}).get(key)
    return own if own is not None else (pod.spec.get("securityContext") or {}).get(key)
