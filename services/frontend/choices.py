"""Choices and logprobs in OpenAI's shapes.

:class:`ChoiceShaper` turns the per-choice :class:`Delta` stream into response bodies and
stream chunks (the request's n / best_of / logprobs / echo were checked, and their
:class:`ChoicePlan` made, in ``services.frontend.request``): chat ``logprobs.content[]`` (token,
logprob, bytes, top_logprobs) and completions ``logprobs`` (tokens, token_logprobs, top_logprobs,
text_offset), ``echo`` with the prompt's logprobs (the first one null), ``index`` per choice,
``best_of`` selection.

Logprobs are the model's raw log-probabilities (before penalties, bias and temperature), as
vLLM's default; the engines compute them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from services.frontend.openai_api import usage_dict
from services.frontend.request import ChoicePlan
from shared.messages import PositionLogprobs, Usage
from shared.tokenizer import Tokenizer

if TYPE_CHECKING:
    from services.frontend.structured import ChatOutput
    from services.frontend.text_stream import Delta


# --- deltas -> OpenAI shapes -------------------------------------------------------------------

_json = msgspec.json.Encoder()
_NO_LOGPROBS_NOT_DONE = b'"logprobs":null,"finish_reason":null}]}\n\n'
_NO_LOGPROBS_DONE = b'"logprobs":null,"finish_reason":'


def sse_event(payload: Any) -> bytes:
    """One server-sent event carrying ``payload`` as JSON."""
    return b"data: " + _json.encode(payload) + b"\n\n"


@dataclass(slots=True)
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
        # The common stream (one choice, text only): each event is this request's fixed bytes around
        # the new text, byte for byte what encoding _chunk's dict gives, without building the dict.
        self._sse_head: bytes | None = None
        if self.outputs is None and plan.logprobs is None and not plan.echo and plan.best_of == 1:
            head = _json.encode({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                                 "created": self.created, "model": model})
            self._sse_head = b"data: " + head[:-1] + b',"choices":[{"index":0,'

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

    # streaming, as server-sent events
    def sse_start(self) -> bytes:
        """The events that open a stream (chat: the assistant role, per choice)."""
        if self._sse_head is not None:
            return self._sse_head + b'"delta":{"role":"assistant","content":""},' + _NO_LOGPROBS_NOT_DONE \
                if self.chat else b""
        return b"".join(map(sse_event, self.stream_start()))

    def sse_delta(self, d: Delta) -> bytes:
        """The events of one delta (see :meth:`stream_delta`)."""
        head = self._sse_head
        if head is None or d.choice != 0 or d.prompt_logprobs:
            return b"".join(map(sse_event, self.stream_delta(d)))
        self.choices[0].started = True
        out = b""
        if d.text or d.finish_reason is None:
            out = head + (b'"delta":{"content":' if self.chat else b'"text":') + _json.encode(d.text) \
                + (b"}," if self.chat else b",") + _NO_LOGPROBS_NOT_DONE
        if d.finish_reason is not None:
            out += head + (b'"delta":{},' if self.chat else b'"text":"",') + _NO_LOGPROBS_DONE \
                + _json.encode(d.finish_reason) + b"}]}\n\n"
        return out

    # streaming, as OpenAI's chunk objects
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
