"""Which worker caches which KV block, and every worker's longest cached prefix of a request in one pass.

Layout. Workers get small dense *slots*, so a set of workers is one Python int bitmask. The index
is one dict, ``block hash -> bitmask of the workers that hold it``. Because block hashes are
chained (:mod:`shared.kv_hash`), equal hashes mean equal prefixes, so a request's cached prefix on
every worker at once is a walk down its hashes, AND-ing the masks until no worker is left:
one dict lookup per request block, whatever the number of workers or of blocks stored.

Per worker the index keeps the runs of hashes it was told about (the lists decoded from the
events, appended as they are: no per-block work) and an exact count of the blocks it holds. The
runs are what dropping or clearing a worker walks; they are compacted when removed blocks make
up half of them, so they stay within 2x of the live count. The count bounds memory: a worker that
claims more blocks than ``max_blocks_per_worker`` must have lost removals, so it is cleared and
re-learned (a resync), and past ``max_indexed_blocks`` in all the fullest worker is.

Bulk dict operations (``update``/``isdisjoint``/``map`` over ``dict.get``) run the per-block work
in C: a run of new blocks held by no one else costs one ``isdisjoint`` and one ``update``.

Not thread-safe: the router mutates and queries it from its event loop only.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from itertools import chain, repeat
from typing import Final

import msgspec

from shared.messages import KvEventBatch

DEVICE_TIER: Final = 1
_EXHAUST = deque(maxlen=0).extend  # run an iterator to the end in C, keeping nothing

# Measured by bench/router_micro.py (tracemalloc, 1M blocks over 64 workers, 64-bit hashes: 93):
# the dict entry, the hash and mask ints, the run lists. Used for the index-size metric.
BYTES_PER_INDEXED_BLOCK: Final = 95


class EventOutcome(Enum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"  # seq already seen (replayed or redelivered): ignored
    GAP = "gap"  # seq jumped: events were lost; the worker's blocks were dropped, this batch applied
    RESTARTED = "restarted"  # seq went back to 1: a new incarnation; old blocks dropped
    FIRST_GAP = "first_gap"  # first batch seen from this worker is not seq 1: its earlier blocks are unknown
    OTHER_TIER = "other_tier"  # host/disk tier events: counted for seq, not indexed


class WorkerSlots:
    """Dense slot numbers for worker ids; freed slots are reused (lowest first) to keep masks small."""

    def __init__(self) -> None:
        self._slot_of: dict[str, int] = {}
        self._ids: list[str | None] = []
        self._free: list[int] = []

    def slot(self, worker_id: str) -> int:
        s = self._slot_of.get(worker_id)
        if s is None:
            if self._free:
                self._free.sort(reverse=True)
                s = self._free.pop()
                self._ids[s] = worker_id
            else:
                s = len(self._ids)
                self._ids.append(worker_id)
            self._slot_of[worker_id] = s
        return s

    def get(self, worker_id: str) -> int | None:
        return self._slot_of.get(worker_id)

    def worker_id(self, slot: int) -> str | None:
        return self._ids[slot] if slot < len(self._ids) else None

    def release(self, worker_id: str) -> None:
        s = self._slot_of.pop(worker_id, None)
        if s is not None:
            self._ids[s] = None
            self._free.append(s)

    def __len__(self) -> int:
        return len(self._slot_of)


class _WorkerBlocks:
    __slots__ = ("bit", "count", "last_seq", "runs", "runs_len", "worker_id")

    def __init__(self, worker_id: str, bit: int) -> None:
        self.worker_id = worker_id
        self.bit = bit
        self.count = 0  # blocks this worker holds, exact
        self.runs: list[Sequence[int]] = []  # every run stored since the last compaction (may hold removed ones)
        self.runs_len = 0
        self.last_seq = 0  # last KvEventBatch.seq applied; 0: none yet


def prefix_depths(hashes: Sequence[int], holders: Sequence[dict[int, int]]) -> list[tuple[int, int]]:
    """Walk ``hashes`` through the union of ``holders`` maps; return ``(depth, mask)`` pairs.

    Each pair says: the workers in ``mask`` hold exactly the first ``depth`` blocks (depth >= 1).
    Workers in no pair hold not even the first block. Stops as soon as no worker is left, so a
    miss costs one lookup; a full hit one lookup per block in the first map (the event index),
    done in C by ``map``. The other maps (predictions) are consulted only at blocks that some
    still-matching worker lacks in the first one.
    """
    if not hashes or not holders:
        return []
    first = holders[0]
    extra = [m.get for m in holders[1:] if m]
    if not first and not extra:
        return []
    it = map(first.get, hashes, repeat(0))
    alive = next(it)
    for g in extra:
        alive |= g(hashes[0], 0)
    if not alive:
        return []
    out: list[tuple[int, int]] = []
    depth = 1
    for m in it:
        if m != alive:  # fast path: exactly the same workers hold this block too
            kept = m & alive
            if kept != alive and extra:
                h = hashes[depth]
                for g in extra:
                    m |= g(h, 0)
                kept = m & alive
            if kept != alive:
                out.append((depth, alive ^ kept))
                alive = kept
                if not alive:
                    return out
        depth += 1
    out.append((depth, alive))
    return out


def depths_by_slot(pairs: Iterable[tuple[int, int]]) -> dict[int, int]:
    """``{slot: cached prefix blocks}`` from :func:`prefix_depths` pairs (one entry per holding worker)."""
    out: dict[int, int] = {}
    for depth, mask in pairs:
        while mask:
            low = mask & -mask
            out[low.bit_length() - 1] = depth
            mask ^= low
    return out


class WorkerSnapshot(msgspec.Struct, kw_only=True, array_like=True):
    worker_id: str
    last_seq: int
    hashes: bytes  # little-endian uint64 array
    needs_resync: bool = False


class IndexSnapshot(msgspec.Struct, kw_only=True, array_like=True):
    """The index as of ``stream_seq`` (last KV-events stream message applied), for fast restarts."""

    stream_seq: int
    created_at: float
    workers: list[WorkerSnapshot]


_snapshot_decoder = msgspec.msgpack.Decoder(IndexSnapshot)


def encode_snapshot(stream_seq: int, created_at: float, parts: list[WorkerSnapshot]) -> bytes:
    return msgspec.msgpack.encode(IndexSnapshot(stream_seq=stream_seq, created_at=created_at, workers=parts))


@dataclass
class IndexStats:
    workers: int
    blocks: int  # distinct hashes
    entries: int  # (worker, block) pairs
    approx_bytes: int


class KvBlockIndex:
    """Block hash -> workers holding it, kept current from :class:`KvEventBatch` events."""

    def __init__(
        self,
        slots: WorkerSlots | None = None,
        max_blocks_per_worker: int = 1 << 21,
        max_indexed_blocks: int = 1 << 25,
    ) -> None:
        self.slots = slots if slots is not None else WorkerSlots()
        self.max_blocks_per_worker = max_blocks_per_worker
        self.max_indexed_blocks = max_indexed_blocks
        self.holders: dict[int, int] = {}
        self._workers: dict[str, _WorkerBlocks] = {}
        self.num_entries = 0
        # Workers whose view was dropped for lost events or a blown bound: the caller asks them to resync.
        self.needs_resync: set[str] = set()

    # --- queries ---------------------------------------------------------------------------

    def overlaps(self, hashes: Sequence[int], *extra: dict[int, int]) -> dict[str, int]:
        """``{worker_id: cached prefix blocks}`` for every worker holding at least the first block."""
        ids = self.slots.worker_id
        return {ids(s): d for s, d in depths_by_slot(prefix_depths(hashes, (self.holders, *extra))).items()}  # type: ignore[misc]

    def worker_blocks(self, worker_id: str) -> set[int]:
        """Every hash ``worker_id`` holds (O(its history); for tests, snapshots and debugging)."""
        w = self._workers.get(worker_id)
        if w is None:
            return set()
        get, bit = self.holders.get, w.bit
        return {h for h in chain.from_iterable(w.runs) if get(h, 0) & bit}

    def block_count(self, worker_id: str) -> int:
        w = self._workers.get(worker_id)
        return w.count if w else 0

    def last_seq(self, worker_id: str) -> int:
        w = self._workers.get(worker_id)
        return w.last_seq if w else 0

    @property
    def worker_ids(self) -> list[str]:
        return list(self._workers)

    def __contains__(self, worker_id: str) -> bool:
        return worker_id in self._workers

    def stats(self) -> IndexStats:
        return IndexStats(workers=len(self._workers), blocks=len(self.holders), entries=self.num_entries,
                          approx_bytes=self.num_entries * BYTES_PER_INDEXED_BLOCK)

    # --- events ----------------------------------------------------------------------------

    def apply(self, batch: KvEventBatch) -> EventOutcome:
        """Apply one worker's batch, checking its sequence number first.

        Within a batch the order of stores and removals is lost, so stores go first: a hash in both
        lists ends up not indexed. If the truth was remove-then-store, the router under-estimates
        that block until the worker evicts it again (a missed hit); the other order would leave a
        phantom block that no later event ever removes.
        """
        w = self._workers.get(batch.worker_id)
        if w is None:
            w = self._add_worker(batch.worker_id)
        seq = batch.seq
        outcome = EventOutcome.APPLIED
        if w.last_seq:
            if seq == w.last_seq + 1:
                pass
            elif seq <= w.last_seq:
                if seq != 1:
                    return EventOutcome.DUPLICATE
                self._clear(w)
                outcome = EventOutcome.RESTARTED
            else:
                self._clear(w)
                self.needs_resync.add(w.worker_id)
                outcome = EventOutcome.GAP
        elif seq != 1 and not batch.cleared:
            self.needs_resync.add(w.worker_id)
            outcome = EventOutcome.FIRST_GAP
        w.last_seq = seq
        if batch.tier != DEVICE_TIER:
            return EventOutcome.OTHER_TIER if outcome is EventOutcome.APPLIED else outcome
        if batch.cleared:
            self._clear(w)
            # A full dump after a clear (the resync answer) makes this worker's view exact again.
            self.needs_resync.discard(w.worker_id)
        for run in batch.stored:
            self._store(w, run.block_hashes)
        if batch.removed:
            self._remove(w, batch.removed)
        self._enforce_bounds(w)
        return outcome

    def store(self, worker_id: str, hashes: Sequence[int]) -> None:
        """Record blocks as cached on ``worker_id`` (no sequence check)."""
        w = self._workers.get(worker_id) or self._add_worker(worker_id)
        self._store(w, hashes)
        self._enforce_bounds(w)

    def remove(self, worker_id: str, hashes: Sequence[int]) -> None:
        w = self._workers.get(worker_id)
        if w is not None:
            self._remove(w, hashes)

    def clear_worker(self, worker_id: str) -> None:
        """Forget every block of ``worker_id`` but keep its slot and sequence number."""
        w = self._workers.get(worker_id)
        if w is not None:
            self._clear(w)

    def drop_worker(self, worker_id: str, release_slot: bool = True) -> None:
        """Forget ``worker_id`` entirely (its discovery key expired); free its slot unless told not to.

        Keep the slot when other maps (predictions) may still carry its bit: a reused slot would
        hand those bits to another worker.
        """
        w = self._workers.pop(worker_id, None)
        if w is not None:
            self._clear(w)
        if release_slot:
            self.slots.release(worker_id)
        self.needs_resync.discard(worker_id)

    # --- snapshots -------------------------------------------------------------------------

    def snapshot_parts(self) -> Iterator[WorkerSnapshot]:
        """One worker at a time, so a caller can yield to its event loop in between.

        Parts taken at different moments still restore exactly: each carries its worker's
        ``last_seq``, and replay from the stream seq taken *before* the first part skips, per
        worker, the batches a part already includes (their seq is not above ``last_seq``).
        """
        import numpy as np

        for worker_id in list(self._workers):
            w = self._workers.get(worker_id)
            if w is None:
                continue
            yield WorkerSnapshot(worker_id=w.worker_id, last_seq=w.last_seq,
                                 hashes=np.fromiter(self.worker_blocks(w.worker_id), dtype="<u8",
                                                    count=w.count).tobytes(),
                                 needs_resync=w.worker_id in self.needs_resync)

    def snapshot(self, stream_seq: int, created_at: float) -> bytes:
        return encode_snapshot(stream_seq, created_at, list(self.snapshot_parts()))

    def restore(self, data: bytes) -> IndexSnapshot:
        """Replace the contents with a snapshot; returns it (its ``stream_seq`` says where to resume)."""
        import numpy as np

        snap = _snapshot_decoder.decode(data)
        for worker_id in list(self._workers):
            self.drop_worker(worker_id)
        for ws in snap.workers:
            w = self._add_worker(ws.worker_id)
            w.last_seq = ws.last_seq
            self._store(w, np.frombuffer(ws.hashes, dtype="<u8").tolist())
            if ws.needs_resync:
                self.needs_resync.add(ws.worker_id)
        return snap

    # --- internals -------------------------------------------------------------------------

    def _add_worker(self, worker_id: str) -> _WorkerBlocks:
        w = _WorkerBlocks(worker_id, 1 << self.slots.slot(worker_id))
        self._workers[worker_id] = w
        return w

    def _store(self, w: _WorkerBlocks, hashes: Sequence[int]) -> None:
        if not hashes:
            return
        holders, bit = self.holders, w.bit
        before = len(holders)
        if holders.keys().isdisjoint(hashes):
            # Common case: blocks nobody holds yet. All new, so the count is the dict's growth,
            # and every value is the one shared ``bit`` object.
            holders.update(zip(hashes, repeat(bit)))
            added = len(holders) - before
        else:
            added = 0
            get = holders.get
            for h in hashes:
                m = get(h, 0)
                if not m & bit:
                    holders[h] = m | bit
                    added += 1
        w.count += added
        self.num_entries += added
        w.runs.append(hashes)
        w.runs_len += len(hashes)
        if w.runs_len > 2 * w.count + 256:  # re-stored blocks pile up in the runs too
            self._compact(w)

    def _remove(self, w: _WorkerBlocks, hashes: Sequence[int]) -> None:
        holders, bit = self.holders, w.bit
        masks = list(map(holders.get, hashes, repeat(0)))
        if masks.count(bit) == len(masks):
            # Common case: this worker alone held every one of them: delete in C.
            before = len(holders)
            _EXHAUST(map(holders.pop, hashes, repeat(None)))
            removed = before - len(holders)
        else:
            removed = 0
            get = holders.get
            for h in hashes:
                m = get(h, 0)
                if m & bit:
                    removed += 1
                    if m == bit:
                        del holders[h]
                    else:
                        holders[h] = m ^ bit
        w.count -= removed
        self.num_entries -= removed
        if w.runs_len > 2 * w.count + 256:
            self._compact(w)

    def _compact(self, w: _WorkerBlocks) -> None:
        live = self.worker_blocks(w.worker_id)
        w.runs = [list(live)] if live else []
        w.runs_len = len(live)

    def _clear(self, w: _WorkerBlocks) -> None:
        holders, bit = self.holders, w.bit
        get = holders.get
        for h in chain.from_iterable(w.runs):
            m = get(h, 0)
            if m & bit:
                if m == bit:
                    del holders[h]
                else:
                    holders[h] = m ^ bit
        self.num_entries -= w.count
        w.count = 0
        w.runs = []
        w.runs_len = 0

    def _enforce_bounds(self, w: _WorkerBlocks) -> None:
        if w.count > self.max_blocks_per_worker:
            # More than any worker's pool can hold: removals were lost. Start over for this worker.
            self._clear(w)
            self.needs_resync.add(w.worker_id)
        while self.num_entries > self.max_indexed_blocks and self._workers:
            fullest = max(self._workers.values(), key=lambda x: x.count)
            self._clear(fullest)
            self.needs_resync.add(fullest.worker_id)
