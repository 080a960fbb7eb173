"""Connectors against the exact commands and API requests they send (no Docker, no cluster here),
and the local connector with stand-in worker processes."""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from pathlib import Path

import anyio
import httpx
import pytest

from services.planner.connectors import (
    ComposeSettings,
    DockerComposeConnector,
    KubernetesConnector,
    KubernetesSettings,
    LocalProcessConnector,
    LocalWorkerSettings,
)
from shared.engines import EngineConfig
from shared.messages import WorkerInfo

pytestmark = pytest.mark.timeout(60)


# --- Docker Compose ----------------------------------------------------------------------------


def test_compose_commands() -> None:
    sent: list[list[str]] = []

    async def runner(argv: list[str]) -> tuple[int, str]:
        sent.append(argv)
        return 0, "c1\nc2\n" if "ps" in argv else ""

    conn = DockerComposeConnector(ComposeSettings(file="compose.yaml", project="baton"), runner)

    async def main() -> dict:
        known = await conn.start({"decode": 1, "prefill": 0})
        await conn.scale("decode", 3, [])
        await conn.scale("prefill", 0, [])
        return known

    known = anyio.run(main)
    assert known == {"decode": 2, "prefill": 2}
    assert sent == [
        ["docker", "compose", "-f", "compose.yaml", "-p", "baton", "ps", "--quiet", "--status", "running", "decode"],
        ["docker", "compose", "-f", "compose.yaml", "-p", "baton", "ps", "--quiet", "--status", "running", "prefill"],
        ["docker", "compose", "-f", "compose.yaml", "-p", "baton", "up", "-d", "--no-deps", "--no-recreate",
         "--scale", "decode=3", "decode"],
        ["docker", "compose", "-f", "compose.yaml", "-p", "baton", "up", "-d", "--no-deps", "--no-recreate",
         "--scale", "prefill=0", "prefill"],
    ]
    # The compose.yaml in this repository names the services the connector scales.
    text = (Path(__file__).resolve().parents[2] / "compose.yaml").read_text()
    assert "\n  decode:\n" in text and "\n  prefill:\n" in text


def test_compose_failure_is_reported() -> None:
    async def runner(argv: list[str]) -> tuple[int, str]:
        return 1, "no such service: decode"

    conn = DockerComposeConnector(runner=runner)
    with pytest.raises(RuntimeError, match="no such service"):
        anyio.run(conn.scale, "decode", 2, [])


# --- Kubernetes --------------------------------------------------------------------------------


def test_kubernetes_requests(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("tok-1\n")
    seen: list[httpx.Request] = []
    replicas = {"baton-decode": 2, "baton-prefill": 0}

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        name = req.url.path.split("/deployments/")[-1].split("/")[0]
        if req.method == "GET":
            return httpx.Response(200, json={"kind": "Scale", "spec": {"replicas": replicas[name]}})
        if "/pods/" in req.url.path:
            return httpx.Response(200, json={})
        replicas[name] = json.loads(req.content)["spec"]["replicas"]
        return httpx.Response(200, json={"kind": "Scale", "spec": {"replicas": replicas[name]}})

    conn = KubernetesConnector(
        KubernetesSettings(namespace="llm", api_server="https://10.0.0.1:6443", token_path=str(token)),
        transport=httpx.MockTransport(handler))
    victims = [WorkerInfo(worker_id="decode-a", role="decode", model="m", host="baton-decode-7d9f-abcde"),
               WorkerInfo(worker_id="decode-b", role="decode", model="m", host="baton-decode-7d9f-fghij")]

    async def main() -> dict:
        known = await conn.start({})
        await conn.scale("decode", 4, victims)
        token.write_text("tok-2\n")  # rotated: the next request must carry the new one
        await conn.scale("decode", 3, victims)
        await conn.close()
        return known

    known = anyio.run(main)
    assert known == {"decode": 2, "prefill": 0}
    get, up, cost, down = seen[0], seen[2], seen[3], seen[4]
    assert (get.method, str(get.url)) == (
        "GET", "https://10.0.0.1:6443/apis/apps/v1/namespaces/llm/deployments/baton-decode/scale")
    assert get.headers["authorization"] == "Bearer tok-1"
    assert (up.method, str(up.url)) == (
        "PATCH", "https://10.0.0.1:6443/apis/apps/v1/namespaces/llm/deployments/baton-decode/scale")
    assert up.headers["content-type"] == "application/merge-patch+json"
    assert up.headers["authorization"] == "Bearer tok-1"
    assert json.loads(up.content) == {"spec": {"replicas": 4}}
    # Scale-down: first the least loaded pod is marked cheapest to delete, then the scale is set.
    assert (cost.method, str(cost.url)) == (
        "PATCH", "https://10.0.0.1:6443/api/v1/namespaces/llm/pods/baton-decode-7d9f-abcde")
    assert json.loads(cost.content) == {
        "metadata": {"annotations": {"controller.kubernetes.io/pod-deletion-cost": "-1000"}}}
    assert cost.headers["authorization"] == "Bearer tok-2"
    assert json.loads(down.content) == {"spec": {"replicas": 3}}
    assert len(seen) == 5 and replicas["baton-decode"] == 3


def test_kubernetes_in_cluster_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    conn = KubernetesConnector(KubernetesSettings(namespace="default", token_path="/dev/null"),
                               transport=httpx.MockTransport(lambda r: httpx.Response(200)))
    assert conn.scale_url("prefill") == (
        "https://10.96.0.1:443/apis/apps/v1/namespaces/default/deployments/baton-prefill/scale")


# --- local processes ---------------------------------------------------------------------------

FAKE_WORKER = """#!/bin/sh
# Stands in for `python -m services.<role> ...`: logs its argv, drains for a moment on SIGTERM.
echo "$@ threads=${BATON_TORCH_THREADS:-unset}" > "$FAKE_DIR/$$.args"
trap 'sleep 0.3; exit 0' TERM
while true; do sleep 0.05; done
"""


def fake_python(tmp_path: Path) -> str:
    p = tmp_path / "fake-python"
    p.write_text(FAKE_WORKER)
    p.chmod(p.stat().st_mode | stat.S_IEXEC)
    os.environ["FAKE_DIR"] = str(tmp_path)
    return str(p)


def test_local_worker_argv() -> None:
    conn = LocalProcessConnector(LocalWorkerSettings(
        nats_url="nats://127.0.0.1:4999",
        engine=EngineConfig(engine="mocker", model="baton-tiny", speedup=0.5, num_blocks=64, max_num_seqs=4),
        engine_fields=("engine", "model", "speedup", "num_blocks", "max_num_seqs"),
        discovery_ttl=3, log_level="warning", extra_args=["--max-inflight", "8"]))
    assert conn.argv("decode", "decode-1234abcd") == [
        sys.executable, "-m", "services.decode", "--nats-url", "nats://127.0.0.1:4999", "--worker-id",
        "decode-1234abcd", "--engine", "mocker", "--model", "baton-tiny", "--num-blocks", "64",
        "--max-num-seqs", "4", "--mocker-speedup", "0.5", "--discovery-ttl", "3", "--log-level", "warning",
        "--max-inflight", "8"]


def test_local_connector_starts_stops_the_chosen_worker_and_replaces_crashes(tmp_path: Path) -> None:
    conn = LocalProcessConnector(LocalWorkerSettings(nats_url="nats://x", python=fake_python(tmp_path),
                                                     stop_timeout=5, env={"BATON_TORCH_THREADS": "3"}))

    async def main() -> None:
        known = await conn.start({"decode": 3, "prefill": 1})
        assert known == {"decode": 3, "prefill": 1}
        decode = conn.active("decode")
        assert len(decode) == 3 and all(w.worker_id.startswith("decode-") for w in decode)
        # Down to one: the two the planner ranks first go (the least loaded), not the others.
        ranked = [WorkerInfo(worker_id=w.worker_id, role="decode", model="m") for w in (decode[2], decode[0], decode[1])]
        await conn.scale("decode", 1, ranked)
        assert [w.worker_id for w in conn.active("decode")] == [decode[1].worker_id]
        assert {w.worker_id for w in conn.stopping("decode")} == {decode[0].worker_id, decode[2].worker_id}
        with anyio.fail_after(5):
            while conn.stopping("decode"):
                await anyio.sleep(0.1)
                await conn.reconcile()
        assert decode[0].proc.returncode == 0 and decode[2].proc.returncode == 0  # drained, exit 0
        # A worker that dies is replaced, keeping the fleet at its target.
        victim = conn.active("prefill")[0]
        victim.proc.kill()
        await victim.proc.wait()
        await conn.reconcile()
        assert len(conn.active("prefill")) == 1 and conn.active("prefill")[0].worker_id != victim.worker_id
        # The replacement's shell must have started (written its argv) before we stop it.
        with anyio.fail_after(10):
            while len(list(tmp_path.glob("*.args"))) < 5:
                await anyio.sleep(0.05)
        await conn.close(timeout=5)
        assert not conn.workers

    anyio.run(main)
    args = [p.read_text() for p in tmp_path.glob("*.args")]
    assert len(args) == 5  # 3 decode + 1 prefill + 1 replacement
    assert all("--worker-id" in a and "--nats-url nats://x" in a for a in args)
    assert all(a.split()[-1] == "threads=3" for a in args)  # the settings' environment, the CPU share


def test_local_connector_unregistered_workers_go_first(tmp_path: Path) -> None:
    conn = LocalProcessConnector(LocalWorkerSettings(nats_url="nats://x", python=fake_python(tmp_path)))

    async def main() -> None:
        await conn.scale("decode", 2, [])
        old, _new = sorted(conn.active("decode"), key=lambda w: w.started)
        old.started -= 10
        # Only `old` has registered (the planner knows only it): the newer, unregistered one holds no work.
        await conn.scale("decode", 1, [WorkerInfo(worker_id=old.worker_id, role="decode", model="m")])
        assert conn.active("decode") == [old]
        await conn.close(timeout=5)

    t0 = time.monotonic()
    anyio.run(main)
    assert time.monotonic() - t0 < 10
