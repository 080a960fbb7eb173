"""The planner for real under ``baton up`` (mocker engine): a burst grows the decode fleet, the
backlog drains, the idle fleet shrinks back to its minimum, and no request fails on the way."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import httpx
import msgspec
import nats
import pytest

from baton.nats_server import free_port
from shared import nats_auth, subjects
from shared.messages import PlannerObservation, ScaleDecision, planner_observation_decoder
from tests.procs import service_env, wait_until
from tests.test_baton_up import alive, children_of

pytestmark = pytest.mark.timeout(150)

decision_decoder = msgspec.msgpack.Decoder(ScaleDecision)

# A slow mocker with a small batch: 80 requests of 48 tokens queue up on one worker for ~12 s.
PLANNER = ("--up-intervals 2 --down-intervals 4 --up-cooldown 1 --down-cooldown 2 --startup-grace 10 "
           "--decode-queue-up 1 --decode-queue-down 0.2 --max-num-seqs 4")


def decode_pids(root: int) -> list[int]:
    out = []
    for pid in children_of(root):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"services.decode" in f.read() and alive(pid):
                    out.append(pid)
        except OSError:
            pass
    return out


class Watcher:
    """Planner decisions and observations, as any NATS client sees them."""

    def __init__(self) -> None:
        self.decisions: list[ScaleDecision] = []
        self.observations: list[PlannerObservation] = []

    async def run(self, url: str, stop: anyio.Event, creds: Path) -> None:
        # baton up's NATS wants credentials: the operator's (admin) identity it wrote to its store.
        nc = await nats.connect(url, **nats_auth.read_credentials(creds).connect_options())

        async def on_decision(msg) -> None:
            self.decisions.append(decision_decoder.decode(msg.data))

        async def on_observation(msg) -> None:
            self.observations.append(planner_observation_decoder.decode(msg.data))

        await nc.subscribe(subjects.PLANNER_DECISIONS, cb=on_decision)
        await nc.subscribe(subjects.PLANNER_OBSERVATIONS, cb=on_observation)
        try:
            await stop.wait()
        finally:
            await nc.close()


def test_burst_scales_decode_up_then_back_to_minimum(tmp_path: Path) -> None:
    http_port, nats_port = free_port(), free_port()
    log = open(tmp_path / "up.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "baton", "up", "--engine", "mocker", "--mocker-speedup", "0.5", "--host", "127.0.0.1",
         "--port", str(http_port), "--nats-port", str(nats_port), "--log-dir", str(tmp_path / "logs"),
         "--data-dir", str(tmp_path / "nats"), "--discovery-ttl", "3", "--prefill-workers", "0", "--decode-workers", "1", "--max-decode-workers", "3",
         "--planner-interval", "0.5", "--planner-args", PLANNER],
        stdout=log, stderr=subprocess.STDOUT, env=service_env(), start_new_session=True,
    )
    watcher = Watcher()
    try:
        wait_until(lambda: "Baton is ready" in (tmp_path / "up.log").read_text() or proc.poll() is not None,
                   120, 0.1, "baton up ready")
        assert proc.poll() is None, (tmp_path / "up.log").read_text()
        assert len(decode_pids(proc.pid)) == 1

        async def main() -> tuple[list[int], float, float, float]:
            stop = anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(watcher.run, f"nats://127.0.0.1:{nats_port}", stop,
                              tmp_path / "nats" / "auth" / "admin.creds")
                await anyio.sleep(0.5)
                t0 = time.monotonic()
                grown_at = 0.0
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", timeout=120,
                                             limits=httpx.Limits(max_connections=200)) as client:

                    async def one(i: int) -> int:
                        r = await client.post("/v1/completions", json={
                            "model": "baton-tiny", "prompt": f"burst request {i} " * 8, "max_tokens": 48,
                            "ignore_eos": True, "temperature": 0})
                        assert r.status_code == 200, r.text
                        assert r.json()["usage"]["completion_tokens"] == 48
                        return r.status_code

                    async def watch_growth() -> None:
                        nonlocal grown_at
                        while not any(o.decode_workers >= 2 for o in watcher.observations):
                            await anyio.sleep(0.1)
                        grown_at = time.monotonic() - t0

                    tg.start_soon(watch_growth)
                    codes = await asyncio.gather(*(one(i) for i in range(80)))
                    served_at = time.monotonic() - t0
                    # Quiet now (a trickle of requests keeps running through the scale-downs): back to one
                    # process and one registered worker; the others drained and exited.
                    trickle: list[asyncio.Future[int]] = []
                    with anyio.fail_after(40):
                        while len(decode_pids(proc.pid)) != 1 or watcher.observations[-1].decode_workers != 1:
                            trickle.append(asyncio.ensure_future(one(1000 + len(trickle))))
                            await anyio.sleep(0.5)
                    shrunk_at = time.monotonic() - t0
                    codes += await asyncio.gather(*trickle)
                stop.set()
            return codes, grown_at, served_at, shrunk_at

        codes, grown_at, served_at, shrunk_at = anyio.run(main)
        assert codes == [200] * len(codes) and len(codes) > 80  # no request failed, scale-downs included
        decode = [d for d in watcher.decisions if d.role == "decode"]
        ups = [d for d in decode if d.after > d.before]
        downs = [d for d in decode if d.after < d.before]
        assert ups and not ups[0].dry_run and "waiting/worker" in ups[0].reason, decode
        assert 0 < grown_at < 15, f"a second decode worker registered only {grown_at:.1f}s into the burst"
        assert max(o.decode_workers for o in watcher.observations) >= 2
        assert downs and downs[-1].after == 1, decode
        assert all(d.timestamp >= ups[-1].timestamp for d in downs)  # no flapping during the burst
        logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("decode-*.log"))
        assert "received SIGTERM: draining" in logs
        print(f"grew after {grown_at:.1f}s, burst served in {served_at:.1f}s, back to 1 after {shrunk_at:.1f}s;",
              "decisions:", [(d.before, d.after) for d in decode])
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()

