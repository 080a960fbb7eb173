"""Engine core: the step loop around the scheduler, with a model runner plugged in.

    generate() / adopt / abort --inbox--> step: drain inbox -> Scheduler.schedule()
        -> ModelRunner.execute(batch) -> Scheduler.update() --> per-request output streams

:class:`EngineCore` is the whole :class:`~shared.engines.base.Engine` interface for engines that
run on Baton's own scheduler and KV cache manager; what computes a step is a
:class:`ModelRunner`. The torch engine plugs in the torch runner
(:mod:`shared.engines.model_runner`), the mocker a simulated one (:mod:`shared.engines.mocker`).

Where the loop runs is the runner's choice (:attr:`ModelRunner.threaded`):

* in a worker thread (torch), so the event loop never waits on a forward pass. Requests and
  aborts reach the thread through the inbox; outputs come back once per step through
  :meth:`OutputQueues.put_threadsafe`. The scheduler is touched only by the step thread, except
  by :meth:`stats` and the disaggregation calls below, which take the lock the thread holds while
  it schedules and records a step (never across a forward pass).
* on the event loop (mocker): a step is plain Python, and a message is applied the moment it is
  submitted, so an abort frees its blocks at once.

Disaggregation: reservations and held blocks are taken and given back under that lock from the
event loop, which is safe because neither is ever part of a step, so no forward pass writes into
them. Everything that touches requests a step may be computing (adopting a remotely prefilled
request, aborting) goes through the inbox instead.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import anyio

from shared.engines.adapters import UnknownAdapterError
from shared.engines.base import (
    ChoiceTracker,
    Engine,
    EngineConfig,
    EngineOutput,
    EngineStats,
    OutputQueues,
    SubmittedStream,
    ViewBlockIO,
)
from shared.engines.request import Request
from shared.engines.scheduler import ScheduledBatch, Scheduler
from shared.kv_hash import ROOT_HASH, adapter_root
from shared.messages import PositionLogprobs, SamplingParams, StructuredOutput

log = logging.getLogger(__name__)


# --- the inbox: what the event loop asks of the step loop ------------------------------------


@dataclass(slots=True, frozen=True)
class AddRequest:
    """Queue a new request. ``hold``: a prefill worker's, finished after its first token with
    its blocks kept until they are sent."""

    request_id: str
    token_ids: list[int]
    sampling: SamplingParams
    hold: bool = False
    lora: str = ""  # LoRA adapter ("" : the base model)


@dataclass(slots=True, frozen=True)
class AdoptRequest:
    """Run a reserved request whose prompt another worker prefilled, from ``first_token`` on."""

    request_id: str
    sampling: SamplingParams
    first_token: int


@dataclass(slots=True, frozen=True)
class AbortRequest:
    request_id: str


@dataclass(slots=True, frozen=True)
class LoraCommand:
    """Load (``path`` set) or unload (``path`` None) a LoRA adapter between two steps; the outcome
    (the adapter's digest, or the exception) is handed to ``done`` on the event loop."""

    name: str
    path: str | None
    done: asyncio.Future[str]
    loop: asyncio.AbstractEventLoop


InboxMessage = AddRequest | AdoptRequest | AbortRequest | LoraCommand


# --- what computes a step --------------------------------------------------------------------


@dataclass(slots=True)
class PoolSpec:
    """What the runner's KV pool looks like once loaded: the scheduler is sized from it."""

    num_blocks: int
    max_model_len: int | None  # positions the model takes; None: no limit known
    vocab_size: int | None  # token ids the scheduler accepts; None: not checked


@dataclass(slots=True)
class StepResult:
    """One computed step: ``tokens[i]`` (and ``logprobs[i]``) for ``batch.samplers[i]``; of a
    multi-step batch, ``runs[i]`` (and ``run_logprobs[i]``), one token per step, instead."""

    tokens: list[int]
    logprobs: list[PositionLogprobs | None] | None
    seconds: float = 0.0  # simulated duration the loop pays back in sleeps (mocker); 0: real time
    # Simulated time that passes before this step's outputs exist (the mocker loading a LoRA
    # adapter first): the loop sleeps it, then delivers. On the loop only.
    stall_s: float = 0.0
    runs: list[list[int]] | None = None
    run_logprobs: list[list[PositionLogprobs] | None] | None = None


class GrammarRefused(Exception):
    """A structured output the runner cannot honour (bad schema, or no support): a client error."""


class ModelRunner(ABC):
    """Turns a scheduled batch into sampled tokens, and owns the KV pool's memory."""

    threaded: bool = True  # step in a worker thread; False: on the event loop
    # LoRA adapters (None: this runner serves none). Touched only between steps, under the lock.
    adapters: Any = None
    layout: str = ""  # kv_layout(), once loaded
    kv_pools: list[memoryview]  # per layer K then V, flat bytes; empty: KV not in host memory
    block_bytes: int = 0  # bytes of one block in each of kv_pools
    # Multi-step decoding (ScheduledBatch.steps): about this many tokens per execute() across a
    # batch of decodes alone; 0: one step per call. Only where a step costs next to nothing, so
    # the scheduler's per-step work is what a step costs (the mocker at a huge speedup).
    multi_step_tokens: int = 0

    @abstractmethod
    def load(self) -> PoolSpec:
        """Load the model and allocate the KV pool (on the step thread when threaded)."""

    def step_context(self) -> AbstractContextManager[Any]:
        """Entered once on the step thread around every step."""
        return nullcontext()

    @abstractmethod
    def new_state(self, req: Request) -> Any:
        """The request's sampling state (``Request.state``), at admission and for each forked choice."""

    @abstractmethod
    def execute(self, batch: ScheduledBatch) -> StepResult:
        """Compute one step and sample a token for each of ``batch.samplers``."""

    def compile_grammar(self, structured: StructuredOutput) -> Any:
        """Compile a structured output (in a worker thread); raises GrammarRefused."""
        raise GrammarRefused(f"{type(self).__name__} has no structured outputs")

    def matcher(self, compiled: Any) -> Any:
        """A fresh matcher (``state.grammar``) for a compiled structured output."""
        raise NotImplementedError

    # --- LoRA adapters (runners with ``adapters``) -----------------------------------------------

    def lora_add(self, name: str, path: str) -> str:
        """Load (validate, make known) adapter ``name`` from ``path``; its digest. Raises ValueError
        (LoraError: it does not fit) or AdapterBusyError."""
        if self.adapters is None:
            raise ValueError(f"the {type(self).__name__} serves no LoRA adapters")
        added = self.adapters.add(name, path)  # a digest (simulated) or the loaded adapter (torch)
        return added if isinstance(added, str) else added.digest

    def lora_remove(self, name: str) -> None:
        if self.adapters is None:
            raise ValueError(f"the {type(self).__name__} serves no LoRA adapters")
        self.adapters.remove(name)

    def lora_digest(self, name: str) -> str:
        """The loaded adapter's digest; UnknownAdapterError if not loaded."""
        if self.adapters is None:
            raise UnknownAdapterError(f"adapter {name!r} is not loaded")
        return self.adapters.digest(name)

    def lora_list(self) -> list[tuple[str, str]]:
        """(name, digest) of every loaded adapter."""
        if self.adapters is None:
            return []
        return [(n, self.adapters.digest(n)) for n in self.adapters.names()]

    def lora_resident(self) -> list[str]:
        return [] if self.adapters is None else self.adapters.resident()

    def check_received(self, req: Request) -> str | None:
        """Decode side, before adopting: what is wrong with the KV received for ``req``, or None."""
        return None

    def adopted(self, req: Request) -> None:
        """Decode side: ``req`` now runs from the first token another worker sampled."""
        return None


# --- the core --------------------------------------------------------------------------------


class EngineCore(Engine):
    """The :class:`Engine` interface over the shared scheduler, for any :class:`ModelRunner`."""

    def __init__(self, config: EngineConfig, runner: ModelRunner) -> None:
        super().__init__()
        self.config = config
        self.block_size = config.block_size
        self.runner = runner
        self.scheduler: Scheduler | None = None
        self.num_steps = 0
        self.num_computed_tokens = 0  # tokens actually forwarded (prefix hits excluded)
        self._queues = OutputQueues()
        self._inbox: deque[InboxMessage] = deque()
        self._wake = threading.Event()  # threaded: the step thread sleeps on it when idle
        self._loop_wake = asyncio.Event()  # on the loop: the step task sleeps on it when idle
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._ready = asyncio.Event()
        self._load_error: BaseException | None = None
        self._closed = False  # run() ended (or never loaded): new requests fail at once
        self._compiled: dict[str, Any] = {}  # request id -> compiled grammar, until admitted
        self._stalled: tuple[float, list[EngineOutput]] | None = None  # on the loop: outputs held by a stall
        self._decode_only = False  # the last step only decoded running requests (no admission, no prefill)
        if not runner.threaded:  # nothing heavy to load: ready before run()
            self._load()
            self._ready.set()

    # --- loading ------------------------------------------------------------------------------

    def _load(self) -> None:
        """Load the runner, size the scheduler from its pool, attach the KV tiers."""
        cfg = self.config
        spec = self.runner.load()
        scheduler = Scheduler(
            num_blocks=spec.num_blocks,
            block_size=cfg.block_size,
            max_num_seqs=cfg.max_num_seqs,
            max_batched_tokens=cfg.max_batched_tokens,
            enable_prefix_caching=cfg.enable_prefix_caching,
            eos_token_ids=self.eos_token_ids,
            max_model_len=spec.max_model_len,
            vocab_size=spec.vocab_size,
            kv_events=self.kv_events,
            make_state=self._choice_state,
            adapters=self.runner.adapters,
        )
        if self.runner.kv_pools:
            tiers = self._make_tiers(cfg, self.kv_views)
            if tiers is not None:
                scheduler.kv.attach_tiers(tiers, ViewBlockIO(self.kv_views))
                log.info("KV tiers: host %d blocks, disk %d blocks at %r (%s)", cfg.host_kv_blocks,
                         cfg.disk_kv_blocks, cfg.disk_kv_dir, cfg.kv_eviction)
        self.scheduler = scheduler

    async def wait_ready(self) -> None:
        await self._ready.wait()
        if self._load_error is not None:
            raise RuntimeError(f"{self.name} engine failed to load {self.config.model!r}") from self._load_error

    # --- the step loop ------------------------------------------------------------------------

    async def run(self) -> None:
        self._closed = False
        self._stop.clear()
        if self.runner.threaded:
            await self._run_in_thread()
        else:
            await self._run_on_loop()

    async def _run_in_thread(self) -> None:
        stopped = threading.Event()
        try:
            await anyio.to_thread.run_sync(self._thread_main, stopped, abandon_on_cancel=True)
        except BaseException as e:
            if not self._ready.is_set():  # the model failed to load
                self._load_error = e
                self._closed = True
                self._ready.set()
                self._fail_pending("error", f"engine failed to load: {e!r}")
            raise
        finally:
            self._stop.set()
            self._wake.set()
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(stopped.wait)
                # Nobody will step again: end every stream rather than leave clients hanging.
                self._closed = True
                self._fail_pending("abort", "engine stopped")

    def _thread_main(self, stopped: threading.Event) -> None:
        """Load (once), then step until stopped, all on this one thread.

        One thread, not one for loading and another for stepping: OpenMP keeps a thread team per
        calling thread, and a second team in the process makes libgomp count more threads than
        CPUs and stop spinning between parallel regions, which made decode steps ~30% slower.
        """
        try:
            if self.scheduler is None:
                self._load()
            anyio.from_thread.run_sync(self._ready.set)
            with self.runner.step_context():
                while not self._stop.is_set():
                    self._step_once()
        finally:
            stopped.set()

    async def _run_on_loop(self) -> None:
        """Step on the event loop, paying simulated step time back with real sleeps.

        Owed time is slept only once it adds up to more than a timer tick, so a tiny simulated
        step costs almost nothing. Decode-only steps that simulate less time than computing them
        takes (``NEAR_FREE_STEP_S``: a mocker at a huge speedup) run back to back in one loop turn,
        up to ``BURST_S`` of real time: each loop turn costs the worker a wake-up of every consumer
        and a message per frontend, and in simulated time these steps take none. A step that
        starts requests (prefill) ends the turn at once, so first tokens never wait on a burst:
        the after-delivery callback (``on_delivered``) sends them as the turn ends; without one,
        the next turn runs one step only, while they take their way to the socket. Arrivals and
        cancels wait at most ``BURST_S`` for the loop (and one multi-step batch: a runner whose
        steps are near free may compute several decode steps per call, ``multi_step_tokens``, since
        the scheduler's work per step is then all a step costs). A slower mocker steps once per
        turn.
        """
        loop = asyncio.get_running_loop()
        sched = self.scheduler
        assert sched is not None
        clock = loop.time()  # simulated time owed up to here
        queues = self._queues
        # Turns since one ended on a step that started requests. Unless an after-delivery callback
        # sends their first tokens as the turn ends (Engine.on_delivered), they take two more turns
        # to reach the socket (the reply batcher's, then the NATS client's flusher task), so the
        # turn right after runs one step only: no burst ahead of a first token's write.
        quiet_turns = 0
        try:
            while True:
                if not sched.has_work():
                    self._loop_wake.clear()
                    await self._loop_wake.wait()
                    clock = loop.time()
                    continue
                # (uvloop's loop.time() stands still within a turn: real time from perf_counter)
                burst = quiet_turns or queues.after_delivery is not None
                turn_ends = time.perf_counter() + BURST_S if burst else 0.0
                while True:
                    step_s = self._step_once(multi_step=bool(burst))
                    if self._stalled is not None:  # this step's outputs exist only once the stall has passed
                        stall, held = self._stalled
                        self._stalled = None
                        queues.delivered()
                        await asyncio.sleep(stall)
                        queues.put(held)
                        clock = max(clock, loop.time())
                        self._decode_only = False
                    clock += step_s
                    owed = clock - loop.time()
                    if owed > MIN_SLEEP_S:
                        queues.delivered()
                        await asyncio.sleep(owed)
                        break
                    if owed < 0:
                        clock -= owed  # running behind: do not bank the lost time as credit
                    if not (step_s < NEAR_FREE_STEP_S and self._decode_only and sched.has_work()
                            and time.perf_counter() < turn_ends):
                        quiet_turns = quiet_turns + 1 if self._decode_only else 0
                        queues.delivered()
                        await asyncio.sleep(0)  # let consumers and new requests in between steps
                        break
        finally:
            self._closed = True
            self._fail_pending("abort", "engine stopped")

    def _step_once(self, multi_step: bool = True) -> float:
        """Drain the inbox, schedule, compute and record one step (or, where the runner takes them
        and ``multi_step`` allows, a multi-step batch); returns its simulated seconds."""
        sched = self.scheduler
        assert sched is not None
        threaded = self.runner.threaded
        deliver = self._queues.put_threadsafe if threaded else self._queues.put
        with self._lock:
            outputs = self._drain_inbox()
            batch = (sched.schedule(self.runner.multi_step_tokens if multi_step else 0)
                     if sched.has_work() else None)
            if sched.rejected:
                outputs += sched.rejected
                sched.rejected = []
        self._decode_only = batch is not None and batch.num_decodes == len(batch.entries) > 0 and not outputs
        if batch is None or not batch.entries:
            deliver(outputs)
            if threaded and batch is None and not self._inbox:
                self._wake.wait()
                self._wake.clear()
            return 0.0
        try:
            result = self.runner.execute(batch)
        except Exception as e:  # a broken step fails its requests, not the worker
            log.exception("%s engine step failed", self.name)
            with self._lock:
                outputs += sched.abort_all("error", f"engine step failed: {e}")
            deliver(outputs)
            return 0.0
        with self._lock:
            if result.runs is not None:
                outputs += sched.update_runs(batch, result.runs, result.run_logprobs)
            else:
                outputs += sched.update(batch, result.tokens, result.logprobs)
        self.num_steps += 1
        self.num_computed_tokens += batch.num_tokens
        if result.stall_s > 0 and not threaded:
            self._stalled = (result.stall_s, outputs)
            return result.seconds
        deliver(outputs)
        return result.seconds

    def _fail_pending(self, reason: str, error: str) -> None:
        """End every request, queued or admitted (call on the loop, with the step loop gone)."""
        outputs: list[EngineOutput] = []
        while self._inbox:
            msg = self._inbox.popleft()
            if isinstance(msg, LoraCommand):
                _settle(msg.done, None, RuntimeError(error))
            elif isinstance(msg, AddRequest):
                outputs.append(EngineOutput(msg.request_id, [], reason, len(msg.token_ids), error=error))
            elif isinstance(msg, AdoptRequest):
                if self.scheduler is not None:
                    self.scheduler.release_reserved(msg.request_id)
                outputs.append(EngineOutput(msg.request_id, [], reason, error=error))
        if self.scheduler is not None:
            outputs += self.scheduler.abort_all(reason, error)
        self._queues.put(outputs)
        self._queues.delivered()

    # --- the inbox ----------------------------------------------------------------------------

    def _submit(self, msg: InboxMessage) -> None:
        if self.runner.threaded:
            self._inbox.append(msg)
            self._wake.set()
        else:  # the loop is this thread: apply now, between two steps
            with self._lock:
                outputs = self._apply(msg)
            self._queues.put(outputs)
            self._queues.delivered()
            self._loop_wake.set()

    def _drain_inbox(self) -> list[EngineOutput]:
        outputs: list[EngineOutput] = []
        inbox = self._inbox
        while inbox:
            outputs += self._apply(inbox.popleft())
        return outputs

    def _apply(self, msg: InboxMessage) -> list[EngineOutput]:
        """Apply one message to the scheduler (holding the lock); the outputs it ends with at once."""
        sched = self.scheduler
        assert sched is not None
        if isinstance(msg, LoraCommand):
            self._lora_command(msg)
            return []
        if isinstance(msg, AddRequest):
            root = ROOT_HASH
            if msg.lora:
                try:
                    root = adapter_root(msg.lora, self.runner.lora_digest(msg.lora))
                except UnknownAdapterError as e:
                    self._compiled.pop(msg.request_id, None)
                    return [EngineOutput(msg.request_id, [], "error", len(msg.token_ids), error=str(e), error_code=404)]
            added = sched.add(msg.request_id, msg.token_ids, msg.sampling, msg.hold, msg.lora, root)
            if isinstance(added, EngineOutput):
                self._compiled.pop(msg.request_id, None)
                return [added]
            added.state = self.runner.new_state(added)
            self._attach_grammar(added)
            return []
        if isinstance(msg, AdoptRequest):
            return [self._adopt(msg)]
        self._compiled.pop(msg.request_id, None)
        out = sched.abort(msg.request_id)
        return [out] if out is not None else []

    def _lora_command(self, msg: LoraCommand) -> None:
        """Load or unload an adapter (between steps) and hand the outcome to the waiting caller."""
        try:
            if msg.path is None:
                self.runner.lora_remove(msg.name)
                result = ""
            else:
                result = self.runner.lora_add(msg.name, msg.path)
        except Exception as e:
            outcome: BaseException = e
            msg.loop.call_soon_threadsafe(_settle, msg.done, None, outcome)
            return
        msg.loop.call_soon_threadsafe(_settle, msg.done, result, None)

    async def load_lora(self, name: str, path: str) -> str:
        """Load LoRA adapter ``name`` from ``path`` (between steps); its digest. Raises ValueError
        (does not fit this model, unreadable: a 400) or AdapterBusyError (a 503)."""
        return await self._lora_call(name, path)

    async def unload_lora(self, name: str) -> None:
        """Forget adapter ``name``: its memory goes now, or when its last running request ends;
        new requests for it are refused (404). UnknownAdapterError if it is not loaded."""
        await self._lora_call(name, None)

    async def _lora_call(self, name: str, path: str | None) -> str:
        if self.runner.adapters is None:
            raise ValueError(f"the {self.name} engine serves no LoRA adapters")
        await self.wait_ready()
        if self._closed:
            raise RuntimeError("engine is not running")
        loop = asyncio.get_running_loop()
        done: asyncio.Future[str] = loop.create_future()
        self._submit(LoraCommand(name, path, done, loop))
        return await done

    def loras(self) -> list[tuple[str, str]]:
        if self.runner.adapters is None or self.scheduler is None:
            return []
        with self._lock:
            return self.runner.lora_list()

    def loras_resident(self) -> list[str]:
        if self.runner.adapters is None or self.scheduler is None:
            return []
        with self._lock:
            return self.runner.lora_resident()

    def _adopt(self, msg: AdoptRequest) -> EngineOutput:
        sched = self.scheduler
        assert sched is not None
        rid = msg.request_id
        reserved = sched.reserved.get(rid)
        problem = self.runner.check_received(reserved) if reserved is not None else None
        if reserved is not None and problem is not None:
            sched.release_reserved(rid)
            self._compiled.pop(rid, None)
            return EngineOutput(rid, [], "error", reserved.num_prompt_tokens, error=problem)
        out = sched.adopt(rid, msg.sampling, msg.first_token)
        req = sched.requests.get(rid)
        if req is None or out.finish_reason is not None:
            self._compiled.pop(rid, None)
            return out
        req.state = self.runner.new_state(req)
        if self._attach_grammar(req):
            req.state.grammar.accept_token(msg.first_token)  # the first token, sampled under it remotely
        self.runner.adopted(req)
        return out

    def _choice_state(self, child: Request) -> Any:
        """Sampling state for choice c > 0 of an n > 1 request: its own seed, and its own matcher
        at the grammar's start when the request is constrained."""
        assert self.scheduler is not None
        st = self.runner.new_state(child)
        parent = self.scheduler.requests.get(child.output_id)
        grammar = getattr(parent.state, "grammar", None) if parent is not None else None
        if grammar is not None:
            st.grammar = grammar.fresh()
        return st

    def _attach_grammar(self, req: Request) -> bool:
        compiled = self._compiled.pop(req.request_id, None)
        if compiled is None:
            return False
        req.state.grammar = self.runner.matcher(compiled)
        return True

    # --- per-request output streams ------------------------------------------------------------

    def generate(
        self, request_id: str, token_ids: list[int], sampling: SamplingParams, lora: str = ""
    ) -> AsyncIterator[EngineOutput]:
        return self._stream(AddRequest(request_id, list(token_ids), sampling, lora=lora), len(token_ids))

    def submit_now(
        self, request_id: str, token_ids: list[int], sampling: SamplingParams, lora: str = ""
    ) -> SubmittedStream | None:
        if self._closed or sampling.structured is not None:
            return None  # generate() says why, or compiles the grammar first
        stream = SubmittedStream(self._queues, request_id, sampling.n, self.abort)
        try:
            self._submit(AddRequest(request_id, list(token_ids), sampling, lora=lora))
        except BaseException:
            self._queues.close(request_id)
            raise
        return stream

    async def _stream(self, msg: AddRequest | AdoptRequest, num_prompt_tokens: int) -> AsyncIterator[EngineOutput]:
        """Submit ``msg`` for one request and stream its outputs; closing early aborts it."""
        request_id, sampling = msg.request_id, msg.sampling
        adopting = isinstance(msg, AdoptRequest)
        queue = self._queues.open(request_id)
        finished = False
        tracker = ChoiceTracker(sampling.n)
        try:
            if self._closed:
                finished = True
                if adopting:
                    self.release_remote_prefill(request_id)
                yield EngineOutput(request_id, [], "error", num_prompt_tokens, error="engine is not running")
                return
            if sampling.structured is not None:
                await self._ready.wait()
                try:
                    self._compiled[request_id] = await anyio.to_thread.run_sync(
                        self.runner.compile_grammar, sampling.structured)
                except GrammarRefused as e:
                    finished = True
                    if adopting:
                        self.release_remote_prefill(request_id)
                    yield EngineOutput(request_id, [], "error", num_prompt_tokens,
                                       error=f"invalid structured output: {e}")
                    return
            self._submit(msg)
            while True:
                out = await queue.get()
                finished = tracker.ends(out)
                yield out
                if finished:
                    return
        finally:
            self._queues.close(request_id)
            if not finished:
                self.abort(request_id)

    def listen(self, request_id: str, on_output: Callable[[EngineOutput], bool] | None) -> bool:
        self._queues.listen(request_id, on_output)
        return True

    def on_delivered(self, callback: Callable[[], None] | None) -> bool:
        self._queues.after_delivery = callback
        return True

    def abort(self, request_id: str) -> None:
        self._submit(AbortRequest(request_id))

    def stats(self) -> EngineStats:
        if self.scheduler is None:
            return EngineStats()
        with self._lock:
            st = self.scheduler.stats()
            adapters = self.runner.adapters
            if adapters is not None:
                st.lora_loads, st.lora_evictions = adapters.loads, adapters.evictions
            return st

    # --- disaggregation: reserve / adopt on the decode side, hold on the prefill side ------------

    def kv_layout(self) -> str:
        if not self.runner.layout:
            raise RuntimeError(f"{self.name} engine not loaded yet")
        return self.runner.layout

    def cached_block_hashes(self) -> list[int] | None:
        if self.scheduler is None:
            return None
        with self._lock:  # the step thread mutates the cache
            return list(self.scheduler.kv.pool.cached)

    def kv_views(self, block_ids: list[int]) -> list[memoryview]:
        """Byte views of the pool for ``block_ids``: per layer K then V, one per run of consecutive ids."""
        pools = self.runner.kv_pools
        if not pools:
            raise NotImplementedError("remote prefill needs the KV pool in CPU memory")
        runs = block_runs(block_ids)
        bb = self.runner.block_bytes
        return [pool[a * bb : b * bb] for pool in pools for a, b in runs]

    def cached_prefix_tokens(self, token_ids: list[int]) -> int:
        if self.scheduler is None:
            return 0
        with self._lock:
            return self.scheduler.kv.cached_prefix_tokens(token_ids)

    def reserve_remote_prefill(self, request_id: str, token_ids: list[int]) -> tuple[list[int], int]:
        if self.scheduler is None or self._closed:
            raise RuntimeError("engine is not running")
        with self._lock:
            req = self.scheduler.reserve(request_id, list(token_ids))
            return req.blocks[req.num_cached_blocks :], req.num_cached_blocks

    def release_remote_prefill(self, request_id: str) -> None:
        if self.scheduler is not None:
            with self._lock:
                self.scheduler.release_reserved(request_id)

    def generate_after_remote_prefill(
        self, request_id: str, token_ids: list[int], sampling: SamplingParams, first_token: int
    ) -> AsyncIterator[EngineOutput]:
        return self._stream(AdoptRequest(request_id, sampling, first_token), len(token_ids))

    async def prefill_and_hold(
        self, request_id: str, token_ids: list[int], sampling: SamplingParams
    ) -> tuple[list[int], int, int]:
        out: EngineOutput | None = None
        held = False
        try:
            async for last in self._stream(AddRequest(request_id, list(token_ids), sampling, hold=True),
                                           len(token_ids)):
                out = last  # a held request has exactly one output: its first token, finished
            assert out is not None and self.scheduler is not None
            if out.error or not out.token_ids:
                raise RuntimeError(out.error or f"prefill ended without a token ({out.finish_reason})")
            with self._lock:
                req = self.scheduler.held.get(request_id)
                if req is None:
                    raise RuntimeError(f"prefill of {request_id!r} holds no blocks")
                blocks = req.blocks[: self.scheduler.kv.blocks_needed(len(token_ids))]
            held = True
            return blocks, out.token_ids[0], out.num_cached_tokens
        finally:
            if not held:
                self.release_held(request_id)

    def release_held(self, request_id: str) -> None:
        if self.scheduler is None:
            return
        with self._lock:
            if self.scheduler.release_held(request_id) is not None:
                return
        # Not held (yet): it may still be in a step, so drop it between steps.
        self._submit(AbortRequest(request_id))


def _settle(done: asyncio.Future[str], result: str | None, error: BaseException | None) -> None:
    if done.done():  # the caller gave up (cancelled)
        return
    if error is not None:
        done.set_exception(error)
    else:
        done.set_result(result or "")


MIN_SLEEP_S = 0.0005  # below this, owed simulated time accumulates instead of arming a timer
BURST_S = 0.0002  # on the loop: real time near-free decode steps may run back to back in one loop turn
NEAR_FREE_STEP_S = 1e-6  # a step simulating less than this is near free (it takes longer to compute)


def block_runs(block_ids: list[int]) -> list[tuple[int, int]]:
    """Runs of consecutive block ids, in the order given, as half-open [start, end) ranges."""
    runs: list[tuple[int, int]] = []
    for b in block_ids:
        if runs and runs[-1][1] == b:
            runs[-1] = (runs[-1][0], b + 1)
        else:
            runs.append((b, b + 1))
    return runs
