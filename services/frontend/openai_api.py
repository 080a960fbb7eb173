"""OpenAI API schema: request Structs, validation into internal sampling params, response bodies.

Requests are decoded with msgspec straight from the body bytes, so a wrong type is caught with
the JSON path of the offending field, which becomes the error's ``param``.
"""

from __future__ import annotations

import re
import time
from typing import Any, Literal

import msgspec
from msgspec import Struct

from shared.messages import SamplingParams, Usage


class ApiError(Exception):
    """An error the client caused (or overload); rendered as OpenAI's error object."""

    def __init__(
        self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers: list[tuple[bytes, bytes]] = []
        if status in (429, 503):
            self.headers.append((b"retry-after", b"1"))

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --- request schemas ------------------------------------------------------------------------


class ContentPart(Struct, kw_only=True):
    type: str
    text: str | None = None


class ChatMessageIn(Struct, kw_only=True):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None  # assistant: calls it made (checked in services/frontend/structured.py)
    tool_call_id: str | None = None  # tool: the call this answers


class StreamOptions(Struct, kw_only=True):
    include_usage: bool = False


class _Common(Struct, kw_only=True):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: bool | int | None = None
    # vLLM-style extensions users of vLLM and Dynamo already send
    top_k: int | None = None
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    # Structured outputs (services/frontend/structured.py turns them into one StructuredOutput)
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None


class ChatCompletionRequest(_Common, kw_only=True):
    messages: list[ChatMessageIn]
    max_completion_tokens: int | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(_Common, kw_only=True):
    # str, [str], [int] or [[int]]; msgspec takes one array type in a union, so check the rest below
    prompt: str | list[str | int | list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


chat_decoder = msgspec.json.Decoder(ChatCompletionRequest)
completion_decoder = msgspec.json.Decoder(CompletionRequest)

_PATH = re.compile(r"at `\$\.?([^`]*)`")


def decode_request(body: bytes, decoder: msgspec.json.Decoder) -> Any:
    if not body.strip():
        raise ApiError(400, "request body is empty; expected a JSON object", code="invalid_json")
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as e:
        m = _PATH.search(str(e))
        param = m.group(1) if m else None
        raise ApiError(400, f"invalid request: {e}", param=param or None) from None
    except msgspec.DecodeError as e:
        raise ApiError(400, f"malformed JSON body: {e}", code="invalid_json") from None


# --- validation into internal params -------------------------------------------------------


def parse_stops(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if len(stops) > 4:
        raise ApiError(400, "at most 4 stop sequences are allowed", param="stop")
    return [s for s in stops if s]


def sampling_from(req: _Common, max_tokens: int | None, prompt_len: int, max_model_len: int) -> SamplingParams:
    """Check the knobs and build SamplingParams; every rejection names its parameter."""
    if req.n != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    if req.logprobs:
        raise ApiError(400, "logprobs are not supported", param="logprobs")
    if req.logit_bias:
        raise ApiError(400, "logit_bias is not supported", param="logit_bias")
    if req.presence_penalty or req.frequency_penalty:
        raise ApiError(400, "presence/frequency penalties are not supported", param="presence_penalty")
    temperature = 1.0 if req.temperature is None else req.temperature
    if not 0.0 <= temperature <= 2.0:
        raise ApiError(400, "temperature must be between 0 and 2", param="temperature")
    top_p = 1.0 if req.top_p is None else req.top_p
    if not 0.0 < top_p <= 1.0:
        raise ApiError(400, "top_p must be in (0, 1]", param="top_p")
    top_k = req.top_k or 0
    if top_k < 0 and top_k != -1:
        raise ApiError(400, "top_k must be -1, 0 or positive", param="top_k")
    room = max_model_len - prompt_len
    if room <= 0:
        raise ApiError(
            400,
            f"this model's maximum context length is {max_model_len} tokens; the prompt has {prompt_len}",
            param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
            code="context_length_exceeded",
        )
    if max_tokens is None:
        max_tokens = room
    if max_tokens < 1:
        raise ApiError(400, "max_tokens must be at least 1", param="max_tokens")
    if max_tokens > room:
        raise ApiError(
            400,
            f"this model's maximum context length is {max_model_len} tokens; the prompt has {prompt_len} "
            f"and max_tokens asks for {max_tokens}",
            param="max_tokens",
            code="context_length_exceeded",
        )
    if req.min_tokens < 0 or req.min_tokens > max_tokens:
        raise ApiError(400, "min_tokens must be between 0 and max_tokens", param="min_tokens")
    if req.seed is not None and not -(2**63) <= req.seed < 2**63:
        raise ApiError(400, "seed must fit in 64 bits", param="seed")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=max(top_k, 0),
        seed=req.seed,
        stop_token_ids=list(req.stop_token_ids or []),
        ignore_eos=req.ignore_eos,
        min_tokens=req.min_tokens,
    )


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    if not req.messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    out: list[dict[str, Any]] = []
    for i, m in enumerate(req.messages):
        if m.content is None:
            text = ""
        elif isinstance(m.content, str):
            text = m.content
        else:
            parts = []
            for p in m.content:
                if p.type != "text" or p.text is None:
                    raise ApiError(400, f"only text content parts are supported (got {p.type!r})", param=f"messages[{i}].content")
                parts.append(p.text)
            text = "".join(parts)
        msg: dict[str, Any] = {"role": m.role, "content": text}
        if m.tool_calls:
            msg["tool_calls"] = m.tool_calls
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            msg["name"] = m.name
        out.append(msg)
    return out


def completion_prompt(req: CompletionRequest) -> str | list[int]:
    if req.echo:
        raise ApiError(400, "echo is not supported", param="echo")
    if req.suffix:
        raise ApiError(400, "suffix is not supported", param="suffix")
    if req.best_of not in (None, 1):
        raise ApiError(400, "only best_of=1 is supported", param="best_of")
    p = req.prompt
    if isinstance(p, str):
        return p
    if not p:
        raise ApiError(400, "prompt must not be empty", param="prompt")
    kinds = {type(x) for x in p}
    if len(kinds) != 1:
        raise ApiError(400, "prompt must be a string, a list of strings, a list of token ids or a list of lists", param="prompt")
    if kinds == {int}:
        return p  # type: ignore[return-value]
    if len(p) != 1:
        raise ApiError(400, "batched prompts are not supported; send one prompt per request", param="prompt")
    first = p[0]
    if isinstance(first, list) and not first:
        raise ApiError(400, "prompt must not be empty", param="prompt")
    return first  # type: ignore[return-value]


# --- response bodies -----------------------------------------------------------------------


def usage_dict(u: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


def chat_response(rid: str, model: str, text: str, finish: str, usage: Usage) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}
        ],
        "usage": usage_dict(usage),
    }


def completion_response(rid: str, model: str, text: str, finish: str, usage: Usage) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
        "usage": usage_dict(usage),
    }


def chat_chunk(rid: str, model: str, created: int, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def completion_chunk(rid: str, model: str, created: int, text: str, finish: str | None) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
    }


def usage_chunk(rid: str, model: str, created: int, obj: str, usage: Usage) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage_dict(usage)}
