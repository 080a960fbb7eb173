"""KV-aware routing: send each request where its prefix is cached, unless that worker is too busy.

For each candidate worker the cost is, in KV blocks,

    cost = overlap_weight * prefill_blocks + decode_blocks
    prefill_blocks = (prompt tokens not cached there + prefill tokens queued there) / block_size
    decode_blocks  = KV blocks in use there + the blocks this request adds (those beyond its cached prefix)

from the index (:mod:`shared.routing.kv_index`) and the workers' LoadReports. A request under a
LoRA adapter adds ``lora_load_weight`` blocks on every worker that does not hold the adapter
resident (it would load it first, and may evict another one): workers that have it are preferred,
unless they are that much busier. The cheapest worker
wins (``temperature`` 0; ties go to the one with fewest requests, then at random), or one is
sampled with probability ``softmax(-normalised cost / temperature)``.

Between reports the router adds what it has just sent to each worker (``pending``: prompt tokens
to prefill, new blocks, requests) and predicts that the chosen worker will cache the request's
blocks (:class:`PredictedBlocks`, with a TTL). Without this a run of cache misses would pile onto
the worker that looked idle at the last report, and a burst sharing a new prefix would not know
where it is going to be. A request's pending prefill ends when the worker's KV events announce
its prompt's last block (its prefill is done); all of its pending work ends with the first load
report received ``PENDING_MARGIN_S`` after the decision (the report counts it already).

``kv-approx`` mode is the same policy fed by predictions only (for engines without KV events):
every routed request refreshes its blocks on the chosen worker, and they are forgotten after a TTL.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat

from shared.kv_hash import adapter_root, block_hashes
from shared.messages import KvEventBatch, LoadReport, RouteRequest, WorkerInfo
from shared.routing.kv_index import (
    DEVICE_TIER,
    EventOutcome,
    KvBlockIndex,
    WorkerSlots,
    depths_by_slot,
    prefix_depths,
)

PENDING_MARGIN_S = 0.15  # a report received this long after a decision reflects it
PENDING_MAX_AGE_S = 5.0  # no report for this long: forget pending work anyway (worker silent or gone)


@dataclass
class KvRouterConfig:
    overlap_weight: float = 1.0  # weight of blocks to prefill against blocks in use
    # A prefix block in a worker's host/disk tier costs this share of recomputing it (it is
    # copied back, not computed): cheaper than a miss, dearer than a device hit.
    lower_tier_weight: float = 0.25
    # A worker without the request's LoRA adapter resident costs this many blocks more (0: adapter-blind).
    lora_load_weight: float = 32.0
    temperature: float = 0.0  # 0: argmin; > 0: softmax sampling over normalised costs
    use_kv_events: bool = True  # False: kv-approx (predictions only)
    prediction_ttl: float = 0.0  # seconds; 0: 10 s with events, 120 s without
    max_predicted_blocks: int = 1 << 22
    max_blocks_per_worker: int = 1 << 21
    max_indexed_blocks: int = 1 << 25
    seed: int | None = None

    def effective_ttl(self) -> float:
        if self.prediction_ttl > 0:
            return self.prediction_ttl
        return 10.0 if self.use_kv_events else 120.0


class PredictedBlocks:
    """Blocks each worker should hold soon because the router sent them there, for about ``ttl`` s.

    Two generations of ``hash -> worker bitmask``: additions go to the current one, which becomes
    the previous one every ``ttl/2``; the previous one is dropped whole. An entry therefore lives
    between ttl/2 and ttl after its last refresh, and expiry costs nothing per block.
    """

    def __init__(self, ttl: float, max_blocks: int = 1 << 22) -> None:
        self.ttl = ttl
        self.max_blocks = max_blocks
        self.current: dict[int, int] = {}
        self.previous: dict[int, int] = {}
        self._rotated_at: float | None = None  # set on first use, on the caller's clock

    def maps(self, now: float) -> tuple[dict[int, int], dict[int, int]]:
        self._rotate(now)
        return self.current, self.previous

    def add(self, bit: int, hashes: Sequence[int], now: float) -> None:
        self._rotate(now)
        cur = self.current
        if cur.keys().isdisjoint(hashes):
            cur.update(zip(hashes, repeat(bit)))
        else:
            cur.update(zip(hashes, map(bit.__or__, map(cur.get, hashes, repeat(0))), strict=False))
        if len(cur) > self.max_blocks // 2:  # bound memory under a flood: age out early
            self.previous, self.current, self._rotated_at = cur, {}, now

    def __len__(self) -> int:
        return len(self.current) + len(self.previous)

    def _rotate(self, now: float) -> None:
        if self._rotated_at is None:
            self._rotated_at = now
        age = now - self._rotated_at
        if age >= self.ttl / 2:
            self.previous = {} if age >= self.ttl else self.current
            self.current = {}
            self._rotated_at = now


class PendingRequest:
    """A request this router sent to a worker that the worker's reports may not show yet."""

    __slots__ = ("blocks", "done", "prefill_tokens", "prompt_last_hash", "seen_seq", "sent_at")

    def __init__(self, sent_at: float, prefill_tokens: int, blocks: int, prompt_last_hash: int | None) -> None:
        self.sent_at = sent_at
        self.prefill_tokens = prefill_tokens  # zeroed once the worker announces the prompt's last block
        self.blocks = blocks  # KV blocks it adds there (its blocks beyond the cached prefix)
        self.prompt_last_hash = prompt_last_hash
        self.seen_seq = 0  # the KV event batch that announced its prompt's last block (0: none yet)
        self.done = False  # no longer counted: a report shows it (it may still sit in ``pending``)


class WorkerLoad:
    """The last LoadReport of one worker plus what this router sent it since.

    ``busy_tokens`` (prefill tokens queued, reported plus pending) and ``busy_blocks`` (KV blocks
    in use, reported plus pending) are kept summed so the cost loop reads two attributes.
    """

    __slots__ = ("active_blocks", "busy_blocks", "busy_tokens", "kv_blocks_total", "lora_sent", "loras_resident",
                 "pending", "pending_blocks", "pending_by_last_hash", "pending_prefill_tokens", "pending_requests",
                 "prefill_tokens_queued", "reported_at", "reported_kv_seq", "requests", "seen")

    def __init__(self) -> None:
        self.active_blocks = 0
        self.prefill_tokens_queued = 0
        self.requests = 0  # running + waiting, as reported
        self.kv_blocks_total = 0
        self.reported_at = 0.0
        self.reported_kv_seq = 0  # the last report's kv_seq (0: the worker sends none)
        self.pending: deque[PendingRequest] = deque()  # oldest first
        # Pending requests whose prompt the worker's KV events announced, by that batch's seq: the
        # first report with a kv_seq at least that shows them (running, or finished and freed).
        self.seen: deque[PendingRequest] = deque()
        self.pending_by_last_hash: dict[int, PendingRequest] = {}
        self.pending_prefill_tokens = 0
        self.pending_blocks = 0
        self.pending_requests = 0
        self.busy_tokens = 0
        self.busy_blocks = 0
        self.loras_resident: frozenset[str] = frozenset()  # as reported
        self.lora_sent: dict[str, float] = {}  # adapter -> when this router last sent a request for it here

    def has_lora(self, name: str) -> bool:
        """Whether ``name`` is resident here: reported so, or sent here since the last report was taken."""
        if name in self.loras_resident:
            return True
        sent = self.lora_sent.get(name)
        return sent is not None and sent > self.reported_at - PENDING_MARGIN_S

    def on_report(self, report: LoadReport, now: float) -> None:
        self.active_blocks = report.kv_blocks_used
        self.prefill_tokens_queued = report.prefill_tokens_queued
        self.requests = report.running + report.waiting
        self.kv_blocks_total = report.kv_blocks_total
        self.reported_at = now
        if report.loras_resident or self.loras_resident:
            self.loras_resident = frozenset(report.loras_resident)
        if report.kv_seq < self.reported_kv_seq:  # the worker restarted: its seqs start again
            self.seen.clear()
        self.reported_kv_seq = report.kv_seq
        seen = self.seen
        while seen and seen[0].seen_seq <= report.kv_seq:
            self._drop(seen.popleft())
        self.expire_pending(now - PENDING_MARGIN_S)
        self._sum()

    def add_pending(self, now: float, prefill_tokens: int, blocks: int, prompt_last_hash: int | None = None) -> None:
        if self.pending and self.pending[0].sent_at < now - PENDING_MAX_AGE_S:
            self.expire_pending(now - PENDING_MAX_AGE_S)
        p = PendingRequest(now, prefill_tokens, blocks, prompt_last_hash)
        self.pending.append(p)
        if prompt_last_hash is not None:
            self.pending_by_last_hash[prompt_last_hash] = p
        self.pending_prefill_tokens += prefill_tokens
        self.pending_blocks += blocks
        self.pending_requests += 1
        self._sum()

    def prefill_done(self, last_hashes: list[int], seq: int = 0) -> None:
        """The worker cached blocks ending runs at these hashes (in KV event batch ``seq``): requests
        whose prompt ends there are prefilled, and any report with ``kv_seq >= seq`` shows them."""
        by_hash = self.pending_by_last_hash
        changed = False
        for h in last_hashes:
            p = by_hash.pop(h, None)
            if p is None or p.done:
                continue
            if p.prefill_tokens:
                self.pending_prefill_tokens -= p.prefill_tokens
                p.prefill_tokens = 0
                changed = True
            if seq <= 0:
                continue
            if seq <= self.reported_kv_seq:  # the report that shows it came first (another path)
                self._drop(p)
                self._trim()
            else:
                p.seen_seq = seq
                self.seen.append(p)  # batches arrive in seq order, so ``seen`` stays sorted
        if changed:
            self._sum()

    def _drop(self, p: PendingRequest) -> None:
        """Stop counting ``p``: a report shows it. It leaves ``pending`` when it reaches the front."""
        if p.done:
            return
        p.done = True
        self.pending_prefill_tokens -= p.prefill_tokens
        self.pending_blocks -= p.blocks
        self.pending_requests -= 1
        p.prefill_tokens = p.blocks = 0
        if p.prompt_last_hash is not None and self.pending_by_last_hash.get(p.prompt_last_hash) is p:
            del self.pending_by_last_hash[p.prompt_last_hash]
        self._sum()

    def expire_pending(self, before: float) -> None:
        q = self.pending
        while q and q[0].sent_at <= before:
            self._drop(q.popleft())
        self._trim()
        self._sum()

    def _trim(self) -> None:
        """Let go of requests no longer counted at the front of the queues (a worker that never
        reports a kv_seq must not grow ``seen`` without end)."""
        for q in (self.pending, self.seen):
            while q and q[0].done:
                q.popleft()

    def _sum(self) -> None:
        self.busy_tokens = self.prefill_tokens_queued + self.pending_prefill_tokens
        self.busy_blocks = self.active_blocks + self.pending_blocks


class KvRouter:
    """The ``kv`` / ``kv-approx`` routing policy (implements :class:`~shared.routing.policy.RoutingPolicy`)."""

    def __init__(self, config: KvRouterConfig | None = None) -> None:
        self.config = config or KvRouterConfig()
        self.name = "kv" if self.config.use_kv_events else "kv-approx"
        self.slots = WorkerSlots()
        self.index = KvBlockIndex(self.slots, self.config.max_blocks_per_worker, self.config.max_indexed_blocks)
        # Blocks in workers' lower tiers (host, disk), same slots; fed from tier > 1 events.
        self.lower_index = KvBlockIndex(self.slots, self.config.max_blocks_per_worker, self.config.max_indexed_blocks)
        self.last_hint: tuple[str, int] | None = None  # (peer, blocks) for the last decision, G4
        self.predicted = PredictedBlocks(self.config.effective_ttl(), self.config.max_predicted_blocks)
        self.loads: dict[str, WorkerLoad] = {}
        self._rng = random.Random(self.config.seed)
        self._retired: deque[tuple[float, str]] = deque()  # forgotten workers whose slot waits out the TTL

    # --- inputs ----------------------------------------------------------------------------

    def on_load(self, report: LoadReport, now: float | None = None) -> None:
        load = self.loads.get(report.worker_id)
        if load is None:
            load = self.loads[report.worker_id] = WorkerLoad()
        load.on_report(report, time.monotonic() if now is None else now)

    def forget_worker(self, worker_id: str, now: float | None = None) -> None:
        """Drop everything about a worker that left discovery."""
        now = time.monotonic() if now is None else now
        self.index.drop_worker(worker_id, release_slot=False)
        self.lower_index.drop_worker(worker_id, release_slot=False)
        self.loads.pop(worker_id, None)
        if self.slots.get(worker_id) is not None:
            self._retired.append((now, worker_id))
        self._release_retired(now)

    def maintain(self, now: float | None = None) -> None:
        """Periodic upkeep: free the slots of workers forgotten more than a prediction TTL ago."""
        self._release_retired(time.monotonic() if now is None else now)

    def _release_retired(self, now: float) -> None:
        # Predictions may still carry a forgotten worker's bit until they age out; only then is
        # its slot safe to hand to another worker.
        while self._retired and self._retired[0][0] <= now - self.predicted.ttl:
            _, worker_id = self._retired.popleft()
            if worker_id not in self.index and worker_id not in self.loads:
                self.slots.release(worker_id)

    # --- the decision ----------------------------------------------------------------------

    def request_hashes(self, request: RouteRequest, block_size: int, root: int | None = None) -> list[int]:
        """The prompt's block hashes for ``block_size``: the frontend's, if it sent them for that size
        (``root``: the chain's root when hashing here, the adapter's for a LoRA request)."""
        sent = getattr(request, "block_hashes", None)
        if sent and getattr(request, "block_size", 0) == block_size:
            return sent
        return block_hashes(request.token_ids, block_size, adapter_root(None) if root is None else root)

    @staticmethod
    def _root(request: RouteRequest, workers: list[WorkerInfo]) -> int | None:
        """The hash root of a LoRA request: its adapter's, with the digest its workers advertise."""
        lora = getattr(request, "lora", "")
        if not lora:
            return None
        digest = next((a.digest for w in workers for a in w.loras if a.name == lora), "")
        return adapter_root(lora, digest)

    def overlaps(self, hashes: Sequence[int], now: float) -> dict[int, int]:
        """``{slot: cached prefix blocks}``: confirmed (events) union predicted blocks."""
        cur, prev = self.predicted.maps(now)
        if self.config.use_kv_events:
            return depths_by_slot(prefix_depths(hashes, (self.index.holders, cur, prev)))
        return depths_by_slot(prefix_depths(hashes, (cur, prev)))

    def choose_worker(self, request: RouteRequest, workers: list[WorkerInfo]) -> tuple[WorkerInfo, int]:
        now = time.monotonic()
        worker, overlap, hashes = self.decide(request, workers, now)
        self.record(worker, hashes, overlap, len(request.token_ids), now, getattr(request, "lora", ""))
        return worker, overlap

    def decide(
        self, request: RouteRequest, workers: list[WorkerInfo], now: float,
        peers: Sequence[WorkerInfo] | None = None,
    ) -> tuple[WorkerInfo, int, list[int]]:
        """Pick a worker; returns it, its predicted cached blocks and the hashes for its block size.

        The index is keyed by worker and every worker serves one model, so only ``workers`` (the
        request's model's candidates) and ``peers`` (every worker of that model, the G4 peers;
        default: ``workers``) are ever looked up: blocks of another model with equal token ids
        never count, nor become a peer hint."""
        self.last_hint = None
        block_size = workers[0].block_size
        if any(w.block_size != block_size for w in workers):
            return self._decide_mixed(request, workers, now)
        hashes = self.request_hashes(request, block_size, self._root(request, workers))
        depths = self.overlaps(hashes, now)
        costs = self._costs(workers, depths, len(request.token_ids))
        if getattr(request, "lora", ""):
            self._charge_lora_loads(costs, workers, request.lora)
        if self.lower_index.holders:
            self._credit_lower_tiers(costs, workers, hashes, depths, len(request.token_ids))
        i = self._pick(costs, workers)
        w = workers[i]
        slot = self.slots.get(w.worker_id)
        self.last_hint = self._peer_hint(w, slot, hashes, peers or workers) if self.lower_index.holders else None
        return w, depths.get(slot, 0) if slot is not None else 0, hashes

    def _peer_hint(self, chosen: WorkerInfo, slot: int | None, hashes: Sequence[int],
                   peers: Sequence[WorkerInfo]) -> tuple[str, int] | None:
        """G4: a peer (of the same model) that holds more of the prompt (device or lower tiers) than
        the chosen worker, so the chosen one can pull the difference from the peer's host/disk tiers."""
        allowed = {self.slots.get(p.worker_id) for p in peers}
        union = {s: d for s, d in depths_by_slot(prefix_depths(hashes, (self.index.holders, self.lower_index.holders)))
                 .items() if s in allowed}
        mine = union.get(slot, 0) if slot is not None else 0
        best_slot, best = max(union.items(), key=lambda kv: kv[1], default=(None, 0))
        if best_slot is None or best <= mine:
            return None
        peer = self.slots.worker_id(best_slot)
        return (peer, best) if peer and peer != chosen.worker_id else None

    def _costs(self, workers: list[WorkerInfo], depths: dict[int, int], num_tokens: int,
               absolute: bool = False) -> list[float]:
        """Cost of each worker, in blocks; all ``workers`` share one block size.

        Relative unless ``absolute``: the part every worker shares is left out.
        """
        bs = workers[0].block_size
        k = self.config.overlap_weight / bs
        ids = [w.worker_id for w in workers]
        lds = list(map(self.loads.get, ids, repeat(_IDLE)))
        # Everyone as if nothing were cached. The request's own share, k * num_tokens + its blocks,
        # is the same everywhere and left out: it moves neither the argmin nor the softmax (which
        # normalises by the spread). A list comprehension keeps the per-worker work small,
        costs = [k * ld.busy_tokens + ld.busy_blocks for ld in lds]
        if absolute:
            shared = k * num_tokens + -(-num_tokens // bs)
            costs = [c + shared for c in costs]
        if depths:
            # then credit the few workers that hold a prefix: fewer tokens to prefill (at least one
            # is always computed), and the shared blocks take no new memory there.
            worker_id, index = self.slots.worker_id, ids.index
            for slot, depth in depths.items():
                wid = worker_id(slot)
                if wid is None:
                    continue
                try:
                    i = index(wid)
                except ValueError:  # not a candidate (other model, excluded, gone)
                    continue
                costs[i] -= k * min(depth * bs, num_tokens - 1) + depth
        return costs

    def _charge_lora_loads(self, costs: list[float], workers: list[WorkerInfo], lora: str, scale: int = 1) -> None:
        """Workers without the adapter resident would load it first: ``lora_load_weight`` blocks more."""
        weight = self.config.lora_load_weight * scale
        if weight <= 0:
            return
        loads, idle = self.loads, _IDLE
        for i, w in enumerate(workers):
            if not loads.get(w.worker_id, idle).has_lora(lora):
                costs[i] += weight

    def _credit_lower_tiers(self, costs: list[float], workers: list[WorkerInfo], hashes: Sequence[int],
                            depths: dict[int, int], num_tokens: int) -> None:
        """Credit workers whose host/disk tiers continue the prompt past their device prefix."""
        bs = workers[0].block_size
        k = self.config.overlap_weight / bs * (1.0 - self.config.lower_tier_weight)
        union = depths_by_slot(prefix_depths(hashes, (self.index.holders, self.lower_index.holders)))
        for i, w in enumerate(workers):
            slot = self.slots.get(w.worker_id)
            if slot is None:
                continue
            device = depths.get(slot, 0)
            extra = union.get(slot, 0) - device
            if extra > 0:
                costs[i] -= k * min(extra * bs, max(0, num_tokens - 1 - device * bs))

    def _pick(self, costs: list[float], workers: list[WorkerInfo]) -> int:
        temperature = self.config.temperature
        best = min(costs)
        if temperature > 0 and len(costs) > 1:
            spread = max(costs) - best
            if spread > 0:
                weights = [math.exp(-(c - best) / spread / temperature) for c in costs]
                return self._rng.choices(range(len(costs)), weights)[0]
        if costs.count(best) == 1:
            return costs.index(best)
        ties = [i for i, c in enumerate(costs) if c == best]
        # Equal cost (e.g. all idle, nothing cached): fewest requests, then at random, so equal
        # workers share the load instead of the first in the list taking it all.
        loads, idle = self.loads, _IDLE
        reqs = [loads.get(workers[i].worker_id, idle) for i in ties]
        counts = [ld.requests + ld.pending_requests for ld in reqs]
        fewest = min(counts)
        ties = [i for i, n in zip(ties, counts, strict=True) if n == fewest]
        return ties[0] if len(ties) == 1 else self._rng.choice(ties)

    def _decide_mixed(
        self, request: RouteRequest, workers: list[WorkerInfo], now: float
    ) -> tuple[WorkerInfo, int, list[int]]:
        # Workers with different block sizes hash differently: one walk per block size, and costs
        # compared in tokens (a cost in blocks times the block size) rather than in blocks.
        by_size: dict[int, tuple[list[int], dict[int, int]]] = {}
        costs: list[float] = []
        for w in workers:
            if w.block_size not in by_size:
                hashes = self.request_hashes(request, w.block_size, self._root(request, workers))
                by_size[w.block_size] = (hashes, self.overlaps(hashes, now))
            cost = self._costs([w], by_size[w.block_size][1], len(request.token_ids), absolute=True)
            if getattr(request, "lora", ""):
                self._charge_lora_loads(cost, [w], request.lora)
            costs.append(cost[0] * w.block_size)
        w = workers[self._pick(costs, workers)]
        hashes, depths = by_size[w.block_size]
        slot = self.slots.get(w.worker_id)
        return w, depths.get(slot, 0) if slot is not None else 0, hashes

    def record(self, worker: WorkerInfo, hashes: list[int], overlap: int, num_tokens: int, now: float,
               lora: str = "") -> None:
        """Count the request against ``worker`` until its events and load report catch up (and its
        LoRA adapter as resident there until a report says otherwise)."""
        bit = 1 << self.slots.slot(worker.worker_id)
        # With events, blocks already cached are confirmed; predict the rest. Without, refresh all
        # (a prefix in use stays in an LRU cache).
        new = hashes[overlap:] if self.config.use_kv_events else hashes
        if new:
            self.predicted.add(bit, new, now)
        load = self.loads.get(worker.worker_id)
        if load is None:
            load = self.loads[worker.worker_id] = WorkerLoad()
        bs = worker.block_size
        cached_tokens = min(overlap * bs, num_tokens - 1)
        # Its last full prompt block ends the run the worker announces when the prefill is done.
        last = hashes[-1] if self.config.use_kv_events and len(hashes) > overlap else None
        load.add_pending(now, num_tokens - cached_tokens, -(-num_tokens // bs) - overlap, last)
        if lora:
            load.lora_sent[lora] = now

    def on_kv_events(self, batch: KvEventBatch, outcome: EventOutcome | None = None) -> None:
        """Events from a worker: requests whose prompts it has now cached no longer wait for prefill;
        lower-tier (host/disk) events feed the lower-tier index."""
        if outcome in (EventOutcome.GAP, EventOutcome.RESTARTED, EventOutcome.FIRST_GAP):
            self.lower_index.clear_worker(batch.worker_id)  # resynced with the device index
        if batch.tier != DEVICE_TIER:
            if outcome is EventOutcome.DUPLICATE:
                return
            if batch.cleared:
                self.lower_index.clear_worker(batch.worker_id)
            for run in batch.stored:
                self.lower_index.store(batch.worker_id, run.block_hashes)
            if batch.removed:
                self.lower_index.remove(batch.worker_id, batch.removed)
            return
        if batch.stored:
            load = self.loads.get(batch.worker_id)
            if load is not None and load.pending_by_last_hash:
                load.prefill_done([run.block_hashes[-1] for run in batch.stored if run.block_hashes], batch.seq)


_IDLE = WorkerLoad()  # stands for a worker with no report yet (never mutated)
