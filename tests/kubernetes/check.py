#!/usr/bin/env python3
"""Checks the Kubernetes examples in examples/kubernetes (`make check-k8s`).

1. Schema: every manifest validates, strictly (an unknown or misspelt field is an error),
   against the Kubernetes API schemas bundled with the pinned kubernetes-validate package, for the
   oldest and the newest Kubernetes version named in SCHEMA_VERSIONS.
2. Meaning (rules.py): the manifests agree with what gpuslice reads and with each other: only
   variables the shim knows, values its own parser accepts (the built `gpuslice check-config`
   reads each pod's resolved environment), annotations that the Downward API references exist,
   LD_PRELOAD names the file the DaemonSet's init container puts on the node, workloads mount the
   controller's socket directory and not its ledger, and so on.
3. Self-test (mutations.py): the same rules run on broken copies of the manifests, one mistake
   each, and must report that mistake; a rule that cannot fail checks nothing.

Usage: check.py --gpuslice target/debug/gpuslice
"""

import argparse
import pathlib
import sys

import kubernetes_validate

import dra
import mutations
import rules
from model import Manifests

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
EXAMPLES = ROOT / "examples" / "kubernetes"
SCHEMA_VERSIONS = ["1.29", "1.37"]


def check_schemas(manifests: Manifests) -> list[str]:
    problems = []
    for doc in manifests.docs:
        for version in SCHEMA_VERSIONS:
            try:
                kubernetes_validate.validate(doc.obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                problems.append(f"{doc.where}: not valid for Kubernetes {version}: {path}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                problems.append(f"{doc.where}: no schema for Kubernetes {version}: {e}")
    return problems


def main() -> int:
    if sys.version_info < (3, 11):
        print("check-k8s: needs Python 3.11 or newer (tomllib)", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpuslice", required=True, help="the built gpuslice binary (its check-config parses the settings)")
    parser.add_argument("--dra-artefacts", default=str(ROOT / "target" / "dra"), help="what `cargo test -p gpuslice-dra` saved: the published ResourceSlice and CDI specs")
    args = parser.parse_args()
    gpuslice = pathlib.Path(args.gpuslice).resolve()
    if not gpuslice.is_file():
        print(f"check-k8s: {gpuslice} is not built", file=sys.stderr)
        return 2

    truth = rules.Truth.from_sources(ROOT)
    manifests = Manifests.load(EXAMPLES)
    problems = check_schemas(manifests)
    print(f"schema: {len(manifests.docs)} objects in {len(manifests.files)} files, strict, Kubernetes {' and '.join(SCHEMA_VERSIONS)}")

    report = rules.check(manifests, truth, gpuslice)
    problems += report.problems
    for line in report.notes:
        print(line)

    caught, missed = mutations.run(manifests, truth, gpuslice)
    print(f"self-test: {caught} broken copies of the manifests, each reported")
    problems += missed

    notes, dra_problems = dra.check(EXAMPLES / "dra", pathlib.Path(args.dra_artefacts), pathlib.Path(__file__).resolve().parent / "cdi-schema")
    for line in notes:
        print(line)
    problems += dra_problems

    for p in problems:
        print(f"PROBLEM {p}")
    if problems:
        print(f"check-k8s: {len(problems)} problem(s)")
        return 1
    print("check-k8s: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
