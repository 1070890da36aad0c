"""What the Kubernetes examples must get right for gpuslice to work, checked against the names
and defaults in the Rust sources (Truth) and with the built `gpuslice check-config`."""

import pathlib
import re
import subprocess
import tempfile
import tomllib
from dataclasses import dataclass, field

import yaml

from model import Manifests, Pod, effective, host_path, resolve_env

# HAMi's extended resources: a container asking for them is placed and limited by HAMi.
HAMI_RESOURCES = ("nvidia.com/gpumem", "nvidia.com/gpumem-percentage", "nvidia.com/gpucores")
TRUE_WORDS = {"1", "t", "T", "true", "TRUE", "True"}  # what Go's strconv.ParseBool takes as true


@dataclass
class Truth:
    """What the code says: the variables the shim reads, which take a _<device> suffix, the
    default socket and ledger, where the Debian package puts the library, the version."""

    env_names: set[str]
    per_device: set[str]
    default_socket: str
    default_ledger: str
    image_library: str
    version: str

    @staticmethod
    def from_sources(root: pathlib.Path) -> "Truth":
        sources = sorted((root / "common" / "src").glob("*.rs")) + [root / "shim" / "src" / "sys" / "runtime.rs"]
        consts = {}
        for f in sources:
            consts.update(dict(re.findall(r'const (\w+): &str = "([^"]*)";', f.read_text())))
        env_names = {v for v in consts.values() if re.fullmatch(r"(GPUSLICE|CUDA_DEVICE)_[A-Z_]+", v) and "TEST" not in v}
        settings = (root / "common" / "src" / "settings.rs").read_text()
        per_device = {consts[n] for pair in re.findall(r"resolve_env\(\s*vars,\s*(\w+),\s*(?:Some\((\w+)\)|None),", settings) for n in pair if n}
        prefix = re.search(r"install DESTDIR=\S+ PREFIX=(\S+)", (root / "packaging" / "make-deb.sh").read_text()).group(1)
        version = re.search(r'\[workspace\.package\][^\[]*?\nversion = "([^"]+)"', (root / "Cargo.toml").read_text()).group(1)
        truth = Truth(env_names, per_device, consts["DEFAULT_SOCKET"], consts["DEFAULT_LEDGER"], f"{prefix}/lib/libgpuslice.so", version)
        assert {"GPUSLICE_MEMORY_LIMIT", "CUDA_DEVICE_SM_LIMIT", "GPUSLICE_SOCKET"} <= env_names and per_device, truth
        return truth

    def knows(self, name: str) -> bool:
        if name in self.env_names:
            return True
        base, _, suffix = name.rpartition("_")
        return base in self.per_device and suffix.isdigit()


@dataclass
class Controller:
    """The gpuslice DaemonSet as the workloads must match it: host paths of the socket, the
    ledger and the library the init container installs."""

    socket_host: str | None = None
    ledger_host: str | None = None
    library_host: str | None = None


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def check(manifests: Manifests, truth: Truth, gpuslice: pathlib.Path) -> Report:
    report = Report()
    controller, controller_pod = check_controller(manifests, truth, gpuslice, report)
    for pod in manifests.pods():
        if controller_pod is not None and pod.doc is controller_pod.doc:
            continue
        for container in pod.containers():
            check_workload(pod, container, controller, truth, gpuslice, report)
    check_time_slicing(manifests, report)
    return report


# ------------------------------------------------------------------------------- the DaemonSet


def is_controller(container: dict) -> bool:
    words = container.get("command", []) + container.get("args", [])
    return "serve" in words and any("gpuslice" in str(x) for x in [container.get("image", "")] + words)


def check_controller(manifests: Manifests, truth: Truth, gpuslice: pathlib.Path, report: Report):
    found = [(pod, c) for pod in manifests.pods() for c in pod.spec.get("containers", []) if is_controller(c)]
    if len(found) != 1:
        report.problems.append(f"expected one container running `gpuslice serve`, found {len(found)}")
        return Controller(), None
    pod, container = found[0]
    where = pod.where(container)
    p = report.problems
    if pod.doc.kind != "DaemonSet":
        p.append(f"{where}: the controller runs as a {pod.doc.kind}; one per GPU node needs a DaemonSet")
    if pod.spec.get("hostPID") is not True:
        p.append(f"{where}: hostPID must be true: the controller identifies and watches registering processes by pid, which it cannot see in a PID namespace of its own")
    for c in pod.containers():
        image = c.get("image", "")
        if not image.endswith(":" + truth.version):
            p.append(f"{pod.where(c)}: image {image!r} is not tagged with this release's version {truth.version} (shim and controller must come from one release)")

    args = container.get("command", []) + container.get("args", [])

    def flag(name: str) -> str | None:
        i = args.index(name) + 1 if name in args else len(args)
        return args[i] if i < len(args) else None

    config = controller_config(pod, container, flag("--config"), manifests, gpuslice, report)
    socket = flag("--socket") or config.get("socket") or truth.default_socket
    ledger = flag("--ledger") or config.get("ledger") or truth.default_ledger

    result = Controller()
    mapped = host_path(pod, container, socket)
    if mapped.host_path is None:
        p.append(f"{where}: the socket {socket} is not on a hostPath volume: pods on the node cannot reach it")
    result.socket_host = mapped.host_path
    mapped = host_path(pod, container, ledger)
    if mapped.host_path is None:
        p.append(f"{where}: the ledger {ledger} is not on a hostPath volume: a restarted controller would start a new one and forget the running programs")
    result.ledger_host = mapped.host_path
    if result.socket_host and result.ledger_host and parent(result.ledger_host) == parent(result.socket_host):
        p.append(f"{where}: the ledger shares the socket's directory, which every workload mounts")
    result.library_host = check_installer(pod, truth, report)
    report.notes.append(f"controller: {pod.doc.where}: socket {socket} (node {result.socket_host}), ledger {ledger} (node {result.ledger_host}), library on the node at {result.library_host}")
    return result, pod


def controller_config(pod: Pod, container: dict, path: str | None, manifests: Manifests, gpuslice, report: Report) -> dict:
    """The [controller] table of the config file the controller reads, from its ConfigMap,
    checked with `gpuslice check-config` as the controller would read it."""
    if not path:
        return {}
    mapped = host_path(pod, container, path)
    name = (mapped.volume or {}).get("configMap", {}).get("name")
    source = manifests.find("ConfigMap", name) if name else None
    key = path[len(mapped.mount["mountPath"].rstrip("/")) + 1:] if mapped.mount else None
    text = (source.obj.get("data", {}) if source else {}).get(key)
    if text is None:
        report.problems.append(f"{pod.where(container)}: --config {path} is not a key of a ConfigMap in these manifests")
        return {}
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
        f.write(text)
        f.flush()
        result = run_check_config(gpuslice, {}, f.name)
    if result.returncode != 0:
        report.problems.append(f"{source.where} {key}: gpuslice check-config refuses it: {result.stderr.strip()}")
        return {}
    return tomllib.loads(text).get("controller", {})


def check_installer(pod: Pod, truth: Truth, report: Report) -> str | None:
    """The init container that copies the library onto the node: from the image's package path,
    under a temporary name, renamed into place. Returns the file's path on the node."""
    for c in pod.spec.get("initContainers", []):
        script = " ".join(c.get("command", []) + c.get("args", []))
        if truth.image_library not in script:
            continue
        dest = next((e.get("value") for e in c.get("env", []) if e.get("name") == "DEST"), None)
        mapped = host_path(pod, c, dest) if dest else None
        if not mapped or mapped.host_path is None:
            report.problems.append(f"{pod.where(c)}: DEST must name a directory on a hostPath volume")
            return None
        if not re.search(r'\bmv\b[^;]*"\$DEST/libgpuslice\.so"', script):
            report.problems.append(f"{pod.where(c)}: the library must be renamed into place (mv to \"$DEST/libgpuslice.so\"): writing over a library that running programs have mapped crashes them")
        return mapped.host_path.rstrip("/") + "/libgpuslice.so"
    report.problems.append(f"{pod.doc.where}: no init container copies {truth.image_library} (where the Debian package in the image puts it) to the node")
    return None


def parent(path: str) -> str:
    return path.rstrip("/").rpartition("/")[0] or "/"


def within(path: str, directory: str) -> bool:
    """`path` is `directory` or below it."""
    path, directory = path.rstrip("/") or "/", directory.rstrip("/") or "/"
    return path == directory or path.startswith(directory.rstrip("/") + "/")


# --------------------------------------------------------------------------------- workloads


def check_workload(pod: Pod, container: dict, ctl: Controller, truth: Truth, gpuslice, report: Report):
    where = pod.where(container)
    p = report.problems
    env = resolve_env(pod, container)
    p.extend(f"{where}: {msg}" for msg in env.problems)
    for name in env.values:
        if name.startswith(("GPUSLICE_", "CUDA_DEVICE_")) and not truth.knows(name):
            p.append(f"{where}: {name} is not a variable gpuslice reads (it reads {', '.join(sorted(truth.env_names))}, and _<device> forms of {', '.join(sorted(truth.per_device))})")
    preload = (env.values.get("LD_PRELOAD") or "").replace(":", " ").split()
    libraries = [x for x in preload if x.endswith("/libgpuslice.so")]
    ours = {k: v for k, v in env.values.items() if truth.knows(k)}
    if not libraries:
        if ours:
            p.append(f"{where}: sets {', '.join(sorted(ours))} but does not preload libgpuslice.so")
        return

    for library in libraries:
        mapped = host_path(pod, container, library)
        if ctl.library_host is None:
            pass  # the controller's problem is reported already
        elif mapped.host_path != ctl.library_host:
            p.append(f"{where}: LD_PRELOAD {library} is {mapped.host_path or 'not a hostPath file'} on the node, but the DaemonSet installs the library at {ctl.library_host}")
        elif not mapped.mount.get("readOnly"):
            p.append(f"{where}: mount the library read-only")
        elif mapped.volume["hostPath"].get("type") != "File":
            p.append(f"{where}: the library's hostPath volume needs type: File, so that the pod waits for the DaemonSet instead of starting without the library (the loader only warns about a missing LD_PRELOAD file)")

    socket = env.values.get("GPUSLICE_SOCKET") or truth.default_socket
    mapped = host_path(pod, container, socket)
    if ctl.socket_host is None:
        pass
    elif mapped.host_path != ctl.socket_host:
        p.append(f"{where}: the socket {socket} is {mapped.host_path or 'not on a hostPath volume'} on the node, but the controller listens on {ctl.socket_host}")
    elif mapped.mount.get("mountPath", "").rstrip("/") == socket:
        p.append(f"{where}: mount the socket's directory, not the socket file: a restarted controller makes a new socket, which a file mount keeps hiding")

    ledger_dir = parent(ctl.ledger_host) if ctl.ledger_host else None
    for volume in pod.spec.get("volumes", []):
        path = volume.get("hostPath", {}).get("path")
        if path and ledger_dir and (within(ledger_dir, path) or within(path, ledger_dir)):
            p.append(f"{where}: volume {volume.get('name')} ({path}) exposes the controller's ledger; a workload gets the ledger's descriptor over the socket and needs no mount of it")

    if not (effective(pod, container, "runAsNonRoot") is True or (effective(pod, container, "runAsUser") or 0) > 0):
        p.append(f"{where}: runs as root: a root process may change every group's limits through the controller's socket; set runAsNonRoot/runAsUser")

    injected = hami_injection(pod, container, env, where, report)
    settings = {k: v for k, v in ours.items() if v is not None}
    settings.update(injected)
    result = run_check_config(gpuslice, settings, None)
    if result.returncode != 0:
        p.append(f"{where}: gpuslice would refuse this pod's settings: {result.stderr.strip()}")
        return
    described = result.stdout.strip()
    if injected and not any(f"from {k}" in described for k in injected):
        p.append(f"{where}: gpuslice does not take the limits HAMi injects ({injected}): {described}")
    report.notes.append(f"workload: {where}: {described}" + (f" (HAMi injects {', '.join(f'{k}={v}' for k, v in injected.items())})" if injected else ""))


def hami_injection(pod: Pod, container: dict, env, where: str, report: Report) -> dict[str, str]:
    """What HAMi's device plugin adds to a container that asks for HAMi's resources: one
    CUDA_DEVICE_MEMORY_LIMIT_<i>=<MiB>m per GPU and CUDA_DEVICE_SM_LIMIT=<percent>."""
    limits = (container.get("resources") or {}).get("limits", {})
    if not any(r in limits for r in HAMI_RESOURCES):
        return {}
    if env.values.get("CUDA_DISABLE_CONTROL") not in TRUE_WORDS:
        report.problems.append(f"{where}: HAMi would also mount its /etc/ld.so.preload (HAMi-core's libvgpu.so) into this container; set CUDA_DISABLE_CONTROL=true")
    for name in env.values:
        if name.startswith(("CUDA_DEVICE_MEMORY_LIMIT", "CUDA_DEVICE_SM_LIMIT")):
            report.problems.append(f"{where}: {name} is HAMi's to inject from the resource requests; do not set it in the pod")
    injected = {}
    if "nvidia.com/gpumem" in limits:
        for i in range(int(limits.get("nvidia.com/gpu", 1))):
            injected[f"CUDA_DEVICE_MEMORY_LIMIT_{i}"] = f"{int(limits['nvidia.com/gpumem'])}m"
    injected["CUDA_DEVICE_SM_LIMIT"] = str(int(limits.get("nvidia.com/gpucores", 0)))
    return injected


def run_check_config(gpuslice: pathlib.Path, env: dict[str, str], config: str | None) -> subprocess.CompletedProcess:
    args = [str(gpuslice), "check-config"] + ([config] if config else [])
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=30)


# ------------------------------------------------------------------------- device plugin config


def check_time_slicing(manifests: Manifests, report: Report):
    for doc in manifests.docs:
        if doc.kind != "ConfigMap":
            continue
        for key, text in (doc.obj.get("data") or {}).items():
            try:
                config = yaml.safe_load(text)
            except yaml.YAMLError:
                continue
            resources = ((config or {}).get("sharing", {}) or {}).get("timeSlicing", {}).get("resources") if isinstance(config, dict) else None
            for r in resources or []:
                if r.get("name") == "nvidia.com/gpu" and int(r.get("replicas", 0)) < 2:
                    report.problems.append(f"{doc.where} {key}: replicas {r.get('replicas')} lets no two pods share a GPU")
