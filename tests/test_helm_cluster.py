"""Helm, at fleet scale (issue 17): NATS as a 3-server JetStream cluster, every service given every
server and 3 JetStream replicas, frontends and routers kept apart by pod anti-affinity, workers
spread over nodes, each worker advertising its pod IP for KV transfers. Rendered by Helm itself
(the helpers of tests/test_deploy.py, which also validates these manifests against the Kubernetes
schemas); skipped locally without helm-python-sdk, failed in CI."""

from __future__ import annotations

import base64
import json
import os
import re

import pytest

from tests.test_deploy import (
    BATON_SERVICES,
    NAMESPACE,
    RELEASE,
    _import,
    component,
    container,
    env_of,
    find,
    one,
    options,
    render,
)

NATS = component("nats")
HEADLESS = f"{NATS}-headless"
HOSTNAME = "kubernetes.io/hostname"


def selector(comp: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "baton", "app.kubernetes.io/instance": RELEASE,
            "app.kubernetes.io/component": comp}


def pod_dns(i: int) -> str:
    return f"{NATS}-{i}.{HEADLESS}.{NAMESPACE}.svc"


def test_nats_is_a_three_server_jetstream_cluster() -> None:
    docs = render()
    sts = one(docs, "StatefulSet", NATS)
    assert sts["spec"]["replicas"] == 3
    assert sts["spec"]["serviceName"] == HEADLESS
    # Each server its own persistent JetStream store.
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"] and claim["spec"]["resources"]["requests"]["storage"]
    nats = container(sts)
    opts = options(nats["args"])
    assert any(m["name"] == claim["metadata"]["name"] and m["mountPath"] == opts["--store_dir"]
               for m in nats["volumeMounts"])
    assert "--jetstream" in nats["args"] and opts["--server_name"] == "$(POD_NAME)"  # unique per pod
    assert {"name": "cluster", "containerPort": 6222} in nats["ports"]
    # The cluster is in the server's config file (no cluster flags: a flag would override the config's
    # route authorization), which includes the per-role auth config.
    assert not {"--routes", "--cluster", "--cluster_name"} & set(nats["args"])
    assert opts["--config"] == "/etc/nats/nats.conf"
    conf = one(docs, "ConfigMap", f"{NATS}-cluster")["data"]["nats.conf"]
    assert 'include "../nats-auth/nats-auth.conf"' in conf and f'name: "{NATS}"' in conf
    assert 'listen: "0.0.0.0:6222"' in conf
    assert re.search(r"authorization \{\s*user: route\s*password: \$NATS_ROUTE_PASSWORD\s*\}", conf)
    assert "routes: [$NATS_ROUTE_0, $NATS_ROUTE_1, $NATS_ROUTE_2]" in conf
    mounts = {m["name"]: m["mountPath"] for m in nats["volumeMounts"]}
    assert mounts["cluster"] == "/etc/nats" and mounts["auth"] == "/etc/nats-auth"
    # Routes to every pod's stable name, on the port the headless Service and the pod publish, each
    # presenting the route password, which only Kubernetes substitutes (from the Secret).
    env = env_of(nats)
    assert env["NATS_ROUTE_PASSWORD"]["valueFrom"] == {
        "secretKeyRef": {"name": component("nats-routes"), "key": "password"}}
    assert [env[f"NATS_ROUTE_{i}"]["value"] for i in range(3)] == [
        f"nats://route:$(NATS_ROUTE_PASSWORD)@{pod_dns(i)}:6222" for i in range(3)]
    headless = one(docs, "Service", HEADLESS)
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    assert {p["port"] for p in headless["spec"]["ports"]} == {4222, 6222}
    assert headless["spec"]["selector"] == selector("nats")
    # The servers prefer different nodes; a PDB lets one go at a time (a majority of 3 stays).
    pod = sts["spec"]["template"]["spec"]
    (term,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"] == {"topologyKey": HOSTNAME, "labelSelector": {"matchLabels": selector("nats")}}
    assert one(docs, "PodDisruptionBudget", NATS)["spec"]["maxUnavailable"] == 1


def test_route_password_is_generated_once_or_the_operators() -> None:
    docs = render()
    secret = one(docs, "Secret", component("nats-routes"))
    password = base64.b64decode(secret["data"]["password"]).decode()
    assert re.fullmatch(r"[A-Za-z0-9]{43}", password)  # random (lookup keeps it across upgrades)
    # The password is in no manifest but that Secret (base64 there, as Secrets' data is).
    assert not [d for d in docs if password in json.dumps(d)]
    assert [d for d in docs if secret["data"]["password"] in json.dumps(d)] == [secret]
    again = one(render({"nats": {"replicas": 3}}), "Secret", component("nats-routes"))["data"]["password"]
    assert base64.b64decode(again).decode() != password  # no release to look up: a fresh render draws anew
    # The operator's own Secret: no generated one, the pods read theirs.
    own = render({"nats": {"routeAuth": {"existingSecret": "my-routes", "passwordKey": "pw"}}})
    assert not [d for d in find(own, "Secret") if d["metadata"]["name"] == component("nats-routes")]
    env = env_of(container(one(own, "StatefulSet", NATS)))
    assert env["NATS_ROUTE_PASSWORD"]["valueFrom"] == {"secretKeyRef": {"name": "my-routes", "key": "pw"}}
    # One server: no routes, no route secret, no cluster config; the auth config as before.
    single = render({"nats": {"replicas": 1}})
    assert not [d for d in find(single, "Secret") if d["metadata"]["name"] == component("nats-routes")]
    assert not [d for d in find(single, "ConfigMap") if d["metadata"]["name"] == f"{NATS}-cluster"]
    nats = container(one(single, "StatefulSet", NATS))
    assert options(nats["args"])["--config"] == "/etc/nats-auth/nats-auth.conf"
    assert not any(e["name"].startswith("NATS_ROUTE") for e in nats["env"])
    # The chart's TLS on: the routes use it too (mutual, with the Secret's CA); off: no route TLS.
    assert "tls {" not in one(docs, "ConfigMap", f"{NATS}-cluster")["data"]["nats.conf"]
    tls = render({"nats": {"tls": {"existingSecret": "srv"}}, "natsTls": {"existingSecret": "cli"}})
    conf = one(tls, "ConfigMap", f"{NATS}-cluster")["data"]["nats.conf"]
    assert re.search(r'tls \{\s*cert_file: "/etc/nats-tls/tls.crt"\s*key_file: "/etc/nats-tls/tls.key"\s*'
                     r'ca_file: "/etc/nats-tls/ca.crt"', conf)
    mounts = {m["name"]: m["mountPath"] for m in container(one(tls, "StatefulSet", NATS))["volumeMounts"]}
    assert mounts["tls"] == "/etc/nats-tls"
    # With one shared credential the cluster config includes that auth config (its ConfigMap).
    shared = render({"natsAuth": {"existingSecret": "creds", "userKey": "user", "passwordKey": "password"}})
    assert 'include "../nats-auth/nats-auth.conf"' in one(shared, "ConfigMap", f"{NATS}-cluster")["data"]["nats.conf"]


def test_services_get_every_server_and_three_replicas() -> None:
    docs = render()
    urls = [f"nats://{pod_dns(i)}:4222" for i in range(3)]
    for svc in BATON_SERVICES:
        env = env_of(container(one(docs, "Deployment", component(svc))))
        assert env["BATON_NATS_URL"]["value"].split(",") == urls, svc
        assert env["BATON_JS_REPLICAS"]["value"] == "3", svc
    # With TLS the scheme follows, still every server.
    tls = render({"nats": {"tls": {"existingSecret": "srv"}}, "natsTls": {"existingSecret": "cli"}})
    env = env_of(container(one(tls, "Deployment", component("router"))))
    assert env["BATON_NATS_URL"]["value"].split(",") == [u.replace("nats://", "tls://") for u in urls]


def test_single_server_and_external_cluster() -> None:
    docs = render({"nats": {"replicas": 1}})
    sts = one(docs, "StatefulSet", NATS)
    assert sts["spec"]["replicas"] == 1
    assert not {"--routes", "--cluster", "--cluster_name"} & set(container(sts)["args"])
    (ingress,) = [p for p in find(docs, "NetworkPolicy")
                  if p["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/component") == "nats"]
    assert [r["ports"] for r in ingress["spec"]["ingress"]] == [[{"port": 4222, "protocol": "TCP"}]]
    env = env_of(container(one(docs, "Deployment", component("frontend"))))
    assert env["BATON_NATS_URL"]["value"] == f"nats://{pod_dns(0)}:4222"
    assert env["BATON_JS_REPLICAS"]["value"] == "1"
    # Someone else's cluster: its URLs and replica count pass through as given.
    external = "nats://n-0.nats:4222,nats://n-1.nats:4222,nats://n-2.nats:4222"
    docs = render({"nats": {"enabled": False}, "externalNats": {"url": external, "jsReplicas": 3},
                   "natsAuth": {"existingSecret": "creds", "credsKey": "baton.creds"}})
    assert not find(docs, "StatefulSet")
    env = env_of(container(one(docs, "Deployment", component("decode"))))
    assert env["BATON_NATS_URL"]["value"] == external and env["BATON_JS_REPLICAS"]["value"] == "3"


@pytest.mark.parametrize("svc", ["frontend", "router"])
def test_frontends_and_routers_are_several_and_kept_apart(svc: str) -> None:
    dep = one(render(), "Deployment", component(svc))
    assert dep["spec"]["replicas"] >= 2
    term = {"topologyKey": HOSTNAME, "labelSelector": {"matchLabels": selector(svc)}}
    anti = dep["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert anti == {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "podAffinityTerm": term}]}
    # Hard rule on request; an explicit affinity replaces the default; "none" leaves it out.
    dep = one(render({svc: {"antiAffinity": "required"}}), "Deployment", component(svc))
    assert dep["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"] == {
        "requiredDuringSchedulingIgnoredDuringExecution": [term]}
    own = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["cpu"]}]}]}}}
    dep = one(render({svc: {"affinity": own}}), "Deployment", component(svc))
    assert dep["spec"]["template"]["spec"]["affinity"] == own
    dep = one(render({svc: {"antiAffinity": "none"}}), "Deployment", component(svc))
    assert "affinity" not in dep["spec"]["template"]["spec"]


@pytest.mark.parametrize("svc", ["decode", "prefill"])
def test_workers_spread_over_nodes_and_advertise_their_pod_ip(svc: str) -> None:
    dep = one(render(), "Deployment", component(svc))
    pod = dep["spec"]["template"]["spec"]
    assert pod["topologySpreadConstraints"] == [{
        "maxSkew": 1, "topologyKey": HOSTNAME, "whenUnsatisfiable": "ScheduleAnyway",
        "labelSelector": {"matchLabels": selector(svc)}}]
    # The KV address other workers dial: this pod's IP, from the downward API.
    env = env_of(container(dep))
    assert env["BATON_KV_HOST"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    hard = one(render({svc: {"topologySpread": "required"}}), "Deployment", component(svc))
    assert hard["spec"]["template"]["spec"]["topologySpreadConstraints"][0]["whenUnsatisfiable"] == "DoNotSchedule"
    zones = [{"maxSkew": 2, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "DoNotSchedule",
              "labelSelector": {"matchLabels": selector(svc)}}]
    own = one(render({svc: {"topologySpreadConstraints": zones}}), "Deployment", component(svc))
    assert own["spec"]["template"]["spec"]["topologySpreadConstraints"] == zones


@pytest.mark.parametrize("values, message", [
    ({"nats": {"replicas": 2}}, "/nats/replicas"),  # an even cluster has no majority after a split
    ({"frontend": {"antiAffinity": "soft"}}, "/frontend/antiAffinity"),
    ({"decode": {"topologySpread": True}}, "/decode/topologySpread"),
    ({"externalNats": {"jsReplicas": 0}}, "/externalNats/jsReplicas"),
])
def test_cluster_values_are_checked(values: dict, message: str) -> None:
    helm = _import("helm_python", "pip install helm-python-sdk")
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        render(values)


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_the_charts_nats_servers_form_a_jetstream_cluster_that_survives_one_loss(tmp_path, tls: bool) -> None:
    """The StatefulSet's own nats-server arguments, environment and config files (the cluster ConfigMap
    including the chart's generated auth config, the generated route password), run as three real
    servers on loopback (pod DNS names mapped to local ports): they route to each other with the route
    password, and a server with a wrong or no route password is refused (never joins); they elect a
    JetStream meta leader, a 3-replica bucket written through one server is read through another, and
    still after the first server is SIGKILLed. The route password is in no server's log. With the
    chart's TLS on (a throwaway CA and certificate for 127.0.0.1), clients and routes use TLS."""
    import asyncio
    import ssl
    import subprocess
    import time
    import urllib.request
    from typing import Any

    import nats
    from nats.js.api import KeyValueConfig

    from baton.nats_server import find_nats_server, free_port
    from tests.procs import wait_until

    docs = render({"nats": {"tls": {"existingSecret": "srv"}}, "natsTls": {"existingSecret": "cli"}} if tls else None)
    nats_container = container(one(docs, "StatefulSet", NATS))
    tls_dir = tmp_path / "nats-tls"
    if tls:
        from tests.test_nats_security import make_certs

        tls_dir.mkdir()
        for made, name in zip(make_certs(tls_dir), ("ca.crt", "tls.crt", "tls.key"), strict=True):
            os.replace(made, tls_dir / name)
    # The Secret's mount point, here: the pod's paths in args and config moved into tmp_path.
    args = [str(a).replace("/etc/nats-tls/", f"{tls_dir}/") for a in nats_container["args"]]
    assert ("--tls" in args) == tls
    env = env_of(nats_container)
    secret = one(docs, "Secret", component("nats-identities"))["stringData"]
    route_password = base64.b64decode(one(docs, "Secret", component("nats-routes"))["data"]["password"]).decode()
    cluster_conf = one(docs, "ConfigMap", f"{NATS}-cluster")["data"]["nats.conf"]
    assert ('ca_file: "/etc/nats-tls/ca.crt"' in cluster_conf) == tls  # routes over TLS with the chart's TLS
    cluster_conf = cluster_conf.replace("/etc/nats-tls/", f"{tls_dir}/")
    # The pods' layout, so the cluster config's relative include finds the auth config.
    (tmp_path / "nats-auth").mkdir()
    (tmp_path / "nats-auth" / "nats-auth.conf").write_text(secret["nats-auth.conf"])
    admin = dict(line.split(": ", 1) for line in secret["admin.creds"].splitlines() if ": " in line)
    client_ports, monitor_ports, route_ports = ([free_port() for _ in range(5)] for _ in range(3))
    local = {f"{pod_dns(i)}:6222": f"127.0.0.1:{route_ports[i]}" for i in range(3)}

    def config(i: int) -> str:
        """The ConfigMap's nats.conf, listening on server i's local route port."""
        listen = 'listen: "0.0.0.0:6222"'
        assert listen in cluster_conf
        (tmp_path / f"nats-{i}").mkdir(exist_ok=True)
        path = tmp_path / f"nats-{i}" / "nats.conf"
        path.write_text(cluster_conf.replace(listen, f'listen: "127.0.0.1:{route_ports[i]}"'))
        return str(path)

    def server_args(i: int) -> list[str]:
        out, replaced = [], set()
        plain = {"--store_dir": str(tmp_path / f"store-{i}"), "--http_port": str(monitor_ports[i]),
                 "--config": config(i)}
        for prev, arg in zip(["", *args[:-1]], args, strict=True):
            new = plain.get(prev)
            if arg == "$(POD_NAME)":
                new = f"{NATS}-{i}"
            if new is not None:
                replaced.add(prev or arg)
            out.append(arg if new is None else new)
        assert replaced == {"--store_dir", "--http_port", "--config", "--server_name"}
        return [find_nats_server(), *out, "-a", "127.0.0.1", "-p", str(client_ports[i])]

    def server_env(password: str | None) -> dict[str, str]:
        """The container's environment as Kubernetes makes it: $(NATS_ROUTE_PASSWORD) substituted;
        ``password`` None: route URLs without credentials."""
        out = {"PATH": os.environ.get("PATH", "")}
        out["NATS_ROUTE_PASSWORD"] = password or "unset"
        for i in range(3):
            url = env[f"NATS_ROUTE_{i}"]["value"]
            for dns, addr in local.items():
                url = url.replace(dns, addr)
            if password is None:
                url = url.replace("route:$(NATS_ROUTE_PASSWORD)@", "")
            out[f"NATS_ROUTE_{i}"] = url.replace("$(NATS_ROUTE_PASSWORD)", password or "")
        return out

    def start(i: int, password: str | None) -> subprocess.Popen:
        return subprocess.Popen(server_args(i), env=server_env(password), stderr=subprocess.STDOUT,
                                stdout=open(tmp_path / f"nats-{i}.log", "wb"))

    def start_listening(i: int, password: str | None) -> subprocess.Popen:
        """start(i, password) until it listens: a port free_port picked can be taken before the
        server binds it (another process's outgoing connection), and the server then exits at once;
        it is started again on fresh ports, at most twice more."""
        for attempt in range(3):
            proc = start(i, password)
            wait_until(lambda p=proc: p.poll() is not None or "Listening for route connections" in log(i), 10, 0.05,
                       f"server {i} listening, or gone")
            if proc.poll() is None or "address already in use" not in log(i) or attempt == 2:
                return proc
            client_ports[i], monitor_ports[i], route_ports[i] = free_port(), free_port(), free_port()
        raise AssertionError("unreachable: the last attempt returns")

    def monitor(i: int, path: str) -> dict | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{monitor_ports[i]}{path}", timeout=1) as r:
                return json.loads(r.read())
        except OSError:
            return None

    def peers(i: int) -> set[str]:
        routez = monitor(i, "/routez") or {"routes": []}
        return {r.get("remote_name") for r in routez["routes"]}

    def log(i: int) -> str:
        return (tmp_path / f"nats-{i}.log").read_text(errors="replace")

    procs = [start(i, route_password) for i in range(3)]
    try:
        def healthy(i: int) -> bool:
            return (monitor(i, "/healthz") or {}).get("status") == "ok"

        wait_until(lambda: all(healthy(i) for i in range(3)), 30, 0.2, "three healthy JetStream servers")
        wait_until(lambda: all(peers(i) == {f"{NATS}-{j}" for j in range(3) if j != i} for i in range(3)),
                   15, 0.2, "each server routed to the other two")
        # Two intruders on the same network, with the chart's config: a wrong route password, and
        # none. Each dials the three members (and listens for routes); the members refuse both.
        procs += [start_listening(3, "not-the-route-password"), start_listening(4, None)]
        wait_until(lambda: all(log(i).count("Authorization Violation") >= 3 for i in (3, 4)), 15, 0.2,
                   "the members refusing both intruders' routes")
        wait_until(lambda: all(monitor(i, "/varz") for i in (3, 4)), 10, 0.1, "the intruders up")
        for i in range(3):
            assert peers(i) == {f"{NATS}-{j}" for j in range(3) if j != i}, i
        assert peers(3) == peers(4) == set()
        cluster = (monitor(0, "/varz") or {}).get("cluster", {})
        assert (cluster.get("tls_required"), cluster.get("tls_verify")) == ((True, True) if tls else (None, None))
        jsz = monitor(0, "/jsz") or {}
        assert jsz.get("meta_cluster", {}).get("cluster_size") == 3

        async def put_when_led(js: Any, value: bytes) -> Any:
            """Put k=value into the probe bucket once its stream answers. A stream with no leader (a
            new R3 one still electing, or one whose leader just died; and when the dead server led
            the meta group too, until a new meta leader answers) leaves a request unanswered, so
            poll with short timeouts (lookup and write), bounded."""
            deadline = time.monotonic() + 25
            while True:
                try:
                    bucket = await js.key_value("probe")
                    await bucket.put("k", value)
                    return bucket
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)

        async def scenario() -> tuple[bytes, bytes]:
            opts = {"user": admin["user"], "password": admin["password"], "connect_timeout": 5,
                    "allow_reconnect": False}
            if tls:
                opts["tls"] = ssl.create_default_context(cafile=str(tls_dir / "ca.crt"))
            first = await nats.connect(f"nats://127.0.0.1:{client_ports[0]}", **opts)
            other = await nats.connect(f"nats://127.0.0.1:{client_ports[2]}", **opts)
            try:
                await first.jetstream().create_key_value(KeyValueConfig(bucket="probe", replicas=3))
                await put_when_led(first.jetstream(timeout=2), b"before")
                read = (await (await other.jetstream().key_value("probe")).get("k")).value
                procs[0].kill()  # SIGKILL the server the bucket was made through
                procs[0].wait(5)
                survivor = await put_when_led(other.jetstream(timeout=2), b"after")
                return read, (await survivor.get("k")).value
            finally:
                await first.close()
                await other.close()

        assert asyncio.run(scenario()) == (b"before", b"after")
        assert not [i for i in range(5) if route_password in log(i)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(10)
