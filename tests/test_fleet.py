"""Fleet-scale simulation: one process hosting many mocker decode workers (services/decode/fleet.py).

End to end: a real nats-server, router and frontend, and one ``decode --replicas 64`` process. Every
replica must register on its own, report load, and serve: requests spread over many of them, and
those that served publish their own KV events.
"""

from __future__ import annotations

import subprocess
import sys
import time

import anyio
import httpx
import nats
import pytest
from nats.js.errors import NoKeysError

from services.decode.fleet import DecodeFleet
from services.decode.worker import DecodeSettings
from shared import subjects
from shared.engines import EngineConfig
from tests.procs import Stack, running, service_env, wait_until

REPLICAS = 64


def test_fleet_ids_and_engine_check() -> None:
    fleet = DecodeFleet(DecodeSettings(engine=EngineConfig(engine="mocker"), worker_id="sim"), 12)
    ids = [w.worker_id for w in fleet.workers]
    assert ids == [f"sim-{i:03d}" for i in range(12)]
    assert len({id(w.engine) for w in fleet.workers}) == 12  # each replica its own engine
    with pytest.raises(ValueError, match="--engine mocker"):
        DecodeFleet(DecodeSettings(engine=EngineConfig(engine="torch")), 2)
    with pytest.raises(ValueError, match="between 1 and"):
        DecodeFleet(DecodeSettings(engine=EngineConfig(engine="mocker")), 0)


@pytest.fixture(scope="module")
def fleet_stack(tmp_path_factory: pytest.TempPathFactory):
    stack = Stack(tmp_path_factory.mktemp("fleet"), "mocker", decode_workers=1, decode_replicas=REPLICAS,
                  extra_decode_args=["--worker-id", "sim", "--no-disagg", "--mocker-speedup", "20"])
    with running(stack) as s:
        yield s


async def registered_decoders(kv, expected: set[str], within: float = 10.0) -> set[str]:
    """The decode workers whose keys the bucket holds, read until they are ``expected`` or
    ``within`` seconds pass. nats-py's ``keys()`` can end before its first entry: its watcher may
    see the consumer's pending count at zero while the entries are still in flight to it, and then
    it raises NoKeysError on a full bucket. A retry reads the bucket again."""
    deadline = time.monotonic() + within
    while True:
        try:
            found = {k.split(".", 1)[1] for k in await kv.keys() if k.startswith("decode.")}
        except NoKeysError:
            found = set()
        if found == expected or time.monotonic() > deadline:
            return found
        await anyio.sleep(0.1)


def test_fleet_registers_and_serves(fleet_stack: Stack) -> None:
    expected = {f"sim-{i:03d}" for i in range(REPLICAS)}
    assert fleet_stack.health()["decode_workers"] == REPLICAS
    assert len(fleet_stack.decoders) == 1  # one process

    async def scenario() -> tuple[set[str], set[str], set[str], list[int]]:
        nc = await nats.connect(fleet_stack.nats.url)
        loaders: set[str] = set()
        kv_writers: set[str] = set()
        try:
            async def on_load(msg) -> None:
                loaders.add(msg.subject.rsplit(".", 1)[1])

            async def on_kv(msg) -> None:
                kv_writers.add(msg.subject.rsplit(".", 1)[1])

            await nc.subscribe(subjects.load("*"), cb=on_load)
            await nc.subscribe(subjects.kv_events("*"), cb=on_kv)
            kv = await nc.jetstream().key_value(subjects.WORKERS_BUCKET)
            registered = {k.split(".", 1)[1] for k in await kv.keys() if k.startswith("decode.")}

            statuses: list[int] = []
            async with httpx.AsyncClient(base_url=fleet_stack.url, timeout=30) as client:
                async def one(i: int) -> None:
                    # Distinct prompts: no shared prefix, so the router spreads them by load.
                    r = await client.post("/v1/completions", json={
                        "model": "baton-tiny", "prompt": f"request {i} " + "word " * (20 + i % 7),
                        "max_tokens": 8})
                    statuses.append(r.status_code)

                async with anyio.create_task_group() as tg:
                    for i in range(2 * REPLICAS):
                        tg.start_soon(one, i)
            # Load reports come every second from every replica, KV events within 50 ms of a change.
            deadline = time.monotonic() + 5
            while (loaders != expected or not kv_writers) and time.monotonic() < deadline:
                await anyio.sleep(0.05)
            return registered, loaders, kv_writers, statuses
        finally:
            await nc.close()

    started = time.monotonic()
    registered, loaders, kv_writers, statuses = anyio.run(scenario)
    assert registered == expected
    assert statuses == [200] * (2 * REPLICAS)
    assert loaders == expected
    # The replicas that served published KV events under their own ids; many served, not one.
    assert kv_writers <= expected
    assert len(kv_writers) >= REPLICAS // 4, sorted(kv_writers)
    assert time.monotonic() - started < 30


def test_fleet_drains_on_sigterm(fleet_stack: Stack) -> None:
    """SIGTERM: every replica withdraws its registration (the frontend sees none left) and the
    process exits 0 within its drain."""
    host = fleet_stack.decoders[0]
    started = time.monotonic()
    assert host.stop(timeout=20) == 0, host.log()[-3000:]
    assert time.monotonic() - started < 15
    wait_until(lambda: not fleet_stack.health().get("decode_workers"), 10, what="replicas deregistered")


def test_replicas_refuse_a_real_engine(tmp_path) -> None:
    r = subprocess.run([sys.executable, "-m", "services.decode", "--engine", "torch", "--replicas", "2",
                        "--nats-url", "nats://127.0.0.1:1"], capture_output=True, text=True, timeout=120,
                       env=service_env())
    assert r.returncode == 2, r.stderr
    assert "decode: error: --replicas > 1 needs --engine mocker" in r.stderr
    assert "Traceback" not in r.stderr
