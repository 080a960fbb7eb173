"""OpenAI API schema: request Structs, the field table, response bodies, and RequestError.

Requests are decoded with msgspec straight from the body bytes, so a wrong type is caught with
the JSON path of the offending field, which becomes the error's ``param``. Their values are
checked, once, in ``services.frontend.request``.
"""

from __future__ import annotations

import re
import time
from typing import Any, Literal

import msgspec
from msgspec import Struct

from shared.messages import Usage


class RequestError(Exception):
    """A request that cannot be served: the client's mistake (4xx) or no capacity (503/504).

    Rendered as OpenAI's error object on HTTP and as ``shared.messages.ApiError`` (the wire
    struct) on the NATS request API."""

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
# Every optional field is nullable: ``null`` means "not set", as in OpenAI's spec. Which fields are
# honoured and which are refused is decided by FIELDS below, never by a field's mere presence here.


class ContentPart(Struct, kw_only=True):
    """One part of a message's content. Only text (and an assistant's refusal) can reach the model;
    image_url, input_audio and file parts are refused by their type (their payloads are not decoded)."""

    type: str
    text: str | None = None
    refusal: str | None = None


class ChatMessageIn(Struct, kw_only=True):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # assistant turns: passed to the chat template
    tool_call_id: str | None = None  # tool turns
    function_call: dict[str, Any] | None = None  # deprecated assistant form: becomes one tool call
    refusal: str | None = None
    audio: dict[str, Any] | None = None  # a previous audio answer: refused (text-only models)


class StreamOptions(Struct, kw_only=True):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # OpenAI pads chunks against side channels; Baton never does


class JsonSchemaFormat(Struct, kw_only=True):
    name: str
    description: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class ResponseFormat(Struct, kw_only=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsIn(Struct, kw_only=True):
    """vLLM's ``structured_outputs`` object (one of its keys set)."""

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None


class FunctionDef(Struct, kw_only=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolIn(Struct, kw_only=True):
    type: Literal["function", "custom"]
    function: FunctionDef | None = None
    custom: dict[str, Any] | None = None


class _Common(Struct, kw_only=True, forbid_unknown_fields=True):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's extensions that users of vLLM and Dynamo already send
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    structured_outputs: StructuredOutputsIn | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    response_format: ResponseFormat | None = None
    priority: int | None = None  # vLLM's: lower is served first


class ChatCompletionRequest(_Common, kw_only=True, forbid_unknown_fields=True):
    messages: list[ChatMessageIn]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[ToolIn] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: str | None = None
    function_call: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    verbosity: str | None = None
    moderation: dict[str, Any] | None = None


class CompletionRequest(_Common, kw_only=True, forbid_unknown_fields=True):
    # str, [str], [int] or [[int]]; msgspec takes one array type in a union, so check the rest below.
    # null: OpenAI's default, a prompt that is just the start of a document.
    prompt: str | list[str | int | list[int]] | None
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


# --- what Baton does with each field ------------------------------------------------------------
#
# ONE table drives validation: a field of either request is honoured, accepted (metadata that
# needs no honouring) or refused (with the reason). A non-honoured field is refused with a 400 naming
# it (``param``, code ``unsupported_parameter``) unless it is null or one of its ``noop`` values
# (what a client sends for "off": n=1, a penalty of 0, logprobs=false...). Fields not in the
# request structs at all are refused by the decoder (code ``unknown_parameter``), as OpenAI does.
#
# To honour a field: set its status to HONOURED and read the value where it is honoured.
# tests/frontend/test_api_surface.py and tests/frontend/test_openapi_schemathesis.py read this table, so their
# expectations follow it; `python -m services.frontend.openai_api` prints docs/api.md's table.

HONOURED = "honoured"
ACCEPTED = "accepted"  # harmless metadata: nothing to honour
REFUSED = "refused"

Endpoint = Literal["chat", "completions", "both"]


class Rule(Struct, frozen=True):
    status: str
    noop: tuple[Any, ...] = ()  # values meaning "off", accepted whatever the status
    why: str = ""
    on: Endpoint = "both"


FIELDS: dict[str, Rule] = {
    # both endpoints
    "model": Rule(HONOURED),
    "max_tokens": Rule(HONOURED),
    "temperature": Rule(HONOURED),
    "top_p": Rule(HONOURED, why="0 means greedy (the smallest nucleus is the top token)"),
    "stream": Rule(HONOURED),
    "stream_options": Rule(HONOURED, why="include_usage honoured; include_obfuscation: Baton never pads chunks"),
    "stop": Rule(HONOURED),
    "seed": Rule(HONOURED),
    "user": Rule(ACCEPTED, why="an end-user id for OpenAI's abuse monitoring; Baton logs nothing by it"),
    "top_k": Rule(HONOURED),
    "min_tokens": Rule(HONOURED),
    "stop_token_ids": Rule(HONOURED),
    "ignore_eos": Rule(HONOURED),
    "include_stop_str_in_output": Rule(HONOURED),
    "skip_special_tokens": Rule(HONOURED),
    "n": Rule(HONOURED, noop=(1,)),
    "presence_penalty": Rule(HONOURED, noop=(0.0,)),
    "frequency_penalty": Rule(HONOURED, noop=(0.0,)),
    "repetition_penalty": Rule(HONOURED, noop=(1.0,)),
    "logit_bias": Rule(HONOURED, noop=({},)),
    "min_p": Rule(HONOURED, noop=(0.0,)),
    "logprobs": Rule(HONOURED, noop=(False,)),  # chat: bool; completions: int (0 asks for the chosen token's)
    "structured_outputs": Rule(HONOURED),
    "guided_json": Rule(HONOURED),
    "guided_regex": Rule(HONOURED),
    "guided_choice": Rule(HONOURED),
    "guided_grammar": Rule(HONOURED),
    "response_format": Rule(HONOURED, noop=(ResponseFormat(type="text"),)),
    "priority": Rule(HONOURED, why="vLLM's: lower is served first; an integer within the frontend's "
                     "--priority-min..--priority-max; the x-baton-priority header sets it when the body does not"),
    # chat only
    "messages": Rule(HONOURED, on="chat"),
    "max_completion_tokens": Rule(HONOURED, on="chat"),
    "top_logprobs": Rule(HONOURED, noop=(0,), on="chat"),
    "tools": Rule(HONOURED, noop=([],), on="chat"),
    "tool_choice": Rule(HONOURED, noop=("none", "auto"), on="chat"),
    "parallel_tool_calls": Rule(HONOURED, noop=(True,), on="chat"),
    "reasoning_effort": Rule(REFUSED, on="chat", why="a control of OpenAI's reasoning models; for a model that "
                             "thinks, start the frontend with --reasoning-parser"),
    "function_call": Rule(REFUSED, noop=("none",), on="chat", why="deprecated by OpenAI; use tools and tool_choice"),
    "functions": Rule(REFUSED, noop=([],), on="chat", why="deprecated by OpenAI; use tools"),
    "metadata": Rule(ACCEPTED, on="chat", why="tags for OpenAI's dashboard; Baton stores nothing"),
    "store": Rule(REFUSED, noop=(False,), on="chat", why="Baton stores no completions"),
    "service_tier": Rule(REFUSED, noop=("auto", "default"), on="chat", why="Baton has one service tier"),
    "safety_identifier": Rule(ACCEPTED, on="chat", why="an end-user id like `user`; Baton logs nothing by it"),
    "prompt_cache_key": Rule(ACCEPTED, on="chat", why="a routing hint; Baton's router finds cached prefixes itself"),
    "prompt_cache_retention": Rule(REFUSED, on="chat", why="Baton's prefix cache is evicted by use, not by time"),
    "prompt_cache_options": Rule(REFUSED, on="chat", why="Baton's prefix cache has no per-request options"),
    "modalities": Rule(REFUSED, noop=(["text"],), on="chat", why="text is the only output modality"),
    "audio": Rule(REFUSED, on="chat", why="text-only models: no audio output"),
    "prediction": Rule(REFUSED, on="chat", why="predicted outputs (speculative decoding) are not implemented"),
    "web_search_options": Rule(REFUSED, on="chat", why="Baton runs no web search"),
    "verbosity": Rule(REFUSED, on="chat", why="a control of OpenAI's own models; no open model takes it"),
    "moderation": Rule(REFUSED, on="chat", why="Baton runs no moderation"),
    # completions only
    "prompt": Rule(HONOURED, on="completions"),
    "echo": Rule(HONOURED, noop=(False,), on="completions"),
    "best_of": Rule(HONOURED, noop=(1,), on="completions"),
    "suffix": Rule(REFUSED, noop=("",), on="completions", why="fill-in-the-middle is not implemented"),
}


def _is_noop(value: Any, noop: tuple[Any, ...]) -> bool:
    # type-aware: True == 1 and 0 == False in Python, but n=true is not n=1
    return value is None or any(type(value) is type(x) and value == x for x in noop)


def _rules(endpoint: Literal["chat", "completions"]) -> dict[str, Rule]:
    return {name: r for name, r in FIELDS.items() if r.on in (endpoint, "both")}


# The fields each endpoint must check (neither honoured nor accepted), worked out once, not per request.
_TO_CHECK = {endpoint: [(name, r) for name, r in _rules(endpoint).items() if r.status not in (HONOURED, ACCEPTED)]
             for endpoint in ("chat", "completions")}


def refusal_of(name: str, rule: Rule) -> str:
    if rule.status == REFUSED:
        return f"`{name}` is not supported: {rule.why}"
    return f"`{name}` is not supported yet"


def check_fields(req: _Common) -> None:
    """Refuse every field that is set but not honoured, naming it."""
    endpoint: Literal["chat", "completions"] = "chat" if isinstance(req, ChatCompletionRequest) else "completions"
    for name, rule in _TO_CHECK[endpoint]:
        if not _is_noop(getattr(req, name), rule.noop):
            raise RequestError(400, refusal_of(name, rule), param=name, code="unsupported_parameter")


class TokenizeRequest(Struct, kw_only=True, forbid_unknown_fields=True):
    """vLLM's /tokenize body: a ``prompt``, or chat ``messages`` rendered by the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessageIn] | None = None
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages (as vLLM)
    add_generation_prompt: bool | None = None
    return_token_strs: bool | None = None


class DetokenizeRequest(Struct, kw_only=True, forbid_unknown_fields=True):
    model: str | None = None
    tokens: list[int]


class LoadLoraAdapterRequest(Struct, kw_only=True, forbid_unknown_fields=True):
    """vLLM's /v1/load_lora_adapter body: ``lora_path`` is a directory under the frontend's --lora-root."""

    lora_name: str
    lora_path: str


class UnloadLoraAdapterRequest(Struct, kw_only=True, forbid_unknown_fields=True):
    lora_name: str
    lora_int_id: int | None = None  # vLLM's; accepted and unused (adapters are named)


chat_decoder = msgspec.json.Decoder(ChatCompletionRequest)
completion_decoder = msgspec.json.Decoder(CompletionRequest)
tokenize_decoder = msgspec.json.Decoder(TokenizeRequest)
detokenize_decoder = msgspec.json.Decoder(DetokenizeRequest)
load_lora_decoder = msgspec.json.Decoder(LoadLoraAdapterRequest)
unload_lora_decoder = msgspec.json.Decoder(UnloadLoraAdapterRequest)

_PATH = re.compile(r"at `\$\.?([^`]*)`")
_UNKNOWN = re.compile(r"unknown field `(.*?)`(?= - at `|$)", re.DOTALL)  # names may hold backticks, newlines


def _integral_floats_to_int(node: Any) -> Any:
    if isinstance(node, float) and node.is_integer():
        return int(node)
    if isinstance(node, dict):
        return {k: _integral_floats_to_int(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_integral_floats_to_int(v) for v in node]
    return node


def decode_request(body: bytes, decoder: msgspec.json.Decoder) -> Any:
    if not body.strip():
        raise RequestError(400, "request body is empty; expected a JSON object", code="invalid_json")
    try:
        try:
            req = decoder.decode(body)
        except msgspec.ValidationError as e:
            if "got `float`" not in str(e):
                raise
            # JSON (and OpenAI's spec) counts 2.0 as an integer; msgspec does not. Off the hot path.
            req = msgspec.convert(_integral_floats_to_int(msgspec.json.decode(body)), decoder.type)
    except msgspec.ValidationError as e:
        unknown = _UNKNOWN.search(str(e))
        m = _PATH.search(str(e))
        if unknown and not (m and m.group(1)):  # a top-level field Baton does not know
            raise RequestError(400, f"unrecognized request argument: `{unknown.group(1)}`", param=unknown.group(1),
                           code="unknown_parameter") from None
        param = m.group(1) if m else None
        raise RequestError(400, f"invalid request: {e}", param=param or None) from None
    except msgspec.DecodeError as e:
        raise RequestError(400, f"malformed JSON body: {e}", code="invalid_json") from None
    if isinstance(req, _Common):
        check_fields(req)
    return req


# --- chat messages and prompts as the model reads them ------------------------------------


# Chat templates know system/user/assistant/tool; the spec's other roles are mapped onto those.
_ROLE_FOR_TEMPLATE = {"developer": "system", "function": "tool"}
_UNUSABLE_PARTS = {"image_url": "images", "input_audio": "audio", "file": "files"}


def _message_text(i: int, m: ChatMessageIn) -> str:
    if m.content is None:
        return ""
    if isinstance(m.content, str):
        return m.content
    parts = []
    for j, p in enumerate(m.content):
        if p.type == "text" and p.text is not None:
            parts.append(p.text)
        elif p.type == "refusal" and m.role == "assistant" and p.refusal is not None:
            parts.append(p.refusal)
        elif p.type in _UNUSABLE_PARTS:
            raise RequestError(400, f"content parts of type {p.type!r} are not supported: this model reads text, not "
                           f"{_UNUSABLE_PARTS[p.type]}", param=f"messages[{i}].content[{j}]",
                           code="unsupported_content")
        else:
            raise RequestError(400, f"content part of type {p.type!r} is not valid in a {m.role} message",
                           param=f"messages[{i}].content[{j}]", code="unsupported_content")
    return "".join(parts)


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    if not req.messages:
        raise RequestError(400, "messages must be a non-empty list", param="messages")
    out: list[dict[str, Any]] = []
    for i, m in enumerate(req.messages):
        if m.audio is not None:
            raise RequestError(400, "audio in messages is not supported: this model reads text",
                           param=f"messages[{i}].audio", code="unsupported_content")
        msg: dict[str, Any] = {"role": _ROLE_FOR_TEMPLATE.get(m.role, m.role), "content": _message_text(i, m)}
        if m.name is not None:
            msg["name"] = m.name
        tool_calls = list(m.tool_calls or [])
        if m.function_call is not None:  # the deprecated form of one tool call
            tool_calls.append({"id": f"call_{i}", "type": "function", "function": m.function_call})
        if tool_calls:
            msg["tool_calls"] = tool_calls
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def completion_prompt(req: CompletionRequest) -> str | list[int] | None:
    """The prompt as text or token ids; None for OpenAI's default (the start of a document), which
    an empty prompt ("", [] or [[]]) also means."""
    p = req.prompt
    if p is None or isinstance(p, str):
        return p or None
    if not p:
        return None
    kinds = {type(x) for x in p}
    if len(kinds) != 1:
        raise RequestError(400, "prompt must be a string, a list of strings, a list of token ids or a list of lists", param="prompt")
    if kinds == {int}:
        return p  # type: ignore[return-value]
    if len(p) != 1:
        raise RequestError(400, "batched prompts are not supported; send one prompt per request", param="prompt")
    return p[0] or None  # type: ignore[return-value]


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
            {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None}, "logprobs": None,
             "finish_reason": finish}
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


# --- the table as documentation -------------------------------------------------------------


_STATUS_WORDS = {HONOURED: "honoured", ACCEPTED: "accepted (no effect needed)", REFUSED: "refused (400)"}


def fields_markdown() -> str:
    """FIELDS as the Markdown table in docs/api.md (tests/frontend/test_api_surface.py keeps them equal)."""
    lines = ["| field | endpoints | what Baton does | values accepted as \"off\" | why |", "|---|---|---|---|---|"]
    for name, r in FIELDS.items():
        noop = ", ".join(f"`{msgspec.json.encode(v).decode()}`" for v in r.noop) or ""
        on = {"both": "chat, completions", "chat": "chat", "completions": "completions"}[r.on]
        lines.append(f"| `{name}` | {on} | {_STATUS_WORDS[r.status]} | {noop} | {r.why} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(fields_markdown(), end="")
