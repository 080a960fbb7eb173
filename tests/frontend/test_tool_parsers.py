"""Tool-call parsers, the reasoning parser and the chat output shaper, whole and streamed.

Streamed input is cut at every position (and one character at a time), so a tag or JSON split
across deltas is handled wherever it falls."""

from __future__ import annotations

import json

import pytest

from services.frontend.openai_api import RequestError
from services.frontend.reasoning import ReasoningStream, split_reasoning
from services.frontend.structured import ChatOutput, plan_tools, structured_from
from services.frontend.tool_parsers import (
    HermesParser,
    Llama3JsonParser,
    MistralParser,
    ToolCallStream,
    detect_parser,
    get_parser,
)

CASES = [
    (HermesParser(), 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
     '\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
     "Let me check.", [("get_weather", {"city": "Paris"}), ("get_time", {})]),
    (Llama3JsonParser(), '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}',
     "", [("get_weather", {"city": "Paris"}), ("get_time", {})]),
    (Llama3JsonParser(), '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}', "",
     [("get_weather", {"city": "Oslo"})]),
    (MistralParser(), '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome"}}]', "",
     [("get_weather", {"city": "Rome"})]),
    (MistralParser(), '[{"name": "get_time", "arguments": "{\\"tz\\": \\"utc\\"}"}]', "",  # marker dropped by detok
     [("get_time", {"tz": "utc"})]),
]
PLAIN = ["Just text, no calls.", "I'd use <tool_call> but it is {broken json</tool_call>", "", "[1, 2, 3]"]


def _calls(calls) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


def _stream(parser, text: str, cuts: list[int]) -> tuple[str, list]:
    s = ToolCallStream(parser)
    content = ""
    last = 0
    for c in [*cuts, len(text)]:
        content += s.feed(text[last:c])
        last = c
    content += s.finish()
    return content, s.calls


@pytest.mark.parametrize(("parser", "text", "content", "calls"), CASES, ids=lambda x: getattr(x, "name", None))
def test_parsers_whole_and_streamed(parser, text: str, content: str, calls) -> None:
    got_content, got_calls = parser.parse(text)
    assert got_content == content and _calls(got_calls) == calls
    assert all(c.id.startswith("call_") for c in got_calls) and len({c.id for c in got_calls}) == len(got_calls)
    for cut in range(len(text) + 1):
        streamed, streamed_calls = _stream(parser, text, [cut])
        assert streamed.strip() == content and _calls(streamed_calls) == calls, cut
    streamed, streamed_calls = _stream(parser, text, list(range(len(text))))
    assert streamed.strip() == content and _calls(streamed_calls) == calls


@pytest.mark.parametrize("text", PLAIN)
@pytest.mark.parametrize("name", ["hermes", "llama3_json", "mistral"])
def test_text_without_valid_calls_is_content(name: str, text: str) -> None:
    parser = get_parser(name)
    assert parser.parse(text) == (text, [])
    for cuts in ([len(text) // 2], list(range(len(text)))):
        assert _stream(parser, text, cuts) == (text, [])


def test_detect_from_template_and_names() -> None:
    assert detect_parser("{% for t in tools %}<tool_call>{% endfor %}").name == "hermes"
    assert detect_parser("[AVAILABLE_TOOLS] [TOOL_CALLS]").name == "mistral"
    assert detect_parser("<|python_tag|>{{ x }}").name == "llama3_json"
    assert detect_parser("{{ messages }}") is None and detect_parser(None) is None
    assert get_parser("qwen").name == "hermes"
    with pytest.raises(ValueError):
        get_parser("nope")


@pytest.mark.parametrize(("parser", "text", "reasoning", "content"), [
    ("think", "<think>\nWeigh it up.\n</think>\n\nThe answer is 4.", "Weigh it up.\n", "The answer is 4."),
    ("think", "The answer is 4.", None, "The answer is 4."),
    ("think", "No <think> here, mid-text.", None, "No <think> here, mid-text."),
    ("deepseek_r1", "Weigh it up.</think>The answer.", "Weigh it up.", "The answer."),
    ("deepseek_r1", "Still thinking when cut", "Still thinking when cut", ""),
    ("think", "<think>unfinished", "unfinished", ""),
])
def test_reasoning_whole_and_streamed(parser: str, text: str, reasoning: str | None, content: str) -> None:
    assert split_reasoning(text, parser) == (reasoning, content)
    for cuts in [[c] for c in range(len(text) + 1)] + [list(range(len(text)))]:
        s = ReasoningStream(parser)
        r = c = ""
        last = 0
        for cut in [*cuts, len(text)]:
            dr, dc = s.feed(text[last:cut])
            r, c, last = r + dr, c + dc, cut
        dr, dc = s.finish()
        assert (r + dr, c + dc) == (reasoning or "", content), cuts


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties":
                                                                        {"a": {"type": "integer"}}}}},
         {"type": "function", "function": {"name": "g"}}]


def test_plan_tools_modes_and_refusals() -> None:
    parser = HermesParser()
    assert plan_tools(None, None, None, None).mode == "none"
    assert plan_tools(TOOLS, None, None, parser).mode == "auto"
    named = plan_tools(TOOLS, {"type": "function", "function": {"name": "f"}}, None, None)
    assert named.mode == "named" and json.loads(named.structured.spec)["properties"] == {"a": {"type": "integer"}}
    single = json.loads(plan_tools(TOOLS, "required", False, None).structured.spec)
    assert [o["properties"]["name"]["const"] for o in single["anyOf"]] == ["f", "g"]
    many = json.loads(plan_tools(TOOLS, "required", True, None).structured.spec)
    assert many["type"] == "array" and many["minItems"] == 1
    for tools, choice, param in [
        (TOOLS, {"type": "function", "function": {"name": "h"}}, "tool_choice"),
        (None, "required", "tool_choice"),
        (TOOLS, "sometimes", "tool_choice"),
        (TOOLS, {"type": "allowed_tools"}, "tool_choice"),
        (TOOLS, "auto", "tool_choice"),  # no parser for this model
        ([{"type": "function", "function": {}}], "none", "tools[0].function.name"),
    ]:
        with pytest.raises(RequestError) as e:
            plan_tools(tools, choice, None, None)
        assert e.value.status == 400 and e.value.param == param


class _Req:
    def __init__(self, **kw) -> None:
        self.__dict__.update(kw)


def test_structured_fields_map_to_one_constraint() -> None:
    so, param = structured_from(_Req(response_format={"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}))
    assert (so.kind, param) == ("json_schema", "response_format")
    assert structured_from(_Req(response_format={"type": "json_object"}))[0].kind == "json_object"
    assert structured_from(_Req(response_format={"type": "text"})) == (None, None)
    assert structured_from(_Req(structured_outputs={"choice": ["a", "b"]}))[0].kind == "choice"
    assert structured_from(_Req(guided_json='{"type": "object"}'))[0].kind == "json_schema"
    assert structured_from(_Req(guided_regex="a+"))[0].spec == "a+"
    assert structured_from(_Req(guided_grammar='root ::= "x"'))[0].kind == "grammar"
    for req, param in [
        (_Req(guided_regex="a", guided_choice=["b"]), "guided_choice"),
        (_Req(structured_outputs={"json": "{", }), "structured_outputs.json"),
        (_Req(structured_outputs={"regex": "a", "choice": ["x"]}), "structured_outputs"),
        (_Req(guided_choice=[]), "guided_choice"),
        (_Req(response_format={"type": "yaml"}), "response_format.type"),
    ]:
        with pytest.raises(RequestError) as e:
            structured_from(req)
        assert e.value.param == param


def test_chat_output_shapes() -> None:
    # named: the reply is the arguments, streamed after the call's header
    out = ChatOutput(plan_tools(TOOLS, {"type": "function", "function": {"name": "f"}}, None, None))
    deltas = out.feed('{"a": ') + out.feed("1}")
    assert deltas[0]["tool_calls"][0]["function"] == {"name": "f", "arguments": ""}
    assert "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas) == '{"a": 1}'
    assert out.finish("stop") == ([], "tool_calls")
    # auto with reasoning: reasoning, content and calls separated; not streamed
    out = ChatOutput(plan_tools(TOOLS, "auto", None, HermesParser()), HermesParser(), "think")
    msg, finish = out.message('<think>hmm</think>Sure.<tool_call>{"name": "g", "arguments": {}}</tool_call>', "stop")
    assert finish == "tool_calls" and msg["reasoning_content"] == "hmm" and msg["content"] == "Sure."
    assert msg["tool_calls"][0]["function"] == {"name": "g", "arguments": "{}"}
    # parallel_tool_calls=false keeps the first call only
    out = ChatOutput(plan_tools(TOOLS, "auto", False, HermesParser()), HermesParser())
    msg, _ = out.message('<tool_call>{"name": "g", "arguments": {}}</tool_call><tool_call>{"name": "f", '
                         '"arguments": {}}</tool_call>', "stop")
    assert [c["function"]["name"] for c in msg["tool_calls"]] == ["g"] and msg["content"] is None
    # required, cut short by max_tokens: no invented call, the text comes back as content
    out = ChatOutput(plan_tools(TOOLS, "required", True, None))
    msg, finish = out.message('[{"name": "f", "argu', "length")
    assert finish == "length" and "tool_calls" not in msg and msg["content"] == '[{"name": "f", "argu'
