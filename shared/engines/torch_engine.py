"""Torch engine: the shared scheduler and KV accounting driving a paged Llama-family model.

The step loop runs in one worker thread (``run()`` -> ``anyio.to_thread``), so the event loop
never waits on a forward pass. Requests and aborts reach the thread through an inbox; outputs
come back once per step through :meth:`OutputQueues.put_threadsafe`. The scheduler is touched
only by the step thread, except :meth:`stats`, which takes the same lock the thread holds while
it schedules and records a step (never across a forward pass).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import threading
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio

if "torch" not in sys.modules:
    # OpenMP workers that spin while waiting wreck throughput once the CPU is shared (other
    # services, other workers); passive waiting costs little. Only effective before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch

from shared.engines.base import Engine, EngineConfig, EngineOutput, EngineStats, OutputQueues
from shared.engines.kv_cache import default_num_blocks
from shared.engines.sampling import Sampler
from shared.engines.scheduler import ScheduledBatch, Scheduler
from shared.engines.torch_model import LlamaModel, ModelArgs, StepInputs, load_model
from shared.messages import SamplingParams
from shared.models import resolve_model

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


def _eos_ids(model_dir: Path) -> tuple[int, ...]:
    try:
        from shared.tokenizer import Tokenizer

        return Tokenizer(model_dir).eos_token_ids
    except Exception:  # no tokenizer.json (a bare checkpoint): read the configs directly
        for name in ("generation_config.json", "config.json"):
            p = model_dir / name
            if p.exists():
                eos = json.loads(p.read_text()).get("eos_token_id")
                if eos is not None:
                    return tuple(eos) if isinstance(eos, list) else (int(eos),)
        return ()


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
        self.block_size = config.block_size
        self.eos_token_ids = _eos_ids(self.model_ref.path)
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

    # --- loading ------------------------------------------------------------------------------

    def _load(self) -> None:
        cfg = self.config
        threads = _torch_threads()
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        model = load_model(self.model_ref.path, cfg.dtype, cfg.device)
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
        )
        windows = {w for w in args.sliding_windows if w is not None}
        if len(windows) > 1:
            raise NotImplementedError("layers with different sliding windows")
        self._sliding_window = windows.pop() if windows else None
        self.model = model
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
        if self.model is None:
            try:
                await anyio.to_thread.run_sync(self._load)
            except BaseException as e:
                self._load_error = e
                self._closed = True
                self._ready.set()
                self._fail_pending("error", f"engine failed to load: {e!r}")
                raise
        self._ready.set()
        self._stop.clear()
        stopped = threading.Event()
        try:
            await anyio.to_thread.run_sync(self._step_loop, stopped, abandon_on_cancel=True)
        finally:
            self._stop.set()
            self._wake.set()
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(stopped.wait)
                # Nobody will step again: end every stream rather than leave clients hanging.
                self._closed = True
                self._fail_pending("abort", "engine stopped")

    def _fail_pending(self, reason: str, error: str) -> None:
        """End every request, queued or admitted (call on the loop, with the step thread gone)."""
        outputs: list[EngineOutput] = []
        while self._inbox:
            cmd = self._inbox.popleft()
            if cmd[0] == "add":
                outputs.append(EngineOutput(cmd[1], [], reason, len(cmd[2]), error=error))
        if self.scheduler is not None:
            outputs += self.scheduler.abort_all(reason, error)
        self._queues.put(outputs)

    def _step_loop(self, stopped: threading.Event) -> None:
        try:
            torch.set_num_threads(_torch_threads())  # OpenMP settings are per calling thread
            with torch.inference_mode():
                while not self._stop.is_set():
                    self._step_once()
        finally:
            stopped.set()

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
            outputs += sched.update(batch, sampled)
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
                added = sched.add(cmd[1], cmd[2], cmd[3])
                if isinstance(added, EngineOutput):
                    outputs.append(added)
                else:
                    added.state = sampler.state_for(added)
            else:
                out = sched.abort(cmd[1])
                if out is not None:
                    outputs.append(out)
        return outputs

    def _execute(self, batch: ScheduledBatch) -> list[int]:
        model, sampler = self.model, self.sampler
        assert model is not None and sampler is not None
        logits = model.forward(self._prepare(batch))
        return sampler.sample(logits, batch.samplers)

    def _prepare(self, batch: ScheduledBatch) -> StepInputs:
        """Flatten a scheduled batch into the model's step tensors."""
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
            if end == len(req.token_ids):
                logits_rows.append(row - 1)
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

    async def generate(
        self, request_id: str, token_ids: list[int], sampling: SamplingParams
    ) -> AsyncIterator[EngineOutput]:
        queue = self._queues.open(request_id)
        finished = False
        try:
            if self._closed:
                finished = True
                yield EngineOutput(request_id, [], "error", len(token_ids), error="engine is not running")
                return
            self._submit(("add", request_id, list(token_ids), sampling))
            while True:
                out = await queue.get()
                finished = out.finish_reason is not None
                yield out
                if finished:
                    return
        finally:
            self._queues.close(request_id)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._submit(("abort", request_id))

    def stats(self) -> EngineStats:
        if self.scheduler is None:
            return EngineStats()
        with self._lock:
            return self.scheduler.stats()
