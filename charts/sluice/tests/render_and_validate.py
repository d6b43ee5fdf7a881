#!/usr/bin/env python3
"""Render the chart in every CI scenario and validate the output offline.

Scenarios: the default values, then every ci/*-values.yaml file (the
chart-testing convention). For each scenario:

1. render with the Helm v4 engine (helm-python-sdk) and write every manifest
   to OUT_DIR/<scenario>/;
2. validate every object with `kubernetes-validate --strict` against each
   Kubernetes version in KUBE_VERSIONS. kubernetes-validate ships schemas for
   built-in kinds only and merely warns (exit 0) on other kinds, so custom
   resources are split off and validated against the strict schemas in
   tests/schemas/; a kind with no schema at all fails the run;
3. check what the chart promises (hostNetwork, probes, RBAC scope, fast-path
   capabilities and mounts, flags, Service/ServiceMonitor wiring, dashboard
   ConfigMap) against the merged values.

Then values the chart must refuse (schema or template `fail`) are rendered and
must fail, manifests broken on purpose must be rejected by the validators, and
`helm lint --strict` must report no warning.

Usage: render_and_validate.py OUT_DIR
Exit status: 0 when everything passed, 1 otherwise.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chartlib  # noqa: E402

# The chart's floor (Chart.yaml kubeVersion) and the newest release
# kubernetes-validate knows; filled in by main().
KUBE_VERSIONS: list[str] = []
FLOOR_VERSION = "1.30.0"

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"
CR_SCHEMAS = {("monitoring.coreos.com/v1", "ServiceMonitor"): SCHEMA_DIR / "servicemonitor-monitoring-v1.json"}

CGROUP_MOUNT = "/run/sluice/cgroupv2"

# Values that must not render, with a fragment of the expected error.
MUST_FAIL: list[tuple[str, dict[str, Any], str]] = [
    ("unknown fast-path mode", {"fastPath": {"mode": "maybe"}}, "mode"),
    ("no secrets namespace", {"secrets": {"namespaces": []}}, "namespaces"),
    ("misspelt top-level key", {"fastpath": {"mode": "on"}}, "fastpath"),
    ("sampling above 1", {"tracing": {"sampling": 2}}, "sampling"),
    ("OTLP endpoint without scheme", {"tracing": {"otlp": {"endpoint": "jaeger:4317"}}}, "endpoint"),
    ("unknown OTLP protocol", {"tracing": {"otlp": {"protocol": "thrift"}}}, "protocol"),
    ("port out of range", {"metrics": {"port": 70000}}, "port"),
    (
        "ServiceMonitor without the metrics Service",
        {"serviceMonitor": {"enabled": True}, "metrics": {"service": {"enabled": False}}},
        "metrics.service.enabled",
    ),
]


class Failures:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, scenario: str, msg: str) -> None:
        self.items.append(f"[{scenario}] {msg}")


def load_scenarios() -> list[tuple[str, dict[str, Any]]]:
    import helm_python as helm

    scenarios: list[tuple[str, dict[str, Any]]] = [("default", {})]
    for f in sorted((chartlib.CHART_DIR / "ci").glob("*-values.yaml")):
        # Parsed by Helm's own values reader, so YAML 1.1 quirks (on/off as
        # booleans) reach the templates exactly as with `helm -f`.
        scenarios.append((f.name.removesuffix("-values.yaml"), helm.values_from_yaml(f.read_text())))
    return scenarios


# --------------------------------------------------------------- validation


def split_docs(objs: list[tuple[str, dict[str, Any]]]) -> tuple[list[dict], list[dict]]:
    builtin, custom = [], []
    for _, o in objs:
        (custom if (o.get("apiVersion"), o.get("kind")) in CR_SCHEMAS else builtin).append(o)
    return builtin, custom


def kubernetes_validate(files: list[Path]) -> tuple[bool, list[str]]:
    """Run the kubernetes-validate CLI in strict mode; any ERROR or WARN line fails."""
    cmd = ["kubernetes-validate", "--strict", "--quiet"]
    for v in KUBE_VERSIONS:
        cmd += ["-k", v]
    proc = subprocess.run(cmd + [str(f) for f in files], capture_output=True, text=True, check=False)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    bad = [line for line in lines if not line.startswith("INFO")]
    return proc.returncode == 0 and not bad, bad or ([f"exit status {proc.returncode}"] if proc.returncode else [])


def validate_custom(obj: dict[str, Any]) -> list[str]:
    import jsonschema

    schema_file = CR_SCHEMAS[(obj["apiVersion"], obj["kind"])]
    schema = json.loads(schema_file.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    return [
        f"{obj['kind']}/{obj['metadata']['name']}: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validator.iter_errors(obj)
    ]


# --------------------------------------------------------------- chart behaviour


def flags_of(args: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for a in args:
        if a.startswith("--"):
            key, _, value = a.partition("=")
            out.setdefault(key, []).append(value)
    return out


def host_port(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def check_behaviour(name: str, values: dict[str, Any], rendered: dict[str, str], fail: Callable[[str], None]) -> None:
    ns = chartlib.RELEASE_NAMESPACE

    ds_list = chartlib.find(rendered, "DaemonSet")
    if len(ds_list) != 1:
        fail(f"expected one DaemonSet, got {len(ds_list)}")
        return
    ds = ds_list[0]
    pod = ds["spec"]["template"]["spec"]
    c = pod["containers"][0]
    flags = flags_of(c["args"])

    def expect(cond: bool, msg: str) -> None:
        if not cond:
            fail(msg)

    # DaemonSet basics.
    expect(c["args"][:2] == ["run", "--kubernetes"], f"args start {c['args'][:2]}, want run --kubernetes")
    expect(pod.get("hostNetwork") is True, "hostNetwork is not true")
    expect(pod.get("dnsPolicy") == "ClusterFirstWithHostNet", f"dnsPolicy {pod.get('dnsPolicy')}")
    expect(pod.get("priorityClassName") == "system-node-critical", "priorityClassName is not system-node-critical")
    expect({"operator": "Exists"} in (pod.get("tolerations") or []), "no toleration for every taint")
    strategy = ds["spec"]["updateStrategy"]
    expect(
        strategy.get("type") == "RollingUpdate" and "maxUnavailable" in strategy.get("rollingUpdate", {}),
        f"updateStrategy {strategy}",
    )
    expect(pod.get("terminationGracePeriodSeconds", 0) >= 10, "terminationGracePeriodSeconds too short to drain")
    env = {e["name"]: e for e in c.get("env", [])}
    expect(
        env.get("NODE_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "spec.nodeName",
        "NODE_NAME does not come from spec.nodeName",
    )
    expect(flags.get("--node-name") == ["$(NODE_NAME)"], f"--node-name {flags.get('--node-name')}")
    expect(
        labels_match(ds["spec"]["selector"]["matchLabels"], ds["spec"]["template"]["metadata"]["labels"]),
        "DaemonSet selector does not match its pod labels",
    )

    # Ports, probes and listen flags.
    ports = {p["name"]: p for p in c.get("ports", [])}
    for key, port_name in (("metrics", "metrics"), ("health", "health")):
        want = int(values[key]["port"])
        p = ports.get(port_name, {})
        expect(p.get("containerPort") == want and p.get("hostPort") == want, f"port {port_name} is {p}, want {want}")
    for flag, key in (("--admin-address", "admin"), ("--health-address", "health"), ("--metrics-address", "metrics")):
        want = host_port(str(values[key]["address"]), int(values[key]["port"]))
        expect(flags.get(flag) == [want], f"{flag} {flags.get(flag)}, want {want}")
    health_addr = str(values["health"]["address"])
    probe_host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(health_addr, health_addr)
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = (c.get(probe) or {}).get("httpGet", {})
        expect(
            get.get("path") == "/healthz" and get.get("port") == "health" and get.get("host") == probe_host,
            f"{probe} is {get}, want GET {probe_host} health /healthz",
        )

    # Flags from values.
    want_ns = list(dict.fromkeys(values["secrets"]["namespaces"]))
    expect(flags.get("--secrets-namespace") == want_ns, f"--secrets-namespace {flags.get('--secrets-namespace')}, want {want_ns}")
    mode = values["fastPath"]["mode"]
    mode = {True: "on", False: "off"}.get(mode, mode) if isinstance(mode, bool) else mode
    expect(flags.get("--fast-path") == [mode], f"--fast-path {flags.get('--fast-path')}, want {mode}")
    endpoint = values["tracing"]["otlp"]["endpoint"]
    if endpoint:
        expect(flags.get("--otlp-endpoint") == [endpoint], f"--otlp-endpoint {flags.get('--otlp-endpoint')}")
        expect(flags.get("--otlp-protocol") == [values["tracing"]["otlp"]["protocol"]], "--otlp-protocol")
        sampling = flags.get("--trace-sampling", ["nan"])[0]
        expect(float(sampling) == float(values["tracing"]["sampling"]), f"--trace-sampling {sampling}")
    else:
        expect(not any(f.startswith("--otlp") or f == "--trace-sampling" for f in flags), "OTLP flags without endpoint")
    workers = int(values["proxy"]["workers"])
    expect(flags.get("--workers") == ([str(workers)] if workers else None), f"--workers {flags.get('--workers')}")
    for extra in values["proxy"]["extraArgs"]:
        expect(str(extra) in c["args"], f"extra arg {extra} missing")

    # Security context and fast-path mounts.
    sc = c.get("securityContext", {})
    caps = sc.get("capabilities", {})
    expect(caps.get("drop") == ["ALL"], f"capabilities.drop {caps.get('drop')}, want [ALL]")
    expect(sc.get("readOnlyRootFilesystem") is True, "root filesystem is writable")
    expect(sc.get("privileged") is not True, "container is privileged")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
    host_paths = {v["hostPath"]["path"] for v in volumes.values() if "hostPath" in v}
    if mode == "off":
        expect(sc.get("runAsNonRoot") is True and sc.get("runAsUser", 0) != 0, "fast path off but not non-root")
        expect(not caps.get("add"), f"fast path off but capabilities added: {caps.get('add')}")
        expect(sc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation not false")
        expect(not host_paths, f"fast path off but hostPath volumes {host_paths}")
        expect("--fast-path-cgroup" not in flags, "--fast-path-cgroup without fast path")
    else:
        want_caps = values["fastPath"]["capabilities"]
        expect(caps.get("add") == want_caps, f"capabilities.add {caps.get('add')}, want {want_caps}")
        expect(not {"PERFMON", "SYS_PTRACE", "ALL"} & set(caps.get("add", [])), "unneeded capability added")
        expect(sc.get("runAsUser") == 0, "fast path needs root (capabilities are granted to root only)")
        if "SYS_ADMIN" in want_caps:
            expect("allowPrivilegeEscalation" not in sc, "allowPrivilegeEscalation=false with SYS_ADMIN is rejected by the API server")
        else:
            expect(sc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation not false")
        expect(flags.get("--fast-path-cgroup") == [CGROUP_MOUNT], f"--fast-path-cgroup {flags.get('--fast-path-cgroup')}")
        cg = mounts.get(CGROUP_MOUNT)
        expect(
            cg is not None and cg.get("readOnly") is True
            and volumes.get(cg["name"], {}).get("hostPath", {}).get("path") == values["fastPath"]["cgroupRoot"],
            f"cgroup2 root not mounted read-only from {values['fastPath']['cgroupRoot']} at {CGROUP_MOUNT}",
        )
        bpf = mounts.get("/sys/fs/bpf")
        expect(
            bpf is not None and volumes.get(bpf["name"], {}).get("hostPath", {}).get("path") == values["fastPath"]["bpfRoot"],
            "bpffs not mounted at /sys/fs/bpf",
        )
        expect(host_paths == {values["fastPath"]["bpfRoot"], values["fastPath"]["cgroupRoot"]}, f"hostPaths {host_paths}")

    # RBAC: cluster-wide read of config, never Secrets; Secrets per namespace.
    sa_name = pod["serviceAccountName"]
    if values["serviceAccount"]["create"]:
        expect(bool(chartlib.find(rendered, "ServiceAccount", sa_name)), f"ServiceAccount {sa_name} not rendered")
    if values["rbac"]["create"]:
        cr = chartlib.find(rendered, "ClusterRole")
        expect(len(cr) == 1, f"{len(cr)} ClusterRoles")
        granted = {
            (g, r, v)
            for rule in (cr[0]["rules"] if cr else [])
            for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]
        }
        needed = {
            (g, r, v)
            for g, r in (("cilium.io", "ciliumenvoyconfigs"), ("cilium.io", "ciliumclusterwideenvoyconfigs"),
                         ("", "services"), ("discovery.k8s.io", "endpointslices"), ("", "nodes"))
            for v in ("get", "list", "watch")
        } | {(g, "events", v) for g in ("", "events.k8s.io") for v in ("create", "patch")}
        expect(granted == needed, f"ClusterRole grants {sorted(granted - needed)} too many, {sorted(needed - granted)} missing")
        crb = chartlib.find(rendered, "ClusterRoleBinding")
        expect(
            len(crb) == 1 and crb[0]["subjects"] == [{"kind": "ServiceAccount", "name": sa_name, "namespace": ns}],
            "ClusterRoleBinding does not bind the proxy's ServiceAccount",
        )
        roles = {r["metadata"]["namespace"]: r for r in chartlib.find(rendered, "Role")}
        bindings = {b["metadata"]["namespace"]: b for b in chartlib.find(rendered, "RoleBinding")}
        expect(sorted(roles) == sorted(want_ns), f"Secret Roles in {sorted(roles)}, want {sorted(want_ns)}")
        for sns, role in roles.items():
            expect(
                role["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch"]}],
                f"Role in {sns} grants {role['rules']}",
            )
            b = bindings.get(sns)
            expect(
                b is not None and b["roleRef"]["name"] == role["metadata"]["name"]
                and b["subjects"] == [{"kind": "ServiceAccount", "name": sa_name, "namespace": ns}],
                f"RoleBinding in {sns} does not bind the Role to the proxy",
            )
    created_ns = {o["metadata"]["name"] for o in chartlib.find(rendered, "Namespace")}
    want_created = set(want_ns) - {ns} if values["secrets"]["createNamespaces"] else set()
    expect(created_ns == want_created, f"Namespaces created {sorted(created_ns)}, want {sorted(want_created)}")

    # CRDs.
    crds = {o["metadata"]["name"] for o in chartlib.find(rendered, "CustomResourceDefinition")}
    want_crds = {"ciliumenvoyconfigs.cilium.io", "ciliumclusterwideenvoyconfigs.cilium.io"} if values["crds"]["install"] else set()
    expect(crds == want_crds, f"CRDs {sorted(crds)}, want {sorted(want_crds)}")

    # Metrics Service and ServiceMonitor wiring.
    svcs = chartlib.find(rendered, "Service")
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    if values["metrics"]["service"]["enabled"]:
        expect(len(svcs) == 1, f"{len(svcs)} Services")
        svc = svcs[0] if svcs else {"spec": {}, "metadata": {}}
        expect(svc["spec"].get("clusterIP") == "None", "metrics Service is not headless")
        expect(labels_match(svc["spec"].get("selector", {}), pod_labels), "metrics Service does not select the proxy pods")
        expect(
            any(p.get("name") == "metrics" and p.get("port") == int(values["metrics"]["port"]) and p.get("targetPort") == "metrics"
                for p in svc["spec"].get("ports", [])),
            "metrics Service has no port named metrics",
        )
    else:
        expect(not svcs, "metrics Service rendered although disabled")
    sms = chartlib.find(rendered, "ServiceMonitor")
    if values["serviceMonitor"]["enabled"]:
        expect(len(sms) == 1, f"{len(sms)} ServiceMonitors")
        if sms and svcs:
            sm = sms[0]
            expect(labels_match(sm["spec"]["selector"]["matchLabels"], svcs[0]["metadata"]["labels"]), "ServiceMonitor does not select the metrics Service")
            expect(sm["spec"]["namespaceSelector"]["matchNames"] == [svcs[0]["metadata"]["namespace"]], "ServiceMonitor looks in the wrong namespace")
            expect([e["port"] for e in sm["spec"]["endpoints"]] == ["metrics"], "ServiceMonitor endpoint is not port metrics")
            expect(
                sm["metadata"]["namespace"] == (values["serviceMonitor"]["namespace"] or ns),
                f"ServiceMonitor namespace {sm['metadata']['namespace']}",
            )
            for k, v in values["serviceMonitor"]["labels"].items():
                expect(sm["metadata"]["labels"].get(k) == v, f"ServiceMonitor lacks label {k}={v}")
        if svcs:
            expect("prometheus.io/scrape" not in (svcs[0]["metadata"].get("annotations") or {}), "both ServiceMonitor and scrape annotations")
    else:
        expect(not sms, "ServiceMonitor rendered although disabled")
        if svcs:
            expect((svcs[0]["metadata"].get("annotations") or {}).get("prometheus.io/scrape") == "true", "no prometheus.io/scrape annotation")

    # Dashboard ConfigMap.
    cms = chartlib.find(rendered, "ConfigMap")
    if values["dashboards"]["enabled"]:
        expect(len(cms) == 1, f"{len(cms)} ConfigMaps")
        if cms:
            cm = cms[0]
            d = values["dashboards"]
            expect(cm["metadata"]["labels"].get(d["label"]) == str(d["labelValue"]), f"dashboard ConfigMap lacks label {d['label']}")
            expect(cm["metadata"]["namespace"] == (d["namespace"] or ns), f"dashboard ConfigMap namespace {cm['metadata']['namespace']}")
            shipped = sorted(p.name for p in (chartlib.CHART_DIR / "dashboards").glob("*.json"))
            expect(sorted(cm["data"]) == shipped, f"ConfigMap keys {sorted(cm['data'])}, want {shipped}")
            for key in cm["data"]:
                on_disk = json.loads((chartlib.CHART_DIR / "dashboards" / key).read_text())
                expect(json.loads(cm["data"][key]) == on_disk, f"{key} in the ConfigMap differs from the file")
    else:
        expect(not cms, "dashboard ConfigMap rendered although disabled")

    # Image.
    img = values["image"]
    want_image = f"{img['repository']}@{img['digest']}" if img["digest"] else f"{img['repository']}:{img['tag'] or '0.1.0'}"
    expect(c["image"] == want_image, f"image {c['image']}, want {want_image}")


# --------------------------------------------------------------- main


def main() -> int:
    from kubernetes_validate import utils as kv_utils

    import helm_python as helm

    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    latest = kv_utils.latest_version()
    KUBE_VERSIONS[:] = [FLOOR_VERSION] + ([latest] if latest != FLOOR_VERSION else [])
    print(f"Helm SDK {helm.helm_sdk_version()}, kubernetes-validate schemas {', '.join(KUBE_VERSIONS)} (strict)")

    failures = Failures()
    summary: list[tuple[str, int, str, str]] = []
    with helm.Chart.load(str(chartlib.CHART_DIR)) as chart:
        for name, overrides in load_scenarios():
            started = time.monotonic()
            before = len(failures.items)
            fail = lambda msg, n=name: failures.add(n, msg)  # noqa: E731
            try:
                rendered = chart.render(values=overrides, name=chartlib.RELEASE_NAME,
                                        namespace=chartlib.RELEASE_NAMESPACE, is_install=True)
            except helm.HelmError as e:
                fail(f"render failed: {e}")
                summary.append((name, 0, "render failed", ""))
                continue
            values = chart.merge_values(overrides)
            scen_dir = out_dir / name
            scen_dir.mkdir(parents=True, exist_ok=True)
            objs = chartlib.objects(rendered)
            builtin, custom = split_docs(objs)
            builtin_file = scen_dir / "manifests.yaml"
            builtin_file.write_text(yaml.safe_dump_all(builtin, sort_keys=False))
            if custom:
                (scen_dir / "custom-resources.yaml").write_text(yaml.safe_dump_all(custom, sort_keys=False))
            if "sluice/templates/NOTES.txt" in rendered:
                (scen_dir / "NOTES.txt").write_text(rendered["sluice/templates/NOTES.txt"])
            else:
                fail("NOTES.txt not rendered")

            ok, lines = kubernetes_validate([builtin_file])
            for line in lines:
                fail(f"kubernetes-validate: {line}")
            for obj in custom:
                for err in validate_custom(obj):
                    fail(f"custom resource schema: {err}")
            check_behaviour(name, values, rendered, fail)

            kinds: dict[str, int] = {}
            for _, o in objs:
                kinds[o["kind"]] = kinds.get(o["kind"], 0) + 1
            kinds_text = ", ".join(f"{k}x{n}" if n > 1 else k for k, n in sorted(kinds.items()))
            result = "ok" if len(failures.items) == before else f"FAILED ({len(failures.items) - before})"
            summary.append((name, len(objs), result, f"{kinds_text}  [{time.monotonic() - started:.1f}s]"))

        # Values the chart must refuse.
        refused_ok = 0
        for label, overrides, fragment in MUST_FAIL:
            try:
                chart.render(values=overrides, name=chartlib.RELEASE_NAME, namespace=chartlib.RELEASE_NAMESPACE)
            except helm.HelmError as e:
                if fragment in str(e):
                    refused_ok += 1
                else:
                    failures.add("must-fail", f"{label}: refused, but the message does not mention {fragment!r}: {e}")
            else:
                failures.add("must-fail", f"{label}: rendered without error")
        summary.append(("invalid values refused", len(MUST_FAIL), "ok" if refused_ok == len(MUST_FAIL) else "FAILED",
                        f"{refused_ok}/{len(MUST_FAIL)} refused with the expected message"))

    # The validators themselves must reject broken manifests, or a green run means nothing.
    broken_dir = out_dir / "_must_be_rejected"
    broken_dir.mkdir(parents=True, exist_ok=True)
    default_objs = yaml.safe_load_all((out_dir / "default" / "manifests.yaml").read_text())
    ds = next(o for o in default_objs if o and o["kind"] == "DaemonSet")
    ds["spec"]["template"]["spec"]["hostNetwrok"] = True
    broken = broken_dir / "daemonset-unknown-field.yaml"
    broken.write_text(yaml.safe_dump(ds))
    ok, _ = kubernetes_validate([broken])
    rejected = 0 if ok else 1
    if ok:
        failures.add("validator", "kubernetes-validate --strict accepted a DaemonSet with an unknown field")
    sm_objs = list(yaml.safe_load_all((out_dir / "servicemonitor" / "custom-resources.yaml").read_text())) \
        if (out_dir / "servicemonitor" / "custom-resources.yaml").exists() else []
    if sm_objs:
        sm = sm_objs[0]
        sm["spec"]["endpoints"][0]["intervall"] = "30s"
        if validate_custom(sm):
            rejected += 1
        else:
            failures.add("validator", "the ServiceMonitor schema accepted an unknown endpoint field")
    else:
        failures.add("validator", "no ServiceMonitor rendered in scenario servicemonitor")
    summary.append(("broken manifests rejected", 2, "ok" if rejected == 2 else "FAILED", f"{rejected}/2 rejected"))

    # helm lint, strict, at the chart's Kubernetes floor.
    report = helm.lint(str(chartlib.CHART_DIR), strict=True, kube_version=f"v{FLOOR_VERSION}")
    problems = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2] + [
        {"path": "", "error": e} for e in report.get("errors", [])
    ]
    for m in problems:
        failures.add("lint", f"{m.get('path')}: {m.get('error')}")
    summary.append(("helm lint --strict", report.get("total_charts_linted", 0), "ok" if not problems else "FAILED",
                    f"{len(report.get('messages', []))} message(s), {len(problems)} warning/error"))

    width = max(len(s[0]) for s in summary)
    print()
    print(f"{'scenario'.ljust(width)}  objects  result  details")
    for name, count, result, details in summary:
        print(f"{name.ljust(width)}  {count:7d}  {result:6s}  {details}")
    print(f"\nrendered manifests written to {out_dir}")
    if failures.items:
        print(f"\n{len(failures.items)} failure(s):")
        for f in failures.items:
            print(f"  FAIL {f}")
    passed = sum(1 for s in summary if s[2] == "ok")
    print(f"render_and_validate: {passed} passed, {len(summary) - passed} failed")
    return 1 if failures.items else 0


if __name__ == "__main__":
    sys.exit(main())
