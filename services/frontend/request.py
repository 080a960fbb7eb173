"""One validated request, whichever door it came in by.

The HTTP API (chat and completions bodies) and the NATS request API each have one function here,
:func:`from_chat`, :func:`from_completion` and :func:`from_nats`, that checks a decoded request
and turns it into a :class:`ValidatedRequest`: the prompt's token ids, the SamplingParams the
engine gets, the text options of the text stream and the response plan. Every refusal is a
:class:`RequestError` naming its field; nothing downstream checks again.

The knobs are read from the request structs by name (``getattr(req, name, None)``: a field a door does not have reads as
unset), so no door copies its fields into another's struct.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import jinja2
import msgspec

from services.frontend.openai_api import (
    ChatCompletionRequest,
    CompletionRequest,
    RequestError,
    chat_messages,
    completion_prompt,
)
from services.frontend.structured import ToolPlan, plan_tools, structured_from, template_messages
from services.frontend.tool_parsers import ToolParser
from shared.messages import ApiGenerateRequest, SamplingParams
from shared.tokenizer import Tokenizer

DEFAULT_MAX_N = 16
MAX_CHAT_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5

# A model's chat template may raise anything on messages it does not expect (a tool call whose
# arguments are a string, a role it does not know): the client's input, so a 400, never a 500.
TEMPLATE_ERRORS = (ValueError, TypeError, LookupError, jinja2.TemplateError)

# Prompts longer than this (characters) are tokenized in a worker thread: a long prompt takes
# milliseconds to tokenize, which on the event loop would stall every other stream.
TOKENIZE_IN_THREAD_CHARS = 8192

DEFAULT_PRIORITY_RANGE = (-100, 100)
MAX_SESSION_ID_CHARS = 256


@dataclass(slots=True, frozen=True)
class RequestHints:
    """What a caller may say outside the body (HTTP or NATS headers), unchecked: ``x-baton-priority``
    for clients that cannot change the body, and ``x-session-id`` to keep a conversation on one worker."""

    priority: str | None = None
    session_id: str | None = None

    @classmethod
    def from_headers(cls, get: Any) -> RequestHints:
        """``get(name)``: the header's value or None, names lowercase."""
        return cls(get(PRIORITY_HEADER), get(SESSION_HEADER))


PRIORITY_HEADER = "x-baton-priority"
SESSION_HEADER = "x-session-id"
NO_HINTS = RequestHints()


@dataclass(slots=True, frozen=True)
class TextOptions:
    """How tokens become the caller's text (vLLM's option names)."""

    stops: list[str] = field(default_factory=list)
    include_stop_str: bool = False  # include_stop_str_in_output
    skip_special_tokens: bool = True


@dataclass(slots=True)
class ChoicePlan:
    """What the response should look like, beyond the SamplingParams."""

    n: int = 1  # choices returned
    best_of: int = 1  # choices generated (completions' best_of; >= n)
    logprobs: int | None = None  # top alternatives per token in the response; None: no logprobs
    echo: bool = False


@dataclass(slots=True)
class ValidatedRequest:
    """A request that passed every check: what to generate, and how to answer."""

    request_id: str
    token_ids: list[int]  # the prompt
    sampling: SamplingParams  # for the engine; ``structured`` set when the output is constrained
    text: TextOptions
    stream: bool
    plan: ChoicePlan = field(default_factory=ChoicePlan)
    include_usage: bool = False  # stream_options.include_usage
    chat: bool = False
    prompt_text: str = ""  # completions' echo
    tool_plan: ToolPlan | None = None  # chat: how tool calls are made and read
    structured_param: str | None = None  # the field an engine's constraint error is blamed on
    lora: str = ""  # the LoRA adapter ``model`` named ("" : the base model)
    lora_digest: str = ""  # its digest as the workers advertise it (the root of its KV block hashes)
    session_id: str = ""  # x-session-id: the router keeps the conversation on one worker

    @property
    def priority(self) -> int:
        return self.sampling.priority


@dataclass(slots=True)
class RequestLimits:
    """What this frontend serves and allows."""

    model: str
    max_model_len: int
    max_prompt_tokens: int = 0  # 0: only the context length bounds a prompt
    max_n: int = DEFAULT_MAX_N  # cap on n and best_of
    tool_parser: ToolParser | None = None
    priority_range: tuple[int, int] = DEFAULT_PRIORITY_RANGE  # allowed request priorities, both ends included
    adapters: Callable[[], dict[str, str]] | None = None  # LoRA adapters served now: name -> digest
    lora: str = ""  # this name is a LoRA adapter of ``model``'s base (ModelRegistry.limits_for sets it)
    lora_digest: str = ""


# --- the doors ------------------------------------------------------------------------------


async def from_chat(req: ChatCompletionRequest, tok: Tokenizer, limits: RequestLimits,
                    request_id: str, hints: RequestHints = NO_HINTS) -> ValidatedRequest:
    lora = check_model(req.model, limits)
    messages = chat_messages(req)
    tool_plan = plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls, limits.tool_parser)
    try:
        token_ids = await encode_chat(tok, template_messages(messages), tool_plan.tools)
    except TEMPLATE_ERRORS as e:
        raise RequestError(400, f"the chat template refused these messages: {e}", param="messages") from None
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    out = _validate(req, request_id, token_ids, max_tokens, True, tok, limits, hints)
    if tool_plan.structured is not None:
        if out.structured_param is not None:
            raise RequestError(400, f"tool_choice {tool_plan.mode!r} cannot be combined with {out.structured_param}",
                               param="tool_choice")
        out.sampling = msgspec.structs.replace(out.sampling, structured=tool_plan.structured)
        out.structured_param = "tool_choice"
    out.tool_plan = tool_plan
    out.lora, out.lora_digest = lora
    return out


async def from_completion(req: CompletionRequest, tok: Tokenizer, limits: RequestLimits,
                          request_id: str, hints: RequestHints = NO_HINTS) -> ValidatedRequest:
    lora = check_model(req.model, limits)
    prompt = completion_prompt(req)
    if prompt is None:  # OpenAI's default prompt: the start of a document (BOS, else EOS)
        token_ids = tok.encode("") or list(tok.eos_token_ids[:1])
    elif isinstance(prompt, str):
        token_ids = await encode_text(tok, prompt)
    else:
        check_token_ids(prompt, tok, "prompt")
        token_ids = list(prompt)
    if not token_ids:
        raise RequestError(400, "prompt must not be empty", param="prompt")
    max_tokens = req.max_tokens if req.max_tokens is not None else 16  # OpenAI's default
    out = _validate(req, request_id, token_ids, max_tokens, False, tok, limits, hints)
    out.prompt_text = prompt if isinstance(prompt, str) else ""
    if req.echo and not isinstance(prompt, str):
        out.prompt_text = tok.decode(token_ids, skip_special_tokens=False)
    out.lora, out.lora_digest = lora
    return out


async def from_nats(req: ApiGenerateRequest, tok: Tokenizer, limits: RequestLimits,
                    request_id: str, hints: RequestHints = NO_HINTS) -> ValidatedRequest:
    """The NATS request API: one choice, no logprobs (its struct has no such fields, so the
    decoder already refused them by name)."""
    lora = check_model(req.model, limits) if req.model else ("", "")
    if sum(x is not None for x in (req.prompt, req.messages, req.token_ids)) != 1:
        raise RequestError(400, "give exactly one of prompt, messages, token_ids")
    if req.prompt is not None:
        token_ids = await encode_text(tok, req.prompt)
    elif req.messages is not None:
        if not req.messages:
            raise RequestError(400, "messages must not be empty")
        try:
            token_ids = await encode_chat(tok, [{"role": m.role, "content": m.content} for m in req.messages])
        except TEMPLATE_ERRORS as e:
            raise RequestError(400, f"the chat template refused these messages: {e}") from None
    else:
        token_ids = list(req.token_ids or [])
        check_token_ids(token_ids, tok, "token_ids")
    if not token_ids:
        raise RequestError(400, "the prompt is empty")
    out = _validate(req, request_id, token_ids, req.max_tokens, False, tok, limits, hints)
    out.lora, out.lora_digest = lora
    return out


# --- the checks every door shares ------------------------------------------------------------


def check_model(model: str, limits: RequestLimits) -> tuple[str, str]:
    """``model`` resolved: ("", "") for the base model, (adapter, its digest) for a LoRA adapter
    of it; OpenAI's 404 for anything else (an adapter unloaded a moment ago included)."""
    if model == limits.model:
        return limits.lora, limits.lora_digest
    adapters = limits.adapters() if limits.adapters is not None else {}
    if model in adapters:
        return model, adapters[model]
    raise RequestError(404, f"the model {model!r} does not exist; this endpoint serves {limits.model!r}"
                       + (" and the LoRA adapters in /v1/models" if adapters else ""), param="model",
                       code="model_not_found")


def check_token_ids(token_ids: list[int], tok: Tokenizer, param: str) -> None:
    if any(t < 0 or t >= tok.vocab_size for t in token_ids):
        raise RequestError(400, f"token ids must be in [0, {tok.vocab_size})", param=param)


def _validate(req: Any, request_id: str, token_ids: list[int], max_tokens: int | None, chat: bool, tok: Tokenizer,
              limits: RequestLimits, hints: RequestHints = NO_HINTS) -> ValidatedRequest:
    if limits.max_prompt_tokens and len(token_ids) > limits.max_prompt_tokens:
        raise RequestError(400, f"the prompt has {len(token_ids)} tokens; this endpoint accepts at most "
                           f"{limits.max_prompt_tokens}", param="messages" if chat else "prompt",
                           code="prompt_too_long")
    stops = parse_stops(req.stop)
    sampling, plan = sampling_and_plan(req, chat, max_tokens, len(token_ids), limits.max_model_len,
                                       max_n=limits.max_n, vocab_size=tok.vocab_size)
    structured, structured_param = structured_from(req)
    if structured is not None:
        sampling = msgspec.structs.replace(sampling, structured=structured)
    priority = check_priority(getattr(req, "priority", None), hints.priority, limits.priority_range)
    if priority:
        sampling = msgspec.structs.replace(sampling, priority=priority)
    stream_options = getattr(req, "stream_options", None)
    return ValidatedRequest(
        request_id=request_id, token_ids=token_ids, sampling=sampling, stream=bool(req.stream), plan=plan, chat=chat,
        text=TextOptions(stops, bool(getattr(req, "include_stop_str_in_output", None)),
                         getattr(req, "skip_special_tokens", None) is not False),
        include_usage=bool(stream_options and stream_options.include_usage),
        structured_param=structured_param, session_id=check_session_id(hints.session_id),
    )


def check_priority(body: int | None, header: str | None, allowed: tuple[int, int]) -> int:
    """The request's priority: the body's ``priority`` if set, else the x-baton-priority header's,
    else 0; outside ``allowed`` a 400 naming ``priority`` either way."""
    lo, hi = allowed
    if body is None and header is not None:
        try:
            body = int(header.strip())
        except ValueError:
            raise RequestError(400, f"the {PRIORITY_HEADER} header must be an integer, got {header[:32]!r}",
                               param="priority") from None
    if body is None:
        return 0
    if not lo <= body <= hi:
        raise RequestError(400, f"priority must be an integer between {lo} and {hi} (lower is served first); "
                           f"got {body}", param="priority")
    return body


def check_session_id(session_id: str | None) -> str:
    if not session_id:
        return ""
    if len(session_id) > MAX_SESSION_ID_CHARS or not session_id.isprintable() or not session_id.isascii():
        raise RequestError(400, f"the {SESSION_HEADER} header must be at most {MAX_SESSION_ID_CHARS} printable "
                           "ASCII characters", param=SESSION_HEADER)
    return session_id


def parse_stops(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if len(stops) > 4:
        raise RequestError(400, "at most 4 stop sequences are allowed", param="stop")
    return [s for s in stops if s]


def _in_range(name: str, value: float | None, lo: float, hi: float, default: float) -> float:
    if value is None:
        return default
    if not lo <= value <= hi:
        raise RequestError(400, f"{name} must be between {lo:g} and {hi:g}", param=name)
    return value



def sampling_and_plan(req: Any, chat: bool, max_tokens: int | None, prompt_len: int, max_model_len: int, *,
                      max_n: int = DEFAULT_MAX_N, vocab_size: int = 0) -> tuple[SamplingParams, ChoicePlan]:
    """SamplingParams and the response's shape (choices, logprobs, echo), from one validation;
    every rejection names its parameter."""
    extra, plan = _choices_and_penalties(req, chat, bool(getattr(req, "stream", None)), max_n, vocab_size)
    temperature = _in_range("temperature", getattr(req, "temperature", None), 0.0, 2.0, 1.0)
    top_p = _in_range("top_p", getattr(req, "top_p", None), 0.0, 1.0, 1.0)
    if top_p == 0.0:  # OpenAI allows 0: the smallest nucleus is the most likely token, i.e. greedy
        temperature, top_p = 0.0, 1.0
    top_k = getattr(req, "top_k", None) or 0
    if top_k < 0 and top_k != -1:
        raise RequestError(400, "top_k must be -1, 0 or positive", param="top_k")
    room = max_model_len - prompt_len
    if room <= 0:
        raise RequestError(
            400,
            f"this model's maximum context length is {max_model_len} tokens; the prompt has {prompt_len}",
            param="messages" if chat else "prompt",
            code="context_length_exceeded",
        )
    if max_tokens is None:
        max_tokens = room
    if max_tokens < 1:
        raise RequestError(400, "max_tokens must be at least 1", param="max_tokens")
    if max_tokens > room:
        raise RequestError(
            400,
            f"this model's maximum context length is {max_model_len} tokens; the prompt has {prompt_len} "
            f"and max_tokens asks for {max_tokens}",
            param="max_tokens",
            code="context_length_exceeded",
        )
    min_tokens = getattr(req, "min_tokens", None) or 0
    if min_tokens < 0 or min_tokens > max_tokens:
        raise RequestError(400, "min_tokens must be between 0 and max_tokens", param="min_tokens")
    seed = getattr(req, "seed", None)
    if seed is not None and not -(2**63) <= seed < 2**63:
        raise RequestError(400, "seed must fit in 64 bits", param="seed")
    sampling = SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=max(top_k, 0),
        seed=seed,
        stop_token_ids=list(getattr(req, "stop_token_ids", None) or []),
        ignore_eos=bool(getattr(req, "ignore_eos", None)),
        min_tokens=min_tokens,
        **extra,
    )
    return sampling, plan


def _choices_and_penalties(req: Any, chat: bool, stream: bool, max_n: int,
                           vocab_size: int) -> tuple[dict[str, Any], ChoicePlan]:
    """SamplingParams keyword arguments for n, best_of, logprobs, echo, penalties, logit_bias and
    min_p, and the response plan."""
    n = getattr(req, "n", None)
    n = 1 if n is None else n
    if not 1 <= n <= max_n:
        raise RequestError(400, f"n must be between 1 and {max_n}", param="n")
    plan = ChoicePlan(n=n, best_of=n)
    logprobs = getattr(req, "logprobs", None)
    if chat:
        top = getattr(req, "top_logprobs", None)
        if top is not None and not 0 <= top <= MAX_CHAT_TOP_LOGPROBS:
            raise RequestError(400, f"top_logprobs must be between 0 and {MAX_CHAT_TOP_LOGPROBS}",
                               param="top_logprobs")
        if logprobs not in (None, True, False):
            raise RequestError(400, "logprobs must be a boolean on chat completions", param="logprobs")
        if top and not logprobs:
            raise RequestError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
        if logprobs:
            plan.logprobs = top or 0
    else:
        if logprobs is not None and (isinstance(logprobs, bool) or not 0 <= logprobs <= MAX_COMPLETION_LOGPROBS):
            raise RequestError(400, f"logprobs must be an integer between 0 and {MAX_COMPLETION_LOGPROBS}",
                               param="logprobs")
        plan.logprobs = logprobs
        plan.echo = bool(getattr(req, "echo", None))
        best_of = getattr(req, "best_of", None)
        if best_of is not None:
            if not n <= best_of <= max_n:
                raise RequestError(400, f"best_of must be between n and {max_n}", param="best_of")
            if stream and best_of > n:
                raise RequestError(400, "best_of greater than n cannot be streamed", param="best_of")
            plan.best_of = best_of
    for name, lo, hi in (("presence_penalty", -2.0, 2.0), ("frequency_penalty", -2.0, 2.0)):
        v = getattr(req, name, None)
        if v is not None and not lo <= v <= hi:
            raise RequestError(400, f"{name} must be between {lo:g} and {hi:g}", param=name)
    rep = getattr(req, "repetition_penalty", None)
    if rep is not None and not 0 < rep <= 2:  # vLLM accepts (0, 2]
        raise RequestError(400, "repetition_penalty must be in (0, 2]", param="repetition_penalty")
    min_p = getattr(req, "min_p", None)
    if min_p is not None and not 0 <= min_p <= 1:
        raise RequestError(400, "min_p must be between 0 and 1", param="min_p")
    bias: dict[int, float] = {}
    for key, value in (getattr(req, "logit_bias", None) or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise RequestError(400, f"logit_bias keys must be token ids, got {key!r}", param="logit_bias") from None
        if not 0 <= token < vocab_size:
            raise RequestError(400, f"logit_bias token id {token} is not in the vocabulary [0, {vocab_size})",
                               param="logit_bias")
        if not -100 <= value <= 100:
            raise RequestError(400, f"logit_bias values must be between -100 and 100 (token {token})",
                               param="logit_bias")
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


# --- tokenizing off the event loop --------------------------------------------------------------


async def encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
    if len(text) < TOKENIZE_IN_THREAD_CHARS:
        return tokenizer.encode(text)
    return await anyio.to_thread.run_sync(lambda: tokenizer.encode(text, gil_free=True))


async def encode_chat(tokenizer: Tokenizer, messages: list[dict[str, Any]],
                      tools: list[dict[str, Any]] | None = None) -> list[int]:
    size = sum(len(str(m.get("content") or "")) for m in messages)
    if size < TOKENIZE_IN_THREAD_CHARS:
        return tokenizer.encode_chat(messages, tools=tools)
    return await anyio.to_thread.run_sync(lambda: tokenizer.encode_chat(messages, gil_free=True, tools=tools))

