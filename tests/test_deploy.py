"""Deployment and observability files, checked offline: no cluster, no Docker engine, no network.

- The Helm chart (deploy/helm/baton) is rendered by Helm's own template engine (the Helm v4 Go
  SDK, through the `helm-python-sdk` wheel), linted, and every manifest is validated against the
  Kubernetes JSON schemas that `kubernetes-validate` ships (strict: unknown fields fail). Then the
  rendered objects are checked for what Baton needs: probes on the ports the services serve,
  commands and BATON_* variables the CLI knows, the planner's RBAC, auth wiring.
- compose.yaml's `observability` profile (and compose.observability.yaml) is validated by Compose,
  prometheus.yml by promtool, and the Prometheus targets, Grafana provisioning and mounts are
  checked against each other.
- Every PromQL query of the Grafana dashboard is parsed (`promql-parser`) and may only name
  metrics, and labels, that the code defines (found by reading the source).

Locally a missing tool skips its tests; in CI (CI=true) it fails them. CI needs:
  pip install helm-python-sdk kubernetes-validate promql-parser   (the `test` extra)
  apt-get install -y docker-compose prometheus                     (Compose v1; promtool)
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "baton"
COMPOSE_FILE = ROOT / "compose.yaml"
COMPOSE_OVERRIDE = ROOT / "compose.observability.yaml"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "baton.json"
OTEL_COLLECTOR = ROOT / "deploy" / "otel" / "collector.yaml"
OPERATIONS_DOC = ROOT / "docs" / "operations.md"

BATON_SERVICES = ("frontend", "router", "decode", "prefill", "planner")
OBSERVABILITY = {"prometheus", "grafana", "jaeger"}
CLUSTER_NATS = {"nats-2", "nats-3"}  # compose.yaml's cluster profile: with `nats`, a 3-server NATS
RELEASE, NAMESPACE = "baton", "llm"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _missing(what: str, install: str) -> None:
    msg = f"{what} is not installed ({install})"
    if _in_ci():
        pytest.fail(msg + "; CI must install it")
    pytest.skip(msg)


def _import(module: str, install: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        _missing(f"Python module {module}", install)


# --- the chart ------------------------------------------------------------------------------

# Value sets the chart must render, each to schema-valid manifests.
SECURED = {
    "natsAuth": {"existingSecret": "baton-nats-auth", "userKey": "user", "passwordKey": "password"},
    "nats": {"tls": {"existingSecret": "baton-nats-server-tls", "verifyClients": True}},
    "natsTls": {"existingSecret": "baton-nats-client-tls", "certKey": "tls.crt", "keyKey": "tls.key"},
    "kvTls": {"existingSecret": "baton-kv-tls"},
    "frontend": {"apiKeys": {"existingSecret": "baton-api-keys"}, "rateLimit": {"rpm": 600, "burst": 50},
                 "limits": {"maxPromptTokens": 8192}},
    "tracing": {"otlpEndpoint": "http://otel-collector.observability:4318", "sampler": "parentbased_traceidratio",
                "samplerArg": 0.25},
    "metrics": {"podMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}}},
    "decode": {"resources": {"limits": {"nvidia.com/gpu": 1}}, "env": {"BATON_NUM_BLOCKS": 4096},
               "extraVolumes": [{"name": "models", "persistentVolumeClaim": {"claimName": "models"}}],
               "extraVolumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True}],
               "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
    "model": "/models/some-model",
}
EXTERNAL_NATS = {
    "nats": {"enabled": False},
    "externalNats": {"url": "nats://nats.nats.svc.cluster.local:4222"},
    "natsAuth": {"existingSecret": "baton-nats-creds", "credsKey": "baton.creds"},
    "planner": {"dryRun": True},
}
VALUE_SETS = {
    "defaults": None,
    "secured": SECURED,
    "external-nats": EXTERNAL_NATS,
    "token-auth": {"natsAuth": {"existingSecret": "baton-nats-auth", "tokenKey": "token"}},
    "no-planner": {"planner": {"enabled": False}, "prefill": {"replicas": 0},
                   "frontend": {"podDisruptionBudget": {"enabled": False}}},
    "observe-only-planner": {"planner": {"connector": "none", "policy": "none"}},
}


@functools.cache
def _render_cached(values_json: str) -> tuple[tuple[str, str], ...]:
    helm = _import("helm_python", "pip install helm-python-sdk")
    values = json.loads(values_json)
    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return tuple(sorted(out.items()))


def render(values: dict | None = None) -> list[dict]:
    """The chart's manifests (every YAML document of every template), rendered by Helm."""
    docs = []
    for path, text in _render_cached(json.dumps(values, sort_keys=True)):
        if path.endswith(".yaml"):
            docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def component(name: str) -> str:
    return f"{RELEASE}-{name}"  # the release name contains the chart's: no "baton-baton-"


def container(deploy: dict) -> dict:
    containers = deploy["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, deploy["metadata"]["name"]
    return containers[0]


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def options(args: list[str]) -> dict[str, str | None]:
    """--flag value pairs of a command line (None for a flag followed by another flag)."""
    opts: dict[str, str | None] = {}
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            name, _, value = arg.partition("=")
            if not value and i + 1 < len(args) and not args[i + 1].startswith("--"):
                value = args[i + 1]
            opts[name] = value or None
    return opts


@functools.cache
def _help(command: str) -> str:
    env = {**os.environ, "COLUMNS": "250", "NO_COLOR": "1", "TERM": "dumb"}
    r = subprocess.run([sys.executable, "-m", "baton", command, "--help"], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=60)
    assert r.returncode == 0, f"`baton {command} --help` exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r.stdout



@functools.cache
def _source_env_vars() -> frozenset[str]:
    """BATON_* variables the code reads outside the CLI options (NatsSecurity, API keys, ...)."""
    found: set[str] = set()
    for base in ("shared", "services", "baton"):
        for path in (ROOT / base).rglob("*.py"):
            found.update(re.findall(r"[\"'](BATON_[A-Z0-9_]+)[\"']", path.read_text()))
    return frozenset(found)


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_chart_renders_and_validates_against_kubernetes_schemas(name: str):
    kv = _import("kubernetes_validate", "pip install kubernetes-validate")
    docs = render(VALUE_SETS[name])
    assert docs, "the chart rendered nothing"
    # The chart's minimum (Chart.yaml kubeVersion) and the newest schemas the validator ships.
    minimum = re.search(r"(\d+\.\d+)", yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]).group(1)
    versions = sorted({minimum, kv.latest_version()})
    seen = set()
    for doc in docs:
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in seen, f"{key} rendered twice"
        seen.add(key)
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD of the Prometheus Operator: not in the Kubernetes schemas
        for version in versions:
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as e:
                pytest.fail(f"{name}: {key[0]} {key[1]} is invalid for Kubernetes {version}: {e.message} "
                            f"at {'/'.join(map(str, e.path))}")
        labels = doc["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/instance") == RELEASE, key


def test_chart_lints_clean():
    helm = _import("helm_python", "pip install helm-python-sdk")
    for values in (None, SECURED):
        report = helm.lint(str(CHART), values, strict=True, namespace=NAMESPACE)
        problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error
        assert not problems and not report["errors"], report


def test_chart_is_the_whole_deployment():
    docs = render()
    for svc in BATON_SERVICES:
        dep = one(docs, "Deployment", component(svc))
        assert container(dep)["args"][0] == svc
    # NATS: one JetStream server with its store on a persistent volume.
    sts = one(docs, "StatefulSet", component("nats"))
    nats = container(sts)
    assert nats["image"].startswith("nats:")
    assert "--jetstream" in nats["args"]
    store = options(nats["args"])["--store_dir"]
    assert any(m["mountPath"] == store for m in nats["volumeMounts"])
    claims = [t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]]
    assert [m["name"] for m in nats["volumeMounts"] if m["mountPath"] == store] == claims
    svc = one(docs, "Service", component("nats"))
    assert {p["port"] for p in svc["spec"]["ports"]} >= {4222}
    assert sts["spec"]["serviceName"] in {s["metadata"]["name"] for s in find(docs, "Service")}
    # Everyone talks to every server of that NATS (by the pods' stable names), with 3 JetStream replicas.
    servers = ",".join(f"nats://{component('nats')}-{i}.{component('nats')}-headless.{NAMESPACE}.svc:4222"
                       for i in range(sts["spec"]["replicas"]))
    for svc_name in BATON_SERVICES:
        env = env_of(container(one(docs, "Deployment", component(svc_name))))
        assert env["BATON_NATS_URL"]["value"] == servers, svc_name
        assert env["BATON_JS_REPLICAS"]["value"] == str(sts["spec"]["replicas"]) == "3", svc_name
    # Frontend and workers agree on the model.
    models = {env_of(container(one(docs, "Deployment", component(s))))["BATON_MODEL"]["value"]
              for s in ("frontend", "decode", "prefill")}
    assert models == {"baton-tiny"}


def test_selectors_match_pods():
    docs = render(SECURED)
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
            for d in docs if d["kind"] in ("Deployment", "StatefulSet")}
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            sel = d["spec"]["selector"]["matchLabels"]
            assert sel.items() <= pods[d["metadata"]["name"]].items(), d["metadata"]["name"]
        elif d["kind"] in ("Service", "PodDisruptionBudget"):
            sel = d["spec"]["selector"]
            sel = sel.get("matchLabels", sel)
            matched = [n for n, labels in pods.items() if sel.items() <= labels.items()]
            assert len(matched) == 1, f"{d['kind']} {d['metadata']['name']} selects {matched}"


def _served_port(dep: dict) -> tuple[int, str]:
    """The port a Baton container serves /metrics and /health on, from its own command line."""
    c = container(dep)
    opts = options(c["args"])
    port = int(opts["--port"] if c["args"][0] == "frontend" else opts["--metrics-port"])
    by_number = {p["containerPort"]: p["name"] for p in c["ports"]}
    assert port in by_number, f"{dep['metadata']['name']}: port {port} is not declared"
    return port, by_number[port]


@pytest.mark.parametrize("svc", BATON_SERVICES)
def test_probes_hit_the_health_endpoints_on_the_served_port(svc: str):
    dep = one(render(), "Deployment", component(svc))
    c = container(dep)
    port, port_name = _served_port(dep)
    ready, live = c["readinessProbe"]["httpGet"], c["livenessProbe"]["httpGet"]
    for probe in (ready, live, c["startupProbe"]["httpGet"]):
        assert probe["port"] in (port, port_name), f"{svc}: a probe is on {probe['port']}, /health on {port}"
    assert ready["path"] == "/health", "readiness: /health (frontend: a decode worker is registered)"
    # The frontend has a liveness endpoint that does not depend on the workers.
    assert live["path"] == ("/health/live" if svc == "frontend" else "/health")


@pytest.mark.parametrize("svc", BATON_SERVICES)
def test_pods_are_annotated_for_prometheus(svc: str):
    dep = one(render(), "Deployment", component(svc))
    port, _ = _served_port(dep)
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert ann["prometheus.io/port"] == str(port)
    assert ann["prometheus.io/path"] == "/metrics"


def test_pod_monitor_scrapes_every_service_port():
    docs = render(SECURED)
    pm = one(docs, "PodMonitor", RELEASE)
    ports = {e["port"] for e in pm["spec"]["podMetricsEndpoints"]}
    for svc in BATON_SERVICES:
        _, port_name = _served_port(one(docs, "Deployment", component(svc)))
        assert port_name in ports, svc


def test_frontend_service_exposes_the_api():
    docs = render()
    svc = one(docs, "Service", component("frontend"))
    port, port_name = _served_port(one(docs, "Deployment", component("frontend")))
    assert [p["targetPort"] for p in svc["spec"]["ports"]] in ([port], [port_name])


@pytest.mark.parametrize("values", ["defaults", "secured", "external-nats"])
@pytest.mark.parametrize("svc", BATON_SERVICES)
def test_command_and_env_are_real_cli(svc: str, values: str):
    c = container(one(render(VALUE_SETS[values]), "Deployment", component(svc)))
    args = [str(a) for a in c["args"]]
    assert args[0] == svc
    help_text = _help(svc)
    known = set(re.findall(r"--[a-z][a-z0-9-]*", help_text))
    for opt in options(args):
        assert opt in known, f"{svc}: `baton {svc}` has no option {opt}"
    known_env = set(re.findall(r"BATON_[A-Z0-9_]+", help_text)) | _source_env_vars()
    for name, e in env_of(c).items():
        if name.startswith("BATON_"):
            assert name in known_env, f"{svc}: nothing reads {name}"
        value = e.get("value", "")
        assert not re.fullmatch(r"-?[\d.]+e[+-]\d+", value), f"{svc}: {name}={value} (float formatting)"
    for a in args:
        assert not re.fullmatch(r"-?[\d.]+e[+-]\d+", a), f"{svc}: argument {a} (float formatting)"


def test_workers_reach_each_other_and_run_unprivileged():
    docs = render()
    decode = container(one(docs, "Deployment", component("decode")))
    # Prefill workers send KV to the address decode advertises: the pod IP, not 127.0.0.1.
    assert env_of(decode)["BATON_KV_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    for svc in BATON_SERVICES:
        dep = one(docs, "Deployment", component(svc))
        pod = dep["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert container(dep)["securityContext"]["allowPrivilegeEscalation"] is False
        assert container(dep)["resources"].get("requests"), f"{svc}: resource requests"
        # Services drain for up to 30 s on SIGTERM (shared/runtime.py).
        assert pod["terminationGracePeriodSeconds"] >= 35, svc
        # Only the planner talks to the Kubernetes API.
        assert pod["automountServiceAccountToken"] is (svc == "planner"), svc


def test_pod_disruption_budgets():
    docs = render()
    pdbs = {d["metadata"]["name"]: d for d in find(docs, "PodDisruptionBudget")}
    for name in ("frontend", "router", "decode", "prefill", "nats"):
        pdb = pdbs[component(name)]
        # maxUnavailable, not minAvailable: a budget of one replica must not block node drains.
        assert pdb["spec"].get("maxUnavailable") == 1, name
    assert component("planner") not in pdbs  # one pod, replaced (Recreate) rather than surged


def test_planner_rbac_lets_it_scale_the_worker_deployments():
    docs = render()
    dep = one(docs, "Deployment", component("planner"))
    pod = dep["spec"]["template"]["spec"]
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    args = options([str(a) for a in container(dep)["args"]])
    assert args["--connector"] == "kubernetes"
    targets = {args["--k8s-decode-deployment"], args["--k8s-prefill-deployment"]}
    assert targets == {component("decode"), component("prefill")}
    assert all(find(docs, "Deployment", t) for t in targets)

    sa = one(docs, "ServiceAccount", pod["serviceAccountName"])
    binding = one(docs, "RoleBinding", component("planner"))
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": NAMESPACE}]
    role = one(docs, "Role", binding["roleRef"]["name"])

    def allowed(group: str, resource: str, verb: str, name: str | None = None) -> bool:
        return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"]
                   and (name is None or not r.get("resourceNames") or name in r["resourceNames"])
                   for r in role["rules"])

    for target in targets:  # what KubernetesConnector does: GET and merge-PATCH of the scale subresource
        for verb in ("get", "patch"):
            assert allowed("apps", "deployments/scale", verb, target), f"planner cannot {verb} scale of {target}"
    assert allowed("", "pods", "patch"), "pod-deletion-cost needs patch on pods"
    # Narrow (issue 15): nothing but scaling its own two Deployments and annotating pods.
    assert not allowed("apps", "deployments/scale", "patch", component("frontend")), "only the workers"
    assert not allowed("apps", "deployments", "patch", component("decode")), "no editing the pod template"
    assert not allowed("apps", "deployments/scale", "update", component("decode"))
    for verb in ("get", "list", "delete", "create", "update"):
        assert not allowed("", "pods", verb), f"pods: {verb}"
    assert not any("*" in r["verbs"] or "*" in r["resources"] for r in role["rules"])


def test_the_planner_owns_worker_replicas_only_when_it_scales_them():
    def replicas(values: dict | None) -> dict[str, Any]:
        docs = render(values)
        return {s: one(docs, "Deployment", component(s))["spec"].get("replicas") for s in ("decode", "prefill")}

    # Scaling: no replicas field, so `helm upgrade` does not undo the planner's decisions.
    assert replicas(None) == {"decode": None, "prefill": None}
    assert replicas({"planner": {"dryRun": True}}) == {"decode": 1, "prefill": 1}
    assert replicas({"planner": {"enabled": False}, "decode": {"replicas": 3}}) == {"decode": 3, "prefill": 1}
    docs = render({"planner": {"connector": "none"}})
    assert not find(docs, "Role") and not find(docs, "ServiceAccount")


def loads_auth_config(docs: list[dict], nats: dict) -> bool:
    """Whether the NATS container's server config is the auth config (/etc/nats-auth/nats-auth.conf)
    or, clustered, the cluster config (/etc/nats/nats.conf, its ConfigMap) that includes it."""
    config = options(nats["args"]).get("--config")
    if config == "/etc/nats-auth/nats-auth.conf":
        return True
    assert config in (None, "/etc/nats/nats.conf"), config
    if config is None:
        return False
    text = one(docs, "ConfigMap", component("nats") + "-cluster")["data"]["nats.conf"]
    return 'include "../nats-auth/nats-auth.conf"' in text


def test_auth_and_tls_are_wired_at_both_ends():
    docs = render(SECURED)
    nats = container(one(docs, "StatefulSet", component("nats")))
    nats_env = env_of(nats)
    args = nats["args"]
    # The server takes the user/password from the Secret the services read theirs from, through its
    # environment ($NATS_USER in its config file): never on its command line.
    assert "--user" not in args and "--pass" not in args and not any("NATS_PASSWORD" in str(a) for a in args)
    conf = one(docs, "ConfigMap", component("nats") + "-config")["data"]["nats-auth.conf"]
    assert "user: $NATS_USER" in conf and "password: $NATS_PASSWORD" in conf
    assert loads_auth_config(docs, nats)
    assert nats_env["NATS_USER"]["valueFrom"]["secretKeyRef"] == {"name": "baton-nats-auth", "key": "user"}
    assert nats_env["NATS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "baton-nats-auth", "key": "password"}
    assert "--tlsverify" in args
    mounted = {m["mountPath"] for m in nats["volumeMounts"]}
    for flag in ("--tlscert", "--tlskey", "--tlscacert"):
        assert str(Path(options(args)[flag]).parent) in mounted, flag
    for svc in BATON_SERVICES:
        dep = one(docs, "Deployment", component(svc))
        c = container(dep)
        env = env_of(c)
        assert env["BATON_NATS_URL"]["value"].startswith("tls://"), svc
        assert env["BATON_NATS_USER"]["valueFrom"]["secretKeyRef"] == {"name": "baton-nats-auth", "key": "user"}
        assert env["BATON_NATS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "password"
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
        for var in ("BATON_NATS_TLS_CA", "BATON_NATS_TLS_CERT", "BATON_NATS_TLS_KEY"):
            path = Path(env[var]["value"])
            vol = volumes[mounts[str(path.parent)]]
            assert vol["secret"]["secretName"] == "baton-nats-client-tls", (svc, var)
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == SECURED["tracing"]["otlpEndpoint"]
        assert env["OTEL_TRACES_EXPORTER"]["value"] == "otlp"
        assert "$(POD_NAME)" in env["OTEL_RESOURCE_ATTRIBUTES"]["value"]
        assert list(env).index("POD_NAME") < list(env).index("OTEL_RESOURCE_ATTRIBUTES")  # $(VAR) order
    # API keys: a file from the Secret, named by BATON_API_KEYS_FILE.
    dep = one(docs, "Deployment", component("frontend"))
    c = container(dep)
    keys_file = Path(env_of(c)["BATON_API_KEYS_FILE"]["value"])
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == str(keys_file.parent))
    vol = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    assert vol["secret"]["secretName"] == "baton-api-keys"
    assert [i["path"] for i in vol["secret"]["items"]] == [keys_file.name]
    assert env_of(c)["BATON_RATE_LIMIT_RPM"]["value"] == "600"


def test_per_role_nats_identities_by_default():
    """Default values: the bundled NATS runs with shared/nats_auth.py's users and permissions, and each
    pod gets only its own role's credentials file, from a Secret, by path."""
    sys.path.insert(0, str(ROOT))
    from shared import nats_auth

    docs = render(None)
    secret = one(docs, "Secret", component("nats-identities"))
    data = secret["stringData"]
    assert set(data) == {"nats-auth.conf", *(f"{r}.creds" for r in nats_auth.ROLES)}
    # The chart's permission table is the Python one (regenerate: python -m shared.nats_auth permissions).
    chart_table = json.loads((CHART / "files" / "nats-permissions.json").read_text())
    assert chart_table == {r: p.to_nats() for r, p in nats_auth.PERMISSIONS.items()}
    users = json.loads(re.search(r"users = (\[.*\])", data["nats-auth.conf"]).group(1))
    assert [u["user"] for u in users] == sorted(nats_auth.ROLES)
    for u in users:
        assert u["permissions"] == chart_table[u["user"]]
        assert u["password"].startswith("$2")  # bcrypt
        creds = nats_auth.parse_credentials(data[f"{u['user']}.creds"])
        assert (creds.user, creds.inbox_prefix) == (u["user"], nats_auth.inbox_prefix(u["user"]))
        assert len(creds.password) >= 32 and creds.password not in data["nats-auth.conf"]
    nats = one(docs, "StatefulSet", component("nats"))
    assert loads_auth_config(docs, container(nats))
    vol = next(v for v in nats["spec"]["template"]["spec"]["volumes"] if v["name"] == "auth")
    assert vol["secret"]["secretName"] == secret["metadata"]["name"]
    assert [i["key"] for i in vol["secret"]["items"]] == ["nats-auth.conf"]
    for svc in BATON_SERVICES:
        dep = one(docs, "Deployment", component(svc))
        c = container(dep)
        env = env_of(c)
        creds = Path(env["BATON_NATS_CREDS"]["value"])
        assert creds.name == f"{svc}.creds"
        assert not any(k in env for k in ("BATON_NATS_USER", "BATON_NATS_PASSWORD", "BATON_NATS_TOKEN"))
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        vol = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == mounts[str(creds.parent)])
        assert vol["secret"]["secretName"] == secret["metadata"]["name"]
        assert [i["key"] for i in vol["secret"]["items"]] == [f"{svc}.creds"], "only its own role's file"
        assert "--nats-creds" in _help(svc)  # the CLI knows the file option too


def test_insecure_no_auth_is_explicit():
    docs = render({"natsAuth": {"insecureNoAuth": True}})
    # No client identities; the cluster's routes stay authenticated (their Secret and config only).
    assert [d["metadata"]["name"] for d in find(docs, "Secret")] == [component("nats-routes")]
    assert not loads_auth_config(docs, container(one(docs, "StatefulSet", component("nats"))))
    single = render({"natsAuth": {"insecureNoAuth": True}, "nats": {"replicas": 1}})
    assert not find(single, "Secret")
    assert "--config" not in container(one(single, "StatefulSet", component("nats")))["args"]
    assert "BATON_NATS_CREDS" not in env_of(container(one(docs, "Deployment", component("decode"))))


def test_nats_runs_unprivileged_and_hides_its_monitoring_port():
    docs = render(None)
    nats = one(docs, "StatefulSet", component("nats"))
    pod = nats["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    sc = container(nats)["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    # Clients and cluster routes only; the monitoring port (8222) is on the pods, for probes.
    ports = {s["metadata"]["name"]: [p["port"] for p in s["spec"]["ports"]] for s in find(docs, "Service")
             if s["metadata"]["name"].startswith(component("nats"))}
    assert ports == {component("nats"): [4222], component("nats") + "-headless": [4222, 6222]}
    for name in BATON_SERVICES:
        assert container(one(docs, "Deployment", component(name)))["securityContext"]["readOnlyRootFilesystem"]


def _policy_for(docs: list[dict], comp: str) -> dict:
    pols = [p for p in find(docs, "NetworkPolicy")
            if p["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/component") == comp]
    assert len(pols) == 1, comp
    return pols[0]


def test_network_policies():
    docs = render(None)
    comp = "app.kubernetes.io/component"
    metrics_port = 9090
    # Every Baton pod and NATS is selected by exactly one ingress policy.
    for name in (*BATON_SERVICES, "nats"):
        assert _policy_for(docs, name)["spec"]["policyTypes"] == ["Ingress"]
    # NATS: the client port only from this release's pods; the cluster routes only from NATS pods.
    rule, routes = _policy_for(docs, "nats")["spec"]["ingress"]
    assert rule["ports"] == [{"port": 4222, "protocol": "TCP"}]
    (peer,) = rule["from"]
    assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "baton", "app.kubernetes.io/instance": RELEASE}
    assert routes["ports"] == [{"port": 6222, "protocol": "TCP"}]
    (peer,) = routes["from"]
    assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "baton", "app.kubernetes.io/instance": RELEASE,
                                                  comp: "nats"}
    # HTTP only to the frontend; others only their metrics port, and decode its KV peers.
    (rule,) = _policy_for(docs, "frontend")["spec"]["ingress"]
    assert rule["ports"] == [{"port": 8000, "protocol": "TCP"}]
    for name in ("router", "planner", "prefill"):
        (rule,) = _policy_for(docs, name)["spec"]["ingress"]
        assert rule["ports"] == [{"port": metrics_port, "protocol": "TCP"}], name
    rules = _policy_for(docs, "decode")["spec"]["ingress"]
    kv = [r for r in rules if "ports" not in r]
    assert len(kv) == 1 and {p["podSelector"]["matchLabels"][comp] for p in kv[0]["from"]} == {"prefill", "decode"}
    # Narrowed by values: e.g. the ingress controller's namespace only.
    ingress = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}]
    docs = render({"networkPolicy": {"frontendFrom": ingress}})
    assert _policy_for(docs, "frontend")["spec"]["ingress"][0]["from"] == ingress
    assert not find(render({"networkPolicy": {"enabled": False}}), "NetworkPolicy")


def test_metrics_ports_only_from_the_monitoring_namespace_when_set():
    """Default (documented): metrics ports open to the cluster, a rule without `from`. With
    networkPolicy.metricsNamespace and/or metricsFrom: only those peers, on the metrics port only."""
    for name in ("router", "planner", "prefill", "decode"):
        (rule,) = [r for r in _policy_for(render(None), name)["spec"]["ingress"] if "ports" in r]
        assert rule["ports"] == [{"port": 9090, "protocol": "TCP"}] and "from" not in rule, name
    prometheus = {"namespaceSelector": {"matchLabels": {"team": "obs"}},
                  "podSelector": {"matchLabels": {"app": "prometheus"}}}
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    cases = [({"metricsNamespace": "monitoring"}, [monitoring]), ({"metricsFrom": [prometheus]}, [prometheus]),
             ({"metricsNamespace": "monitoring", "metricsFrom": [prometheus]}, [monitoring, prometheus])]
    for values, peers in cases:
        docs = render({"networkPolicy": values})
        for name in ("router", "planner", "prefill", "decode"):
            metric_rules = [r for r in _policy_for(docs, name)["spec"]["ingress"] if "ports" in r]
            assert metric_rules == [{"ports": [{"port": 9090, "protocol": "TCP"}], "from": peers}], (name, values)
        # The frontend's HTTP port (which serves its /metrics too) follows frontendFrom, not this.
        assert "from" not in _policy_for(docs, "frontend")["spec"]["ingress"][0]


def test_kv_tls_from_a_secret_for_workers_only():
    """Part B's BATON_KV_TLS_CERT/KEY/CA: off by default; from kvTls.existingSecret, decode and prefill
    (only) get each variable pointing at a file of that Secret, mounted read-only."""
    kv_vars = {"BATON_KV_TLS_CERT", "BATON_KV_TLS_KEY", "BATON_KV_TLS_CA"}
    tls_source = (ROOT / "shared" / "kv_transport" / "tls.py").read_text()
    assert all(v in tls_source for v in kv_vars), "the chart sets variables the transport does not read"
    for dep in find(render(None), "Deployment"):
        assert not kv_vars & set(env_of(container(dep))), dep["metadata"]["name"]
        assert "kv-tls" not in {v["name"] for v in dep["spec"]["template"]["spec"]["volumes"]}
    for values, expected in [({"existingSecret": "kv"}, kv_vars),
                             ({"existingSecret": "kv", "caKey": ""}, kv_vars - {"BATON_KV_TLS_CA"})]:
        docs = render({"kvTls": values})
        for svc in BATON_SERVICES:
            dep = one(docs, "Deployment", component(svc))
            env = env_of(container(dep))
            if svc not in ("decode", "prefill"):
                assert not kv_vars & set(env), svc
                continue
            assert kv_vars & set(env) == expected, svc
            mounts = {m["mountPath"]: m for m in container(dep)["volumeMounts"]}
            volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
            for var in expected:
                path = Path(env[var]["value"])
                mount = mounts[str(path.parent)]
                assert mount.get("readOnly") is True, (svc, var)
                secret = volumes[mount["name"]]["secret"]
                assert secret["secretName"] == "kv", (svc, var)
                assert path.name in {"tls.crt", "tls.key", "ca.crt"}, (svc, var)


def test_creds_file_with_external_nats():
    docs = render(EXTERNAL_NATS)
    assert not find(docs, "StatefulSet")
    for svc in BATON_SERVICES:
        dep = one(docs, "Deployment", component(svc))
        env = env_of(container(dep))
        assert env["BATON_NATS_URL"]["value"] == EXTERNAL_NATS["externalNats"]["url"]
        creds = Path(env["BATON_NATS_CREDS"]["value"])
        mounts = {m["mountPath"]: m["name"] for m in container(dep)["volumeMounts"]}
        vol = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == mounts[str(creds.parent)])
        assert vol["secret"]["secretName"] == "baton-nats-creds"
        assert creds.name in [i["path"] for i in vol["secret"]["items"]]


@pytest.mark.parametrize("values, message", [
    ({"natsAuth": {"existingSecret": "s", "credsKey": "c"}}, "externalNats"),
    ({"nats": {"enabled": False}}, "externalNats.url"),
    ({"nats": {"enabled": False}, "externalNats": {"url": "nats://n:4222"}}, "insecureNoAuth"),
    ({"natsAuth": {"userKey": "user", "passwordKey": "password"}}, "existingSecret"),
    ({"nats": {"tls": {"existingSecret": "t"}}}, "natsTls"),
    # values.schema.json: typos and wrong types fail at install, not in a pod.
    ({"planner": {"connector": "local"}}, "/planner/connector"),
    ({"frontend": {"replica": 3}}, "'replica' not allowed"),
    ({"router": {"mode": "kv-aware"}}, "/router/mode"),
    ({"decode": {"replicas": "3"}}, "/decode/replicas"),
    ({"tracing": {"otlpEndpont": "http://x:4318"}}, "'otlpEndpont' not allowed"),
])
def test_chart_refuses_half_configurations_and_typos(values: dict, message: str):
    helm = _import("helm_python", "pip install helm-python-sdk")
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        render(values)


# --- compose: the observability profile --------------------------------------------------------

COMPOSE = yaml.safe_load(COMPOSE_FILE.read_text())
SERVICES: dict[str, dict] = COMPOSE["services"]


def _compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker:
        try:
            probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=20)
        except subprocess.TimeoutExpired:
            probe = None
        if probe is not None and probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


@pytest.mark.parametrize("files", [["compose.yaml"], ["compose.yaml", "compose.observability.yaml"]])
def test_observability_profile_is_valid_for_compose(files: list[str]):
    cmd = _compose_command()
    if cmd is None:
        _missing("Compose (docker compose or docker-compose)", "apt-get install -y docker-compose")
    args = [a for f in files for a in ("-f", f)]
    r = subprocess.run([*cmd, *args, "--profile", "observability", "config", "-q"], capture_output=True,
                       text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, f"{' '.join(cmd)} config rejected {files}:\n{r.stdout}\n{r.stderr}"
    r = subprocess.run([*cmd, *args, "--profile", "observability", "config", "--services"], capture_output=True,
                       text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    assert set(r.stdout.split()) >= OBSERVABILITY | set(BATON_SERVICES) | {"nats"}


SETUP = {"nats-auth", "grafana-secret"}  # one-shot jobs (restart "no"), see tests/test_compose.py


def test_observability_services_only_in_the_profile():
    assert SERVICES["grafana-secret"].get("profiles") == ["observability"]
    for name, svc in SERVICES.items():
        if name in SETUP:
            continue
        if name in OBSERVABILITY:
            assert svc.get("profiles") == ["observability"], name
            assert svc.get("restart") and svc.get("healthcheck", {}).get("test"), name
        elif name in CLUSTER_NATS:
            assert svc.get("profiles") == ["cluster"], name  # tests/test_compose.py checks that profile
        else:
            assert not svc.get("profiles"), f"{name}: the default deployment must not change"
    # Config files the profile mounts exist in the repository.
    for name in OBSERVABILITY:
        for vol in SERVICES[name].get("volumes", []):
            src = str(vol).split(":")[0]
            if src.startswith("./"):
                assert (ROOT / src).exists(), f"{name} mounts {src}, which does not exist"


def _metrics_port(name: str) -> int:
    command = [str(a) for a in SERVICES[name]["command"]]
    opts = options(command)
    return int(opts["--port"] if command[0] == "frontend" else opts["--metrics-port"])


def test_prometheus_scrapes_every_service_where_it_serves_metrics():
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    targets: set[tuple[str, int]] = set()
    for job in config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics", job["job_name"]
        for sd in job.get("dns_sd_configs", []):
            assert sd.get("type") == "A", "Compose's DNS gives A records (one per replica)"
            targets.update((n, int(sd["port"])) for n in sd["names"])
        for sc in job.get("static_configs", []):
            for t in sc["targets"]:
                host, _, port = t.rpartition(":")
                targets.add((host, int(port)))
    for name in SERVICES:
        if name == "nats" or name in CLUSTER_NATS or name in OBSERVABILITY or name in SETUP:
            continue
        assert (name, _metrics_port(name)) in targets, f"prometheus.yml does not scrape {name}"
    for host, _ in targets:
        assert host == "localhost" or host in SERVICES, f"prometheus.yml scrapes unknown host {host}"


def test_prometheus_config_passes_promtool():
    promtool = shutil.which("promtool")
    if promtool is None:
        _missing("promtool", "apt-get install -y prometheus")
    r = subprocess.run([promtool, "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def _mounts(name: str) -> dict[str, str]:
    """container path -> repository path of a service's bind mounts."""
    out = {}
    for vol in SERVICES[name].get("volumes", []):
        parts = str(vol).split(":")
        if parts[0].startswith("./"):
            out[parts[1]] = parts[0]
    return out


def _host(path_in_container: str, mounts: dict[str, str]) -> Path | None:
    for inside, outside in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
        if path_in_container == inside or path_in_container.startswith(inside.rstrip("/") + "/"):
            return ROOT / outside / os.path.relpath(path_in_container, inside)
    return None


def test_grafana_is_provisioned_with_the_dashboard():
    mounts = _mounts("grafana")
    provisioning = _host("/etc/grafana/provisioning", mounts)
    assert provisioning and provisioning.is_dir(), "mount deploy/grafana/provisioning there"
    providers = [p for f in (provisioning / "dashboards").glob("*.yaml")
                 for p in yaml.safe_load(f.read_text())["providers"]]
    assert providers, "no dashboard provider"
    dashboards = {p for prov in providers if (d := _host(prov["options"]["path"], mounts))
                  for p in d.glob("*.json")}
    assert DASHBOARD in dashboards, "the provider's path must be where the dashboards are mounted"
    home = SERVICES["grafana"]["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        assert _host(home, mounts) == DASHBOARD
    # Datasources point at Compose services, on the ports they listen on.
    sources = [s for f in (provisioning / "datasources").glob("*.yaml")
               for s in yaml.safe_load(f.read_text())["datasources"]]
    by_type = {s["type"]: s for s in sources}
    prom = re.fullmatch(r"http://([\w-]+):(\d+)", by_type["prometheus"]["url"])
    assert prom and prom.group(1) == "prometheus" and prom.group(1) in SERVICES
    assert by_type["prometheus"]["uid"] == "prometheus", "the dashboard's default datasource"
    scrape = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["global"]["scrape_interval"]
    assert by_type["prometheus"]["jsonData"]["timeInterval"] == scrape, "$__rate_interval needs the interval"
    jaeger = re.fullmatch(r"http://([\w-]+):(\d+)", by_type["jaeger"]["url"])
    assert jaeger and jaeger.group(1) in SERVICES


def test_tracing_override_points_every_service_at_the_collector():
    override = yaml.safe_load(COMPOSE_OVERRIDE.read_text())["services"]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for name, svc in SERVICES.items():
        if name not in BATON_SERVICES:  # nats, the one-shot nats-auth job, observability: no spans
            continue
        assert name in override, f"{name}: no tracing in compose.observability.yaml"
        env = override[name]["environment"]
        endpoint = re.fullmatch(r"http://([\w-]+):(\d+)", env["OTEL_EXPORTER_OTLP_ENDPOINT"])
        assert endpoint and endpoint.group(1) in OBSERVABILITY, env
        assert endpoint.group(2) == "4318" and env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf") == \
            "http/protobuf", "shared/tracing.py uses the OTLP/HTTP exporter"
        wanted = override[name]["build"]["args"]["EXTRAS"].replace(",", " ").split()
        assert "otlp" in wanted, f"{name}: the image needs the otlp extra to export"
        base = (svc.get("build") or {}).get("args", {}).get("EXTRAS", "").replace(",", " ").split()
        assert set(base) <= set(wanted), f"{name}: the override drops extras {set(base) - set(wanted)}"
        for extra in wanted:
            assert extra in extras, f"pyproject.toml has no [{extra}] extra (the Dockerfile installs it)"


def test_otel_collector_config_is_consistent():
    config = yaml.safe_load(OTEL_COLLECTOR.read_text())
    service = config["service"]
    for ext in service.get("extensions", []):
        assert ext in config["extensions"], ext
    for pipeline, spec in service["pipelines"].items():
        for kind in ("receivers", "processors", "exporters"):
            for comp in spec.get(kind, []):
                assert comp in config[kind], f"{pipeline}: {kind[:-1]} {comp} is not configured"
    assert "otlp" in service["pipelines"]["traces"]["receivers"]
    assert config["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")
    processors = service["pipelines"]["traces"]["processors"]
    assert processors[0] == "memory_limiter" and processors[-1] == "batch", "the collector's recommended order"


# --- the dashboard ----------------------------------------------------------------------------

# Counter("name", "help" ["help" ...], ["label", ...]) and the like (LoopHistogram too), over several lines or one.
_METRIC_DEF = re.compile(
    r"\b(?:Loop)?(Counter|Gauge|Histogram|Summary)\(\s*[\"'](baton_\w+)[\"']\s*,"
    r"\s*(?:(?:\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*')\s*)+"
    r"(?:,\s*(?:labelnames\s*=\s*)?[\[(]([^\])]*)[\])])?")


@functools.cache
def defined_series() -> dict[str, frozenset[str]]:
    """Series names the code exposes (with _total/_bucket/_sum/_count) -> their label names."""
    series: dict[str, frozenset[str]] = {}
    for base in ("services", "shared", "baton"):
        for path in (ROOT / base).rglob("*.py"):
            for kind, name, labels in _METRIC_DEF.findall(path.read_text()):
                names = frozenset(re.findall(r"[\"'](\w+)[\"']", labels or ""))
                if kind == "Counter":
                    stem = name.removesuffix("_total")
                    series[f"{stem}_total"] = names
                    series[f"{stem}_created"] = names
                elif kind == "Gauge":
                    series[name] = names
                else:
                    series[name if kind == "Summary" else f"{name}_bucket"] = names | (
                        {"quantile"} if kind == "Summary" else {"le"})
                    for suffix in ("_sum", "_count", "_created"):
                        series[name + suffix] = names
    return series


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(dash: dict) -> Iterator[dict]:
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])


def _queries(dash: dict) -> Iterator[tuple[str, str]]:
    for p in _panels(dash):
        for t in p.get("targets", []):
            if t.get("expr"):
                yield p["title"], t["expr"]


def _promql(expr: str) -> str:
    """Grafana's variables replaced so that Prometheus' grammar applies."""
    return re.sub(r"\$__(rate_)?interval|\$__range", "1m", expr)


def test_dashboard_is_well_formed():
    dash = _dashboard()
    assert dash["uid"] and dash["title"]
    ids = [p["id"] for p in _panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    var = {v["name"]: v for v in dash["templating"]["list"]}["datasource"]
    assert var["type"] == "datasource" and var["query"] == "prometheus"
    cells: dict[tuple[int, int], str] = {}
    for p in _panels(dash):
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]
        if p["type"] != "row":
            assert p.get("description"), f"{p['title']}: say what the panel shows"
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
            assert p["targets"], p["title"]


def _query_problems(pp: Any, ast: Any, series: dict[str, frozenset[str]]) -> list[str]:
    """Metrics the query names that the code does not define, and labels those metrics lack."""
    target_labels = {"job", "instance"}  # added by Prometheus to every series
    problems: list[str] = []

    def selectors(node: Any) -> list:
        found: list = []
        pp.walk(node, lambda n: found.append(n) if isinstance(n, pp.VectorSelector) else None)
        return found

    def visit(node: Any) -> None:
        if isinstance(node, pp.VectorSelector):
            if node.name not in series:
                problems.append(f"no metric {node.name} in the code")
                return
            for m in node.matchers.matchers:
                if m.name not in series[node.name] | target_labels:
                    problems.append(f"{node.name} has no label {m.name}")
        elif isinstance(node, pp.AggregateExpr) and node.modifier is not None:
            inner = selectors(node.expr)
            available = frozenset().union(*(series.get(s.name, frozenset()) for s in inner)) | target_labels
            for label in node.modifier.labels:
                if label not in available:
                    problems.append(f"grouping by {label}, which none of {[s.name for s in inner]} has")

    pp.walk(ast, visit)
    return problems


def test_dashboard_queries_parse_and_use_only_metrics_the_code_defines():
    pp = _import("promql_parser", "pip install promql-parser")
    series = defined_series()
    assert "baton_frontend_requests_total" in series and "baton_worker_kv_blocks_used" in series, (
        "found no metric definitions: has the code's style changed?")
    for title, expr in _queries(_dashboard()):
        try:
            ast = pp.parse(_promql(expr))
        except Exception as e:  # the parser raises ValueError with the position
            pytest.fail(f"{title!r}: {expr}\n  does not parse: {e}")
        problems = _query_problems(pp, ast, series)
        assert not problems, f"{title!r}: {expr}\n  " + "\n  ".join(problems)


def test_dashboard_charts_what_llm_serving_users_chart():
    used = {s for _, expr in _queries(_dashboard()) for s in re.findall(r"\bbaton_\w+", expr)}
    wanted = [
        "baton_frontend_requests_total",                     # request rate by status
        "baton_frontend_time_to_first_token_seconds_bucket",  # TTFT quantiles
        "baton_frontend_inter_token_latency_seconds_bucket",  # ITL quantiles
        "baton_frontend_request_duration_seconds_bucket",
        "baton_frontend_input_sequence_tokens_sum", "baton_frontend_output_sequence_tokens_sum",
        "baton_frontend_migrations_total",
        "baton_worker_kv_cache_usage_ratio", "baton_worker_kv_blocks_used", "baton_worker_kv_blocks_total",
        "baton_worker_requests_running", "baton_worker_requests_waiting",
        "baton_worker_prefix_cache_hit_tokens", "baton_worker_prompt_tokens", "baton_worker_preemptions",
        "baton_router_decisions_total", "baton_router_predicted_overlap_ratio_sum",
        "baton_planner_replicas", "baton_planner_decisions_total",
    ]
    assert not [m for m in wanted if m not in used], "the dashboard lacks panels for these"
    for title, expr in _queries(_dashboard()):
        if "baton_frontend_requests_total" in expr:
            # /health and /metrics are requests too (probes, scrapes): chart the API only.
            assert 'endpoint=~"/v1/.*"' in expr, title


def test_operations_doc_explains_every_panel():
    doc = OPERATIONS_DOC.read_text()
    missing = [p["title"] for p in _panels(_dashboard()) if p["type"] != "row" and p["title"] not in doc]
    assert not missing, f"docs/operations.md does not describe these panels: {missing}"


def test_policy_check_skips_are_the_documented_ones():
    """`make policy-check` (checkov, its own venv: not a test dependency) may skip only checks that
    docs/operations.md's table explains, and the table explains no check that is not skipped."""
    config = yaml.safe_load((ROOT / "deploy" / "helm" / "checkov.yaml").read_text())
    skipped = set(config["skip-check"])
    doc = OPERATIONS_DOC.read_text()
    section = doc[doc.index("**Policy check (checkov).**"):]
    section = section[:section.index("\n\n", section.index("| Check |"))]
    documented = set(re.findall(r"^\| (CKV_K8S_\d+) \|", section, re.M))
    assert skipped and skipped == documented
    assert config["framework"] == ["kubernetes"]
    assert "policy-check:" in (ROOT / "Makefile").read_text()
