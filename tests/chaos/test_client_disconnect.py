"""Chaos: clients that hang up mid-request. Every hop cancels, and every KV block returns to the
worker's pool (read from the worker's own load reports)."""

from __future__ import annotations

import threading

import anyio
import httpx
import nats
import pytest

from shared import subjects
from shared.messages import LoadReport, load_report_decoder
from tests.procs import Stack, wait_until

pytestmark = pytest.mark.timeout(180)

LONG = {"model": "baton-tiny", "prompt": "Tell me everything about relay races", "max_tokens": 4000, "temperature": 0,
        "ignore_eos": True}


class LoadWatcher:
    """Keeps the latest LoadReport of every worker, from a background NATS subscription."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.latest: dict[str, LoadReport] = {}
        self.peak_used = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: anyio.run(self._main), daemon=True)

    async def _main(self) -> None:
        nc = await nats.connect(self.url)

        async def on_load(msg) -> None:
            r = load_report_decoder.decode(msg.data)
            self.latest[r.worker_id] = r
            self.peak_used = max(self.peak_used, r.kv_blocks_used)

        await nc.subscribe(subjects.LOAD_ALL, cb=on_load)
        while not self._stop.is_set():
            await anyio.sleep(0.05)
        await nc.close()

    def __enter__(self) -> LoadWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def test_disconnects_free_every_block(stack: Stack) -> None:
    with LoadWatcher(stack.nats.url) as loads:
        wait_until(lambda: bool(loads.latest), 10, 0.05, "a load report")

        release = threading.Event()

        def hang_up_streaming(i: int) -> None:
            with httpx.stream("POST", f"{stack.url}/v1/completions", json={**LONG, "stream": True, "seed": i},
                              timeout=60) as r:
                for n, _ in enumerate(r.iter_lines()):
                    if n >= 10:
                        release.wait(30)
                        return  # leave mid-stream: the connection closes here

        def hang_up_waiting() -> None:
            try:
                httpx.post(f"{stack.url}/v1/completions", json=LONG, timeout=0.5)
            except httpx.TimeoutException:
                pass  # the client gave up before the answer: the request must be cancelled

        threads = [threading.Thread(target=hang_up_streaming, args=(i,)) for i in range(6)]
        threads += [threading.Thread(target=hang_up_waiting) for _ in range(2)]
        for t in threads:
            t.start()
        wait_until(lambda: any(r.running >= 6 for r in loads.latest.values()), 30, 0.02, "streams running")
        release.set()
        for t in threads:
            t.join(60)
        # Without cancellation these would run 4000 tokens each; with it, the pool empties.
        wait_until(lambda: all(r.running == 0 and r.kv_blocks_used == 0 for r in loads.latest.values()), 20, 0.05,
                   "every request cancelled and every KV block back in the pool")
        assert loads.peak_used > 0
    r = httpx.post(f"{stack.url}/v1/completions", json={**LONG, "max_tokens": 4}, timeout=60)
    assert r.status_code == 200
