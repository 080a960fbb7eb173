"""OpenAI's own OpenAPI spec, fuzzed by schemathesis against a real frontend (mocker engine).

The spec is OpenAI's (tests/openapi/openai_cut.json, cut by tests/openapi/cut_spec.py; MIT licence
in tests/openapi/LICENSE-openai-openapi). Positive cases (valid per the spec) and negative cases
(invalid) go to POST /v1/chat/completions and /v1/completions, plus GET /v1/models. Required of
every answer: no 5xx, no hang (a bounded client timeout), an OpenAI error object on every error,
and every 200 body, streamed chunk by chunk too, valid against the spec's response schema.

Positive cases must be answered 200, with these documented exceptions, each checked to name its
cause in the error's ``param``:
  * a field the field table (openai_api.FIELDS) does not honour, set to something other than
    "off". The set of excused fields is read from the table, so a field that becomes honoured
    loses its excuse at once.
  * a top-level field the spec does not define (the generator may add extra properties; OpenAI
    itself refuses them as "unrecognized request argument").
  * content parts the text model cannot read (image_url, input_audio, file): ``messages[i].content[j]``.
  * limits the spec cannot know: the context length (code ``context_length_exceeded``), at most
    one prompt per request, token ids outside the model's vocabulary, a chat template that refuses
    the conversation, max_tokens=0 (valid in
    the spec only for echo).
  * structured outputs (a JSON schema, a forced tool call), which this stack's mocker engine cannot
    honour; the torch and vLLM engines do (tests/frontend/test_structured_e2e.py).
The ``model`` of every case is set to the served model (a wrong model is a 404, tested elsewhere).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import referencing
import referencing.jsonschema
import schemathesis  # the `test` extra: missing, this fails rather than skips
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from services.frontend.openai_api import ACCEPTED, FIELDS, HONOURED, Rule
from tests.procs import Stack, running

pytestmark = pytest.mark.timeout(240)

SPEC_PATH = Path(__file__).parents[1] / "openapi" / "openai_cut.json"
SPEC: dict[str, Any] = json.loads(SPEC_PATH.read_text())
EXAMPLES = int(os.environ.get("BATON_SCHEMATHESIS_EXAMPLES", "10"))  # per operation and mode
CLIENT_TIMEOUT = 30.0  # a hang fails the test

OPERATIONS = {"/chat/completions": "chat", "/completions": "completions"}


# --- the spec's response schemas as plain JSON Schema ------------------------------------------------


def _nullable_to_jsonschema(node: Any) -> Any:
    """The spec mixes OpenAPI 3.0's ``nullable: true`` into 3.1: make it JSON Schema's null."""
    if isinstance(node, dict):
        out = {k: _nullable_to_jsonschema(v) for k, v in node.items() if k != "nullable"}
        if node.get("nullable") is True:
            return {"anyOf": [out, {"type": "null"}]}
        return out
    if isinstance(node, list):
        return [_nullable_to_jsonschema(v) for v in node]
    return node


_DOC = _nullable_to_jsonschema(SPEC)
_REGISTRY = referencing.Registry().with_resource(
    "urn:openai", referencing.Resource.from_contents(_DOC, default_specification=referencing.jsonschema.DRAFT202012))


def _validator(component: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator({"$ref": f"urn:openai#/components/schemas/{component}"},
                                           registry=_REGISTRY)


RESPONSE_SCHEMA = {
    ("chat", False): _validator("CreateChatCompletionResponse"),
    ("chat", True): _validator("CreateChatCompletionStreamResponse"),
    ("completions", False): _validator("CreateCompletionResponse"),
    ("completions", True): _validator("CreateCompletionResponse"),  # the spec streams the same object
}


def _schema_errors(validator: jsonschema.Draft202012Validator, obj: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)][:5]


# --- the excused 400s of positive cases -------------------------------------------------------------


def refused_fields(endpoint: str) -> set[str]:
    """Fields the table does not honour today (read at test time: flips drop out by themselves)."""
    return {name for name, r in FIELDS.items() if r.on in (endpoint, "both") and r.status not in (HONOURED, ACCEPTED)}


def _spec_fields(endpoint: str) -> set[str]:
    name = "CreateChatCompletionRequest" if endpoint == "chat" else "CreateCompletionRequest"
    schemas = SPEC["components"]["schemas"]

    def props(n: str) -> set[str]:
        s = schemas[n]
        out: set[str] = set()
        for part in s.get("allOf", [s]):
            out |= props(part["$ref"].rsplit("/", 1)[1]) if "$ref" in part else set(part.get("properties", {}))
        return out

    return props(name)


def _message_fields(role: str) -> set[str]:
    """The properties the spec defines for a chat message of ``role``."""
    schema = SPEC["components"]["schemas"].get(f"ChatCompletionRequest{role.capitalize()}Message", {})
    return set(schema.get("properties", {}))


def excused(endpoint: str, body: dict[str, Any], err: dict[str, Any]) -> bool:
    param, code = err.get("param"), err.get("code")
    if code == "unsupported_parameter":
        return param in refused_fields(endpoint) and body.get(param) is not None
    if code == "unknown_parameter":
        return param in body and param not in _spec_fields(endpoint)
    if code == "unsupported_content":
        return isinstance(param, str) and param.startswith("messages[")
    if code == "context_length_exceeded":
        return True
    if param == "prompt" and ("batched prompts" in err.get("message", "") or "token ids must be in" in
                              err.get("message", "")):
        return True  # one prompt per request; token ids outside this model's vocabulary
    if param == "messages" and "template" in err.get("message", ""):
        return True
    if param == "max_tokens" and body.get("max_tokens") == 0:
        return True
    if "mocker engine cannot honour structured outputs" in err.get("message", ""):
        return param in ("response_format", "structured_outputs", "tool_choice") or str(param).startswith("guided_")
    if isinstance(param, str) and (field := re.fullmatch(r"messages\[(\d+)\]\.(\w+)", param)):
        # The spec leaves extra properties open, so a positive case may give a message a field its
        # role does not define (a tool message's `name`) with any type; Baton types that field for
        # every role.
        messages = body.get("messages") if isinstance(body, dict) else None
        i = int(field.group(1))
        message = messages[i] if isinstance(messages, list) and i < len(messages) else None
        role = message.get("role") if isinstance(message, dict) else None
        return isinstance(role, str) and field.group(2) not in _message_fields(role)
    if param == "logit_bias" and ("keys must be token ids" in err.get("message", "")
                                  or "not in the vocabulary" in err.get("message", "")):
        return True  # the spec's keys are "token IDs in the tokenizer": any string passes its schema
    return False


# --- the running frontend ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory):
    with running(Stack(tmp_path_factory.mktemp("schemathesis"), "mocker",
                       extra_decode_args=["--mocker-speedup", "1000"])) as s:
        yield s


def _call(stack: Stack, endpoint: str, body: Any) -> tuple[httpx.Response, list[Any]]:
    """POST the body; return the response and, when streamed, its decoded SSE events."""
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        r = httpx.post(f"{stack.url}{path}", content=content, headers={"content-type": "application/json"},
                       timeout=CLIENT_TIMEOUT)
    except httpx.TimeoutException:
        pytest.fail(f"hang: no answer within {CLIENT_TIMEOUT}s to {content[:500]!r}")
    events: list[Any] = []
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        for line in r.text.splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
        assert r.text.rstrip().endswith("data: [DONE]"), r.text[-300:]
    return r, events


def _check_error_shape(r: httpx.Response) -> dict[str, Any]:
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    return err


def _served(body: Any, stack: Stack) -> Any:
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        body = {**body, "model": stack.model}
    return body


def _fuzz(stack: Stack, spec_path: str, mode: GenerationMode) -> None:
    endpoint = OPERATIONS[spec_path]
    schema = schemathesis.openapi.from_dict(SPEC)
    strategy = schema[spec_path]["POST"].as_strategy(generation_mode=mode)
    seen: dict[int, int] = {}

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case: Any) -> None:
        body = _served(case.body, stack)
        r, events = _call(stack, endpoint, body)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, f"{r.status_code} for {json.dumps(body)[:800]}: {r.text[:500]}"
        if r.status_code != 200:
            err = _check_error_shape(r)
            if mode.is_positive:
                assert r.status_code == 400 and excused(endpoint, body, err), (
                    f"valid request refused: {r.status_code} {err} for {json.dumps(body)[:800]}")
            return
        if mode.is_positive is False:
            return  # a negative case the server could still serve (e.g. an unusual but usable value)
        stream = bool(isinstance(body, dict) and body.get("stream"))
        objs = events if stream else [r.json()]
        assert objs, "a 200 with nothing in it"
        for obj in objs:
            errors = _schema_errors(RESPONSE_SCHEMA[endpoint, stream], obj)
            assert not errors, f"response violates the spec: {errors} in {obj}"

    run()
    print(f"{spec_path} {mode.value}: statuses {seen}")
    if mode.is_positive:
        assert seen.get(200, 0) > 0, f"no positive case was served: {seen}"


@pytest.mark.parametrize("spec_path", list(OPERATIONS))
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"])
def test_openai_spec_fuzz(api: Stack, spec_path: str, mode: GenerationMode) -> None:
    _fuzz(api, spec_path, mode)


def test_models_matches_spec(api: Stack) -> None:
    r = httpx.get(f"{api.url}/v1/models", timeout=10)
    assert r.status_code == 200
    assert not _schema_errors(_validator("ListModelsResponse"), r.json())
    assert r.json()["data"][0]["max_model_len"] > 0


def test_excuses_follow_the_table() -> None:
    """Flipping a field to honoured removes its excuse: the positive fuzz then needs a 200."""
    assert "n" in refused_fields("chat") or FIELDS["n"].status == HONOURED
    flipped = dict(FIELDS)
    try:
        FIELDS["n"] = Rule(HONOURED, noop=(1,))
        assert "n" not in refused_fields("chat")
        assert not excused("chat", {"n": 2}, {"param": "n", "code": "unsupported_parameter"})
    finally:
        FIELDS.clear()
        FIELDS.update(flipped)
