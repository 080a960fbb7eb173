"""One sequence inside an engine: its tokens, its status, its KV blocks, its sampling state.

A :class:`Request` carries everything that is its own (sampling parameters, stop ids, the
engine's per-request state), so the scheduler and the model runner take their decisions from the
request alone. Per-request features (a LoRA adapter, the priority) belong here as fields.
"""

from __future__ import annotations

import enum
import itertools
from typing import Any

from shared.kv_hash import ROOT_HASH
from shared.messages import SamplingParams

_ARRIVALS = itertools.count()  # engine-wide arrival order: ties between equal priorities go to the earlier


class RequestStatus(enum.IntEnum):
    WAITING = 0  # queued, or preempted and waiting to be recomputed
    RUNNING = 1  # in the running batch, with blocks in the pool
    FINISHED = 2  # done, aborted, or (prefill side) held until its blocks are sent


class Request:
    """One sequence: prompt plus generated tokens, and its place in the KV pool."""

    __slots__ = (
        "arrival",
        "block_hashes",
        "blocks",
        "choice",
        "hash_root",
        "hold",
        "lora",
        "lora_slot",
        "max_tokens",
        "min_tokens",
        "num_cached_blocks",
        "num_cached_tokens",
        "num_computed_tokens",
        "num_prompt_tokens",
        "output_id",
        "pending_forks",
        "priority",
        "prompt_logprobs",
        "request_id",
        "sampling",
        "state",
        "status",
        "stop_ids",
        "token_ids",
    )

    def __init__(
        self, request_id: str, token_ids: list[int], sampling: SamplingParams, stop_ids: frozenset[int]
    ) -> None:
        self.request_id = request_id
        self.token_ids = list(token_ids)  # prompt, then every generated token
        self.num_prompt_tokens = len(token_ids)
        self.sampling = sampling
        self.priority = sampling.priority  # lower is served first, and preempted last
        self.arrival = next(_ARRIVALS)
        self.max_tokens = sampling.max_tokens
        self.min_tokens = sampling.min_tokens
        self.stop_ids = stop_ids  # EOS (unless ignore_eos) and stop_token_ids
        self.num_computed_tokens = 0  # tokens whose KV is in the pool
        self.blocks: list[int] = []
        self.block_hashes: list[int] = []  # chained hashes of every full block of token_ids
        self.num_cached_blocks = 0  # leading blocks already in the prefix cache
        self.num_cached_tokens = -1  # prompt tokens served from the cache on first admission
        self.status = RequestStatus.WAITING
        self.hold = False  # prefill worker: keep the blocks once the first token is sampled
        # The runner's per-request sampling state: a SamplerState (torch: generator, grammar
        # matcher, prompt logprobs under way) or the mocker's token seed.
        self.state: Any = None
        # n > 1: choice 0 is this request; once its prompt is computed, n - 1 forks share its
        # full prompt blocks. Outputs carry ``output_id`` (the caller's id) and ``choice``.
        self.output_id = request_id
        self.choice = 0
        self.pending_forks = max(0, sampling.n - 1)
        self.prompt_logprobs: list[Any] | None = None  # set by the runner; sent with the first output
        # LoRA: the adapter's name ("" : the base model), its resident slot once acquired at
        # admission (-1: not holding one; kept across preemption, released when it finishes), and
        # the root of its KV block hashes so blocks computed under different adapters never mix.
        self.lora = ""
        self.lora_slot = -1
        self.hash_root = ROOT_HASH

    @property
    def queue_order(self) -> tuple[int, int]:
        """Place in the waiting queue: by priority, then arrival (a preempted request keeps its
        arrival, so it goes back ahead of those that came after it)."""
        return self.priority, self.arrival

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)
