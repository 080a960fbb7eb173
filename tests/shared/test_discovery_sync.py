"""Discovery's initial read (shared/discovery.py): ``WorkerView.synced`` means the whole fleet is in
the view, even when nats-py says its initial values are done before they have all arrived."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from nats.js.kv import KeyValue

from shared.bus import Bus
from shared.discovery import WorkerView, workers_bucket
from shared.messages import WorkerInfo, encode
from shared.streams import initial_entry_count
from shared.subjects import worker_key
from tests.procs import with_bus

pytestmark = pytest.mark.timeout(60)
WORKERS = 16


class EarlyMarker:
    """A nats-py KeyWatcher whose "initial values done" marker (None) comes first, before the
    entries it stands for: the order nats-py produces when it reads the consumer's pending count
    as 0 while those entries are still in flight to the client."""

    def __init__(self, watcher: KeyValue.KeyWatcher) -> None:
        self._watcher = watcher
        self._sub = watcher._sub
        self._marker_sent = False

    async def updates(self, timeout: float = 5.0):
        if not self._marker_sent:
            self._marker_sent = True
            return None
        entry = await self._watcher.updates(timeout=timeout)
        if entry is None:  # nats-py's own marker: already sent, out of order
            entry = await self._watcher.updates(timeout=timeout)
        return entry

    async def stop(self) -> None:
        await self._watcher.stop()


def test_synced_waits_for_entries_behind_an_early_marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_watchall = KeyValue.watchall

    async def early_watchall(self: KeyValue, **kwargs: object) -> EarlyMarker:
        return EarlyMarker(await real_watchall(self, **kwargs))

    async def main(bus: Bus, url: str) -> None:
        kv = await workers_bucket(bus)
        for i in range(WORKERS):
            info = WorkerInfo(worker_id=f"w{i}", role="decode", model="m", generate_subject=f"gen.w{i}")
            await kv.put(worker_key("decode", info.worker_id), encode(info))
        # What the server says makes up a fresh watch's initial values: every key.
        watcher = await real_watchall(kv)
        with anyio.fail_after(10):
            while await watcher.updates(timeout=5) is not None:
                pass
        assert await initial_entry_count(watcher) == WORKERS
        await watcher.stop()

        monkeypatch.setattr(KeyValue, "watchall", early_watchall)
        view = WorkerView(bus)
        seen_at_sync: list[int] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(view.run)
            with anyio.fail_after(10):
                await view.synced.wait()
            seen_at_sync.append(len(view.workers("decode")))
            tg.cancel_scope.cancel()
        assert seen_at_sync == [WORKERS]

    with_bus(tmp_path, main)
