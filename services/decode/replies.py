"""One request's replies: engine outputs in, TokenChunks out.

The worker's request task owns one :class:`RequestReplies`. Where it can (one choice, and either
a batching frontend or a non-streamed request), it also listens to the engine's step directly
(:meth:`RequestReplies.on_output`): streamed tokens go to the reply batcher as the step delivers
them, non-streamed ones are held for the last chunk, and the last chunk goes to the batcher too,
so the request's task is not woken per step. Everything else (n > 1, errors, a frontend that
takes single replies) goes through the task's loop, with the same chunk shapes.

A request the worker serves without a task (:attr:`RequestReplies.on_done` set: a plain request
to a batching frontend, see ``DecodeWorker._submit_early``) has its listener take every output,
its last and an engine error too, and report the outcome through ``on_done``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from shared import probe, tracing
from shared.bus import ReplyBatcher
from shared.engines.base import EngineOutput
from shared.messages import GenerateError, GenerateRequest, PositionLogprobs, TokenChunk, Usage

log = logging.getLogger("baton.decode")


class RequestReplies:
    """Per-choice positions, held tokens and logprobs of one request, and its listener."""

    __slots__ = ("batcher", "held", "held_logprobs", "index", "listens", "on_done", "prompt_logprobs", "req",
                 "sent_last", "span", "subject")

    def __init__(self, req: GenerateRequest, batcher: ReplyBatcher | None, span: Any = None) -> None:
        n = max(1, req.sampling.n)
        self.req = req
        self.span = span
        self.subject = req.batch_reply
        self.batcher = batcher if req.batch_reply else None
        self.index = [0] * n  # tokens sent (or held) so far, per choice
        self.held: list[list[int]] = [[] for _ in range(n)]  # not streamed: coalesced per choice
        self.held_logprobs: list[list[PositionLogprobs]] = [[] for _ in range(n)]
        self.prompt_logprobs: list[PositionLogprobs] = []
        self.sent_last = ""  # the finish reason, once the listener has sent the last chunk
        # The listener applies to one choice, streamed to a batching frontend or not streamed.
        self.listens = n == 1 and (self.batcher is not None or not req.stream)
        # Set when no task serves the request: the listener then takes every output (with a
        # batcher), and calls this once with the outcome ("length", "stop", "abort", "error",
        # "bad_request") when the request has ended.
        self.on_done: Callable[[str], None] | None = None

    def first_token(self, out: EngineOutput) -> None:
        tracing.event(self.span, "first_token", **{"baton.cached_tokens": out.num_cached_tokens})
        if probe.on:
            probe.mark("first_token", self.req.request_id)

    def usage(self, out: EngineOutput) -> Usage:
        """The request's usage, given its last output (the prompt counted once)."""
        usage = Usage(prompt_tokens=out.num_prompt_tokens or len(self.req.token_ids),
                      completion_tokens=sum(self.index) + len(out.token_ids), cached_tokens=out.num_cached_tokens)
        if self.span is not None:
            self.span.set_attributes({"gen_ai.usage.output_tokens": usage.completion_tokens,
                                      "baton.cached_tokens": out.num_cached_tokens})
        return usage

    def last_chunk(self, out: EngineOutput, c: int, usage: Usage | None) -> TokenChunk:
        """Choice ``c``'s last chunk: not streamed, every token held for it."""
        stream = self.req.stream
        lps = out.logprobs or []
        start = self.index[c] if stream else 0
        tokens = out.token_ids if stream else self.held[c] + out.token_ids
        self.index[c] += len(out.token_ids)
        chunk = TokenChunk(request_id=self.req.request_id, index=start, token_ids=tokens,
                           finish_reason=out.finish_reason, usage=usage, choice=c,  # type: ignore[arg-type]
                           logprobs=lps if stream else self.held_logprobs[c] + lps,
                           prompt_logprobs=self.prompt_logprobs)
        self.prompt_logprobs = []
        return chunk

    def middle_chunk(self, out: EngineOutput, c: int) -> TokenChunk:
        """Choice ``c``'s tokens of one step, streamed."""
        chunk = TokenChunk(request_id=self.req.request_id, index=self.index[c], token_ids=out.token_ids, choice=c,
                           logprobs=out.logprobs or [], prompt_logprobs=self.prompt_logprobs)
        self.prompt_logprobs = []
        self.index[c] += len(out.token_ids)
        return chunk

    def hold(self, out: EngineOutput, c: int) -> None:
        """Not streamed: keep choice ``c``'s tokens of one step for its last chunk."""
        self.held[c].extend(out.token_ids)
        if out.logprobs:
            self.held_logprobs[c].extend(out.logprobs)
        self.index[c] += len(out.token_ids)

    def on_output(self, out: EngineOutput) -> bool:
        """The engine's listener (``Engine.listen``), when :attr:`listens`: take this output (True)
        or leave it to the task's loop (False). With a task, errors always go to the loop; the last
        output does too, after its chunk went to the batcher (the loop then only ends the request).
        Without one (:attr:`on_done`), it takes them all."""
        if self.on_done is None:
            return self._take(out)
        try:
            return self._take(out)
        except Exception as e:  # no task will see this request again: end it here, and say why
            if self.on_done is None:  # it had ended already
                raise
            log.exception("request %s: reply failed", self.req.request_id)
            self._end_with_error(500, f"engine error: {e!r}", "error")
            return True

    def _end_with_error(self, code: int, message: str, outcome: str) -> None:
        on_done, self.on_done = self.on_done, None
        assert on_done is not None and self.batcher is not None
        self.batcher.send(self.subject, GenerateError(request_id=self.req.request_id, code=code, message=message),
                          in_step=True)
        on_done(outcome)

    def _take(self, out: EngineOutput) -> bool:
        batcher = self.batcher
        if out.error:
            if self.on_done is None:
                return False
            self._end_with_error(out.error_code, out.error, "bad_request")
            return True
        if out.finish_reason is not None and batcher is None:
            return False
        if out.token_ids and self.index[0] == 0:
            self.first_token(out)
        if out.prompt_logprobs:
            self.prompt_logprobs = out.prompt_logprobs
        if out.finish_reason is not None:
            assert batcher is not None
            # Urgent: it leaves as the step's delivery ends (ReplyBatcher.flush_urgent_now).
            batcher.send(self.subject, self.last_chunk(out, 0, self.usage(out)), in_step=True)
            self.sent_last = out.finish_reason
            on_done, self.on_done = self.on_done, None
            if on_done is not None:
                on_done(out.finish_reason)
                return True
            return False
        if out.token_ids:
            if self.req.stream:
                assert batcher is not None
                batcher.send(self.subject, self.middle_chunk(out, 0), in_step=True)
            else:
                self.hold(out, 0)
        return True
