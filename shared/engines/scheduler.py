"""Continuous batching, engine-agnostic: which tokens of which requests to compute each step.

Each step the running batch goes first (decodes, then unfinished prefill chunks), then waiting
requests are admitted while the token budget (``max_batched_tokens``) and ``max_num_seqs``
allow. The waiting queue is ordered by request priority (vLLM's: lower first), then arrival. A
long prompt is prefilled in chunks across steps, so it never stalls running decodes. When the KV
pool runs dry the lowest-priority running request is preempted (of equals, the most recently
admitted): its blocks are freed, it returns to the waiting queue in its place (ahead of every
later arrival of its priority) with the tokens it has generated so far, and is recomputed later
(mostly from the prefix cache). Nothing here computes anything; the
engine turns a :class:`ScheduledBatch` into sampled tokens and hands them to :meth:`Scheduler.update`.

Disaggregation adds two side doors. A decode worker *reserves* blocks for a prompt another worker
prefills (:meth:`Scheduler.reserve`), then *adopts* it into the running batch with its KV already
in place and the first token sampled elsewhere (:meth:`Scheduler.adopt`). A prefill worker adds a
request with ``hold=True``: it is prefilled as usual, and once its first token is sampled it leaves
the batch with its blocks *held* (:attr:`Scheduler.held`) until they have been sent. Reserved and
held requests are never scheduled, so nothing computes into their blocks meanwhile.

Not thread-safe: the engine core drives it from its step loop, and takes reservations and held
blocks from the event loop only under the lock that loop schedules under.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from shared.engines.adapters import AdapterBusyError, AdapterSlots, UnknownAdapterError
from shared.engines.base import EngineOutput, EngineStats, KvEventBuffer
from shared.engines.kv_cache import KvCacheManager
from shared.engines.request import Request, RequestStatus
from shared.kv_hash import ROOT_HASH
from shared.messages import SamplingParams

WAITING, RUNNING, FINISHED = RequestStatus.WAITING, RequestStatus.RUNNING, RequestStatus.FINISHED
MAX_MULTI_STEPS = 16  # decode steps one multi-step batch may ask for


def _queue_order(req: Request) -> tuple[int, int]:
    return req.queue_order


def preemption_victim(running: list[Request]) -> Request:
    """The lowest-priority request of ``running`` (in admission order); of equals, the last admitted."""
    victim = running[-1]
    for req in reversed(running):
        if req.priority > victim.priority:
            victim = req
    return victim


class ScheduledBatch:
    """What to compute this step: ``entries`` is (request, new tokens), decodes first.

    Requests in ``samplers`` reach the end of their tokens this step, so the engine samples one
    new token for each (in that order) and passes them to :meth:`Scheduler.update`.

    A multi-step batch (``steps`` > 1, decodes only) asks for up to ``steps`` decode steps back to
    back: each entry's count is the tokens to sample for that request, one per step, each fed to
    the next; the engine passes them to :meth:`Scheduler.update_runs`.
    """

    __slots__ = ("entries", "num_decodes", "num_prefill_tokens", "samplers", "steps")

    def __init__(self, entries: list[tuple[Request, int]], num_decodes: int, steps: int = 1) -> None:
        self.entries = entries
        self.num_decodes = num_decodes
        self.steps = steps
        if num_decodes == len(entries):  # decodes only (the usual step): each one samples
            self.num_prefill_tokens = 0
            self.samplers = [r for r, _ in entries]
        else:
            self.num_prefill_tokens = sum(n for _, n in entries[num_decodes:])
            self.samplers = [r for r, n in entries if r.num_computed_tokens + n == len(r.token_ids)]

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def num_tokens(self) -> int:
        if self.steps > 1:
            return sum(n for _, n in self.entries)
        return self.num_decodes + self.num_prefill_tokens


class Scheduler:
    def __init__(
        self,
        *,
        num_blocks: int,
        block_size: int,
        max_num_seqs: int,
        max_batched_tokens: int,
        enable_prefix_caching: bool = True,
        eos_token_ids: Iterable[int] = (),
        max_model_len: int | None = None,
        vocab_size: int | None = None,
        kv_events: KvEventBuffer | None = None,
        make_state: Callable[[Request], Any] | None = None,
        adapters: AdapterSlots | None = None,
    ) -> None:
        if max_num_seqs <= 0 or max_batched_tokens <= 0:
            raise ValueError("max_num_seqs and max_batched_tokens must be positive")
        self.kv = KvCacheManager(num_blocks, block_size, enable_prefix_caching, kv_events)
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.eos_token_ids = frozenset(eos_token_ids)
        self.pool_tokens = num_blocks * block_size
        self.max_model_len = max_model_len or (1 << 62)
        self.vocab_size = vocab_size
        self.waiting: deque[Request] = deque()  # by Request.queue_order (priority, then arrival)
        self.running: list[Request] = []  # admission order: the last is preempted first
        self.requests: dict[str, Request] = {}  # waiting or running
        self.reserved: dict[str, Request] = {}  # decode side: blocks awaiting a remote prefill's KV
        self.held: dict[str, Request] = {}  # prefill side: prefilled, blocks kept until sent
        self.groups: dict[str, list[Request]] = {}  # n > 1: caller's id -> its forked choices
        self.make_state = make_state  # the engine's per-request state for a forked choice
        self.forked_blocks = 0  # prompt blocks shared by forks instead of computed again
        self.num_preemptions = 0
        self.prompt_tokens = 0  # cumulative, over admitted requests
        # LoRA: a request pins its adapter from admission to its end (kept across preemption).
        self.adapters = adapters
        self.rejected: list[EngineOutput] = []  # ended at admission (adapter unloaded meanwhile); the engine drains it

    # --- requests in and out -----------------------------------------------------------------

    def add(
        self, request_id: str, token_ids: list[int], sampling: SamplingParams, hold: bool = False,
        lora: str = "", hash_root: int = ROOT_HASH,
    ) -> Request | EngineOutput:
        """Queue a request; an :class:`EngineOutput` instead means it finished at once (error, or nothing to do).

        ``hold``: finish after the first token but keep the blocks in :attr:`held` (prefill worker).
        ``lora``: the adapter it runs under, acquired at admission; ``hash_root`` its KV hash root.
        """
        if lora and self.adapters is None:
            return EngineOutput(request_id, [], "error", len(token_ids), error="this engine serves no LoRA adapters")
        if self._known(request_id):
            return EngineOutput(
                request_id, [], "error", len(token_ids), error=f"duplicate request id {request_id!r}"
            )
        problem = self._check(token_ids, sampling)
        if problem is not None:
            return EngineOutput(request_id, [], "error", len(token_ids), error=problem)
        if sampling.max_tokens <= 0:
            return EngineOutput(request_id, [], "length", len(token_ids))
        stop_ids = self._stop_ids(sampling)
        req = Request(request_id, token_ids, sampling, stop_ids)
        req.hold = hold
        req.lora, req.hash_root = lora, hash_root
        self.requests[request_id] = req
        self._enqueue(req)
        return req

    def _enqueue(self, req: Request) -> None:
        """Into the waiting queue at its place by priority, then arrival."""
        waiting = self.waiting
        if not waiting or waiting[-1].queue_order <= req.queue_order:
            waiting.append(req)  # the usual case: one priority, arrivals in order
        else:
            waiting.insert(bisect.bisect_right(waiting, req.queue_order, key=_queue_order), req)

    def _known(self, request_id: str) -> bool:
        return (request_id in self.requests or request_id in self.reserved or request_id in self.held
                or request_id in self.groups)

    def _stop_ids(self, sampling: SamplingParams) -> frozenset[int]:
        stop_ids = frozenset(sampling.stop_token_ids)
        return stop_ids if sampling.ignore_eos else stop_ids | self.eos_token_ids

    def _check(self, token_ids: list[int], sampling: SamplingParams) -> str | None:
        """What this engine cannot take (its context length, KV pool, vocabulary), or None.

        Sampling fields themselves were validated once, by the frontend; only limits that depend
        on this engine are checked here.
        """
        n = len(token_ids)
        if n == 0:
            return "empty prompt"
        if n >= self.max_model_len:
            return (
                f"prompt has {n} tokens; the model takes at most {self.max_model_len - 1} before generating"
            )
        if n > self.pool_tokens:
            return f"prompt has {n} tokens; the KV cache holds at most {self.pool_tokens}"
        if self.vocab_size is not None and (min(token_ids) < 0 or max(token_ids) >= self.vocab_size):
            return f"token ids must be in [0, {self.vocab_size})"
        if self.vocab_size is not None and any(not 0 <= t < self.vocab_size for t in sampling.logit_bias):
            return f"logit_bias token ids must be in [0, {self.vocab_size})"
        return None

    def abort(self, request_id: str) -> EngineOutput | None:
        """Drop a request wherever it is (held included, reserved not) and free its blocks; None if it is not here.

        A reservation is left alone: a KV transfer may be writing into it, and only its owner
        knows when that has stopped (:meth:`release_reserved`).
        """
        group = self.groups.pop(request_id, None)
        if group is not None:  # n > 1: every choice still running goes, one output for them all
            out = None
            for member in group:
                if member.request_id in self.requests:
                    out = self.abort(member.request_id) or out
            first = self.abort(request_id) if request_id in self.requests else None
            out = first or out
            if out is not None:
                out.choice = 0
            return out
        req = self.requests.pop(request_id, None)
        if req is None:
            held = self.release_held(request_id)
            return self._output(held, [], "abort") if held is not None else None
        if req.status == RUNNING:
            self.running.remove(req)
        elif req.status == WAITING:
            self.waiting.remove(req)
        self.kv.free(req)
        self._release_adapter(req)
        req.status = FINISHED
        return self._output(req, [], "abort")

    def abort_all(self, reason: str = "abort", error: str | None = None) -> list[EngineOutput]:
        outs = []
        for request_id in list(self.requests):
            out = self.abort(request_id)
            if out is not None:
                out.finish_reason, out.error = reason, error
                outs.append(out)
        return outs

    # --- disaggregation --------------------------------------------------------------------

    def reserve(self, request_id: str, token_ids: list[int]) -> Request:
        """Decode side: take blocks for a prompt another worker prefills; raises RuntimeError if it cannot.

        The longest cached prefix is reused (those blocks are not sent); the rest, the last
        partial block included, is freshly allocated. ``req.blocks[req.num_cached_blocks:]`` are
        the blocks to be written.
        """
        if self._known(request_id):
            raise RuntimeError(f"duplicate request id {request_id!r}")
        problem = self._check(token_ids, SamplingParams())
        if problem is not None:
            raise RuntimeError(problem)
        req = Request(request_id, token_ids, SamplingParams(), frozenset())
        hit = self.kv.lookup_prefix(req)
        computed = len(hit) * self.block_size
        need = self.kv.blocks_needed(len(token_ids)) - len(hit)
        # Leave each running sequence room to grow by a block, so a reservation does not
        # immediately force preemptions of work already under way.
        if need + len(self.running) > self.kv.num_free_blocks - sum(
            1 for b in hit if self.kv.pool.ref_counts[b] == 0
        ) or not self.kv.allocate_slots(req, len(token_ids) - computed, hit):
            raise RuntimeError(f"no room for {need} KV blocks ({self.kv.num_free_blocks} free)")
        req.num_cached_tokens = computed
        self.reserved[request_id] = req
        return req

    def release_reserved(self, request_id: str) -> bool:
        """Decode side: give a reservation's blocks back (its remote prefill failed or was abandoned)."""
        req = self.reserved.pop(request_id, None)
        if req is None:
            return False
        self.kv.free(req)
        return True

    def adopt(self, request_id: str, sampling: SamplingParams, first_token: int) -> EngineOutput:
        """Decode side: the reservation now holds the prompt's KV; run it from ``first_token`` on.

        Returns the request's first output (the first token, finished if that already ends it).
        The full prompt blocks enter the prefix cache here, so KV events flow as for a local prefill.
        """
        req = self.reserved.pop(request_id, None)
        if req is None:
            return EngineOutput(request_id, [], "error", error=f"no reservation for {request_id!r}")
        problem = self._check(req.token_ids, sampling)
        if problem is None and self.vocab_size is not None and not 0 <= first_token < self.vocab_size:
            problem = f"first token {first_token} outside the vocabulary"
        if problem is None and sampling.max_tokens <= 0:
            problem = "max_tokens must be at least 1"
        if problem is not None:
            self.kv.free(req)
            return EngineOutput(request_id, [], "error", req.num_prompt_tokens, error=problem)
        req.sampling = sampling
        req.priority = sampling.priority
        req.max_tokens, req.min_tokens = sampling.max_tokens, sampling.min_tokens
        req.stop_ids = self._stop_ids(sampling)
        req.num_computed_tokens = req.num_prompt_tokens
        self.kv.prefix_hit_tokens += req.num_cached_tokens
        self.prompt_tokens += req.num_prompt_tokens
        self.kv.cache_computed(req)
        req.token_ids.append(first_token)
        reason = self._finish_reason(req, first_token)
        if reason is None:
            req.status = RUNNING
            self.requests[request_id] = req
            self.running.append(req)  # past max_num_seqs if need be: its KV is here already
        else:
            req.status = FINISHED
            self.kv.free(req)
        return EngineOutput(request_id, [first_token], reason, req.num_prompt_tokens, req.num_cached_tokens)

    def release_held(self, request_id: str) -> Request | None:
        """Prefill side: free a held request's blocks (sent, or no longer wanted)."""
        req = self.held.pop(request_id, None)
        if req is not None:
            self.kv.free(req)
        return req

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # --- one step ----------------------------------------------------------------------------

    def schedule(self, multi_step_tokens: int = 0) -> ScheduledBatch:
        """The next step's batch. With ``multi_step_tokens`` (a runner whose steps are near free),
        a batch of decodes alone, nothing waiting, may be a multi-step batch of about that many
        tokens (:meth:`_multi_step`)."""
        if multi_step_tokens and not self.waiting and self.running:
            multi = self._multi_step(multi_step_tokens)
            if multi is not None:
                return multi
        budget = self.max_batched_tokens
        kv = self.kv
        entries: list[tuple[Request, int]] = []
        num_decodes = 0
        preempted = False
        if self.running:
            # Decodes first, then chunks of prompts already under way.
            running = self.running
            decodes = [r for r in running if r.num_computed_tokens + 1 == len(r.token_ids)]
            order = (
                decodes
                if len(decodes) == len(running)
                else decodes + [r for r in running if r.num_computed_tokens + 1 != len(r.token_ids)]
            )
            block_size = self.block_size
            for req in order:
                if budget == 0:
                    break
                if req.status != RUNNING:  # preempted earlier in this loop
                    continue
                left = len(req.token_ids) - req.num_computed_tokens
                if left == 1 and req.num_computed_tokens < len(req.blocks) * block_size:
                    # A decode whose token has its slot already: no allocation to try.
                    entries.append((req, 1))
                    budget -= 1
                    num_decodes += 1
                    continue
                n = min(left, budget)
                while not kv.allocate_slots(req, n):
                    victim = self._preemption_victim()
                    self._preempt(victim)
                    preempted = True
                    for i, (r, k) in enumerate(entries):
                        if r is victim:  # scheduled earlier this step: give its tokens back
                            del entries[i]
                            budget += k
                            if i < num_decodes:
                                num_decodes -= 1
                            break
                    if victim is req:
                        break
                else:
                    entries.append((req, n))
                    budget -= n
                    if n == 1 and req.num_computed_tokens + 1 == len(req.token_ids):
                        num_decodes += 1
        # Admit only when nothing had to be preempted: the pool is tight.
        if not preempted:
            waiting = self.waiting
            skipped: list[Request] = []  # their adapter cannot be made resident this step
            while waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                req = waiting[0]
                if req.lora and req.lora_slot < 0:
                    problem = self._acquire_adapter(req)
                    if problem == "busy":
                        skipped.append(waiting.popleft())
                        continue
                    if problem is not None:
                        continue  # rejected: left the queue
                # Prompt logprobs need every prompt position computed: no prefix-cache hit.
                hit = kv.lookup_prefix(req) if req.sampling.prompt_logprobs < 0 else []
                computed = len(hit) * self.block_size
                n = min(len(req.token_ids) - computed, budget)
                if not kv.allocate_slots(req, n, hit):
                    break
                waiting.popleft()
                if req.num_cached_tokens < 0:  # first admission (not a preempted one coming back)
                    req.num_cached_tokens = min(computed, req.num_prompt_tokens)
                    kv.prefix_hit_tokens += req.num_cached_tokens
                    self.prompt_tokens += req.num_prompt_tokens
                req.status = RUNNING
                self.running.append(req)
                entries.append((req, n))
                budget -= n
            waiting.extendleft(reversed(skipped))  # back in their places, first in line
        return ScheduledBatch(entries, num_decodes)

    def _multi_step(self, tokens: int) -> ScheduledBatch | None:
        """Decode steps back to back in one batch, when every running request is a plain decode:
        ``tokens // len(running)`` steps (at most :data:`MAX_MULTI_STEPS`), no request given more
        than it may still produce, the slots for all of them allocated now. None (schedule one
        step as usual) when fewer than two steps fit, a request is not a plain decode, or the pool
        cannot hold them all without preempting."""
        running = self.running
        steps = min(MAX_MULTI_STEPS, tokens // len(running), self.max_batched_tokens // len(running))
        if steps < 2:
            return None
        entries: list[tuple[Request, int]] = []
        for req in running:
            length = len(req.token_ids)
            if (req.num_computed_tokens + 1 != length or req.status is not RUNNING or req.hold or req.pending_forks
                    or getattr(req.state, "grammar", None) is not None):
                return None
            # no slots for tokens past its own end (max_tokens, the model's length, the pool)
            n = min(steps, req.max_tokens - (length - req.num_prompt_tokens), self.max_model_len - length,
                    self.pool_tokens + 1 - length)
            if n < 1:
                return None
            entries.append((req, n))
        kv = self.kv
        bs = self.block_size
        # All or none: blocks taken for some runs and then missing for others could make a single
        # step preempt where it would not have had to.
        need = sum(max(0, -(-(req.num_computed_tokens + n) // bs) - len(req.blocks)) for req, n in entries)
        if need > kv.pool.num_free:
            return None
        for req, n in entries:
            if not kv.allocate_slots(req, n):  # (cannot fail: counted above)
                return None
        return ScheduledBatch(entries, len(entries), steps)

    def _acquire_adapter(self, req: Request) -> str | None:
        """Pin the adapter of the request at the head of the queue: None (got it), "busy" (every
        slot pinned: it waits, others go first), or "unknown" (unloaded since it was queued: it
        ends with an error, in :attr:`rejected`)."""
        assert self.adapters is not None
        try:
            req.lora_slot = self.adapters.acquire(req.lora)
            return None
        except AdapterBusyError:
            return "busy"
        except UnknownAdapterError as e:
            self.waiting.popleft()
            del self.requests[req.request_id]
            req.status = FINISHED
            out = self._output(req, [], "error")
            out.error, out.error_code = str(e), 404
            self.rejected.append(out)
            return "unknown"

    def _release_adapter(self, req: Request) -> None:
        if req.lora_slot >= 0 and self.adapters is not None:
            self.adapters.release(req.lora)
            req.lora_slot = -1

    def _preemption_victim(self) -> Request:
        """Who gives its blocks back when the pool runs dry: the lowest-priority running request
        (the highest ``priority`` value); of equals, the most recently admitted.

        The one place the preemption policy decides.
        """
        return preemption_victim(self.running)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = WAITING
        self._enqueue(req)
        self.num_preemptions += 1

    def update(
        self, batch: ScheduledBatch, sampled: list[int], logprobs: list[Any] | None = None
    ) -> list[EngineOutput]:
        """Record a computed step: ``sampled[i]`` is the new token of ``batch.samplers[i]``
        (``logprobs[i]`` its PositionLogprobs, or None)."""
        kv = self.kv
        block_size = self.block_size
        for req, n in batch.entries:
            if req.status is not RUNNING:  # aborted while the step ran
                continue
            computed = req.num_computed_tokens = req.num_computed_tokens + n
            if computed // block_size > req.num_cached_blocks:  # a block filled: cache (and hash) it
                kv.cache_computed(req)
        samplers = batch.samplers
        if len(sampled) != len(samplers):
            raise ValueError(f"{len(sampled)} tokens sampled for {len(samplers)} sequences")
        outputs: list[EngineOutput] = []
        finished = False
        finish_reason = self._finish_reason
        for i, req in enumerate(samplers):
            if req.status is not RUNNING:  # aborted while the step ran
                continue
            token = sampled[i]
            if req.pending_forks and not req.hold:
                self._fork(req)  # the prompt is computed: its choices share its blocks from here
            req.token_ids.append(token)
            reason = finish_reason(req, token)
            if req.hold and reason is None:
                reason = "length"  # a prefill worker wants the first token only
            if reason is not None:
                finished = True
                req.status = FINISHED
                del self.requests[req.request_id]
                self._release_adapter(req)
                if req.hold:
                    self.held[req.request_id] = req  # blocks kept until they have been sent
                else:
                    kv.free(req)
                    self._leave_group(req)
            out = EngineOutput(req.output_id, [token], reason, req.num_prompt_tokens, req.num_cached_tokens, None,
                               req.choice)
            if logprobs is not None and (lp := logprobs[i]) is not None:
                out.logprobs = [lp]
            if req.prompt_logprobs is not None:
                out.prompt_logprobs, req.prompt_logprobs = req.prompt_logprobs, None
            outputs.append(out)
        if finished:
            self.running = [r for r in self.running if r.status == RUNNING]
        return outputs

    def update_runs(
        self, batch: ScheduledBatch, runs: list[list[int]], run_logprobs: list[list[Any] | None] | None = None
    ) -> list[EngineOutput]:
        """Record a computed multi-step batch: ``runs[i]`` are the tokens sampled for
        ``batch.samplers[i]``, one per step (``run_logprobs[i]`` their PositionLogprobs, or None).
        A request takes them in order up to the one that ends it, as one step at a time would."""
        if len(runs) != len(batch.samplers):
            raise ValueError(f"{len(runs)} runs sampled for {len(batch.samplers)} sequences")
        kv = self.kv
        block_size = self.block_size
        outputs: list[EngineOutput] = []
        finished = False
        finish_reason = self._finish_reason
        for i, req in enumerate(batch.samplers):
            if req.status is not RUNNING:  # aborted while the step ran
                continue
            run = runs[i]
            taken = 0
            reason = None
            for token in run:
                req.token_ids.append(token)
                taken += 1
                reason = finish_reason(req, token)
                if reason is not None:
                    break
            if taken < len(run):
                run = run[:taken]
            # each token taken but the last was fed to the next step: their KV is computed
            req.num_computed_tokens += taken
            if req.num_computed_tokens // block_size > req.num_cached_blocks:
                kv.cache_computed(req)
            if reason is not None:
                finished = True
                req.status = FINISHED
                del self.requests[req.request_id]
                self._release_adapter(req)
                kv.free(req)
                self._leave_group(req)
            out = EngineOutput(req.output_id, run, reason, req.num_prompt_tokens, req.num_cached_tokens, None,
                               req.choice)
            if run_logprobs is not None and (lps := run_logprobs[i]) is not None:
                out.logprobs = lps[:taken]
            outputs.append(out)
        if finished:
            self.running = [r for r in self.running if r.status == RUNNING]
        return outputs

    def _fork(self, parent: Request) -> None:
        """Start choices 1..n-1 of ``parent``: each takes a reference to its full prompt blocks and
        recomputes only the prompt's last, partly filled block (at most ``block_size`` tokens), so
        it gets its own logits row and its own first draw. They join the running batch at once."""
        n_forks, parent.pending_forks = parent.pending_forks, 0
        bs = self.block_size
        full = (parent.num_prompt_tokens - 1) // bs
        shared = parent.blocks[:full]
        group = self.groups.setdefault(parent.output_id, [parent])
        for c in range(1, n_forks + 1):
            child = Request(f"{parent.output_id}\x1f{c}", parent.token_ids[: parent.num_prompt_tokens],
                            parent.sampling, parent.stop_ids)
            child.output_id, child.choice, child.pending_forks = parent.output_id, c, 0
            child.lora, child.hash_root = parent.lora, parent.hash_root
            if parent.lora_slot >= 0 and self.adapters is not None:
                child.lora_slot = self.adapters.acquire(parent.lora)  # resident and pinned: cannot fail
            self.kv.pool.take(shared)
            child.blocks = list(shared)
            child.block_hashes = parent.block_hashes[:full]
            child.num_cached_blocks = min(parent.num_cached_blocks, full)
            child.num_computed_tokens = full * bs
            child.num_cached_tokens = parent.num_cached_tokens
            child.status = RUNNING
            if self.make_state is not None:
                child.state = self.make_state(child)
            self.requests[child.request_id] = child
            self.running.append(child)  # past max_num_seqs if need be: choices run together
            group.append(child)
            self.forked_blocks += full

    def _leave_group(self, req: Request) -> None:
        group = self.groups.get(req.output_id)
        if group is not None and all(m.status == FINISHED for m in group):
            del self.groups[req.output_id]

    def _finish_reason(self, req: Request, token: int) -> str | None:
        """Why a request ends now that ``token`` is its last token, or None."""
        length = len(req.token_ids)
        num_out = length - req.num_prompt_tokens
        if token in req.stop_ids and num_out >= req.min_tokens:
            return "stop"
        grammar = getattr(req.state, "grammar", None)
        if grammar is not None and grammar.is_terminated():
            return "stop"  # structured output complete, or it can no longer be satisfied
        if num_out >= req.max_tokens or length >= self.max_model_len or length > self.pool_tokens:
            return "length"  # out of budget, positions or KV room
        return None

    def _output(self, req: Request, token_ids: list[int], reason: str | None) -> EngineOutput:
        return EngineOutput(
            req.output_id, token_ids, reason, req.num_prompt_tokens, max(req.num_cached_tokens, 0), choice=req.choice
        )

    # --- accounting --------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        queued = sum(r.num_tokens for r in self.waiting)
        queued += sum(
            r.num_tokens - r.num_computed_tokens
            for r in self.running
            if r.num_computed_tokens + 1 < r.num_tokens
        )
        return EngineStats(
            kv_blocks_used=self.kv.num_used_blocks,
            kv_blocks_total=self.kv.num_blocks,
            running=len(self.running),
            waiting=len(self.waiting),
            prefill_tokens_queued=queued,
            preemptions=self.num_preemptions,
            prefix_hit_tokens=self.kv.prefix_hit_tokens,
            prompt_tokens=self.prompt_tokens,
        )
