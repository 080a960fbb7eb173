"""Structured outputs, tools and reasoning on the frontend: requests in, message shapes out.

In: ``response_format``, vLLM's ``structured_outputs`` and legacy ``guided_*`` fields become one
:class:`StructuredOutput` for the engine (xgrammar compiles it there, at admission; a spec it
cannot compile comes back as a 400 that :func:`name_structured_error` gives its ``param``).
``tools``/``tool_choice``/``parallel_tool_calls`` are checked here; ``required`` and a named
function are enforced the same way, with a JSON schema built from the functions' parameters, so
any model, even one with random weights, returns a valid call.

Out: :class:`ChatOutput` turns a choice's text, streamed or whole, into OpenAI's message or delta
shapes: ``reasoning_content`` (``--reasoning-parser``), ``content`` and ``tool_calls`` (a forced
call read directly, otherwise the model family's tool-call parser), with finish_reason
``"tool_calls"`` when the choice made calls.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import msgspec

from services.frontend.openai_api import RequestError
from services.frontend.reasoning import ReasoningStream
from services.frontend.tool_parsers import ToolCall, ToolCallStream, ToolParser, call_deltas
from shared.messages import StructuredOutput

# Marks engine errors about the constraint (shared.engines.structured / the engines' admission).
ENGINE_ERROR_MARK = "invalid structured output"


def _json_text(value: Any, param: str) -> str:
    """A JSON schema given as an object or as JSON text, as compact JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise RequestError(400, f"{param} is not valid JSON: {e}", param=param) from None
    if not isinstance(value, dict | bool):
        raise RequestError(400, f"{param} must be a JSON schema object", param=param)
    return json.dumps(value, separators=(",", ":"))


def _choice(value: Any, param: str) -> StructuredOutput:
    if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
        raise RequestError(400, f"{param} must be a non-empty list of strings", param=param)
    return StructuredOutput(kind="choice", spec=json.dumps(value))


def _text(value: Any, param: str) -> str:
    if not isinstance(value, str) or not value:
        raise RequestError(400, f"{param} must be a non-empty string", param=param)
    return value


def _from_response_format(rf: dict[str, Any]) -> StructuredOutput | None:
    kind = rf.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput(kind="json_object")
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise RequestError(400, "response_format.json_schema must be an object with a schema",
                           param="response_format.json_schema")
        if js.get("schema") is None:  # OpenAI allows a schema-less json_schema: any object
            return StructuredOutput(kind="json_object")
        return StructuredOutput(kind="json_schema", spec=_json_text(js["schema"], "response_format.json_schema.schema"))
    raise RequestError(400, f"response_format type {kind!r} is not supported (text, json_object, json_schema)",
                   param="response_format.type")


def _from_structured_outputs(so: dict[str, Any]) -> StructuredOutput | None:
    given = {k: v for k, v in so.items() if v is not None and v is not False}
    unknown = set(given) - {"json", "regex", "choice", "grammar", "json_object"}
    if unknown:
        raise RequestError(400, f"structured_outputs.{sorted(unknown)[0]} is not supported (json, regex, choice, grammar, "
                       "json_object)", param=f"structured_outputs.{sorted(unknown)[0]}")
    if len(given) > 1:
        raise RequestError(400, "structured_outputs takes exactly one of json, regex, choice, grammar, json_object",
                       param="structured_outputs")
    if not given:
        return None
    (key, value), = given.items()
    param = f"structured_outputs.{key}"
    if key == "json":
        return StructuredOutput(kind="json_schema", spec=_json_text(value, param))
    if key == "json_object":
        return StructuredOutput(kind="json_object")
    if key == "choice":
        return _choice(value, param)
    return StructuredOutput(kind="regex" if key == "regex" else "grammar", spec=_text(value, param))


def _plain(value: Any) -> Any:
    """A request struct (openai_api.py) as the plain JSON it was sent as, unset fields left out."""
    if isinstance(value, msgspec.Struct):
        return {f: _plain(v) for f in value.__struct_fields__ if (v := getattr(value, f)) is not None}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def structured_from(req: Any) -> tuple[StructuredOutput | None, str | None]:
    """The request's output constraint and the field it came from (for errors), or (None, None)."""
    found: list[tuple[StructuredOutput, str]] = []
    rf = getattr(req, "response_format", None)
    if rf is not None:
        so = _from_response_format(_plain(rf))
        if so is not None:
            found.append((so, "response_format"))
    if getattr(req, "structured_outputs", None) is not None:
        so = _from_structured_outputs(_plain(req.structured_outputs))
        if so is not None:
            found.append((so, "structured_outputs"))
    if getattr(req, "guided_json", None) is not None:
        found.append((StructuredOutput(kind="json_schema", spec=_json_text(req.guided_json, "guided_json")),
                      "guided_json"))
    if getattr(req, "guided_regex", None) is not None:
        found.append((StructuredOutput(kind="regex", spec=_text(req.guided_regex, "guided_regex")), "guided_regex"))
    if getattr(req, "guided_choice", None) is not None:
        found.append((_choice(req.guided_choice, "guided_choice"), "guided_choice"))
    if getattr(req, "guided_grammar", None) is not None:
        found.append((StructuredOutput(kind="grammar", spec=_text(req.guided_grammar, "guided_grammar")),
                      "guided_grammar"))
    if len(found) > 1:
        raise RequestError(400, f"{found[0][1]} and {found[1][1]} both constrain the output; send one",
                       param=found[1][1])
    return found[0] if found else (None, None)


def name_structured_error(e: RequestError, param: str | None) -> RequestError:
    """An engine's "invalid structured output" 400 names the request field it came from."""
    if e.status == 400 and e.param is None and param and ENGINE_ERROR_MARK in e.message:
        e.param = param
    return e


# --- tools ---------------------------------------------------------------------------------


@dataclass
class ToolPlan:
    """What a chat request's tools mean for generation and for its output."""

    tools: list[dict[str, Any]] | None = None  # for the chat template
    mode: str = "none"  # none | auto | required | named
    function: str = ""  # named mode: the function forced
    parallel: bool = True
    structured: StructuredOutput | None = None  # required/named: the call's JSON schema


def _parameters(fn: dict[str, Any]) -> dict[str, Any]:
    params = fn.get("parameters")
    return params if isinstance(params, dict) else {"type": "object", "properties": {}}


def plan_tools(tools: list[Any] | None, tool_choice: Any, parallel_tool_calls: bool | None,
               parser: ToolParser | None) -> ToolPlan:
    """Check tools and tool_choice and decide how calls are made and read; every refusal names its param."""
    parallel = parallel_tool_calls is not False
    tools, tool_choice = _plain(tools), _plain(tool_choice)
    functions: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools or []):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise RequestError(400, "only tools of type 'function' are supported", param=f"tools[{i}].type")
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RequestError(400, "a function tool needs function.name", param=f"tools[{i}].function.name")
        if "parameters" in fn and not isinstance(fn["parameters"], dict):
            raise RequestError(400, "function.parameters must be a JSON schema object",
                           param=f"tools[{i}].function.parameters")
        functions[fn["name"]] = fn
    choice = tool_choice
    if choice is None:
        choice = "auto" if functions else "none"
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise RequestError(400, f"tool_choice {choice!r} is not one of none, auto, required or a function",
                           param="tool_choice")
        mode, name = choice, ""
    elif (isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict)
          and isinstance(choice["function"].get("name"), str)):
        mode, name = "named", choice["function"]["name"]
    else:
        raise RequestError(400, "tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": "
                       "{\"name\": ...}}", param="tool_choice")
    if mode != "none" and not functions:
        raise RequestError(400, f"tool_choice {mode!r} needs tools", param="tool_choice")
    plan = ToolPlan(tools=list(tools) if tools else None, mode=mode, function=name, parallel=parallel)
    if mode == "named":
        if name not in functions:
            raise RequestError(400, f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
        plan.structured = StructuredOutput(kind="json_schema", spec=json.dumps(_parameters(functions[name])))
    elif mode == "required":
        one = {"anyOf": [{"type": "object", "properties": {"name": {"const": n}, "arguments": _parameters(fn)},
                          "required": ["name", "arguments"], "additionalProperties": False}
                         for n, fn in functions.items()]}
        schema = {"type": "array", "items": one, "minItems": 1} if parallel else one
        plan.structured = StructuredOutput(kind="json_schema", spec=json.dumps(schema))
    elif mode == "auto" and parser is None:
        raise RequestError(400, "tool_choice 'auto' needs a tool-call parser for this model (start the frontend with "
                       "--tool-call-parser hermes|llama3_json|mistral)", param="tool_choice")
    return plan


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as chat templates expect them: assistant tool calls with arguments as objects (as
    vLLM passes them; templates print them with ``tojson``)."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if calls:
            fixed = []
            for c in calls:
                fn = dict(c.get("function") or {})
                args = fn.get("arguments")
                if isinstance(args, str):
                    try:
                        fn["arguments"] = json.loads(args) if args else {}
                    except ValueError:
                        pass  # leave it as text; the template prints what it gets
                fixed.append({**c, "function": fn})
            m = {**m, "tool_calls": fixed}
        out.append(m)
    return out


# --- output shaping ------------------------------------------------------------------------


@dataclass
class ChatOutput:
    """Turns one choice's text into chat deltas (streamed) or one message (not streamed)."""

    plan: ToolPlan
    parser: ToolParser | None = None
    reasoning_parser: str | None = None
    _reasoning: ReasoningStream | None = None
    _tools: ToolCallStream | None = None
    _forced: str = ""  # required/named: the whole reply, read at the end
    _named_started: bool = False
    _calls: list[ToolCall] = field(default_factory=list)
    _named_id: str = ""

    def __post_init__(self) -> None:
        if self.reasoning_parser and self.plan.mode not in ("named", "required"):
            self._reasoning = ReasoningStream(self.reasoning_parser)
        if self.plan.mode == "auto" and self.parser is not None:
            self._tools = ToolCallStream(self.parser)

    def feed(self, text: str) -> list[dict[str, Any]]:
        """Deltas for new text (possibly none while a tag or call is being read)."""
        if not text:
            return []
        mode = self.plan.mode
        if mode == "named":
            # The reply is the arguments: stream them as they come, after the call's header.
            out = []
            if not self._named_started:
                self._named_started = True
                self._calls = [ToolCall(self.plan.function, "")]
                c = self._calls[0]
                out.append({"tool_calls": [{"index": 0, "id": c.id, "type": "function",
                                            "function": {"name": c.name, "arguments": ""}}]})
            self._calls[0].arguments += text
            out.append({"tool_calls": [{"index": 0, "function": {"arguments": text}}]})
            return out
        if mode == "required":
            self._forced += text
            return []
        reasoning, content = (self._reasoning.feed(text) if self._reasoning else ("", text))
        return self._pieces(reasoning, content)

    def _pieces(self, reasoning: str, content: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if reasoning:
            out.append({"reasoning_content": reasoning})
        if content and self._tools is not None:
            content = self._tools.feed(content)
        if content:
            out.append({"content": content})
        return out

    def finish(self, finish_reason: str) -> tuple[list[dict[str, Any]], str]:
        """The last deltas and the finish_reason to report."""
        mode = self.plan.mode
        if mode == "named":
            if not self._calls:  # an empty reply (max_tokens hit at once): still a call, arguments empty
                return [], finish_reason
            return [], "tool_calls" if finish_reason == "stop" else finish_reason
        if mode == "required":
            calls = self._read_forced(self._forced)
            if calls is None:  # cut short (length): what was generated goes out as content
                return ([{"content": self._forced}] if self._forced else []), finish_reason
            self._calls = calls
            return call_deltas(calls), "tool_calls"
        out: list[dict[str, Any]] = []
        if self._reasoning is not None:
            reasoning, content = self._reasoning.finish()
            out += self._pieces(reasoning, content)
        if self._tools is not None:
            rest = self._tools.finish()
            if rest:
                out.append({"content": rest})
            if self._tools.calls:
                calls = self._tools.calls if self.plan.parallel else self._tools.calls[:1]
                self._calls = calls
                out += call_deltas(calls)
                return out, "tool_calls" if finish_reason == "stop" else finish_reason
        return out, finish_reason

    def _read_forced(self, text: str) -> list[ToolCall] | None:
        try:
            obj = json.loads(text)
        except ValueError:
            return None
        items = obj if isinstance(obj, list) else [obj]
        calls = []
        for it in items:
            if not isinstance(it, dict) or not isinstance(it.get("name"), str):
                return None
            calls.append(ToolCall(it["name"], json.dumps(it.get("arguments", {}), ensure_ascii=False)))
        return calls

    def message(self, text: str, finish_reason: str) -> tuple[dict[str, Any], str]:
        """The whole reply as a chat message (not streamed)."""
        deltas = self.feed(text)
        last, finish = self.finish(finish_reason)
        msg: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
        content = "".join(d.get("content", "") for d in deltas + last)
        reasoning = "".join(d.get("reasoning_content", "") for d in deltas + last)
        if content or not self._calls:
            msg["content"] = content
        if reasoning or self._reasoning is not None:
            msg["reasoning_content"] = reasoning or None
        if self._calls:
            msg["tool_calls"] = [c.to_openai() for c in self._calls]
        return msg, finish
