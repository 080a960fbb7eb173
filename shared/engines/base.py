"""The one small interface that prefill and decode workers share, whatever the engine.

An engine owns its step loop (``run()``, started inside the worker's task group) and its KV block
pool. ``generate()`` streams :class:`EngineOutput` for one request; closing or cancelling the
iterator aborts the request and frees its blocks. Engines that compute (torch, vLLM) run their
step loop off the event loop, so streaming, heartbeats and NATS traffic never wait on a forward
pass; they hand outputs back with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from shared.messages import KvStored, PositionLogprobs, SamplingParams

log = logging.getLogger("baton.engine")


class EngineConfig(msgspec.Struct, kw_only=True):
    engine: str = "torch"  # torch | mocker | vllm
    model: str = "baton-tiny"  # built-in model name or a Hugging Face model directory
    block_size: int = 16
    num_blocks: int = 0  # KV pool size in blocks; 0: engine default
    max_num_seqs: int = 64  # running batch cap
    max_batched_tokens: int = 512  # per-step token budget (chunked prefill)
    enable_prefix_caching: bool = True
    dtype: str = "auto"  # auto (the checkpoint's; see shared.models.resolve_dtype), float32, bfloat16, float16
    device: str = "cpu"
    seed: int = 0
    # mocker timing model: seconds, divided by speedup (a huge speedup makes it near free)
    speedup: float = 1.0
    prefill_s_per_token: float = 2e-5
    decode_step_s: float = 5e-3
    decode_s_per_seq: float = 1e-4
    # vLLM: share of device (on CPU: host) memory it may reserve
    gpu_memory_utilization: float = 0.2
    max_model_len: int = 0  # context cap; 0: engine default (the model's own; vLLM: min(model's, 2048))
    # KV block manager tiers below the engine's pool (0 / "": off). Evicted cached blocks spill
    # to host memory, then to disk; a prefix found there is copied back instead of recomputed.
    host_kv_blocks: int = 0
    disk_kv_dir: str = ""
    disk_kv_blocks: int = 0
    kv_eviction: str = "lru"  # lru | s3fifo, per tier
    # LoRA adapters (torch, mocker): resident at once per worker (LRU beyond), largest rank
    # accepted, adapters loaded at start ("name=path,name=path"), and the mocker's simulated
    # seconds to make one resident.
    max_loras: int = 4
    max_lora_rank: int = 64
    lora_modules: str = ""
    lora_load_s: float = 0.05


@dataclass(slots=True)
class EngineOutput:
    """New tokens of one request since its last output; the last one has a finish_reason."""

    request_id: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: str | None = None
    choice: int = 0  # which of the request's n sequences (SamplingParams.n)
    logprobs: list[PositionLogprobs] | None = None  # one per token_ids entry, when asked for
    prompt_logprobs: list[PositionLogprobs] | None = None  # once, with a request's first output
    error_code: int = 400  # with ``error``: HTTP-like (400 bad input, 404 unknown LoRA adapter, 503 busy)


class ChoiceTracker:
    """Tells when a request's output stream is over: every one of its ``n`` choices has finished,
    or the request as a whole failed (an error or an abort ends all choices at once)."""

    __slots__ = ("done", "n")

    def __init__(self, n: int) -> None:
        self.n = max(1, n)
        self.done: set[int] = set()

    def ends(self, out: EngineOutput) -> bool:
        if out.finish_reason is None:
            return False
        if out.error or out.finish_reason in ("abort", "error") or self.n == 1:
            return True
        self.done.add(out.choice)
        return len(self.done) >= self.n


@dataclass(slots=True)
class EngineStats:
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    running: int = 0
    waiting: int = 0
    prefill_tokens_queued: int = 0
    preemptions: int = 0
    prefix_hit_tokens: int = 0
    prompt_tokens: int = 0
    lora_loads: int = 0  # LoRA adapters made resident since start (loads after an eviction included)
    lora_evictions: int = 0


@dataclass
class KvEventBuffer:
    """Blocks stored and removed since the last drain; filled by the engine, drained by the worker.

    Thread-safe: the torch engine records from its step thread, the worker drains on the loop.
    """

    stored: list[KvStored] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    cleared: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record_stored(self, block_hashes: list[int], parent_hash: int | None) -> None:
        if block_hashes:
            with self._lock:
                self.stored.append(KvStored(block_hashes=list(block_hashes), parent_hash=parent_hash))

    def record_removed(self, block_hashes: list[int]) -> None:
        if block_hashes:
            with self._lock:
                self.removed.extend(block_hashes)

    def record_cleared(self) -> None:
        with self._lock:
            self.stored.clear()
            self.removed.clear()
            self.cleared = True

    def drain(self) -> tuple[list[KvStored], list[int], bool]:
        with self._lock:
            out = (self.stored, self.removed, self.cleared)
            self.stored, self.removed, self.cleared = [], [], False
        return out


class OutputQueue:
    """One request's outputs in order, for its one reader (the request's stream) on the event loop.

    A deque and at most one waiting future rather than an asyncio.Queue: this is on the per-token
    path of every request, and the Queue's getter bookkeeping costs more than the outputs do.
    """

    __slots__ = ("_items", "_loop", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._items: deque[EngineOutput] = deque()
        self._loop = loop
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, out: EngineOutput) -> None:
        self._items.append(out)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> EngineOutput:
        items = self._items
        while not items:
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return items.popleft()

    def qsize(self) -> int:
        return len(self._items)


class OutputQueues:
    """Per-request output queues that an engine's step loop (any thread) feeds."""

    def __init__(self) -> None:
        self._queues: dict[str, OutputQueue] = {}
        self._listeners: dict[str, Callable[[EngineOutput], bool]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        # Engine.on_delivered's callback: run once the outputs of a step (or of a burst of steps
        # run in one loop turn) are all delivered.
        self.after_delivery: Callable[[], None] | None = None

    def delivered(self) -> None:
        """A step's (or a burst's) outputs are all delivered: run the after-delivery callback."""
        callback = self.after_delivery
        if callback is not None:
            try:
                callback()
            except Exception:  # a callback's bug must not stop the step loop
                log.exception("after-delivery callback failed")

    def listen(self, request_id: str, on_output: Callable[[EngineOutput], bool] | None) -> None:
        """See :meth:`Engine.listen`; None stops listening."""
        if on_output is None:
            self._listeners.pop(request_id, None)
        else:
            self._listeners[request_id] = on_output

    def open(self, request_id: str) -> OutputQueue:
        if request_id in self._queues:
            raise ValueError(f"duplicate request id {request_id!r}")
        self._loop = loop = asyncio.get_running_loop()
        q = self._queues[request_id] = OutputQueue(loop)
        return q

    def close(self, request_id: str) -> None:
        self._queues.pop(request_id, None)
        self._listeners.pop(request_id, None)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._queues

    def __len__(self) -> int:
        return len(self._queues)

    def put(self, outputs: list[EngineOutput]) -> None:
        """Deliver from the event loop's own thread."""
        listeners = self._listeners
        for out in outputs:
            if listeners:
                on_output = listeners.get(out.request_id)
                if on_output is not None:
                    try:
                        if on_output(out):
                            continue
                    except Exception:  # a listener's bug must not stop the step loop: its stream gets the rest
                        log.exception("output listener of %s failed", out.request_id)
                        listeners.pop(out.request_id, None)
            q = self._queues.get(out.request_id)
            if q is not None:
                q.put_nowait(out)

    def put_threadsafe(self, outputs: list[EngineOutput]) -> None:
        """Deliver from a step thread: one loop wake-up per step, not per token."""
        if outputs and self._loop is not None:
            self._loop.call_soon_threadsafe(self._put_step, outputs)

    def _put_step(self, outputs: list[EngineOutput]) -> None:
        self.put(outputs)
        self.delivered()


class SubmittedStream:
    """One submitted request's outputs (:meth:`Engine.submit_now`): iterate, then :meth:`close`.

    An iterator rather than an async generator because the request is already with the engine
    when it is made: a generator runs nothing (not even its cleanup) until it is first iterated.
    Cancelled while waiting, or closed before the request finished, it aborts the request.
    """

    __slots__ = ("_abort", "_queue", "_queues", "_tracker", "open", "request_id")

    def __init__(self, queues: OutputQueues, request_id: str, n: int, abort: Callable[[str], None]) -> None:
        self._queues = queues
        self._abort = abort
        self.request_id = request_id
        self._queue = queues.open(request_id)
        self._tracker = ChoiceTracker(n)
        self.open = True

    def __aiter__(self) -> SubmittedStream:
        return self

    async def __anext__(self) -> EngineOutput:
        if not self.open:
            raise StopAsyncIteration
        try:
            out = await self._queue.get()
        except BaseException:
            self.close()
            raise
        if self._tracker.ends(out):
            self.open = False
            self._queues.close(self.request_id)
        return out

    def close(self) -> None:
        if self.open:
            self.open = False
            self._queues.close(self.request_id)
            self._abort(self.request_id)

    def detach(self) -> None:
        """The request has finished, and its listener took its last output (:meth:`Engine.listen`),
        so this stream will not see its end: let it go without an abort."""
        if self.open:
            self.open = False
            self._queues.close(self.request_id)

    async def aclose(self) -> None:
        self.close()


class ViewBlockIO:
    """Block reads and writes through an engine's ``kv_views`` (every layer, K then V)."""

    def __init__(self, views_of: Callable[[list[int]], list[memoryview]]) -> None:
        self._views_of = views_of

    def read(self, block: int) -> bytes:
        return b"".join(self._views_of([block]))

    def write(self, block: int, data: bytes) -> None:
        off = 0
        for v in self._views_of([block]):
            n = len(v)
            v[:] = data[off : off + n]
            off += n
        if off != len(data):
            raise ValueError(f"block of {len(data)} bytes written into {off} bytes of pool")


class Engine(ABC):
    """What a worker needs from an engine. Implementations: torch, mocker, vLLM."""

    name: str = "engine"
    block_size: int = 16
    model_name: str = ""
    eos_token_ids: tuple[int, ...] = ()

    def __init__(self) -> None:
        self.kv_events = KvEventBuffer()
        # Lower tiers' events (2 host, 3 disk), when the engine has tiers: published like
        # kv_events, in batches that carry the tier.
        self.tier_events: dict[int, KvEventBuffer] = {}
        self.kv_tiers: Any = None  # a TieredKvStore when configured

    def _make_tiers(self, config: EngineConfig, views_of: Callable[[list[int]], list[memoryview]]) -> Any:
        """Build the host/disk tiers from ``config`` (None when off) over this engine's pool views."""
        if config.host_kv_blocks <= 0 and not (config.disk_kv_dir and config.disk_kv_blocks > 0):
            return None
        from shared.engines.kv_tiers import TIER_DISK, TIER_HOST, TieredKvStore

        self.tier_events = {TIER_HOST: KvEventBuffer(), TIER_DISK: KvEventBuffer()}
        self.kv_tiers = TieredKvStore(
            config.host_kv_blocks, config.disk_kv_dir or None, config.disk_kv_blocks, config.kv_eviction,
            on_stored=lambda tier, hs: self.tier_events[tier].record_stored(hs, None),
            on_removed=lambda tier, hs: self.tier_events[tier].record_removed(hs),
        )
        return self.kv_tiers

    @abstractmethod
    async def run(self) -> None:
        """Run the step loop until cancelled. Start it in the worker's task group."""

    @abstractmethod
    def generate(
        self, request_id: str, token_ids: list[int], sampling: SamplingParams, lora: str = ""
    ) -> AsyncIterator[EngineOutput]:
        """Stream outputs of one request (under LoRA adapter ``lora`` if set). Closing the iterator
        early aborts the request."""

    def submit_now(
        self, request_id: str, token_ids: list[int], sampling: SamplingParams, lora: str = ""
    ) -> SubmittedStream | None:
        """:meth:`generate`, with the request handed to the engine before this returns (called on
        the event loop, e.g. from a NATS read loop: no task turn before the scheduler sees it).
        Its :meth:`SubmittedStream.close` must run when the caller is done (it aborts an
        unfinished request). None: this engine, or this request (a grammar to compile first),
        takes :meth:`generate` only."""
        return None

    # --- LoRA adapters: engines that serve them override all four ---------------------------------

    async def load_lora(self, name: str, path: str) -> str:
        """Load adapter ``name`` from ``path``; its digest. ValueError: it does not fit (a 400)."""
        raise ValueError(f"the {self.name} engine serves no LoRA adapters")

    async def unload_lora(self, name: str) -> None:
        raise ValueError(f"the {self.name} engine serves no LoRA adapters")

    def loras(self) -> list[tuple[str, str]]:
        """(name, digest) of each adapter loaded."""
        return []

    def loras_resident(self) -> list[str]:
        """Adapters in memory now (a request for one pays no load)."""
        return []

    def listen(self, request_id: str, on_output: Callable[[EngineOutput], bool] | None) -> bool:
        """Have ``on_output`` see this request's outputs as its step delivers them, on the event loop,
        with no task switch per output: an output it takes (returns True) skips the request's
        stream, which still gets every other one. It must take a prefix of the outputs (once it
        declines one, it declines the rest), so nothing is reordered. None: stop listening.
        False: this engine cannot, and its outputs only arrive through the stream."""
        return False

    def on_delivered(self, callback: Callable[[], None] | None) -> bool:
        """Have ``callback`` run on the event loop each time a step's outputs have all been
        delivered to listeners and streams (once per loop turn when near-free steps run back to
        back): the moment to send what the listeners gathered. None: stop. False: this engine
        cannot."""
        return False

    @abstractmethod
    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks; its stream ends with finish_reason ``abort``."""

    @abstractmethod
    def stats(self) -> EngineStats: ...

    def cached_block_hashes(self) -> list[int] | None:
        """Every block hash in the device prefix cache now (a router's resync), or None if unknown."""
        return None

    async def wait_ready(self) -> None:
        """Return once the engine can take requests (models load in ``run()``)."""
        return

    # --- disaggregation: prefill on one worker, decode on another, KV moved by a KvTransport ----
    #
    # Both sides describe KV memory the same way: ``kv_views(block_ids)`` returns writable byte
    # views of the pool for those blocks in one canonical order (for each layer, K then V; within
    # each, runs of consecutive block ids in the order given). The same logical blocks therefore
    # produce the same byte stream on any two workers with the same ``kv_layout()``.

    supports_remote_prefill: bool = False

    def kv_layout(self) -> str:
        """A string both sides compare before a transfer (model, dtype, block size, shapes)."""
        raise NotImplementedError(f"{self.name} engine does not support remote prefill")

    def kv_views(self, block_ids: list[int]) -> list[memoryview]:
        raise NotImplementedError(f"{self.name} engine does not support remote prefill")

    def cached_prefix_tokens(self, token_ids: list[int]) -> int:
        """Prompt tokens this engine would serve from its prefix cache right now (full blocks)."""
        return 0

    def reserve_remote_prefill(self, request_id: str, token_ids: list[int]) -> tuple[list[int], int]:
        """Decode side: hold blocks for a prompt that another worker will prefill.

        Returns (block ids to be written, in logical order; the number of leading prompt blocks
        already served from the prefix cache, which are not sent). Raises RuntimeError if the
        pool cannot hold the prompt now. The blocks stay reserved until
        ``generate_after_remote_prefill`` or ``release_remote_prefill``.
        """
        raise NotImplementedError(f"{self.name} engine does not support remote prefill")

    def release_remote_prefill(self, request_id: str) -> None:
        """Decode side: give back a reservation whose prefill failed or was abandoned."""
        raise NotImplementedError(f"{self.name} engine does not support remote prefill")

    def generate_after_remote_prefill(
        self, request_id: str, token_ids: list[int], sampling: SamplingParams, first_token: int
    ) -> AsyncIterator[EngineOutput]:
        """Decode side: the reserved blocks now hold the prompt's KV and ``first_token`` was
        sampled by the prefill worker. Stream the rest of the request, starting with first_token."""
        raise NotImplementedError(f"{self.name} engine does not support remote prefill")

    async def prefill_and_hold(
        self, request_id: str, token_ids: list[int], sampling: SamplingParams
    ) -> tuple[list[int], int, int]:
        """Prefill side: compute the prompt and sample its first token, keeping the KV blocks.

        Returns (block ids of every prompt block in logical order, the first token, prompt
        tokens served from this engine's own prefix cache). The blocks stay held until
        ``release_held`` so they can be sent.
        """
        raise NotImplementedError(f"{self.name} engine does not support remote prefill")

    def release_held(self, request_id: str) -> None:
        raise NotImplementedError(f"{self.name} engine does not support remote prefill")
