"""Choices, logprobs and the sampling controls in OpenAI's shapes.

Two halves:

* :func:`advanced_sampling` turns a request's n / best_of / logprobs / echo / penalties /
  logit_bias / min_p fields into SamplingParams fields (called from ``sampling_and_plan``, the one
  place requests become SamplingParams), each bad value a 400 naming its ``param``.
* :class:`ChoiceShaper` turns the per-choice :class:`Delta` stream into response bodies and
  stream chunks: chat ``logprobs.content[]`` (token, logprob, bytes, top_logprobs) and
  completions ``logprobs`` (tokens, token_logprobs, top_logprobs, text_offset), ``echo`` with the
  prompt's logprobs (the first one null), ``index`` per choice, ``best_of`` selection.

Logprobs are the model's raw log-probabilities (before penalties, bias and temperature), as
vLLM's default; the engines compute them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from services.frontend.openai_api import ApiError, usage_dict
from shared.messages import PositionLogprobs, Usage
from shared.tokenizer import Tokenizer

if TYPE_CHECKING:
    from services.frontend.generation import Delta
    from services.frontend.structured import ChatOutput

DEFAULT_MAX_N = 16
MAX_CHAT_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5


# --- request fields -> SamplingParams fields ------------------------------------------------


@dataclass(slots=True)
class ChoicePlan:
    """What the response should look like, beyond the SamplingParams."""

    n: int = 1  # choices returned
    best_of: int = 1  # choices generated (completions' best_of; >= n)
    logprobs: int | None = None  # top alternatives per token in the response; None: no logprobs
    echo: bool = False


def advanced_sampling(req: Any, chat: bool, stream: bool, max_n: int, vocab_size: int) -> tuple[dict[str, Any], ChoicePlan]:
    """SamplingParams keyword arguments for n, logprobs, penalties, bias, min_p (and the plan)."""
    n = 1 if req.n is None else req.n
    if not 1 <= n <= max_n:
        raise ApiError(400, f"n must be between 1 and {max_n}", param="n")
    plan = ChoicePlan(n=n, best_of=n)
    if chat:
        top = getattr(req, "top_logprobs", None)
        if top is not None and not 0 <= top <= MAX_CHAT_TOP_LOGPROBS:
            raise ApiError(400, f"top_logprobs must be between 0 and {MAX_CHAT_TOP_LOGPROBS}", param="top_logprobs")
        if req.logprobs not in (None, True, False):
            raise ApiError(400, "logprobs must be a boolean on chat completions", param="logprobs")
        if top and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
        if req.logprobs:
            plan.logprobs = top or 0
    else:
        lp = req.logprobs
        if lp is not None and (isinstance(lp, bool) or not 0 <= lp <= MAX_COMPLETION_LOGPROBS):
            raise ApiError(400, f"logprobs must be an integer between 0 and {MAX_COMPLETION_LOGPROBS}",
                           param="logprobs")
        plan.logprobs = lp
        plan.echo = bool(getattr(req, "echo", False))
        best_of = getattr(req, "best_of", None)
        if best_of is not None:
            if not n <= best_of <= max_n:
                raise ApiError(400, f"best_of must be between n and {max_n}", param="best_of")
            if stream and best_of > n:
                raise ApiError(400, "best_of greater than n cannot be streamed", param="best_of")
            plan.best_of = best_of
    for name, lo, hi in (("presence_penalty", -2.0, 2.0), ("frequency_penalty", -2.0, 2.0)):
        v = getattr(req, name, None)
        if v is not None and not lo <= v <= hi:
            raise ApiError(400, f"{name} must be between {lo:g} and {hi:g}", param=name)
    rep = getattr(req, "repetition_penalty", None)
    if rep is not None and not 0 < rep <= 2:  # vLLM accepts (0, 2]
        raise ApiError(400, "repetition_penalty must be in (0, 2]", param="repetition_penalty")
    min_p = getattr(req, "min_p", None)
    if min_p is not None and not 0 <= min_p <= 1:
        raise ApiError(400, "min_p must be between 0 and 1", param="min_p")
    bias: dict[int, float] = {}
    for key, value in (req.logit_bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise ApiError(400, f"logit_bias keys must be token ids, got {key!r}", param="logit_bias") from None
        if not 0 <= token < vocab_size:
            raise ApiError(400, f"logit_bias token id {token} is not in the vocabulary [0, {vocab_size})",
                           param="logit_bias")
        if not -100 <= value <= 100:
            raise ApiError(400, f"logit_bias values must be between -100 and 100 (token {token})", param="logit_bias")
        bias[token] = float(value)
    # best_of ranks choices by cumulative logprob: the engine must send them even if not shown.
    engine_logprobs = plan.logprobs if plan.logprobs is not None else (0 if plan.best_of > plan.n else -1)
    kwargs = {
        "n": plan.best_of,
        "logprobs": engine_logprobs,
        "prompt_logprobs": plan.logprobs if plan.echo and plan.logprobs is not None else -1,
        "presence_penalty": float(getattr(req, "presence_penalty", None) or 0.0),
        "frequency_penalty": float(getattr(req, "frequency_penalty", None) or 0.0),
        "repetition_penalty": float(rep) if rep is not None else 1.0,
        "min_p": float(min_p or 0.0),
        "logit_bias": bias,
    }
    return kwargs, plan


# --- deltas -> OpenAI shapes -------------------------------------------------------------------


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    finish: str | None = None
    offset: int = 0  # completions' text_offset of the next token
    started: bool = False


class ChoiceShaper:
    """Per-request: collects or streams the choices of one chat or completions request."""

    def __init__(self, tokenizer: Tokenizer, plan: ChoicePlan, chat: bool, rid: str, model: str,
                 prompt_text: str = "", prompt_ids: list[int] | None = None,
                 chat_output: Callable[[], ChatOutput] | None = None) -> None:
        self.tokenizer = tokenizer
        self.plan = plan
        self.chat = chat
        self.rid = rid
        self.model = model
        self.created = int(time.time())
        self.prompt_text = prompt_text
        self.prompt_ids = prompt_ids or []
        self.prompt_logprobs: list[PositionLogprobs] = []
        self.choices = [_Choice() for _ in range(plan.best_of)]
        # Chat: each choice's text through its own tool-call / reasoning reader (structured.py).
        self.outputs = [chat_output() for _ in self.choices] if chat and chat_output is not None else None
        self._strings: dict[int, str] = {}

    # token text
    def token_str(self, token_id: int) -> str:
        s = self._strings.get(token_id)
        if s is None:
            s = self._strings[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return s

    def _chat_entry(self, p: PositionLogprobs) -> dict[str, Any]:
        tok = self.token_str(p.token.token_id)
        return {"token": tok, "logprob": _finite(p.token.logprob), "bytes": list(tok.encode()),
                "top_logprobs": [{"token": (t := self.token_str(a.token_id)), "logprob": _finite(a.logprob),
                                  "bytes": list(t.encode())} for a in p.top[: self.plan.logprobs or 0]]}

    def _completion_logprobs(self, c: _Choice, lps: list[PositionLogprobs], echo: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        if echo:  # the prompt first: its first token has no logprob
            by_pos = [None, *self.prompt_logprobs]
            for i, tid in enumerate(self.prompt_ids):
                tok = self.token_str(tid)
                p = by_pos[i] if i < len(by_pos) else None
                out["tokens"].append(tok)
                out["token_logprobs"].append(None if p is None else _finite(p.token.logprob))
                out["top_logprobs"].append(None if p is None else self._top_dict(p))
                out["text_offset"].append(c.offset)
                c.offset += len(tok)
        for p in lps:
            tok = self.token_str(p.token.token_id)
            out["tokens"].append(tok)
            out["token_logprobs"].append(_finite(p.token.logprob))
            out["top_logprobs"].append(self._top_dict(p))
            out["text_offset"].append(c.offset)
            c.offset += len(tok)
        return out

    def _top_dict(self, p: PositionLogprobs) -> dict[str, float]:
        top = {self.token_str(a.token_id): _finite(a.logprob) for a in p.top[: self.plan.logprobs or 0]}
        # OpenAI's completions list the chosen token among the top ones too
        top.setdefault(self.token_str(p.token.token_id), _finite(p.token.logprob))
        return top

    def _logprobs_field(self, c: _Choice, lps: list[PositionLogprobs], echo: bool) -> Any:
        if self.plan.logprobs is None:
            return None
        if self.chat:
            return {"content": [self._chat_entry(p) for p in lps], "refusal": None}
        return self._completion_logprobs(c, lps, echo)

    # streaming
    def stream_start(self) -> list[dict[str, Any]]:
        if not self.chat:
            return []
        return [self._chunk(i, {"role": "assistant", "content": ""}, None, None) for i in range(self.plan.n)]

    def stream_delta(self, d: Delta) -> list[dict[str, Any]]:
        """Chunks for one delta: its text (and logprobs), then its finish chunk if it ends the choice."""
        if d.prompt_logprobs:
            self.prompt_logprobs = d.prompt_logprobs
        if not 0 <= d.choice < len(self.choices):
            return []
        c = self.choices[d.choice]
        echo = self.plan.echo and not c.started
        c.started = True
        text = (self.prompt_text if echo else "") + d.text
        out = []
        lps = d.logprobs if self.plan.logprobs is not None else []
        if self.outputs is not None:
            return self._chat_output_delta(d, c, text, lps)
        if text or d.finish_reason is None or lps:
            logprobs = self._logprobs_field(c, lps, echo)
            if self.chat:
                out.append(self._chunk(d.choice, {"content": text}, None, logprobs))
            else:
                out.append(self._chunk(d.choice, text, None, logprobs))
        if d.finish_reason is not None:
            out.append(self._chunk(d.choice, {} if self.chat else "", d.finish_reason, None))
        return out

    def _chat_output_delta(self, d: Delta, c: _Choice, text: str, lps: list[PositionLogprobs]) -> list[dict[str, Any]]:
        """Chat with tools or a reasoning parser: the choice's reader decides the deltas (text may be
        held back while a call or tag is read); the tokens' logprobs ride on the first of them."""
        assert self.outputs is not None
        reader = self.outputs[d.choice]
        pieces = reader.feed(text)
        finish = d.finish_reason
        if d.finish_reason is not None:
            last, finish = reader.finish(d.finish_reason)
            pieces += last
        if not pieces and (lps or (not text and d.finish_reason is None)):
            pieces = [{"content": ""}]
        logprobs = self._logprobs_field(c, lps, False)
        out = [self._chunk(d.choice, piece, None, logprobs if k == 0 else None) for k, piece in enumerate(pieces)]
        if d.finish_reason is not None:
            out.append(self._chunk(d.choice, {}, finish, None))
        return out

    def _chunk(self, index: int, delta: Any, finish: str | None, logprobs: Any) -> dict[str, Any]:
        if self.chat:
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": index, "text": delta, "logprobs": logprobs, "finish_reason": finish}
            obj = "text_completion"
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model, "choices": [choice]}

    # whole responses
    def add(self, d: Delta) -> None:
        if d.prompt_logprobs:
            self.prompt_logprobs = d.prompt_logprobs
        if not 0 <= d.choice < len(self.choices):
            return
        c = self.choices[d.choice]
        c.text.append(d.text)
        c.token_ids += d.token_ids
        c.logprobs += d.logprobs
        if d.finish_reason is not None:
            c.finish = d.finish_reason

    def body(self, usage: Usage) -> dict[str, Any]:
        order = list(range(len(self.choices)))
        if self.plan.best_of > self.plan.n:  # the n with the highest cumulative logprob
            order.sort(key=lambda i: -sum(p.token.logprob for p in self.choices[i].logprobs))
            order = order[: self.plan.n]
        out = []
        for index, i in enumerate(order):
            c = self.choices[i]
            text = "".join(c.text)
            lps = c.logprobs if self.plan.logprobs is not None else []
            logprobs = self._logprobs_field(c, lps, self.plan.echo)
            if self.chat:
                message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
                finish = c.finish
                if self.outputs is not None and finish is not None:  # reasoning, tool calls
                    message, finish = self.outputs[i].message(text, finish)
                out.append({"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish})
            else:
                out.append({"index": index, "text": (self.prompt_text if self.plan.echo else "") + text,
                            "logprobs": logprobs, "finish_reason": c.finish})
        return {"id": self.rid, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": out, "usage": usage_dict(usage)}


def _finite(x: float) -> float:
    """JSON has no -inf: a token the model gives no chance at all gets a very low finite logprob."""
    return x if x > -1e30 else -9999.0
