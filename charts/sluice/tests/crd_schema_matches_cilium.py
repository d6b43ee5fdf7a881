#!/usr/bin/env python3
"""The chart's CiliumEnvoyConfig CRDs must be Cilium's CRDs.

Renders the chart with crds.install=true and compares each CRD with the one
Cilium generates (read in place from the reference corpus beside the
repository): group, names, scope and the complete versions list (served,
storage, subresources, printer columns and the openAPIV3Schema). Any
difference means objects accepted by one API server could be rejected by the
other, or that the Cilium operator would fight Helm over the CRD.

Exit status: 0 when equal or when the corpus is absent (a loud SKIP line is
printed), 1 on any difference.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chartlib  # noqa: E402

CRD_SUBDIR = Path("cilium/pkg/k8s/apis/cilium.io/client/crds/v2")
CRDS = ("ciliumenvoyconfigs.cilium.io", "ciliumclusterwideenvoyconfigs.cilium.io")
COMPARED_SPEC_FIELDS = ("group", "names", "scope", "versions")


def differences(want: Any, got: Any, path: str = "") -> list[str]:
    """Structural differences between two YAML values, as readable paths."""
    if isinstance(want, dict) and isinstance(got, dict):
        out: list[str] = []
        for key in sorted(set(want) | set(got), key=str):
            sub = f"{path}.{key}"
            if key not in got:
                out.append(f"{sub}: missing in the chart (Cilium has {want[key]!r:.80})")
            elif key not in want:
                out.append(f"{sub}: not in Cilium's CRD (chart has {got[key]!r:.80})")
            else:
                out.extend(differences(want[key], got[key], sub))
        return out
    if isinstance(want, list) and isinstance(got, list):
        if len(want) != len(got):
            return [f"{path}: {len(want)} items in Cilium's CRD, {len(got)} in the chart"]
        out = []
        for i, (w, g) in enumerate(zip(want, got)):
            out.extend(differences(w, g, f"{path}[{i}]"))
        return out
    if isinstance(want, str) and isinstance(got, str) and want != got:
        at = next((i for i, (w, g) in enumerate(zip(want, got)) if w != g), min(len(want), len(got)))
        lo = max(0, at - 30)
        return [
            f"{path}: strings differ at character {at}: "
            f"Cilium ...{want[lo:at + 30]!r}... != chart ...{got[lo:at + 30]!r}..."
        ]
    if want != got or type(want) is not type(got):
        return [f"{path}: Cilium {want!r:.120} != chart {got!r:.120}"]
    return []


def self_test() -> None:
    """The comparison must notice a change deep in the schema, or it proves nothing."""
    a = {"v": [{"schema": {"p": {"type": "string", "enum": ["In", "NotIn"]}}}]}
    b = copy.deepcopy(a)
    assert differences(a, b) == [], "identical values reported as different"
    b["v"][0]["schema"]["p"]["enum"].append("Exists")
    assert differences(a, b), "an added enum value went unnoticed"
    c = copy.deepcopy(a)
    c["v"][0]["schema"]["p"]["type"] = "integer"
    assert differences(a, c), "a changed type went unnoticed"


def main() -> int:
    self_test()
    crd_dir = chartlib.corpus_dir() / CRD_SUBDIR
    if not crd_dir.is_dir():
        print(
            "SKIP !!! crd_schema_matches_cilium: Cilium's CRDs not found at "
            f"{crd_dir} (set SLUICE_CORPUS_DIR); the CRD schema was NOT compared !!!"
        )
        return 0

    rendered = chartlib.render({"crds": {"install": True}})
    chart_crds = {o["metadata"]["name"]: o for o in chartlib.find(rendered, "CustomResourceDefinition")}
    not_installed = chartlib.render({"crds": {"install": False}})
    if chartlib.find(not_installed, "CustomResourceDefinition"):
        print("FAIL crds.install=false still renders CustomResourceDefinitions")
        return 1

    failed = 0
    for name in CRDS:
        upstream_file = crd_dir / f"{name.split('.')[0]}.yaml"
        upstream = yaml.safe_load(upstream_file.read_text())
        if name not in chart_crds:
            print(f"FAIL {name}: not rendered by the chart with crds.install=true")
            failed += 1
            continue
        ours = chart_crds[name]
        diffs = []
        if upstream["metadata"]["name"] != name:
            diffs.append(f"metadata.name: corpus file holds {upstream['metadata']['name']}")
        for field in COMPARED_SPEC_FIELDS:
            diffs.extend(differences(upstream["spec"].get(field), ours["spec"].get(field), f"spec.{field}"))
        if diffs:
            failed += 1
            print(f"FAIL {name} differs from {upstream_file}:")
            for d in diffs:
                print(f"  {d}")
        else:
            served = [v["name"] for v in ours["spec"]["versions"] if v.get("served")]
            print(f"ok   {name}: group, names, scope and versions {served} equal Cilium's")

    extra = sorted(set(chart_crds) - set(CRDS))
    if extra:
        print(f"FAIL unexpected CRDs rendered: {extra}")
        failed += 1
    print(f"crd_schema_matches_cilium: {len(CRDS) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
