"""Units of request validation: every door (chat, completions, the NATS request API) gives one
ValidatedRequest through the same checks."""

from __future__ import annotations

import anyio
import msgspec
import pytest

from services.frontend.openai_api import (
    CompletionRequest,
    RequestError,
    chat_decoder,
    completion_decoder,
    completion_prompt,
    decode_request,
)
from services.frontend.request import (
    RequestLimits,
    ValidatedRequest,
    from_chat,
    from_completion,
    from_nats,
    sampling_and_plan,
)
from shared.messages import ApiGenerateRequest, ChatMessage, api_request_json_decoder
from shared.models import resolve_model
from shared.tokenizer import Tokenizer

LIMITS = RequestLimits(model="m", max_model_len=64)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(resolve_model("baton-tiny").path)


def test_openai_validation() -> None:
    req = decode_request(b'{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a"}]}]}',
                         chat_decoder)
    assert req.messages[0].content[0].text == "a"
    with pytest.raises(RequestError) as e:
        decode_request(b'{"model":"m","messages":[{"role":"user","content":"a"}],"temperature":"hot"}', chat_decoder)
    assert e.value.param == "temperature"
    c = CompletionRequest(model="m", prompt="x", max_tokens=5)
    assert sampling_and_plan(c, False, 5, 10, 100)[0].max_tokens == 5
    assert sampling_and_plan(c, False, None, 10, 100)[0].max_tokens == 90  # default: the rest of the context
    with pytest.raises(RequestError):
        sampling_and_plan(c, False, 95, 10, 100)
    with pytest.raises(RequestError):
        sampling_and_plan(c, False, 1, 100, 100)
    assert completion_prompt(decode_request(b'{"model":"m","prompt":[[1,2]]}', completion_decoder)) == [1, 2]


def nats(tok: Tokenizer, body: bytes) -> ValidatedRequest:
    return anyio.run(from_nats, api_request_json_decoder.decode(body), tok, LIMITS, "r")


def completion(tok: Tokenizer, body: bytes) -> ValidatedRequest:
    return anyio.run(from_completion, decode_request(body, completion_decoder), tok, LIMITS, "r")


def test_nats_and_http_give_the_same_request_for_the_same_knobs(tok: Tokenizer) -> None:
    knobs = b'"max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 3, "seed": 4, "stop": ["zz"], ' \
            b'"stop_token_ids": [5], "ignore_eos": true, "stream": false'
    a = nats(tok, b'{"prompt": "hello there", ' + knobs + b"}")
    b = completion(tok, b'{"model": "m", "prompt": "hello there", ' + knobs + b"}")
    assert a.token_ids == b.token_ids
    assert a.sampling == b.sampling
    assert a.text == b.text and a.text.stops == ["zz"]
    assert a.stream is False and a.plan == b.plan


def test_nats_messages_use_the_chat_template(tok: Tokenizer) -> None:
    req = ApiGenerateRequest(messages=[ChatMessage(role="user", content="hi")], max_tokens=4)
    out = anyio.run(from_nats, req, tok, LIMITS, "r")
    assert out.token_ids == tok.encode_chat([{"role": "user", "content": "hi"}])
    assert out.sampling.max_tokens == 4 and out.stream is True


@pytest.mark.parametrize(("body", "message"), [
    (b'{"prompt": "x", "token_ids": [1]}', "exactly one of prompt, messages, token_ids"),
    (b'{"messages": []}', "messages must not be empty"),
    (b'{"token_ids": [1, 999999]}', "token ids must be in"),
    (b'{"token_ids": []}', "the prompt is empty"),
    (b'{"prompt": "x", "model": "other"}', "does not exist"),
    (b'{"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', "at most 4 stop sequences"),
    (b'{"prompt": "x", "max_tokens": 500}', "maximum context length is 64"),
    (b'{"prompt": "x", "temperature": 3}', "temperature must be between"),
])
def test_nats_refusals_say_what_is_wrong(tok: Tokenizer, body: bytes, message: str) -> None:
    with pytest.raises(RequestError) as e:
        nats(tok, body)
    assert 400 <= e.value.status < 500 and message in e.value.message


@pytest.mark.parametrize("field", ["n", "logprobs", "echo"])
def test_nats_refuses_what_it_does_not_honour_by_name(field: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=f"unknown field `{field}`"):
        api_request_json_decoder.decode(b'{"prompt": "x", "%s": 2}' % field.encode())


def test_chat_request_carries_the_response_plan(tok: Tokenizer) -> None:
    body = (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 2, "logprobs": true, '
            b'"top_logprobs": 3, "stream": true, "stream_options": {"include_usage": true}, "stop": "q", '
            b'"include_stop_str_in_output": true, "skip_special_tokens": false, '
            b'"response_format": {"type": "json_object"}}')
    out = anyio.run(from_chat, decode_request(body, chat_decoder), tok, LIMITS, "r")
    assert (out.plan.n, out.plan.logprobs, out.sampling.n, out.sampling.logprobs) == (2, 3, 2, 3)
    assert out.stream and out.include_usage and out.chat
    assert (out.text.stops, out.text.include_stop_str, out.text.skip_special_tokens) == (["q"], True, False)
    assert out.sampling.structured is not None and out.structured_param == "response_format"
    assert out.tool_plan is not None and out.tool_plan.mode == "none"


def test_max_prompt_tokens_is_checked_for_http_and_nats(tok: Tokenizer) -> None:
    small = RequestLimits(model="m", max_model_len=64, max_prompt_tokens=2)
    with pytest.raises(RequestError) as e:
        anyio.run(from_nats, ApiGenerateRequest(token_ids=[1, 2, 3]), tok, small, "r")
    assert e.value.code == "prompt_too_long"
    with pytest.raises(RequestError) as e:
        anyio.run(from_completion, CompletionRequest(model="m", prompt=[1, 2, 3]), tok, small, "r")
    assert e.value.code == "prompt_too_long" and e.value.param == "prompt"
