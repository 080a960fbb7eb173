"""Helm, at fleet scale (issue 17): NATS as a 3-server JetStream cluster, every service given every
server and 3 JetStream replicas, frontends and routers kept apart by pod anti-affinity, workers
spread over nodes, each worker advertising its pod IP for KV transfers. Rendered by Helm itself
(the helpers of tests/test_deploy.py, which also validates these manifests against the Kubernetes
schemas); skipped locally without helm-python-sdk, failed in CI."""

from __future__ import annotations

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
    # Routes to every pod's stable name, on the port the headless Service and the pod publish.
    assert opts["--cluster"] == "nats://0.0.0.0:6222" and opts["--cluster_name"] == NATS
    assert opts["--routes"].split(",") == [f"nats://{pod_dns(i)}:6222" for i in range(3)]
    assert {"name": "cluster", "containerPort": 6222} in nats["ports"]
    headless = one(docs, "Service", HEADLESS)
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    assert {p["port"] for p in headless["spec"]["ports"]} == {4222, 6222}
    assert headless["spec"]["selector"] == selector("nats")
    # Auth as before: the per-role identities' server config is still loaded.
    assert opts["--config"] == "/etc/nats-auth/nats-auth.conf"
    # The servers prefer different nodes; a PDB lets one go at a time (a majority of 3 stays).
    pod = sts["spec"]["template"]["spec"]
    (term,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"] == {"topologyKey": HOSTNAME, "labelSelector": {"matchLabels": selector("nats")}}
    assert one(docs, "PodDisruptionBudget", NATS)["spec"]["maxUnavailable"] == 1


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


def test_the_charts_nats_servers_form_a_jetstream_cluster_that_survives_one_loss(tmp_path) -> None:
    """The StatefulSet's own nats-server arguments and the chart's generated auth config, run as three
    real servers on loopback (pod DNS names mapped to local ports): they elect a JetStream meta
    leader, a 3-replica bucket written through one server is read through another, and still after
    the first server is SIGKILLed."""
    import asyncio
    import json
    import subprocess
    import time
    import urllib.request

    import nats
    from nats.js.api import KeyValueConfig

    from baton.nats_server import find_nats_server, free_port
    from tests.procs import wait_until

    docs = render()
    args = [str(a) for a in container(one(docs, "StatefulSet", NATS))["args"]]
    secret = one(docs, "Secret", component("nats-identities"))["stringData"]
    conf = tmp_path / "nats-auth.conf"
    conf.write_text(secret["nats-auth.conf"])
    admin = dict(line.split(": ", 1) for line in secret["admin.creds"].splitlines() if ": " in line)
    client_ports, monitor_ports, route_ports = ([free_port() for _ in range(3)] for _ in range(3))
    local = {f"nats://{pod_dns(i)}:6222": f"nats://127.0.0.1:{route_ports[i]}" for i in range(3)}

    def server_args(i: int) -> list[str]:
        out, replaced = [], set()
        plain = {"--store_dir": str(tmp_path / f"store-{i}"), "--http_port": str(monitor_ports[i]),
                 "--cluster": f"nats://127.0.0.1:{route_ports[i]}", "--config": str(conf)}
        for prev, arg in zip(["", *args[:-1]], args, strict=True):
            new = plain.get(prev)
            if prev == "--routes":
                new = ",".join(local[r] for r in arg.split(","))
            elif arg == "$(POD_NAME)":
                new = f"{NATS}-{i}"
            if new is not None:
                replaced.add(prev or arg)
            out.append(arg if new is None else new)
        assert replaced == {"--store_dir", "--http_port", "--cluster", "--config", "--routes", "--server_name"}
        return [find_nats_server(), *out, "-a", "127.0.0.1", "-p", str(client_ports[i])]

    procs = [subprocess.Popen(server_args(i), stdout=open(tmp_path / f"nats-{i}.log", "wb"),
                              stderr=subprocess.STDOUT) for i in range(3)]
    try:
        def healthy(i: int) -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{monitor_ports[i]}/healthz", timeout=1) as r:
                    return json.loads(r.read()).get("status") == "ok"
            except OSError:
                return False

        wait_until(lambda: all(healthy(i) for i in range(3)), 30, 0.2, "three healthy JetStream servers")

        async def scenario() -> tuple[bytes, bytes]:
            opts = {"user": admin["user"], "password": admin["password"], "connect_timeout": 5,
                    "allow_reconnect": False}
            first = await nats.connect(f"nats://127.0.0.1:{client_ports[0]}", **opts)
            other = await nats.connect(f"nats://127.0.0.1:{client_ports[2]}", **opts)
            try:
                kv = await first.jetstream().create_key_value(KeyValueConfig(bucket="probe", replicas=3))
                await kv.put("k", b"before")
                read = (await (await other.jetstream().key_value("probe")).get("k")).value
                procs[0].kill()  # SIGKILL the server the bucket was made through
                procs[0].wait(5)
                survivor = await other.jetstream(timeout=10).key_value("probe")
                deadline = time.monotonic() + 15
                while True:  # a new stream leader is elected within seconds
                    try:
                        await survivor.put("k", b"after")
                        break
                    except Exception:
                        if time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(0.2)
                return read, (await survivor.get("k")).value
            finally:
                await first.close()
                await other.close()

        assert asyncio.run(scenario()) == (b"before", b"after")
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(10)
