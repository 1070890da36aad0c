"""The DRA example (examples/kubernetes/dra) and what gpuslice-dra produces (`make check-k8s`).

1. Schema: the manifests, and the ResourceSlice that the plugin published to the test API server
   (saved by `cargo test -p gpuslice-dra` in target/dra/), validate strictly for the Kubernetes
   versions in SCHEMA_VERSIONS (resource.k8s.io/v1 exists from 1.34 on). The CDI specs it wrote
   validate against the CDI project's own JSON schema (cdi-schema/) and CDI's name rules.
2. Meaning: the DeviceClass selects the driver the DaemonSet runs; claims ask only for capacities
   the published devices offer, within what a device has and on its steps; opaque configuration
   is what the plugin accepts; pods name claims that exist; the plugin's directories are the
   node's (mounted from the same host paths) and its socket and library are the controller's and
   the installer's.
3. Self-test: broken copies, one mistake each, must each be reported.
"""

import copy
import json
import pathlib
import re

import jsonschema
import kubernetes_validate
import referencing
import referencing.jsonschema

from model import Manifests, host_path, pod_of, effective

SCHEMA_VERSIONS = ["1.34", "1.37"]
CONFIG_API_VERSION = "gpuslice.dev/v1alpha1"
CONFIG_KIND = "SliceConfig"
CONFIG_KEYS = {"apiVersion", "kind", "priority", "smMax"}
PRIORITIES = {"high", "normal", "low"}
CDI_VERSIONS = {"1.0.0", "1.1.0"}
CDI_VENDOR = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?$")
CDI_CLASS = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?$")
CDI_DEVICE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")

UNITS = {"": 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def quantity(q) -> int | None:
    m = re.fullmatch(r"(\d+)([A-Za-z]*)", str(q).strip())
    if not m or m.group(2) not in UNITS:
        return None
    return int(m.group(1)) * UNITS[m.group(2)]


def validate_schemas(obj: dict, where: str) -> list[str]:
    problems = []
    for version in SCHEMA_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            problems.append(f"{where}: not valid for Kubernetes {version}: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            problems.append(f"{where}: no schema for Kubernetes {version}: {e}")
    return problems


def cdi_validator(schema_dir: pathlib.Path) -> jsonschema.Validator:
    schema = json.loads((schema_dir / "schema.json").read_text())
    defs = json.loads((schema_dir / "defs.json").read_text())
    registry = referencing.Registry().with_resource("defs.json", referencing.Resource.from_contents(defs, default_specification=referencing.jsonschema.DRAFT7))
    return jsonschema.Draft7Validator(schema, registry=registry)


def check_cdi(spec: dict, where: str, validator) -> list[str]:
    problems = [f"{where}: CDI schema: {'.'.join(str(p) for p in e.path)}: {e.message}" for e in validator.iter_errors(spec)]
    if spec.get("cdiVersion") not in CDI_VERSIONS:
        problems.append(f"{where}: cdiVersion {spec.get('cdiVersion')!r} is not one of {sorted(CDI_VERSIONS)}")
    vendor, _, cls = str(spec.get("kind", "")).partition("/")
    if not (CDI_VENDOR.match(vendor) and "." in vendor and CDI_CLASS.match(cls)):
        problems.append(f"{where}: kind {spec.get('kind')!r} is not vendor.tld/class")
    for d in spec.get("devices", []):
        if not CDI_DEVICE.match(str(d.get("name", ""))):
            problems.append(f"{where}: device name {d.get('name')!r} is not a CDI device name")
    return problems


class Context:
    def __init__(self, manifests: Manifests, slice_obj: dict | None):
        self.m = manifests
        self.slice = slice_obj
        self.problems: list[str] = []

    def problem(self, text: str):
        self.problems.append(text)


def plugin_container(m: Manifests):
    for doc in m.docs:
        pod = pod_of(doc)
        if not pod:
            continue
        for c in pod.spec.get("containers", []):
            if "gpuslice-dra" in " ".join(c.get("command", [])):
                return pod, c
    return None, None


def flags(c: dict) -> dict[str, str]:
    out = {}
    for a in c.get("args", []):
        if a.startswith("--") and "=" in a:
            k, v = a[2:].split("=", 1)
            out[k] = v
    return out


def check_driver(ctx: Context) -> str | None:
    pod, c = plugin_container(ctx.m)
    if not c:
        ctx.problem("dra: no container runs gpuslice-dra")
        return None
    f = flags(c)
    driver = f.get("driver-name", "gpuslice.dev")
    where = pod.where(c)
    wanted = {
        "registrar-dir": "/var/lib/kubelet/plugins_registry",
        "plugin-dir": f"/var/lib/kubelet/plugins/{driver}",
        "cdi-dir": "/var/run/cdi",
    }
    for flag, node_path in wanted.items():
        path = f.get(flag, node_path)
        mapped = host_path(pod, c, path)
        if mapped.host_path != node_path:
            ctx.problem(f"{where}: --{flag} {path} is {'not on a hostPath volume' if mapped.host_path is None else 'the node path ' + mapped.host_path}; the kubelet and the runtime use {node_path}")
    socket = f.get("controller-socket", "/run/gpuslice/gpuslice.sock")
    sock_host = host_path(pod, c, socket).host_path
    ctl = next((x for x in pod.spec.get("containers", []) if x.get("args", [None])[0] == "serve"), None)
    if not ctl:
        ctx.problem(f"{pod.where()}: no controller container (`gpuslice serve`) next to the plugin")
    else:
        ctl_host = host_path(pod, ctl, socket).host_path
        if sock_host is None or sock_host != ctl_host:
            ctx.problem(f"{where}: --controller-socket {socket} is {sock_host} on the node, the controller's is {ctl_host}")
    lib = f.get("host-library", "/opt/gpuslice/libgpuslice.so")
    installer = next((x for x in pod.spec.get("initContainers", []) if x.get("name") == "install-library"), None)
    if installer:
        dest = next((e.get("value") for e in installer.get("env", []) if e.get("name") == "DEST"), None)
        installed = host_path(pod, installer, dest).host_path if dest else None
        if installed is None or installed.rstrip("/") + "/libgpuslice.so" != lib:
            ctx.problem(f"{where}: --host-library {lib}, but the installer puts the library at {installed}/libgpuslice.so")
    else:
        ctx.problem(f"{pod.where()}: no install-library init container puts {lib} on the node")
    if not f.get("node-name") and not any(e.get("name") == "NODE_NAME" and e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "spec.nodeName" for e in c.get("env", [])):
        ctx.problem(f"{where}: NODE_NAME must come from spec.nodeName (the plugin's pool is its node)")
    return driver


def check_opaque(ctx: Context, where: str, configs: list, driver: str):
    for cfg in configs or []:
        opaque = cfg.get("opaque") or {}
        if opaque.get("driver") != driver:
            continue
        p = opaque.get("parameters") or {}
        unknown = set(p) - CONFIG_KEYS
        if unknown:
            ctx.problem(f"{where}: opaque config for {driver} has {sorted(unknown)}, which gpuslice-dra refuses (it knows {sorted(CONFIG_KEYS)})")
        if p.get("apiVersion", CONFIG_API_VERSION) != CONFIG_API_VERSION or p.get("kind", CONFIG_KIND) != CONFIG_KIND:
            ctx.problem(f"{where}: opaque config must be apiVersion {CONFIG_API_VERSION}, kind {CONFIG_KIND}")
        if "priority" in p and str(p["priority"]).lower() not in PRIORITIES:
            ctx.problem(f"{where}: priority {p['priority']!r} is not high, normal or low")
        if "smMax" in p and not valid_cap(p["smMax"]):
            ctx.problem(f"{where}: smMax {p['smMax']!r} is not a percentage from 1 to 100 or none")


def valid_cap(value) -> bool:
    """What gpuslice's parse_cap accepts (issue 18): 1..100, optionally with %, or none."""
    text = str(value).strip().lower()
    if text in ("none", "unlimited"):
        return True
    text = text.removesuffix("%").strip()
    return text.isdigit() and 1 <= int(text) <= 100


def device_capacity(ctx: Context) -> dict[str, dict]:
    devices = (ctx.slice or {}).get("spec", {}).get("devices", [])
    return devices[0].get("capacity", {}) if devices else {}


def check_claim_spec(ctx: Context, where: str, spec: dict, classes: dict[str, str], driver: str):
    capacity = device_capacity(ctx)
    for r in spec.get("devices", {}).get("requests", []):
        ex = r.get("exactly") or {}
        cls = ex.get("deviceClassName")
        if classes.get(cls) != driver:
            ctx.problem(f"{where}: request {r.get('name')} asks for class {cls!r}, which is not a DeviceClass of {driver} here")
        for name, q in (ex.get("capacity", {}).get("requests") or {}).items():
            cap = capacity.get(name)
            if cap is None:
                ctx.problem(f"{where}: request {r.get('name')} asks for capacity {name!r}; the published devices offer {sorted(capacity)}")
                continue
            value, have = quantity(q), quantity(cap["value"])
            rng = cap.get("requestPolicy", {}).get("validRange", {})
            lo, step = quantity(rng.get("min", 0)), quantity(rng.get("step", 1))
            if value is None:
                ctx.problem(f"{where}: {name} {q!r} is not a whole quantity")
            elif not lo <= value <= have or (value - lo) % step:
                ctx.problem(f"{where}: {name} {q} is outside what a device has ({rng.get('min')} to {cap['value']} in steps of {rng.get('step')})")
    check_opaque(ctx, where, spec.get("devices", {}).get("config"), driver)


def check_meaning(ctx: Context):
    driver = check_driver(ctx) or "gpuslice.dev"
    classes = {}
    for d in ctx.m.docs:
        if d.kind == "DeviceClass":
            exprs = [s.get("cel", {}).get("expression", "") for s in d.obj.get("spec", {}).get("selectors", [])]
            if not any(f'device.driver == "{driver}"' in e for e in exprs):
                ctx.problem(f"{d.where}: selects no device of {driver} (its CEL: {exprs})")
            else:
                classes[d.name] = driver
            check_opaque(ctx, d.where, d.obj.get("spec", {}).get("config"), driver)
    if not classes:
        ctx.problem(f"dra: no DeviceClass selects {driver}")
    claims, templates = set(), set()
    for d in ctx.m.docs:
        if d.kind == "ResourceClaim":
            claims.add(d.name)
            check_claim_spec(ctx, d.where, d.obj.get("spec", {}), classes, driver)
        elif d.kind == "ResourceClaimTemplate":
            templates.add(d.name)
            check_claim_spec(ctx, d.where, d.obj.get("spec", {}).get("spec", {}), classes, driver)
    for pod in ctx.m.pods():
        entries = {rc.get("name"): rc for rc in pod.spec.get("resourceClaims", [])}
        if not entries:
            continue
        for name, rc in entries.items():
            if "resourceClaimName" in rc and rc["resourceClaimName"] not in claims:
                ctx.problem(f"{pod.where()}: resourceClaims {name} names claim {rc['resourceClaimName']!r}, which is not defined")
            if "resourceClaimTemplateName" in rc and rc["resourceClaimTemplateName"] not in templates:
                ctx.problem(f"{pod.where()}: resourceClaims {name} names template {rc['resourceClaimTemplateName']!r}, which is not defined")
        for c in pod.containers():
            for cl in c.get("resources", {}).get("claims", []):
                if cl.get("name") not in entries:
                    ctx.problem(f"{pod.where(c)}: uses claim {cl.get('name')!r}, which the pod's resourceClaims do not list")
            if c.get("resources", {}).get("claims") and not (effective(pod, c, "runAsNonRoot") or (effective(pod, c, "runAsUser") or 0) > 0):
                ctx.problem(f"{pod.where(c)}: runs as root; a root process could change any group's limits through the socket")


def meaning(manifests: Manifests, slice_obj: dict | None) -> list[str]:
    ctx = Context(manifests, slice_obj)
    check_meaning(ctx)
    return ctx.problems


# --------------------------------------------------------------------------- self-test mutations


def _doc(m, kind, name):
    return m.find(kind, name).obj


def _plugin(m):
    return plugin_container(m)[1]


def _set_flag(m, flag, value):
    c = _plugin(m)
    c["args"] = [a for a in c["args"] if not a.startswith(f"--{flag}=")] + [f"--{flag}={value}"]


def _template_caps(m):
    return _doc(m, "ResourceClaimTemplate", "gpu-8gi-30")["spec"]["spec"]["devices"]["requests"][0]["exactly"]["capacity"]["requests"]


MUTATIONS = [
    ("class of another driver", lambda m: _doc(m, "DeviceClass", "gpuslice.dev")["spec"]["selectors"][0]["cel"].update(expression='device.driver == "gpu.nvidia.com"'), "selects no device"),
    ("more memory than a GPU has", lambda m: _template_caps(m).update(memory="200Gi"), "outside what a device has"),
    ("memory off its steps", lambda m: _template_caps(m).update(memory="1536Ki"), "outside what a device has"),
    ("a share over 100", lambda m: _template_caps(m).update(sm="130"), "outside what a device has"),
    ("HAMi's capacity name", lambda m: _template_caps(m).update(cores="30"), "asks for capacity 'cores'"),
    ("an smMax that is not a cap", lambda m: _doc(m, "ResourceClaim", "batch-gpu")["spec"]["devices"]["config"][0]["opaque"]["parameters"].update(smMax="most"), "is not a percentage"),
    ("a misspelt priority", lambda m: _doc(m, "ResourceClaim", "batch-gpu")["spec"]["devices"]["config"][0]["opaque"]["parameters"].update(priority="urgent"), "is not high, normal or low"),
    ("an unknown config key", lambda m: _doc(m, "DeviceClass", "gpuslice.dev")["spec"]["config"][0]["opaque"]["parameters"].update(smCap=50), "which gpuslice-dra refuses"),
    ("a missing template", lambda m: pod_of(m.find("Deployment", "inference")).spec["resourceClaims"][0].update(resourceClaimTemplateName="gpu-8gi"), "which is not defined"),
    ("a container's claim not in the pod", lambda m: _doc(m, "Pod", "batch")["spec"]["containers"][1]["resources"]["claims"][0].update(name="gpus"), "do not list"),
    ("CDI specs written inside the container", lambda m: _set_flag(m, "cdi-dir", "/etc/cdi"), "--cdi-dir /etc/cdi"),
    ("the registration socket elsewhere", lambda m: _set_flag(m, "registrar-dir", "/var/lib/kubelet/plugins"), "--registrar-dir"),
    ("another controller socket", lambda m: _set_flag(m, "controller-socket", "/tmp/gpuslice.sock"), "--controller-socket"),
    ("a library the installer does not write", lambda m: _set_flag(m, "host-library", "/usr/lib/libgpuslice.so"), "--host-library"),
    ("a workload as root", lambda m: _doc(m, "Pod", "batch")["spec"]["securityContext"].update(runAsNonRoot=False, runAsUser=0), "runs as root"),
]


def self_test(manifests: Manifests, slice_obj: dict | None) -> tuple[int, list[str]]:
    missed = []
    for name, mutate, words in MUTATIONS:
        m = manifests.copy()
        mutate(m)
        found = meaning(m, copy.deepcopy(slice_obj))
        if not any(words in p for p in found):
            missed.append(f"dra self-test: {name}: no problem says {words!r} (got {found})")
    return len(MUTATIONS), missed


def check(examples: pathlib.Path, artefacts: pathlib.Path, cdi_schema: pathlib.Path) -> tuple[list[str], list[str]]:
    """(notes, problems) for the DRA example and the plugin's published objects."""
    manifests = Manifests.load(examples)
    problems, notes = [], []
    for doc in manifests.docs:
        problems += validate_schemas(doc.obj, doc.where)
    notes.append(f"dra schema: {len(manifests.docs)} objects in {len(manifests.files)} files, strict, Kubernetes {' and '.join(SCHEMA_VERSIONS)}")
    slice_file = artefacts / "resourceslice.json"
    slice_obj = None
    if not slice_file.is_file():
        problems.append(f"dra: {slice_file} is missing: run `cargo test -p gpuslice-dra` first (it saves what the plugin published)")
    else:
        slice_obj = json.loads(slice_file.read_text())
        problems += validate_schemas(slice_obj, f"published {slice_obj.get('kind')}/{slice_obj.get('metadata', {}).get('name')}")
        notes.append(f"dra published ResourceSlice: {len(slice_obj.get('spec', {}).get('devices', []))} devices, strict, Kubernetes {' and '.join(SCHEMA_VERSIONS)}")
    specs = sorted((artefacts / "cdi").glob("*.json"))
    if not specs:
        problems.append(f"dra: no CDI spec in {artefacts / 'cdi'}: run `cargo test -p gpuslice-dra` first")
    validator = cdi_validator(cdi_schema)
    for s in specs:
        problems += check_cdi(json.loads(s.read_text()), s.name, validator)
    notes.append(f"dra CDI specs: {len(specs)} against the CDI schema")
    problems += meaning(manifests, slice_obj)
    caught, missed = self_test(manifests, slice_obj)
    bad_cdi = {"cdiVersion": "1.1.0", "kind": "gpuslice.dev", "devices": [{"name": "-x", "containerEdits": {"env": "LD_PRELOAD=x"}}]}
    if len(check_cdi(bad_cdi, "self-test", validator)) < 3:
        missed.append("dra self-test: a broken CDI spec (no class, bad device name, env not a list) was not reported three times")
    notes.append(f"dra self-test: {caught + 1} broken copies, each reported")
    problems += missed
    return notes, problems
