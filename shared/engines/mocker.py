"""Mocker engine: the real scheduler and KV accounting, no model.

Requests go through the same engine core (:mod:`shared.engines.core`: scheduler, KV cache manager,
inbox, output streams, disaggregation) as the torch engine, so block usage, prefix caching (same chained hashes), KV events, preemption and stats behave as
a real worker's would; only the forward pass is replaced by a timing model:

    step cost = (decode_step_s + decode_s_per_seq * decodes + prefill_s_per_token * prefill tokens) / speedup

and a step that makes LoRA adapters resident first stalls ``lora_load_s / speedup`` per adapter
before its tokens come out (a real worker stalls its batch while it loads an adapter).

Tokens are deterministic pseudo-random ids from (seed, or the prompt's hash) and the output
position, drawn from the model's vocabulary without its special tokens, so a mocker never stops on
EOS by chance (stop_token_ids still stop it). Its :class:`MockRunner` steps on the event loop: a
step is plain Python, cheap enough for dozens of mockers per machine. Simulated time is paid back
with real sleeps only once it adds up to more than a timer tick, so a huge speedup costs almost
nothing.

Disaggregation runs for real, on a tiny KV pool: ``MOCKER_KV_LAYERS`` layers of K and V with
``BATON_MOCKER_KV_BLOCK_BYTES`` bytes per block (default 64), so reservations, held blocks and KV
transfers are exercised cheaply. Each prefill chunk stamps the blocks it computes with a signature
of their tokens; a decode worker adopting a remote prefill checks the signatures of the blocks it
received, so a transfer that lands in the wrong blocks or order fails the request loudly.
"""

from __future__ import annotations

import logging
import os

from shared.engines.adapters import SimulatedAdapters, lora_modules
from shared.engines.base import EngineConfig
from shared.engines.core import (
    NEAR_FREE_STEP_S,
    EngineCore,
    GrammarRefused,
    ModelRunner,
    PoolSpec,
    StepResult,
)
from shared.engines.kv_cache import default_num_blocks
from shared.engines.request import Request
from shared.engines.scheduler import ScheduledBatch
from shared.messages import PositionLogprobs, StructuredOutput, TokenLogprob

log = logging.getLogger(__name__)

FALLBACK_VOCAB_SIZE = 2048
_MASK64 = (1 << 64) - 1
MOCKER_KV_LAYERS = 2  # enough to exercise the per-layer K/V ordering of kv_views
# Near free, a multi-step batch holds about this many tokens: 16 steps of one request, 2 of 32,
# none past 32 (a batch that size is a single step, as before). Arrivals wait at most that long.
MULTI_STEP_TOKENS = 64


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


class MockRunner(ModelRunner):
    """The simulated model: deterministic tokens, fake logprobs, stamped KV blocks, a step cost."""

    threaded = False

    def __init__(self, config: EngineConfig, facts: _ModelFacts) -> None:
        self.config = config
        self.block_size = config.block_size
        self.vocab_size = facts.vocab_size
        self.max_model_len = facts.max_model_len
        # Never emit special tokens: a mocker's output length is max_tokens unless a stop id is asked for.
        self.avoid = frozenset(facts.special_ids | set(facts.eos_token_ids))
        if len(self.avoid) >= self.vocab_size:
            raise ValueError("mocker vocabulary has no ordinary tokens")
        speedup = config.speedup if config.speedup > 0 else 1.0
        self._step_s = config.decode_step_s / speedup
        self._seq_s = config.decode_s_per_seq / speedup
        self._prefill_token_s = config.prefill_s_per_token / speedup
        self.block_bytes = _kv_block_bytes()
        self.kv_pools = []
        # LoRA: names and residency only; making one resident costs lora_load_s simulated seconds.
        self.adapters: SimulatedAdapters | None = None
        if config.max_loras > 0:
            self.adapters = SimulatedAdapters(config.max_loras, config.lora_load_s / speedup)
            for name, path in lora_modules(config.lora_modules):
                self.adapters.add(name, path)
        # Near free (a huge speedup): several decode steps per scheduler call, since the
        # scheduler's work per step is then all a step costs.
        if self._step_s + self._seq_s * MULTI_STEP_TOKENS < NEAR_FREE_STEP_S:
            self.multi_step_tokens = MULTI_STEP_TOKENS
        self.layout = (
            f"mocker/{facts.name}/block_size={config.block_size}/layers={MOCKER_KV_LAYERS}"
            f"/block_bytes={self.block_bytes}"
        )

    def load(self) -> PoolSpec:
        cfg = self.config
        num_blocks = cfg.num_blocks or default_num_blocks(cfg.max_num_seqs, cfg.block_size, self.max_model_len)
        # The KV "pool": per layer a K and a V region of block_bytes per block.
        region = num_blocks * self.block_bytes
        mem = memoryview(bytearray(2 * MOCKER_KV_LAYERS * region))
        self.kv_pools = [mem[i * region : (i + 1) * region] for i in range(2 * MOCKER_KV_LAYERS)]
        return PoolSpec(num_blocks, self.max_model_len, None)  # any token id goes: no embedding table

    def new_state(self, req: Request) -> int:
        """Same seed, same tokens; unseeded requests vary with their prompt; each choice its own."""
        sp = req.sampling
        base = sp.seed if sp.seed is not None else hash(tuple(req.token_ids[: req.num_prompt_tokens]))
        return _mix64((base + req.choice * 0x9E3779B97F4A7C15) & _MASK64)

    def compile_grammar(self, structured: StructuredOutput) -> None:
        # Never ignored: the mocker's fake tokens cannot follow a grammar, so it refuses (a 400).
        raise GrammarRefused(
            "the mocker engine cannot honour structured outputs (response_format, structured_outputs, "
            "guided_*, a forced tool_choice); use the torch or vllm engine")

    def execute(self, batch: ScheduledBatch) -> StepResult:
        if batch.steps > 1:
            return self._execute_runs(batch)
        vocab, avoid = self.vocab_size, self.avoid
        samplers = batch.samplers
        sampled: list[int] = []
        append = sampled.append
        wants_logprobs = False
        for req in samplers:
            # _mix64(state ^ (output position * odd constant)), written out: this runs per token.
            x = ((req.state ^ ((len(req.token_ids) - req.num_prompt_tokens) * 0xD1B54A32D192ED03))
                 + 0x9E3779B97F4A7C15) & _MASK64
            x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
            x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
            token = (x ^ (x >> 31)) % vocab
            while token in avoid:
                token = (token + 1) % vocab
            append(token)
            sp = req.sampling
            if sp.logprobs >= 0 or sp.prompt_logprobs >= 0:
                wants_logprobs = True
        if batch.num_decodes < len(batch.entries):  # prefill chunks: stamp the blocks they compute
            self._stamp(batch)
        logprobs: list[PositionLogprobs | None] | None = None
        if wants_logprobs:
            logprobs = [
                self._fake_logprobs(req.state, t, req.sampling.logprobs) if req.sampling.logprobs >= 0 else None
                for req, t in zip(samplers, sampled, strict=True)]
            for req in samplers:
                if req.sampling.prompt_logprobs >= 0 and req.choice == 0 and req.num_output_tokens == 0:
                    prompt = req.token_ids[1 : req.num_prompt_tokens]
                    req.prompt_logprobs = [self._fake_logprobs(req.state ^ i, t, req.sampling.prompt_logprobs)
                                           for i, t in enumerate(prompt)]
        seconds = self._step_s + self._seq_s * batch.num_decodes + self._prefill_token_s * batch.num_prefill_tokens
        stall = 0.0
        if self.adapters is not None and self.adapters.owed_s:  # adapters made resident for this step: load first
            stall, self.adapters.owed_s = self.adapters.owed_s, 0.0
        return StepResult(sampled, logprobs, seconds, stall)

    def _execute_runs(self, batch: ScheduledBatch) -> StepResult:
        """A multi-step batch of decodes: each request's next tokens, the same ones (and logprobs)
        that as many single steps would draw, at the simulated cost of those steps."""
        vocab, avoid = self.vocab_size, self.avoid
        runs: list[list[int]] = []
        run_logprobs: list[list[PositionLogprobs] | None] | None = None
        for i, (req, n) in enumerate(batch.entries):
            state = req.state
            first = len(req.token_ids) - req.num_prompt_tokens  # the output position of its first token
            run: list[int] = []
            for position in range(first, first + n):
                x = ((state ^ (position * 0xD1B54A32D192ED03)) + 0x9E3779B97F4A7C15) & _MASK64
                x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
                x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
                token = (x ^ (x >> 31)) % vocab
                while token in avoid:
                    token = (token + 1) % vocab
                run.append(token)
            runs.append(run)
            top = req.sampling.logprobs
            if top >= 0:
                if run_logprobs is None:
                    run_logprobs = [None] * len(batch.entries)
                run_logprobs[i] = [self._fake_logprobs(state, t, top) for t in run]
        # the steps shrink as requests run out of tokens: each counts the decodes still in it
        decodes = sum(n for _, n in batch.entries)
        seconds = self._step_s * batch.steps + self._seq_s * decodes
        stall = 0.0
        if self.adapters is not None and self.adapters.owed_s:  # (admissions make adapters resident: none here)
            stall, self.adapters.owed_s = self.adapters.owed_s, 0.0
        return StepResult([], None, seconds, stall, runs=runs, run_logprobs=run_logprobs)

    # --- LoRA: simulated adapters -------------------------------------------------------------

    def _fake_logprobs(self, state: int, token: int, top: int) -> PositionLogprobs:
        """Well-formed, made-up logprobs: the token's is in (-1, 0], the top list (the token first,
        then other ordinary tokens) strictly decreasing, ``top`` entries long."""
        lp = -(_mix64(state ^ token) % 1000) / 1000.0
        alts: list[TokenLogprob] = []
        t = token
        while len(alts) < top:
            if t not in self.avoid:
                alts.append(TokenLogprob(t, lp - 0.5 * len(alts)))
            t = (t + 1) % self.vocab_size
        return PositionLogprobs(TokenLogprob(token, lp), alts)

    # --- block signatures: what a real engine's KV would be, in a few bytes ------------------

    def check_received(self, req: Request) -> str | None:
        bad = self._check_stamps(req)
        return None if bad is None else f"received KV block {bad} does not hold its tokens' KV"

    def _signatures(self, tokens: list[int], index: int) -> list[bytes]:
        """Per layer K/V region, the bytes block ``index`` holding ``tokens`` has there."""
        word = _mix64(hash((index, *tokens)) & _MASK64)
        reps = self.block_bytes // 8
        return [((word ^ (lk * 0x9E3779B97F4A7C15)) & _MASK64).to_bytes(8, "little") * reps
                for lk in range(len(self.kv_pools))]

    def _stamp(self, batch: ScheduledBatch) -> None:
        """Write the signatures of every block a prefill chunk of this step computes into."""
        bs, bb = self.block_size, self.block_bytes
        for req, n in batch.entries[batch.num_decodes :]:
            end = req.num_computed_tokens + n
            for i in range(req.num_computed_tokens // bs, (end - 1) // bs + 1):
                block = req.blocks[i]
                sigs = self._signatures(req.token_ids[i * bs : min((i + 1) * bs, end)], i)
                for pool, sig in zip(self.kv_pools, sigs, strict=True):
                    pool[block * bb : (block + 1) * bb] = sig

    def _check_stamps(self, req: Request) -> int | None:
        """The first received block whose bytes are not its prompt tokens' signature, or None."""
        bs, bb = self.block_size, self.block_bytes
        n = req.num_prompt_tokens
        for i in range(req.num_cached_blocks, len(req.blocks)):
            block = req.blocks[i]
            sigs = self._signatures(req.token_ids[i * bs : min((i + 1) * bs, n)], i)
            for pool, sig in zip(self.kv_pools, sigs, strict=True):
                if pool[block * bb : (block + 1) * bb] != sig:
                    return block
        return None


class MockerEngine(EngineCore):
    name = "mocker"
    supports_remote_prefill = True
    runner: MockRunner

    def __init__(self, config: EngineConfig) -> None:
        facts = _ModelFacts(config.model)
        self.model_name = facts.name
        self.eos_token_ids = facts.eos_token_ids
        self.vocab_size = facts.vocab_size  # the decode worker checks token ids against it
        super().__init__(config, MockRunner(config, facts))
