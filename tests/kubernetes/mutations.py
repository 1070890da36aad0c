"""The rules' self-test: each mutation breaks one thing in a copy of the manifests, the way a
user could, and the rules must report it (the expected words must appear in a problem)."""

import pathlib

import rules
from model import Manifests, pod_of


def template(m: Manifests, kind: str, name: str):
    pod = pod_of(m.find(kind, name))
    return pod.meta, pod.spec


def container(m: Manifests, kind: str, name: str, index: int = 0) -> dict:
    return template(m, kind, name)[1]["containers"][index]


def env_entry(c: dict, name: str) -> dict:
    return next(e for e in c["env"] if e["name"] == name)


def volume(m: Manifests, kind: str, name: str, volume_name: str) -> dict:
    return next(v for v in template(m, kind, name)[1]["volumes"] if v["name"] == volume_name)


def misspelt_annotation(m):
    meta, _ = template(m, "Deployment", "inference")
    meta["annotations"]["gpuslice.io/memory-limits"] = meta["annotations"].pop("gpuslice.io/memory-limit")


def unknown_variable(m):
    container(m, "Deployment", "inference")["env"].append({"name": "GPUSLICE_MEMORY", "value": "8GiB"})


def unparsable_limit(m):
    template(m, "Deployment", "inference")[0]["annotations"]["gpuslice.io/memory-limit"] = "20 GB please"


def reference_before_definition(m):
    env = container(m, "Deployment", "inference")["env"]
    group = env_entry({"env": env}, "GPUSLICE_GROUP")
    env.remove(group)
    env.insert(0, group)


def long_group_name(m):
    m.find("Deployment", "inference").obj["metadata"]["name"] = "inference-" + "x" * 50


def preload_elsewhere(m):
    env_entry(container(m, "Deployment", "inference"), "LD_PRELOAD")["value"] = "/usr/local/lib/libgpuslice.so"


def library_may_be_missing(m):
    volume(m, "Deployment", "inference", "gpuslice-library")["hostPath"]["type"] = "FileOrCreate"


def socket_file_mounted(m):
    c = container(m, "Deployment", "inference")
    next(v for v in c["volumeMounts"] if v["name"] == "gpuslice-socket")["mountPath"] = "/run/gpuslice/gpuslice.sock"
    volume(m, "Deployment", "inference", "gpuslice-socket")["hostPath"]["path"] = "/run/gpuslice/gpuslice.sock"


def socket_elsewhere(m):
    volume(m, "Deployment", "inference", "gpuslice-socket")["hostPath"]["path"] = "/var/run/gpuslice-old"


def ledger_exposed(m):
    _, spec = template(m, "Deployment", "inference")
    spec["volumes"].append({"name": "shm", "hostPath": {"path": "/dev/shm"}})


def root_workload(m):
    _, spec = template(m, "Deployment", "inference")
    spec["securityContext"] = {"runAsUser": 0}


def controller_without_host_pid(m):
    del template(m, "DaemonSet", "gpuslice")[1]["hostPID"]


def ledger_in_the_pod(m):
    cm = m.find("ConfigMap", "gpuslice-config").obj
    cm["data"]["config.toml"] = cm["data"]["config.toml"].replace('"/dev/shm/gpuslice/ledger"', '"/var/lib/gpuslice/ledger"')


def bad_controller_config(m):
    cm = m.find("ConfigMap", "gpuslice-config").obj
    cm["data"]["config.toml"] += "\n[groups.batch]\nmemory_limt = \"4GiB\"\n"


def copy_in_place(m):
    _, spec = template(m, "DaemonSet", "gpuslice")
    spec["initContainers"][0]["args"] = ['set -eu; cp /usr/lib/libgpuslice.so "$DEST/libgpuslice.so"']


def stale_image_tag(m):
    template(m, "DaemonSet", "gpuslice")[1]["containers"][0]["image"] = "gpuslice:0.0.9"


def hami_without_disable_control(m):
    c = m.find("Pod", "hami-inference").obj["spec"]["containers"][0]
    c["env"] = [e for e in c["env"] if e["name"] != "CUDA_DISABLE_CONTROL"]


def hami_limit_in_pod(m):
    c = m.find("Pod", "hami-inference").obj["spec"]["containers"][0]
    c["env"].append({"name": "CUDA_DEVICE_MEMORY_LIMIT", "value": "4g"})


def no_time_slicing(m):
    cm = m.find("ConfigMap", "time-slicing").obj
    cm["data"]["any"] = cm["data"]["any"].replace("replicas: 4", "replicas: 1")


# (mutation, words that must appear in one reported problem)
MUTATIONS = [
    (misspelt_annotation, "does not have (it would be empty: no limit)"),
    (unknown_variable, "GPUSLICE_MEMORY is not a variable gpuslice reads"),
    (unparsable_limit, "GPUSLICE_MEMORY_LIMIT=\"20 GB please\""),
    (reference_before_definition, "refers to $(POD_NAMESPACE), which is not defined before it"),
    (long_group_name, "GPUSLICE_GROUP="),
    (preload_elsewhere, "but the DaemonSet installs the library at"),
    (library_may_be_missing, "needs type: File"),
    (socket_file_mounted, "not the socket file"),
    (socket_elsewhere, "but the controller listens on"),
    (ledger_exposed, "exposes the controller's ledger"),
    (root_workload, "runs as root"),
    (controller_without_host_pid, "hostPID must be true"),
    (ledger_in_the_pod, "is not on a hostPath volume: a restarted controller"),
    (bad_controller_config, "check-config refuses it"),
    (copy_in_place, "must be renamed into place"),
    (stale_image_tag, "is not tagged with this release's version"),
    (hami_without_disable_control, "set CUDA_DISABLE_CONTROL=true"),
    (hami_limit_in_pod, "is HAMi's to inject"),
    (no_time_slicing, "lets no two pods share a GPU"),
]


def run(manifests: Manifests, truth: rules.Truth, gpuslice: pathlib.Path) -> tuple[int, list[str]]:
    """Returns how many mutations were caught and a problem for each one that was not."""
    missed = []
    for mutate, words in MUTATIONS:
        broken = manifests.copy()
        mutate(broken)
        problems = rules.check(broken, truth, gpuslice).problems
        if not any(words in p for p in problems):
            missed.append(f"self-test: the rules did not catch {mutate.__name__} (expected a problem with {words!r}; got {problems or 'none'})")
    return len(MUTATIONS) - len(missed), missed
