"""A request's token chunks as the caller's text: detokenizing, stop strings, per-choice deltas.

:class:`Generation` (generation.py) decides where a request runs and moves it when a worker
fails; this module only turns what workers send into what callers read, so it knows no bus and
no worker. One :class:`ReplyText` per request, one :class:`TextStream` per choice; both carry
over a migration unchanged, so the caller's text continues where it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.frontend.request import TextOptions
from shared.messages import GenerateError, PositionLogprobs, TokenChunk, Usage
from shared.tokenizer import StopStringMatcher, Tokenizer


@dataclass(slots=True)
class Delta:
    """New text of one choice for the caller. Each choice's last delta carries its finish_reason;
    the request's very last one also the usage (prompt counted once, completions summed)."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    usage: Usage | None = None
    worker_id: str = ""
    choice: int = 0
    logprobs: list[PositionLogprobs] = field(default_factory=list)  # one per token_ids entry, when asked
    prompt_logprobs: list[PositionLogprobs] = field(default_factory=list)  # prompt positions 1.., once


class TextStream:
    """One choice's tokens to text: incremental detokenizing (a character split over tokens comes
    out whole), then stop strings (text that may start one is held back until it cannot)."""

    __slots__ = ("_detok", "_stops")

    def __init__(self, tokenizer: Tokenizer, options: TextOptions) -> None:
        self._detok = tokenizer.detokenizer(options.skip_special_tokens)
        # No stop strings (the common case): nothing to hold back, so no matcher per request.
        self._stops = StopStringMatcher(options.stops, options.include_stop_str) if options.stops else None

    def push(self, token_ids: list[int], last: bool) -> tuple[str, bool]:
        """Text now safe to show for these new tokens, and whether a stop string ended the choice.

        ``last``: the worker finished the choice, so whatever is held back goes out."""
        text = self._detok.add(token_ids) if token_ids else ""
        if last:
            text += self._detok.flush()
        if self._stops is None:
            return text, False
        text, stopped = self._stops.push(text)
        if last and not stopped:
            text += self._stops.flush()
        return text, stopped


class ReplyText:
    """The choices of one request: their text streams, the tokens each has given the caller, and
    which are done (finished by the worker, or cut by a stop string)."""

    def __init__(self, tokenizer: Tokenizer, options: TextOptions, n: int) -> None:
        self.n = n
        self.streams = [TextStream(tokenizer, options) for _ in range(n)]
        self.generated: list[list[int]] = [[] for _ in range(n)]  # tokens the caller has been given
        self.completion_tokens = 0  # all choices' generated tokens, counted as they come (per chunk, cheap)
        self.done = [False] * n
        self.prompt_logprobs_sent = False  # a resumed request does not ask for them again

    @property
    def any_tokens(self) -> bool:
        return self.completion_tokens > 0

    @property
    def all_done(self) -> bool:
        return all(self.done)

    def feed(self, chunk: TokenChunk, worker_id: str) -> Delta | None:
        """The caller's delta for one chunk, or None when there is nothing to say (an empty chunk,
        or the tail of a choice a stop string already cut)."""
        c = chunk.choice
        if not 0 <= c < self.n or self.done[c]:
            return None
        self.generated[c].extend(chunk.token_ids)
        self.completion_tokens += len(chunk.token_ids)
        self.prompt_logprobs_sent = self.prompt_logprobs_sent or bool(chunk.prompt_logprobs)
        finished = chunk.finish_reason is not None
        text, stopped = self.streams[c].push(chunk.token_ids, finished)
        if stopped or finished:
            self.done[c] = True
            return Delta(text, chunk.token_ids, "stop" if stopped else chunk.finish_reason, None, worker_id, c,
                         chunk.logprobs, chunk.prompt_logprobs)
        if text or chunk.token_ids:
            return Delta(text, chunk.token_ids, worker_id=worker_id, choice=c, logprobs=chunk.logprobs,
                         prompt_logprobs=chunk.prompt_logprobs)
        return None


def coalesce(replies: list[TokenChunk | GenerateError]) -> list[TokenChunk | GenerateError]:
    """Join runs of consecutive chunks of the same choice (an error ends the list): chunks that
    piled up while the frontend was busy go out as one delta per choice."""
    out: list[TokenChunk | GenerateError] = []
    for r in replies:
        if isinstance(r, GenerateError):
            out.append(r)
            return out
        prev = out[-1] if out else None
        if (isinstance(prev, TokenChunk) and prev.choice == r.choice and prev.finish_reason is None
                and not r.prompt_logprobs):
            out[-1] = TokenChunk(request_id=prev.request_id, index=prev.index, token_ids=prev.token_ids + r.token_ids,
                                 finish_reason=r.finish_reason, usage=r.usage, choice=r.choice,
                                 logprobs=prev.logprobs + r.logprobs, prompt_logprobs=prev.prompt_logprobs)
        else:
            out.append(r)
    return out
