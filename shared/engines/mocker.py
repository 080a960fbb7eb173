"""Mocker engine: the real scheduler and KV accounting, no model.

Requests go through the same :class:`Scheduler` and :class:`KvCacheManager` as the torch engine,
so block usage, prefix caching (same chained hashes), KV events, preemption and stats behave as
a real worker's would; only the forward pass is replaced by a timing model:

    step cost = (decode_step_s + decode_s_per_seq * decodes + prefill_s_per_token * prefill tokens) / speedup

Tokens are deterministic pseudo-random ids from (seed, or the prompt's hash) and the output
position, drawn from the model's vocabulary without its special tokens, so a mocker never stops on
EOS by chance (stop_token_ids still stop it). It runs on the event loop: a step is plain Python,
cheap enough for dozens of mockers per machine. Simulated time is paid back with real sleeps only
once it adds up to more than a timer tick, so a huge speedup costs almost nothing.

Disaggregation runs for real, on a tiny KV pool: ``MOCKER_KV_LAYERS`` layers of K and V with
``BATON_MOCKER_KV_BLOCK_BYTES`` bytes per block (default 64), so reservations, held blocks and KV
transfers are exercised cheaply. Each prefill chunk stamps the blocks it computes with a signature
of their tokens; a decode worker adopting a remote prefill checks the signatures of the blocks it
received, so a transfer that lands in the wrong blocks or order fails the request loudly.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator

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
from shared.engines.scheduler import Request, ScheduledBatch, Scheduler
from shared.messages import PositionLogprobs, SamplingParams, TokenLogprob

log = logging.getLogger(__name__)

FALLBACK_VOCAB_SIZE = 2048
_MASK64 = (1 << 64) - 1
MIN_SLEEP_S = 0.0005  # below this, owed simulated time accumulates instead of arming a timer
MOCKER_KV_LAYERS = 2  # enough to exercise the per-layer K/V ordering of kv_views


def _kv_block_bytes() -> int:
    n = int(os.environ.get("BATON_MOCKER_KV_BLOCK_BYTES", "64"))
    return max(8, n - n % 8)


def _mix64(x: int) -> int:
    """splitmix64 finaliser: a cheap, well-spread 64-bit hash of an int."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class _ModelFacts:
    """What the mocker borrows from the model directory, when it can find one."""

    def __init__(self, model: str) -> None:
        self.name = model
        self.vocab_size = FALLBACK_VOCAB_SIZE
        self.eos_token_ids: tuple[int, ...] = ()
        self.special_ids: set[int] = set()
        self.max_model_len: int | None = None
        try:
            import json

            from tokenizers import Tokenizer as HfTokenizer

            from shared.models import resolve_model
            from shared.tokenizer import Tokenizer

            ref = resolve_model(model)
            self.name = ref.name
            tok = Tokenizer(ref.path)
            self.vocab_size = tok.vocab_size
            self.eos_token_ids = tok.eos_token_ids
            raw = HfTokenizer.from_file(str(ref.path / "tokenizer.json"))
            self.special_ids = {i for i, t in raw.get_added_tokens_decoder().items() if t.special}
            cfg = json.loads((ref.path / "config.json").read_text())
            self.max_model_len = cfg.get("max_position_embeddings")
        except Exception as e:  # no model directory: a mocker needs none
            log.info("mocker: model %r not resolvable (%s); vocab %d", model, e, FALLBACK_VOCAB_SIZE)


class MockerEngine(Engine):
    name = "mocker"

    def __init__(self, config: EngineConfig) -> None:
        super().__init__()
        self.config = config
        facts = _ModelFacts(config.model)
        self.model_name = facts.name
        self.block_size = config.block_size
        self.eos_token_ids = facts.eos_token_ids
        self.vocab_size = facts.vocab_size
        # Never emit special tokens: a mocker's output length is max_tokens unless a stop id is asked for.
        self._avoid = frozenset(facts.special_ids | set(facts.eos_token_ids))
        if len(self._avoid) >= self.vocab_size:
            raise ValueError("mocker vocabulary has no ordinary tokens")
        num_blocks = config.num_blocks or default_num_blocks(
            config.max_num_seqs, config.block_size, facts.max_model_len
        )
        self.scheduler = Scheduler(
            num_blocks=num_blocks,
            block_size=config.block_size,
            max_num_seqs=config.max_num_seqs,
            max_batched_tokens=config.max_batched_tokens,
            enable_prefix_caching=config.enable_prefix_caching,
            eos_token_ids=facts.eos_token_ids,
            max_model_len=facts.max_model_len,
            kv_events=self.kv_events,
            make_state=self._state_for,
        )
        self._queues = OutputQueues()
        self._wake = asyncio.Event()
        speedup = config.speedup if config.speedup > 0 else 1.0
        self._step_s = config.decode_step_s / speedup
        self._seq_s = config.decode_s_per_seq / speedup
        self._prefill_token_s = config.prefill_s_per_token / speedup
        self.num_steps = 0
        self.num_computed_tokens = 0  # tokens "forwarded": prefill chunks plus decodes
        # The KV "pool": per layer a K and a V region of block_bytes per block.
        self._block_bytes = _kv_block_bytes()
        self._kv_mem = memoryview(bytearray(2 * MOCKER_KV_LAYERS * num_blocks * self._block_bytes))
        region = num_blocks * self._block_bytes
        self._kv_pools = [self._kv_mem[i * region : (i + 1) * region] for i in range(2 * MOCKER_KV_LAYERS)]
        tiers = self._make_tiers(config, self.kv_views)
        if tiers is not None:
            self.scheduler.kv.attach_tiers(tiers, ViewBlockIO(self.kv_views))

    # --- the step loop -----------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        sched = self.scheduler
        clock = loop.time()  # simulated time owed up to here
        try:
            while True:
                if not sched.has_work():
                    self._wake.clear()
                    await self._wake.wait()
                    clock = loop.time()
                    continue
                clock += self._step()
                owed = clock - loop.time()
                if owed > MIN_SLEEP_S:
                    await asyncio.sleep(owed)
                else:
                    if owed < 0:
                        clock -= owed  # running behind: do not bank the lost time as credit
                    await asyncio.sleep(0)  # let consumers and new requests in between steps
        finally:
            # Nobody will step again: end every stream rather than leave clients hanging.
            self._queues.put(sched.abort_all("abort", "engine stopped"))

    def _step(self) -> float:
        """Schedule, "compute" and deliver one step; returns its simulated duration (seconds)."""
        sched = self.scheduler
        batch = sched.schedule()
        if not batch.entries:
            return 0.0
        vocab, avoid = self.vocab_size, self._avoid
        sampled: list[int] = []
        for req in batch.samplers:
            token = (
                _mix64(req.state ^ ((len(req.token_ids) - req.num_prompt_tokens) * 0xD1B54A32D192ED03))
                % vocab
            )
            while token in avoid:
                token = (token + 1) % vocab
            sampled.append(token)
        self._stamp(batch)
        logprobs = [self._fake_logprobs(req.state, t, req.sampling.logprobs) if req.sampling.logprobs >= 0 else None
                    for req, t in zip(batch.samplers, sampled, strict=True)]
        for req in batch.samplers:
            if req.sampling.prompt_logprobs >= 0 and req.choice == 0 and req.num_output_tokens == 0:
                prompt = req.token_ids[1 : req.num_prompt_tokens]
                req.prompt_logprobs = [self._fake_logprobs(req.state ^ i, t, req.sampling.prompt_logprobs)
                                       for i, t in enumerate(prompt)]
        self._queues.put(sched.update(batch, sampled, logprobs))
        self.num_steps += 1
        self.num_computed_tokens += batch.num_tokens
        return (
            self._step_s + self._seq_s * batch.num_decodes + self._prefill_token_s * batch.num_prefill_tokens
        )

    # --- Engine interface --------------------------------------------------------------------

    def generate(
        self, request_id: str, token_ids: list[int], sampling: SamplingParams
    ) -> AsyncIterator[EngineOutput]:
        return self._run(request_id, token_ids, sampling, hold=False)

    async def _run(
        self, request_id: str, token_ids: list[int], sampling: SamplingParams, hold: bool = False,
        first_token: int | None = None,
    ) -> AsyncIterator[EngineOutput]:
        """Add (or, with ``first_token``, adopt a remotely prefilled) request and stream its outputs."""
        queue = self._queues.open(request_id)
        finished = False
        try:
            if sampling.structured is not None:
                # Never ignored: the mocker's fake tokens cannot follow a grammar, so it refuses (a 400).
                finished = True
                yield EngineOutput(request_id, [], "error", len(token_ids), error=(
                    "invalid structured output: the mocker engine cannot honour structured outputs "
                    "(response_format, structured_outputs, guided_*, a forced tool_choice); use the torch "
                    "or vllm engine"))
                return
            sched = self.scheduler
            if first_token is None:
                added = sched.add(request_id, token_ids, sampling, hold)
            else:
                added = self._adopt(request_id, sampling, first_token)
            first: EngineOutput | None = None
            if isinstance(added, EngineOutput):
                first = added  # an error, or an adopted request's first token
                added = sched.requests.get(request_id) if added.finish_reason is None else None
            if added is not None:
                added.state = self._state_for(added)
                self._wake.set()
            tracker = ChoiceTracker(sampling.n)
            if first is not None:
                finished = tracker.ends(first)
                yield first
                if finished:
                    return
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

    @staticmethod
    def _state_for(req: Request) -> int:
        """Same seed, same tokens; unseeded requests vary with their prompt; each choice its own."""
        sp = req.sampling
        base = sp.seed if sp.seed is not None else hash(tuple(req.token_ids[: req.num_prompt_tokens]))
        return _mix64((base + req.choice * 0x9E3779B97F4A7C15) & _MASK64)

    def _fake_logprobs(self, state: int, token: int, top: int) -> PositionLogprobs:
        """Well-formed, made-up logprobs: the token's is in (-1, 0], the top list (the token first,
        then other ordinary tokens) strictly decreasing, ``top`` entries long."""
        lp = -(_mix64(state ^ token) % 1000) / 1000.0
        alts: list[TokenLogprob] = []
        t = token
        while len(alts) < top:
            if t not in self._avoid:
                alts.append(TokenLogprob(t, lp - 0.5 * len(alts)))
            t = (t + 1) % self.vocab_size
        return PositionLogprobs(TokenLogprob(token, lp), alts)

    def abort(self, request_id: str) -> None:
        out = self.scheduler.abort(request_id)
        if out is not None:
            self._queues.put([out])

    def stats(self) -> EngineStats:
        return self.scheduler.stats()

    # --- disaggregation ----------------------------------------------------------------------

    supports_remote_prefill = True

    def kv_layout(self) -> str:
        return (
            f"mocker/{self.model_name}/block_size={self.block_size}/layers={MOCKER_KV_LAYERS}"
            f"/block_bytes={self._block_bytes}"
        )

    def cached_block_hashes(self) -> list[int] | None:
        return list(self.scheduler.kv.pool.cached)  # runs on the event loop, like every mocker step

    def kv_views(self, block_ids: list[int]) -> list[memoryview]:
        bb = self._block_bytes
        runs: list[tuple[int, int]] = []
        for b in block_ids:
            if runs and runs[-1][1] == b:
                runs[-1] = (runs[-1][0], b + 1)
            else:
                runs.append((b, b + 1))
        return [pool[a * bb : b * bb] for pool in self._kv_pools for a, b in runs]

    def cached_prefix_tokens(self, token_ids: list[int]) -> int:
        return self.scheduler.kv.cached_prefix_tokens(token_ids)

    def reserve_remote_prefill(self, request_id: str, token_ids: list[int]) -> tuple[list[int], int]:
        req = self.scheduler.reserve(request_id, list(token_ids))
        return req.blocks[req.num_cached_blocks :], req.num_cached_blocks

    def release_remote_prefill(self, request_id: str) -> None:
        self.scheduler.release_reserved(request_id)

    def generate_after_remote_prefill(
        self, request_id: str, token_ids: list[int], sampling: SamplingParams, first_token: int
    ) -> AsyncIterator[EngineOutput]:
        return self._run(request_id, token_ids, sampling, first_token=first_token)

    def _adopt(self, request_id: str, sampling: SamplingParams, first_token: int) -> EngineOutput:
        req = self.scheduler.reserved.get(request_id)
        if req is not None:
            bad = self._check_stamps(req)
            if bad is not None:
                self.scheduler.release_reserved(request_id)
                return EngineOutput(request_id, [], "error", req.num_prompt_tokens,
                                    error=f"received KV block {bad} does not hold its tokens' KV")
        return self.scheduler.adopt(request_id, sampling, first_token)

    async def prefill_and_hold(
        self, request_id: str, token_ids: list[int], sampling: SamplingParams
    ) -> tuple[list[int], int, int]:
        out: EngineOutput | None = None
        held = False
        try:
            async for last in self._run(request_id, token_ids, sampling, hold=True):
                out = last  # a held request has exactly one output: its first token, finished
            assert out is not None
            req = self.scheduler.held.get(request_id)
            if out.error or not out.token_ids or req is None:
                raise RuntimeError(out.error or f"prefill ended without a token ({out.finish_reason})")
            held = True
            return req.blocks[: self.scheduler.kv.blocks_needed(len(token_ids))], out.token_ids[0], out.num_cached_tokens
        finally:
            if not held:
                self.release_held(request_id)

    def release_held(self, request_id: str) -> None:
        self.scheduler.abort(request_id)  # held or still prefilling: either way its blocks go back

    # --- block signatures: what a real engine's KV would be, in a few bytes ------------------

    def _signatures(self, tokens: list[int], index: int) -> list[bytes]:
        """Per layer K/V region, the bytes block ``index`` holding ``tokens`` has there."""
        word = _mix64(hash((index, *tokens)) & _MASK64)
        reps = self._block_bytes // 8
        return [((word ^ (lk * 0x9E3779B97F4A7C15)) & _MASK64).to_bytes(8, "little") * reps
                for lk in range(len(self._kv_pools))]

    def _stamp(self, batch: ScheduledBatch) -> None:
        """Write the signatures of every block a prefill chunk of this step computes into."""
        bs, bb = self.block_size, self._block_bytes
        for req, n in batch.entries[batch.num_decodes :]:
            end = req.num_computed_tokens + n
            for i in range(req.num_computed_tokens // bs, (end - 1) // bs + 1):
                block = req.blocks[i]
                sigs = self._signatures(req.token_ids[i * bs : min((i + 1) * bs, end)], i)
                for pool, sig in zip(self._kv_pools, sigs, strict=True):
                    pool[block * bb : (block + 1) * bb] = sig

    def _check_stamps(self, req: Request) -> int | None:
        """The first received block whose bytes are not its prompt tokens' signature, or None."""
        bs, bb = self.block_size, self._block_bytes
        n = req.num_prompt_tokens
        for i in range(req.num_cached_blocks, len(req.blocks)):
            block = req.blocks[i]
            sigs = self._signatures(req.token_ids[i * bs : min((i + 1) * bs, n)], i)
            for pool, sig in zip(self._kv_pools, sigs, strict=True):
                if pool[block * bb : (block + 1) * bb] != sig:
                    return block
        return None
