"""Discovery on a JetStream KeyValue bucket: one key per worker, refreshed; TTL expiry = gone.

A worker registers with :class:`WorkerRegistration` (puts its WorkerInfo every ttl/3 and deletes
it on a clean exit). Anyone who needs the live fleet runs a :class:`WorkerView`, which watches the
bucket. The bucket's max age is the TTL and the server writes a delete marker when a key ages
out (nats-server >= 2.11 limit markers), so a SIGKILLed worker vanishes from every view within
the TTL. The view also ages entries out on its own clock, in case a marker is missed.
"""

from __future__ import annotations

import logging
import time

import anyio
import nats.errors
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from shared.bus import Bus
from shared.messages import WorkerInfo, encode, worker_info_decoder
from shared.streams import initial_entry_count, key_value_bucket, watch_alive
from shared.subjects import WORKERS_BUCKET, worker_key

log = logging.getLogger("baton.discovery")

DEFAULT_TTL = 6.0


async def workers_bucket(bus: Bus, ttl: float = DEFAULT_TTL) -> KeyValue:
    """Open the discovery bucket, creating it if absent (idempotent across services)."""
    return await key_value_bucket(bus, KeyValueConfig(
        bucket=WORKERS_BUCKET,
        history=1,
        ttl=ttl,
        storage=StorageType.MEMORY,
        limit_marker_ttl=max(1.0, ttl),
    ))


class WorkerRegistration:
    """Keeps one worker's key alive while ``run()`` runs; deletes it when cancelled."""

    def __init__(self, bus: Bus, info: WorkerInfo, ttl: float = DEFAULT_TTL) -> None:
        self.bus = bus
        self.info = info
        self.ttl = ttl
        self.key = worker_key(info.role, info.worker_id)
        self._kv: KeyValue | None = None
        self._withdrawn = False

    async def register(self) -> None:
        self._kv = await workers_bucket(self.bus, self.ttl)
        await self._put()

    async def _put(self) -> None:
        if self._kv is None:
            self._kv = await workers_bucket(self.bus, self.ttl)
        try:
            # Short: a put stuck in a cluster election is better retried soon than waited on
            # past the key's TTL (then every view would drop this worker).
            with anyio.fail_after(min(2.0, self.ttl / 2)):
                await self._kv.put(self.key, encode(self.info))
        except Exception:
            # The bucket may be gone (a NATS restart loses memory storage): reopen it next time.
            self._kv = None
            raise

    async def update(self, info: WorkerInfo) -> None:
        """Replace the advertised info (e.g. LoRA adapters loaded) and put it now."""
        self.info = info
        if not self._withdrawn:
            await self._put()

    async def run(self) -> None:
        if self._kv is None:
            await self.register()
        try:
            delay = self.ttl / 3
            while not self._withdrawn:
                await anyio.sleep(delay)
                if self._withdrawn:
                    break
                try:
                    await self._put()
                    delay = self.ttl / 3
                except Exception as e:  # NATS away or electing: retry soon, the TTL is the truth
                    log.warning("discovery refresh failed: %r", e)
                    delay = min(0.5, self.ttl / 3)
        finally:
            await self.withdraw()

    async def withdraw(self) -> None:
        """Remove the key now (graceful drain): routers stop sending new work at once."""
        if self._withdrawn or self._kv is None:
            self._withdrawn = True
            return
        self._withdrawn = True
        with anyio.move_on_after(3, shield=True):
            try:
                await self._kv.delete(self.key)
            except Exception as e:
                log.debug("discovery delete failed: %r", e)


class WorkerView:
    """A live map of registered workers, kept current by watching the bucket."""

    def __init__(self, bus: Bus, ttl: float = DEFAULT_TTL) -> None:
        self.bus = bus
        self.ttl = ttl
        self._workers: dict[str, tuple[WorkerInfo, float]] = {}
        self.synced = anyio.Event()
        self._changed = anyio.Event()
        # Whether the watch is known to work. While it does not (its consumer was lost with a NATS
        # server, a re-watch waits on an election), entries are not aged out on our own clock: no
        # news is not news of death, and dropping every worker would refuse every request.
        self._watch_ok = False

    async def run(self) -> None:
        while True:
            try:
                await self._watch()
                log.info("re-watching discovery after a reconnect")
            except anyio.get_cancelled_exc_class():
                raise
            except Exception as e:  # the watch consumer died (NATS restart): watch again
                log.warning("discovery watch failed (%r); rewatching", e)
                await anyio.sleep(0.5)

    async def _watch(self) -> None:
        kv = await workers_bucket(self.bus, self.ttl)
        seen_reconnects = self.bus.reconnects
        with anyio.fail_after(10):
            watcher = await kv.watchall()
        checked = time.monotonic()
        entries = 0  # entries taken from this watch
        initial: int | None = None  # entries that make up its initial values, once nats-py says they are in
        try:
            while True:
                try:
                    entry = await watcher.updates(timeout=min(1.0, self.ttl / 2))
                except nats.errors.TimeoutError:
                    if initial is not None:  # quiet since the marker: nothing more is on its way
                        self._mark_synced()
                    self._expire()
                    if self.bus.reconnects != seen_reconnects:
                        return  # the client moved or the server restarted: its consumer may be gone
                    if time.monotonic() - checked >= 1.0:
                        checked = time.monotonic()
                        if not await watch_alive(watcher):
                            self._watch_ok = False
                            return  # lost with a server of the cluster: watch anew
                    continue
                if entry is None:  # nats-py: initial values delivered (some may still be on their way)
                    initial = await initial_entry_count(watcher)
                    if initial is None or entries >= initial:
                        self._mark_synced()
                    continue
                entries += 1
                if entry.operation in ("DEL", "PURGE") or not entry.value:
                    self._workers.pop(entry.key, None)
                else:
                    try:
                        self._workers[entry.key] = (worker_info_decoder.decode(entry.value), time.monotonic())
                    except Exception:
                        log.warning("ignoring undecodable discovery entry %s", entry.key)
                if initial is not None and entries >= initial:
                    self._mark_synced()  # the last of the initial values, applied
                self._expire()
                self._notify()
        finally:
            self._watch_ok = False
            with anyio.move_on_after(2, shield=True):
                try:
                    await watcher.stop()
                except Exception:
                    pass

    def _mark_synced(self) -> None:
        self._watch_ok = True
        self.synced.set()

    def _expire(self) -> None:
        # Belt and braces: a key not refreshed for 1.5 TTL is gone even if no marker came.
        if not self._watch_ok:
            return
        cutoff = time.monotonic() - 1.5 * self.ttl
        stale = [k for k, (_, seen) in self._workers.items() if seen < cutoff]
        for k in stale:
            del self._workers[k]
        if stale:
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def workers(self, role: str | None = None, model: str | None = None) -> list[WorkerInfo]:
        self._expire()
        return [
            info
            for info, _ in self._workers.values()
            if (role is None or info.role == role) and (not model or info.model == model)
        ]

    def get(self, worker_id: str) -> WorkerInfo | None:
        for info, _ in self._workers.values():
            if info.worker_id == worker_id:
                return info
        return None

    def models(self) -> list[str]:
        return sorted({info.model for info in self.workers()})

    async def wait_changed(self) -> None:
        await self._changed.wait()

    async def wait_for(self, role: str = "decode", count: int = 1) -> None:
        """Wait until at least ``count`` workers of ``role`` are registered (no timeout: wrap it)."""
        while len(self.workers(role)) < count:
            await self.wait_changed()
