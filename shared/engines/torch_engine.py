"""Torch engine: the shared scheduler and KV accounting driving a paged Llama-family model.

The step loop runs in one worker thread (``run()`` -> ``anyio.to_thread``), so the event loop
never waits on a forward pass. Requests and aborts reach the thread through an inbox; outputs
come back once per step through :meth:`OutputQueues.put_threadsafe`. The scheduler is touched
only by the step thread, except :meth:`stats`, which takes the same lock the thread holds while
it schedules and records a step (never across a forward pass).

Disaggregation (see :class:`Engine`): reservations and held blocks are taken and given back under
that lock from the event loop, which is safe because neither is ever part of a step, so no forward
pass writes into them. Everything that touches requests a step may be computing (adopting a
remotely prefilled request, aborting) goes through the inbox instead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import anyio

if "torch" not in sys.modules and "OMP_WAIT_POLICY" not in os.environ:
    # OpenMP workers spin briefly after each parallel region, then sleep. Long spinning wrecks
    # throughput once the CPU is shared (other services, other workers); never spinning (passive)
    # pays a futex wake-up per op, ~1.7x slower decode steps on a small model. ~30k spins keeps
    # the threads warm between the ops of one step. Only effective before torch loads.
    os.environ.setdefault("GOMP_SPINCOUNT", "30000")
import torch

from shared.engines.base import (
    ChoiceTracker,
    Engine,
    EngineConfig,
    EngineOutput,
    EngineStats,
    OutputQueues,
    ViewBlockIO,
)
from shared.engines.kv_cache import default_num_blocks
from shared.engines.sampling import Sampler, SampleResult, prompt_position_logprobs
from shared.engines.scheduler import Request, ScheduledBatch, Scheduler
from shared.engines.structured import GrammarBackend, StructuredOutputError
from shared.engines.torch_model import LlamaModel, ModelArgs, StepInputs, load_model
from shared.messages import SamplingParams
from shared.models import resolve_dtype, resolve_model
from shared.tokenizer import eos_token_ids

log = logging.getLogger(__name__)

DEFAULT_KV_BYTES_CAP = 4 << 30  # default pool never above this, nor above a quarter of free memory


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _torch_threads() -> int:
    """Threads for matmuls: BATON_TORCH_THREADS, else the CPUs this process may run on."""
    env = os.environ.get("BATON_TORCH_THREADS")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class TorchEngine(Engine):
    name = "torch"

    def __init__(self, config: EngineConfig) -> None:
        super().__init__()
        self.config = config
        self.model_ref = resolve_model(config.model)
        self.model_name = self.model_ref.name
        self.dtype = resolve_dtype(config.dtype, self.model_ref.path, torch.device(config.device).type)
        self.block_size = config.block_size
        self.eos_token_ids = eos_token_ids(self.model_ref.path)
        self.model: LlamaModel | None = None
        self.scheduler: Scheduler | None = None
        self.sampler: Sampler | None = None
        self.num_steps = 0
        self.num_computed_tokens = 0  # tokens actually forwarded (prefix hits excluded)
        self._queues = OutputQueues()
        self._inbox: deque[tuple[Any, ...]] = deque()  # ("add", id, tokens, sampling) | ("abort", id)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._ready = asyncio.Event()
        self._load_error: BaseException | None = None
        self._sliding_window: int | None = None
        self._closed = False  # run() ended (or never loaded): new requests fail at once
        # KV export/import reads and writes the pool from the event loop: CPU memory only.
        self.supports_remote_prefill = torch.device(config.device).type == "cpu"
        self._kv_bytes: list[memoryview] = []  # per layer: K pool, then V pool, as flat bytes
        self._block_bytes = 0
        self._layout = ""
        # Structured outputs: built on first use (a vocabulary pass), grammars compiled at admission.
        self._grammar_backend: GrammarBackend | None = None
        self._grammar_lock = threading.Lock()
        self._compiled: dict[str, Any] = {}  # request id -> compiled grammar, until admitted

    # --- loading ------------------------------------------------------------------------------

    def _load(self) -> None:
        cfg = self.config
        threads = _torch_threads()
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        model = load_model(self.model_ref.path, self.dtype, cfg.device)
        args: ModelArgs = model.args
        num_blocks = cfg.num_blocks or self._default_num_blocks(model)
        model.allocate_kv(num_blocks, cfg.block_size)
        self.sampler = Sampler(args.vocab_size, cfg.seed)
        self.scheduler = Scheduler(
            num_blocks=num_blocks,
            block_size=cfg.block_size,
            max_num_seqs=cfg.max_num_seqs,
            max_batched_tokens=cfg.max_batched_tokens,
            enable_prefix_caching=cfg.enable_prefix_caching,
            eos_token_ids=self.eos_token_ids,
            max_model_len=args.max_position_embeddings,
            vocab_size=args.vocab_size,
            kv_events=self.kv_events,
            make_state=self._choice_state,
        )
        windows = {w for w in args.sliding_windows if w is not None}
        if len(windows) > 1:
            raise NotImplementedError("layers with different sliding windows")
        self._sliding_window = windows.pop() if windows else None
        self.model = model
        if self.supports_remote_prefill:
            for layer in range(args.num_layers):
                for pool in (model.k_caches[layer], model.v_caches[layer]):
                    self._kv_bytes.append(memoryview(pool.reshape(-1).view(torch.uint8).numpy()))
            self._block_bytes = len(self._kv_bytes[0]) // num_blocks
            tiers = self._make_tiers(cfg, self.kv_views)
            if tiers is not None:
                self.scheduler.kv.attach_tiers(tiers, ViewBlockIO(self.kv_views))
                log.info("KV tiers: host %d blocks, disk %d blocks at %r (%s)", cfg.host_kv_blocks,
                         cfg.disk_kv_blocks, cfg.disk_kv_dir, cfg.kv_eviction)
        self._layout = (
            f"torch/{self.model_name}/{self.dtype}/block_size={cfg.block_size}/layers={args.num_layers}"
            f"/kv_heads={args.num_kv_heads}/head_dim={args.head_dim}"
        )
        log.info(
            "torch engine: %s, %d KV blocks of %d tokens (%.0f MiB), %d threads",
            self.model_name,
            num_blocks,
            cfg.block_size,
            num_blocks * cfg.block_size * model.kv_bytes_per_token() / 2**20,
            threads,
        )

    def _default_num_blocks(self, model: LlamaModel) -> int:
        cfg = self.config
        wanted = default_num_blocks(cfg.max_num_seqs, cfg.block_size, model.args.max_position_embeddings)
        cap = DEFAULT_KV_BYTES_CAP
        avail = _available_memory()
        if avail is not None:
            cap = min(cap, avail // 4)
        affordable = cap // (cfg.block_size * model.kv_bytes_per_token())
        return max(1, min(wanted, affordable))

    async def wait_ready(self) -> None:
        await self._ready.wait()
        if self._load_error is not None:
            raise RuntimeError(f"torch engine failed to load {self.config.model!r}") from self._load_error

    # --- the step loop ------------------------------------------------------------------------

    async def run(self) -> None:
        self._closed = False
        self._stop.clear()
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
            if self.model is None:
                self._load()
            anyio.from_thread.run_sync(self._ready.set)
            self._step_loop()
        finally:
            stopped.set()

    def _fail_pending(self, reason: str, error: str) -> None:
        """End every request, queued or admitted (call on the loop, with the step thread gone)."""
        outputs: list[EngineOutput] = []
        while self._inbox:
            cmd = self._inbox.popleft()
            if cmd[0] == "add":
                outputs.append(EngineOutput(cmd[1], [], reason, len(cmd[2]), error=error))
            elif cmd[0] == "adopt":
                if self.scheduler is not None:
                    self.scheduler.release_reserved(cmd[1])
                outputs.append(EngineOutput(cmd[1], [], reason, error=error))
        if self.scheduler is not None:
            outputs += self.scheduler.abort_all(reason, error)
        self._queues.put(outputs)

    def _step_loop(self) -> None:
        torch.set_num_threads(_torch_threads())  # OpenMP settings are per calling thread
        with torch.inference_mode():
            while not self._stop.is_set():
                self._step_once()

    def _step_once(self) -> None:
        sched = self.scheduler
        assert sched is not None
        with self._lock:
            outputs = self._drain_inbox()
            batch = sched.schedule() if sched.has_work() else None
        if batch is None or not batch.entries:
            self._queues.put_threadsafe(outputs)
            if batch is None and not self._inbox:
                self._wake.wait()
                self._wake.clear()
            return
        try:
            sampled = self._execute(batch)
        except Exception as e:  # a broken step fails its requests, not the worker
            log.exception("torch engine step failed")
            with self._lock:
                outputs += sched.abort_all("error", f"engine step failed: {e}")
            self._queues.put_threadsafe(outputs)
            return
        with self._lock:
            outputs += sched.update(batch, sampled.tokens, sampled.logprobs)
        self.num_steps += 1
        self.num_computed_tokens += batch.num_tokens
        self._queues.put_threadsafe(outputs)

    def _drain_inbox(self) -> list[EngineOutput]:
        sched, sampler = self.scheduler, self.sampler
        assert sched is not None and sampler is not None
        outputs: list[EngineOutput] = []
        inbox = self._inbox
        while inbox:
            cmd = inbox.popleft()
            if cmd[0] == "add":
                added = sched.add(cmd[1], cmd[2], cmd[3], cmd[4])
                if isinstance(added, EngineOutput):
                    self._compiled.pop(cmd[1], None)
                    outputs.append(added)
                else:
                    added.state = sampler.state_for(added)
                    self._attach_grammar(added)
            elif cmd[0] == "adopt":
                out = sched.adopt(cmd[1], cmd[2], cmd[3])
                outputs.append(out)
                req = sched.requests.get(cmd[1])
                if req is None or out.finish_reason is not None:
                    self._compiled.pop(cmd[1], None)
                if req is not None and out.finish_reason is None:
                    req.state = st = sampler.state_for(req)
                    if self._attach_grammar(req):
                        st.grammar.accept_token(cmd[3])  # the first token, sampled under it remotely
                    if not st.greedy and req.sampling.seed is not None:
                        # The prefill worker drew the first token from this seed's generator:
                        # draw once too, so later tokens match an aggregated run. (A draw
                        # consumes the same randomness whatever the probabilities.)
                        torch.multinomial(torch.ones(sampler.vocab_size), 1, generator=st.generator)
            else:
                self._compiled.pop(cmd[1], None)
                out = sched.abort(cmd[1])
                if out is not None:
                    outputs.append(out)
        return outputs

    def _choice_state(self, child: Request) -> Any:
        """Sampler state for choice c > 0 of an n > 1 request: its own seed, and its own matcher
        at the grammar's start when the request is constrained."""
        assert self.sampler is not None and self.scheduler is not None
        st = self.sampler.state_for(child)
        parent = self.scheduler.requests.get(child.output_id)
        if parent is not None and parent.state is not None and parent.state.grammar is not None:
            st.grammar = parent.state.grammar.fresh()
        return st

    def _attach_grammar(self, req: Request) -> bool:
        compiled = self._compiled.pop(req.request_id, None)
        if compiled is None:
            return False
        assert self._grammar_backend is not None
        req.state.grammar = self._grammar_backend.matcher(compiled)
        return True

    def _compile_grammar(self, sampling: SamplingParams) -> Any:
        """Compile the request's structured output (in a worker thread; cached). Raises StructuredOutputError."""
        assert sampling.structured is not None
        with self._grammar_lock:
            if self._grammar_backend is None:
                assert self.model is not None
                self._grammar_backend = GrammarBackend.for_model(
                    self.model_ref.path, self.model.args.vocab_size, self.eos_token_ids)
        return self._grammar_backend.compile(sampling.structured)

    def _execute(self, batch: ScheduledBatch) -> SampleResult:
        model, sampler = self.model, self.sampler
        assert model is not None and sampler is not None
        segments: list[tuple[Request, int, int, int]] = []
        sample_rows: list[int] = []
        logits = model.forward(self._prepare(batch, segments, sample_rows))
        if logits.device.type != "cpu":  # the sampler and its per-request generators live on the CPU
            logits = logits.cpu()
        if segments:
            self._gather_prompt_logprobs(logits, segments)
            logits = logits[sample_rows]
        return sampler.step(logits, batch.samplers)

    @staticmethod
    def _gather_prompt_logprobs(logits: torch.Tensor, segments: list[tuple[Request, int, int, int]]) -> None:
        """Logits row ``first + j`` of a segment predicted prompt token ``start + j + 1``."""
        for req, start, n, first in segments:
            st = req.state
            if st.prompt_logprobs is None:
                continue
            if start == 0:
                st.prompt_logprobs = []  # (re)computed from the start, e.g. after a preemption
            end = min(start + n, req.num_prompt_tokens - 1)
            if end > start:
                st.prompt_logprobs += prompt_position_logprobs(
                    logits[first : first + end - start], req.token_ids[start + 1 : end + 1], req.sampling.prompt_logprobs)
            if start + n == req.num_prompt_tokens:  # sent with the first output
                req.prompt_logprobs, st.prompt_logprobs = st.prompt_logprobs, None

    def _prepare(
        self, batch: ScheduledBatch, segments: list[tuple[Request, int, int, int]] | None = None,
        sample_rows: list[int] | None = None,
    ) -> StepInputs:
        """Flatten a scheduled batch into the model's step tensors.

        Requests that asked for prompt logprobs get a logits row for every prompt token of their
        chunk: ``segments`` gets (request, chunk start, tokens, first logits row) and
        ``sample_rows`` the logits row each sampling request draws from.
        """
        bs = self.block_size
        device = self.config.device
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_rows: list[int] = []
        nd = batch.num_decodes
        decodes = batch.entries[:nd]
        for row, (req, _) in enumerate(decodes):
            pos = len(req.token_ids) - 1
            input_ids.append(req.token_ids[pos])
            positions.append(pos)
            slots.append(req.blocks[pos // bs] * bs + pos % bs)
            logits_rows.append(row)
        table = mask = window_mask = None
        if decodes:
            max_blocks = max(len(r.blocks) for r, _ in decodes)
            padded: list[int] = []
            for r, _ in decodes:
                padded += r.blocks
                padded += [0] * (max_blocks - len(r.blocks))
            table = torch.tensor(padded, dtype=torch.long, device=device)
            ctx = torch.tensor(positions, dtype=torch.long, device=device)[:, None]
            key_pos = torch.arange(max_blocks * bs, device=device)[None, :]
            mask = (key_pos <= ctx)[:, None, None, :]
            window = self._sliding_window
            if window is not None:
                window_mask = ((key_pos <= ctx) & (ctx - key_pos < window))[:, None, None, :]
        prefills: list[tuple[int, int, int, torch.Tensor]] = []
        row = nd
        for req, n in batch.entries[nd:]:
            start = req.num_computed_tokens
            end = start + n
            blocks = req.blocks
            input_ids.extend(req.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend([blocks[p // bs] * bs + p % bs for p in range(start, end)])
            prefills.append(
                (row, n, start, torch.tensor(blocks[: -(-end // bs)], dtype=torch.long, device=device))
            )
            row += n
            st = req.state
            if segments is not None and st is not None and getattr(st, "prompt_logprobs", None) is not None:
                segments.append((req, start, n, len(logits_rows)))
                logits_rows.extend(range(row - n, row))  # the last one is the sampling row too
            elif end == len(req.token_ids):
                logits_rows.append(row - 1)
        if sample_rows is not None and segments:
            by_row = {r: i for i, r in enumerate(logits_rows)}
            nd_rows = list(range(nd))
            last_rows = []
            row = nd
            for req, n in batch.entries[nd:]:
                row += n
                if req.num_computed_tokens + n == len(req.token_ids):
                    last_rows.append(by_row[row - 1])
            sample_rows.extend(nd_rows + last_rows)
        return StepInputs(
            input_ids=torch.tensor(input_ids, dtype=torch.long, device=device),
            positions=torch.tensor(positions, dtype=torch.long, device=device),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            logits_indices=torch.tensor(logits_rows, dtype=torch.long, device=device),
            num_decodes=nd,
            decode_block_table=table,
            decode_mask=mask,
            decode_window_mask=window_mask,
            prefills=prefills,
        )

    # --- Engine interface ---------------------------------------------------------------------

    def _submit(self, cmd: tuple[Any, ...]) -> None:
        self._inbox.append(cmd)
        self._wake.set()

    def generate(
        self, request_id: str, token_ids: list[int], sampling: SamplingParams
    ) -> AsyncIterator[EngineOutput]:
        return self._run_request(request_id, ("add", request_id, list(token_ids), sampling, False), len(token_ids))

    async def _run_request(
        self, request_id: str, cmd: tuple[Any, ...], num_prompt_tokens: int
    ) -> AsyncIterator[EngineOutput]:
        """Submit ``cmd`` for one request and stream its outputs; closing early aborts it."""
        queue = self._queues.open(request_id)
        finished = False
        tracker = ChoiceTracker(cmd[3].n if cmd[0] == "add" else cmd[2].n)
        try:
            if self._closed:
                finished = True
                if cmd[0] == "adopt":
                    self.release_remote_prefill(request_id)
                yield EngineOutput(request_id, [], "error", num_prompt_tokens, error="engine is not running")
                return
            sampling: SamplingParams = cmd[3] if cmd[0] == "add" else cmd[2]
            if sampling.structured is not None:
                await self._ready.wait()
                try:
                    self._compiled[request_id] = await anyio.to_thread.run_sync(self._compile_grammar, sampling)
                except StructuredOutputError as e:
                    finished = True
                    if cmd[0] == "adopt":
                        self.release_remote_prefill(request_id)
                    yield EngineOutput(request_id, [], "error", num_prompt_tokens,
                                       error=f"invalid structured output: {e}")
                    return
            self._submit(cmd)
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

    def abort(self, request_id: str) -> None:
        self._submit(("abort", request_id))

    # --- disaggregation -----------------------------------------------------------------------

    def kv_layout(self) -> str:
        if not self._layout:
            raise RuntimeError("torch engine not loaded yet")
        return self._layout

    def cached_block_hashes(self) -> list[int] | None:
        if self.scheduler is None:
            return None
        with self._lock:  # the step thread mutates the cache
            return list(self.scheduler.kv.pool.cached)

    def kv_views(self, block_ids: list[int]) -> list[memoryview]:
        """Byte views of the pool for ``block_ids``: per layer K then V, one per run of consecutive ids."""
        if not self._kv_bytes:
            raise NotImplementedError("remote prefill needs the KV pool in CPU memory")
        runs = block_runs(block_ids)
        bb = self._block_bytes
        return [pool[a * bb : b * bb] for pool in self._kv_bytes for a, b in runs]

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
        return self._run_request(request_id, ("adopt", request_id, sampling, first_token), len(token_ids))

    async def prefill_and_hold(
        self, request_id: str, token_ids: list[int], sampling: SamplingParams
    ) -> tuple[list[int], int, int]:
        out: EngineOutput | None = None
        held = False
        try:
            async for last in self._run_request(
                request_id, ("add", request_id, list(token_ids), sampling, True), len(token_ids)
            ):
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
        self._submit(("abort", request_id))

    def stats(self) -> EngineStats:
        if self.scheduler is None:
            return EngineStats()
        with self._lock:
            return self.scheduler.stats()


def block_runs(block_ids: list[int]) -> list[tuple[int, int]]:
    """Runs of consecutive block ids, in the order given, as half-open [start, end) ranges."""
    runs: list[tuple[int, int]] = []
    for b in block_ids:
        if runs and runs[-1][1] == b:
            runs[-1] = (runs[-1][0], b + 1)
        else:
            runs.append((b, b + 1))
    return runs
