"""The torch model runner: a scheduled batch to step tensors, the forward pass, logits, sampling.

It owns the model, its paged KV pool and the :class:`~shared.engines.sampling.Sampler`; the
:class:`~shared.engines.core.EngineCore` calls it from its step thread. Sampling is its own room:
the runner hands it the step's logits rows through one entry point, :meth:`Sampler.step`.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from contextlib import AbstractContextManager
from typing import Any

if "torch" not in sys.modules and "OMP_WAIT_POLICY" not in os.environ:
    # OpenMP workers spin briefly after each parallel region, then sleep. Long spinning wrecks
    # throughput once the CPU is shared (other services, other workers); never spinning (passive)
    # pays a futex wake-up per op, ~1.7x slower decode steps on a small model. ~30k spins keeps
    # the threads warm between the ops of one step. Only effective before torch loads.
    os.environ.setdefault("GOMP_SPINCOUNT", "30000")
import torch

from shared.engines.adapters import lora_modules
from shared.engines.base import EngineConfig
from shared.engines.core import GrammarRefused, ModelRunner, PoolSpec, StepResult
from shared.engines.cpu_threads import torch_threads
from shared.engines.kv_cache import default_num_blocks
from shared.engines.lora import row_slots
from shared.engines.request import Request
from shared.engines.sampling import Sampler, SamplerState, prompt_position_logprobs
from shared.engines.scheduler import ScheduledBatch
from shared.engines.structured import GrammarBackend, StructuredOutputError
from shared.engines.torch_model import LlamaModel, ModelArgs, StepInputs, load_model
from shared.messages import StructuredOutput
from shared.models import ModelRef

log = logging.getLogger(__name__)

DEFAULT_KV_BYTES_CAP = 4 << 30  # default pool never above this, nor above a quarter of free memory

# A prefill chunk that asked for prompt logprobs: (request, chunk start, tokens, first logits row).
Segment = tuple[Request, int, int, int]


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def device_type(device: str) -> str:
    """"cpu", "cuda", ... of a device string such as "cuda:1"."""
    return torch.device(device).type


class _StepMode(AbstractContextManager[None]):
    """Around the step loop: this thread's matmul threads (OpenMP settings are per calling
    thread) and inference mode."""

    def __init__(self) -> None:
        self._inference = torch.inference_mode()

    def __enter__(self) -> None:
        torch.set_num_threads(torch_threads())
        self._inference.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._inference.__exit__(*exc)


class TorchModelRunner(ModelRunner):
    threaded = True

    def __init__(self, config: EngineConfig, model_ref: ModelRef, dtype: torch.dtype,
                 eos_token_ids: tuple[int, ...]) -> None:
        self.config = config
        self.model_ref = model_ref
        self.dtype = dtype
        self.eos_token_ids = eos_token_ids
        self.model: LlamaModel | None = None
        self.sampler: Sampler | None = None
        self.sliding_window: int | None = None
        self.kv_pools = []
        # Structured outputs: built on first use (a vocabulary pass), grammars compiled at admission.
        self._grammar_backend: GrammarBackend | None = None
        self._grammar_lock = threading.Lock()

    # --- loading ------------------------------------------------------------------------------

    def load(self) -> PoolSpec:
        cfg = self.config
        threads = torch_threads()
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        model = load_model(self.model_ref.path, self.dtype, cfg.device)
        args: ModelArgs = model.args
        num_blocks = cfg.num_blocks or self._default_num_blocks(model)
        model.allocate_kv(num_blocks, cfg.block_size)
        self.sampler = Sampler(args.vocab_size, cfg.seed)
        windows = {w for w in args.sliding_windows if w is not None}
        if len(windows) > 1:
            raise NotImplementedError("layers with different sliding windows")
        self.sliding_window = windows.pop() if windows else None
        self.model = model
        if cfg.max_loras > 0:
            from shared.engines.lora import LoraRegistry

            self.adapters = LoraRegistry(args, model.dtype, model.device, max_loras=cfg.max_loras,
                                         max_rank=cfg.max_lora_rank)
            for name, path in lora_modules(cfg.lora_modules):
                self.adapters.add(name, path)  # a bad one fails the start, naming it
        if torch.device(cfg.device).type == "cpu":  # KV export/import reads the pool from the event loop
            for layer in range(args.num_layers):
                for pool in (model.k_caches[layer], model.v_caches[layer]):
                    self.kv_pools.append(memoryview(pool.reshape(-1).view(torch.uint8).numpy()))
            self.block_bytes = len(self.kv_pools[0]) // num_blocks
        self.layout = (
            f"torch/{self.model_ref.name}/{self.dtype}/block_size={cfg.block_size}/layers={args.num_layers}"
            f"/kv_heads={args.num_kv_heads}/head_dim={args.head_dim}"
        )
        log.info(
            "torch engine: %s, %d KV blocks of %d tokens (%.0f MiB), %d threads",
            self.model_ref.name,
            num_blocks,
            cfg.block_size,
            num_blocks * cfg.block_size * model.kv_bytes_per_token() / 2**20,
            threads,
        )
        return PoolSpec(num_blocks, args.max_position_embeddings, args.vocab_size)

    def _default_num_blocks(self, model: LlamaModel) -> int:
        cfg = self.config
        wanted = default_num_blocks(cfg.max_num_seqs, cfg.block_size, model.args.max_position_embeddings)
        cap = DEFAULT_KV_BYTES_CAP
        avail = _available_memory()
        if avail is not None:
            cap = min(cap, avail // 4)
        affordable = cap // (cfg.block_size * model.kv_bytes_per_token())
        return max(1, min(wanted, affordable))

    def step_context(self) -> AbstractContextManager[Any]:
        return _StepMode()

    # --- per-request state ------------------------------------------------------------------------

    def new_state(self, req: Request) -> SamplerState:
        assert self.sampler is not None
        return self.sampler.state_for(req)

    # --- LoRA adapters (between steps, under the core's lock) -----------------------------------------

    def adopted(self, req: Request) -> None:
        st = req.state
        if not st.greedy and req.sampling.seed is not None:
            # The prefill worker drew the first token from this seed's generator: draw once too,
            # so later tokens match an aggregated run. (A draw consumes the same randomness
            # whatever the probabilities.)
            assert self.sampler is not None
            torch.multinomial(torch.ones(self.sampler.vocab_size), 1, generator=st.generator)

    def compile_grammar(self, structured: StructuredOutput) -> Any:
        """Compile in a worker thread (cached by the backend, which the first call builds)."""
        with self._grammar_lock:
            if self._grammar_backend is None:
                assert self.model is not None
                self._grammar_backend = GrammarBackend.for_model(
                    self.model_ref.path, self.model.args.vocab_size, self.eos_token_ids)
        try:
            return self._grammar_backend.compile(structured)
        except StructuredOutputError as e:
            raise GrammarRefused(str(e)) from e

    def matcher(self, compiled: Any) -> Any:
        assert self._grammar_backend is not None
        return self._grammar_backend.matcher(compiled)

    # --- one step ---------------------------------------------------------------------------------

    def execute(self, batch: ScheduledBatch) -> StepResult:
        model, sampler = self.model, self.sampler
        assert model is not None and sampler is not None
        segments: list[Segment] = []
        sample_rows: list[int] = []
        inputs = self.prepare(batch, segments, sample_rows)
        if self.adapters is not None and any(r.lora_slot >= 0 for r, _ in batch.entries):
            # Rows in flat order: one per decode, then each prefill chunk's tokens.
            nd = batch.num_decodes
            runs = [(r.lora_slot, 1) for r, _ in batch.entries[:nd]] + [(r.lora_slot, n) for r, n in batch.entries[nd:]]
            inputs.lora = self.adapters.plan(row_slots(runs))
        logits = model.forward(inputs)
        if logits.device.type != "cpu":  # the sampler and its per-request generators live on the CPU
            logits = logits.cpu()
        if segments:
            self._gather_prompt_logprobs(logits, segments)
            logits = logits[sample_rows]
        sampled = sampler.step(logits, batch.samplers)
        return StepResult(sampled.tokens, sampled.logprobs)

    @staticmethod
    def _gather_prompt_logprobs(logits: torch.Tensor, segments: list[Segment]) -> None:
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

    def prepare(
        self, batch: ScheduledBatch, segments: list[Segment] | None = None, sample_rows: list[int] | None = None,
    ) -> StepInputs:
        """Flatten a scheduled batch into the model's step tensors.

        Requests that asked for prompt logprobs get a logits row for every prompt token of their
        chunk: ``segments`` gets (request, chunk start, tokens, first logits row) and
        ``sample_rows`` the logits row each sampling request draws from.
        """
        bs = self.config.block_size
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
            window = self.sliding_window
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

