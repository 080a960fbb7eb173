"""Structured outputs and tools end to end: the official OpenAI SDK against a real stack (nats-server,
router, torch decode worker, frontend) serving the random-weight baton-tiny. Whatever the weights,
the output must follow the schema: that is the grammar's doing."""

from __future__ import annotations

import json

import pytest

from tests.conftest import e2e_engine
from tests.procs import Stack

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(e2e_engine() != "torch", reason="structured outputs need the torch engine (the mocker refuses)"),
]

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0, "maximum": 99},
                   "member": {"type": "boolean"}},
    "required": ["name", "age", "member"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {"type": "object", "properties": {"tz": {"enum": ["utc", "cet"]}}, "required": ["tz"],
        "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "The time", "parameters": TIME}},
]
PARAMS = {"get_weather": WEATHER, "get_time": TIME}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", timeout=120, max_retries=0)


def test_json_schema_output_validates(client: openai.OpenAI) -> None:
    for seed in (1, 2):
        r = client.chat.completions.create(
            model="baton-tiny", messages=[{"role": "user", "content": "A person as JSON"}], max_tokens=300, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
        choice = r.choices[0]
        assert choice.finish_reason == "stop", choice  # the grammar completed and ended the choice itself
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    # vLLM's fields, on completions too
    r = client.completions.create(model="baton-tiny", prompt="Yes or no?", max_tokens=20,
                                  extra_body={"guided_choice": ["yes", "no"]})
    assert r.choices[0].text in ("yes", "no") and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model="baton-tiny", prompt="A code:", max_tokens=20,
                                  extra_body={"structured_outputs": {"regex": "[A-F]{2}[0-9]{3}"}})
    assert len(r.choices[0].text) == 5 and r.choices[0].text[:2].isupper() and r.choices[0].text[2:].isdigit()


def _check_calls(calls, names: set[str]) -> None:
    assert calls
    for c in calls:
        assert c.type == "function" and c.id and c.function.name in names
        jsonschema.validate(json.loads(c.function.arguments), PARAMS[c.function.name])


def test_forced_tool_calls(client: openai.OpenAI) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model="baton-tiny", messages=USER, tools=TOOLS, tool_choice=named,
                                       max_tokens=300, seed=3)
    assert r.choices[0].finish_reason == "tool_calls", r
    _check_calls(r.choices[0].message.tool_calls, {"get_weather"})
    r = client.chat.completions.create(model="baton-tiny", messages=USER, tools=TOOLS, tool_choice="required",
                                       parallel_tool_calls=False, max_tokens=300, seed=4)
    assert r.choices[0].finish_reason == "tool_calls", r
    assert len(r.choices[0].message.tool_calls) == 1
    _check_calls(r.choices[0].message.tool_calls, {"get_weather", "get_time"})

    # parallel calls allowed: an array of one or more calls
    r = client.chat.completions.create(model="baton-tiny", messages=USER, tools=TOOLS, tool_choice="required",
                                       max_tokens=800, temperature=0)
    assert r.choices[0].finish_reason == "tool_calls", r
    _check_calls(r.choices[0].message.tool_calls, {"get_weather", "get_time"})

    for choice, names in ((named, {"get_weather"}), ("required", {"get_weather", "get_time"})):
        stream = client.chat.completions.create(model="baton-tiny", messages=USER, tools=TOOLS, tool_choice=choice,
                                                parallel_tool_calls=False, max_tokens=400, seed=5, stream=True)
        calls: dict[int, dict] = {}
        finish = None
        for chunk in stream:
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            for tc in delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
                if tc.id:
                    assert entry["id"] is None and tc.type == "function"  # the header comes once, first
                    entry["id"], entry["name"] = tc.id, tc.function.name
                entry["arguments"] += tc.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
        assert finish == "tool_calls" and calls
        for entry in calls.values():
            assert entry["id"] and entry["name"] in names
            jsonschema.validate(json.loads(entry["arguments"]), PARAMS[entry["name"]])


def test_two_turn_tool_conversation(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model="baton-tiny", messages=USER, tools=TOOLS, max_tokens=300, seed=6,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = first.choices[0].message.tool_calls[0]
    history = [*USER, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}]
    second = client.chat.completions.create(model="baton-tiny", messages=history, tools=TOOLS, tool_choice="none",
                                            max_tokens=5, temperature=0)
    assert second.choices[0].message.tool_calls is None and isinstance(second.choices[0].message.content, str)
    # The call and the tool's answer went into the template: the prompt grew by at least their text.
    plain = client.chat.completions.create(model="baton-tiny", messages=USER, tools=TOOLS, tool_choice="none",
                                           max_tokens=1)
    no_tools = client.chat.completions.create(model="baton-tiny", messages=USER, max_tokens=1)
    assert plain.usage.prompt_tokens > no_tools.usage.prompt_tokens + 20  # the tools' signatures
    assert second.usage.prompt_tokens > plain.usage.prompt_tokens + 10


def test_bad_structured_requests_are_400s_naming_the_field(client: openai.OpenAI) -> None:
    cases = [
        (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}),
         "response_format"),
        (dict(extra_body={"guided_regex": "(("}), "guided_regex"),
        (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nowhere"}}), "tool_choice"),
        (dict(tool_choice="required"), "tool_choice"),
        (dict(tools=[{"type": "custom", "custom": {"name": "x"}}]), "tools[0].type"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="baton-tiny", messages=USER, max_tokens=5, **kwargs)
        assert e.value.status_code == 400 and e.value.body["param"] == param, (kwargs, e.value.body)
    # and the stack is unharmed
    assert client.chat.completions.create(model="baton-tiny", messages=USER, max_tokens=3).choices[0].message
