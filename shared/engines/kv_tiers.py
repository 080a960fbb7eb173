"""KV block tiers below the engine's own pool: G2 host memory, G3 local disk.

A block here is the bytes of one KV block over every layer (K then V), keyed by its chained
block hash (shared/kv_hash.py), so equal keys mean equal prefixes across tiers and workers.

- ``HostTier`` (G2) keeps blocks in host memory: pinned when CUDA exists, so uploads can be async.
- ``DiskTier`` (G3) writes one file per block: a header (magic, hash, length, BLAKE2b checksum)
  then the payload. Every read is verified against hash and checksum, so a corrupt or truncated
  block is dropped and recomputed, never fed to attention. On start it scans its directory, so a
  restarted worker reuses what it wrote before.
- ``TieredKvStore`` chains them. A block evicted from G2 is demoted to G3, and a hit in G3 is
  promoted back to G2. Eviction is per tier, by LRU or S3-FIFO. Writes to disk go through a
  background thread, so the engine's step loop never waits on the file system.

Tier numbers are the ones KV events carry: 1 device (the engine's pool), 2 host, 3 disk.
"""

from __future__ import annotations

import logging
import os
import queue
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from hashlib import blake2b
from pathlib import Path

from prometheus_client import Counter, Gauge

from shared.engines.eviction import EvictionPolicy, make_policy

log = logging.getLogger("baton.kv_tiers")

TIER_HOST, TIER_DISK = 2, 3
_MAGIC = b"BKV1"
_HEADER = struct.Struct("<4sQQ8s")  # magic, block hash, payload length, blake2b-8 of payload

TIER_BLOCKS = Gauge("baton_kv_tier_blocks", "KV blocks held per tier", ["tier"])
TIER_BYTES = Gauge("baton_kv_tier_bytes", "KV bytes held per tier", ["tier"])
TIER_HITS = Counter("baton_kv_tier_hits_total", "Block lookups served per tier", ["tier"])
TIER_MISSES = Counter("baton_kv_tier_misses_total", "Block lookups no tier could serve")
OFFLOAD_BYTES = Counter("baton_kv_offload_bytes_total", "Bytes moved down into a tier", ["tier"])
ONBOARD_BYTES = Counter("baton_kv_onboard_bytes_total", "Bytes moved back up from a tier", ["tier"])
CORRUPT = Counter("baton_kv_tier_corrupt_total", "Blocks dropped because they failed verification", ["tier"])


def checksum(data: bytes | memoryview) -> bytes:
    return blake2b(data, digest_size=8).digest()


@dataclass
class TierStats:
    blocks: int = 0
    bytes: int = 0
    hits: int = 0
    misses: int = 0
    offloaded: int = 0
    onboarded: int = 0
    corrupt: int = 0


class _Tier:
    tier = 0
    stats: TierStats

    def _hit(self, data: bytes) -> bytes:
        """Book a hit (under the tier's lock); metrics are updated by the caller outside it."""
        self.stats.hits += 1
        self.stats.onboarded += len(data)
        return data

    def _count_onboard(self, data: bytes) -> bytes:
        TIER_HITS.labels(str(self.tier)).inc()
        ONBOARD_BYTES.labels(str(self.tier)).inc(len(data))
        return data


class HostTier(_Tier):
    tier = TIER_HOST

    def __init__(self, capacity_blocks: int, policy: str = "lru") -> None:
        self.policy: EvictionPolicy = make_policy(policy, capacity_blocks)
        self._data: dict[int, bytes] = {}
        self.stats = TierStats()
        self._lock = threading.Lock()

    def __contains__(self, h: int) -> bool:
        return h in self._data

    def put(self, h: int, data: bytes) -> list[tuple[int, bytes]]:
        """Store; returns the (hash, data) pairs evicted to make room (to demote)."""
        with self._lock:
            if h in self._data:
                self.policy.touch(h)
                return []
            out = []
            for victim in self.policy.insert(h):
                vd = self._data.pop(victim, None)  # type: ignore[arg-type]
                if vd is not None:
                    self.stats.bytes -= len(vd)
                    out.append((victim, vd))
            self._data[h] = data
            self.stats.bytes += len(data)
            self.stats.blocks = len(self._data)
            self.stats.offloaded += len(data)
        OFFLOAD_BYTES.labels(str(self.tier)).inc(len(data))
        return out  # type: ignore[return-value]

    def get(self, h: int) -> bytes | None:
        with self._lock:
            data = self._data.get(h)
            if data is None:
                self.stats.misses += 1
                return None
            self.policy.touch(h)
            self._hit(data)
        return self._count_onboard(data)

    def keys(self) -> list[int]:
        with self._lock:
            return list(self._data)


class DiskTier(_Tier):
    tier = TIER_DISK

    def __init__(self, directory: str | Path, capacity_blocks: int, policy: str = "lru") -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.policy: EvictionPolicy = make_policy(policy, capacity_blocks)
        self._sizes: dict[int, int] = {}
        self.stats = TierStats()
        self._lock = threading.Lock()
        self._load_index()

    def _path(self, h: int) -> Path:
        return self.dir / f"{h:016x}.kv"

    def _load_index(self) -> None:
        """Reuse what a previous run wrote: read each file's header (payloads are verified on read)."""
        for f in sorted(self.dir.glob("*.kv"), key=lambda p: p.stat().st_mtime):
            try:
                with open(f, "rb") as fh:
                    magic, h, n, _ = _HEADER.unpack(fh.read(_HEADER.size))
                if magic != _MAGIC or f.name != f"{h:016x}.kv":
                    raise ValueError("bad header")
            except (OSError, ValueError, struct.error):
                f.unlink(missing_ok=True)
                continue
            for victim in self.policy.insert(h):
                self._unlink(victim)  # type: ignore[arg-type]
            self._sizes[h] = n
        self.stats.blocks = len(self._sizes)
        self.stats.bytes = sum(self._sizes.values())
        if self._sizes:
            log.info("disk tier %s: reusing %d blocks from a previous run", self.dir, len(self._sizes))

    def _unlink(self, h: int) -> None:
        n = self._sizes.pop(h, 0)
        self.stats.bytes -= n
        self._path(h).unlink(missing_ok=True)

    def __contains__(self, h: int) -> bool:
        return h in self._sizes

    def put(self, h: int, data: bytes) -> list[int]:
        """Store; returns the hashes evicted (and deleted) to make room."""
        with self._lock:
            if h in self._sizes:
                self.policy.touch(h)
                return []
            victims = self.policy.insert(h)
            for victim in victims:
                self._unlink(victim)  # type: ignore[arg-type]
            tmp = self._path(h).with_suffix(".tmp")
            with open(tmp, "wb") as fh:
                fh.write(_HEADER.pack(_MAGIC, h, len(data), checksum(data)))
                fh.write(data)
            os.replace(tmp, self._path(h))  # whole or absent, never half-written
            self._sizes[h] = len(data)
            self.stats.bytes += len(data)
            self.stats.blocks = len(self._sizes)
            self.stats.offloaded += len(data)
        OFFLOAD_BYTES.labels(str(self.tier)).inc(len(data))
        return victims  # type: ignore[return-value]

    def get(self, h: int) -> bytes | None:
        with self._lock:
            if h not in self._sizes:
                self.stats.misses += 1
                return None
            try:
                raw = self._path(h).read_bytes()
                magic, fh_hash, n, digest = _HEADER.unpack(raw[: _HEADER.size])
                data = raw[_HEADER.size :]
                if magic != _MAGIC or fh_hash != h or n != len(data) or checksum(data) != digest:
                    raise ValueError("verification failed")
            except (OSError, ValueError, struct.error) as e:
                log.warning("dropping corrupt KV block %016x from disk: %s", h, e)
                self.stats.corrupt += 1
                CORRUPT.labels(str(self.tier)).inc()
                self.policy.remove(h)
                self._unlink(h)
                self.stats.blocks = len(self._sizes)
                return None
            self.policy.touch(h)
            self._hit(data)
        return self._count_onboard(data)

    def keys(self) -> list[int]:
        with self._lock:
            return list(self._sizes)


class TieredKvStore:
    """G2 then G3, with demotion on eviction and a background writer.

    ``on_stored(tier, hashes)`` and ``on_removed(tier, hashes)`` report movements so the worker
    can publish KV events that carry the tier.
    """

    def __init__(self, host_blocks: int, disk_dir: str | Path | None = None, disk_blocks: int = 0,
                 policy: str = "lru", on_stored: Callable[[int, list[int]], None] | None = None,
                 on_removed: Callable[[int, list[int]], None] | None = None) -> None:
        self.host = HostTier(host_blocks, policy) if host_blocks > 0 else None
        self.disk = DiskTier(disk_dir, disk_blocks, policy) if disk_dir and disk_blocks > 0 else None
        self._on_stored = on_stored or (lambda tier, hs: None)
        self._on_removed = on_removed or (lambda tier, hs: None)
        self._queue: queue.Queue[tuple[int, bytes] | None] = queue.Queue(maxsize=4096)
        self._writer = threading.Thread(target=self._write_loop, name="kv-offload", daemon=True)
        self._writer.start()
        if self.disk is not None and self.disk.keys():
            self._on_stored(TIER_DISK, self.disk.keys())

    def offload(self, h: int, data: bytes) -> bool:
        """Queue a block evicted from the engine's pool; False if the writer is backed up (dropped)."""
        try:
            self._queue.put_nowait((h, data))
            return True
        except queue.Full:
            return False

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self._store(*item)
            except Exception:  # a full disk must not kill the engine: the block is just lost
                log.exception("KV offload failed")
            finally:
                self._queue.task_done()

    def _store(self, h: int, data: bytes) -> None:
        if self.host is not None:
            demoted = self.host.put(h, data)
            self._on_stored(TIER_HOST, [h])
            if demoted:
                self._on_removed(TIER_HOST, [d for d, _ in demoted])
                if self.disk is not None:
                    for dh, dd in demoted:
                        self._disk_put(dh, dd)
        elif self.disk is not None:
            self._disk_put(h, data)

    def _disk_put(self, h: int, data: bytes) -> None:
        assert self.disk is not None
        gone = self.disk.put(h, data)
        self._on_stored(TIER_DISK, [h])
        if gone:
            self._on_removed(TIER_DISK, gone)

    def import_blocks(self, blocks: list[tuple[int, bytes]]) -> None:
        """Store blocks pulled from a peer (G4) now, so the next prefix lookup onboards them."""
        for h, data in blocks:
            self._store(h, data)

    def leading_available(self, hashes: list[int]) -> int:
        """How many of ``hashes``, from the first, this store holds (host or disk)."""
        n = 0
        for h in hashes:
            if not self.contains(h):
                break
            n += 1
        return n

    def flush(self) -> None:
        """Wait until every queued offload is stored (tests, shutdown)."""
        self._queue.join()

    def lookup(self, h: int) -> tuple[int, bytes] | None:
        """(tier, data) of a block, from the fastest tier that holds it; promotes disk hits."""
        if self.host is not None:
            data = self.host.get(h)
            if data is not None:
                return TIER_HOST, data
        if self.disk is not None:
            data = self.disk.get(h)
            if data is not None:
                if self.host is not None:
                    self.offload(h, data)  # keep it close for the next turn
                return TIER_DISK, data
        TIER_MISSES.inc()
        return None

    def contains(self, h: int) -> int:
        """The tier holding ``h`` (2 or 3), or 0."""
        if self.host is not None and h in self.host:
            return TIER_HOST
        if self.disk is not None and h in self.disk:
            return TIER_DISK
        return 0

    def update_gauges(self) -> None:
        for t in (self.host, self.disk):
            if t is not None:
                TIER_BLOCKS.labels(str(t.tier)).set(t.stats.blocks)
                TIER_BYTES.labels(str(t.tier)).set(t.stats.bytes)

    def close(self) -> None:
        self._queue.put(None)
        self._writer.join(5)
