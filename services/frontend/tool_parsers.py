"""Tool-call parsers: turn a model's text into OpenAI ``tool_calls``, per model family.

Each parser knows where a family's tool calls start (``markers``) and how to read them:
- ``hermes`` (Hermes, Qwen 2.5/3): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, repeated.
- ``llama3_json`` (Llama 3.1+): the whole reply is ``{"name": ..., "parameters": {...}}`` (optionally
  after ``<|python_tag|>``), several separated by ``;``.
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``. ``[TOOL_CALLS]`` is a
  special token the detokenizer drops, so a reply that *is* such a JSON array counts too.

Streaming (:class:`ToolCallStream`): text before a marker goes out as content at once, holding back
only what may be the start of a marker; from the marker on, the text is buffered and the calls are
sent when the choice ends, each as OpenAI's deltas (index, id, type and function.name, then
function.arguments). Text that turns out not to hold a valid call is sent as content.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            self.id = new_call_id()

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call_from(obj: Any, args_keys: tuple[str, ...] = ("arguments", "parameters")) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    for key in args_keys:
        if key in obj:
            args = obj[key]
            if isinstance(args, str):  # some models send the arguments as a JSON string already
                try:
                    json.loads(args)
                except ValueError:
                    return None
                return ToolCall(obj["name"], args)
            return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))
    return ToolCall(obj["name"], "{}")


class ToolParser:
    name = ""
    markers: tuple[str, ...] = ()

    def start(self, text: str) -> int:
        """Where tool calls start in ``text``, or -1."""
        found = [i for i in (text.find(m) for m in self.markers) if i >= 0]
        return min(found) if found else -1

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content, calls): content is the text that is not a call. No valid call: (text, [])."""
        raise NotImplementedError


class HermesParser(ToolParser):
    name = "hermes"
    markers = ("<tool_call>",)
    _CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        i = self.start(text)
        if i < 0:
            return text, []
        calls = []
        for m in self._CALL.finditer(text, i):
            try:
                call = _call_from(json.loads(m.group(1)))
            except ValueError:
                call = None
            if call is None:
                return text, []
            calls.append(call)
        return text[:i].rstrip(), calls


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    markers = ("<|python_tag|>", "{")

    def start(self, text: str) -> int:
        stripped = text.lstrip()
        if stripped.startswith(self.markers):
            return len(text) - len(stripped)
        return -1

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        i = self.start(text)
        if i < 0:
            return text, []
        body = text[i:].removeprefix("<|python_tag|>").strip()
        decoder = json.JSONDecoder()
        calls: list[ToolCall] = []
        pos = 0
        try:
            while pos < len(body):
                obj, end = decoder.raw_decode(body, pos)
                call = _call_from(obj, ("parameters", "arguments"))
                if call is None:
                    return text, []
                calls.append(call)
                pos = end
                while pos < len(body) and body[pos] in " \t\r\n;":
                    pos += 1
        except ValueError:
            return text, []
        return text[:i].rstrip(), calls


class MistralParser(ToolParser):
    name = "mistral"
    markers = ("[TOOL_CALLS]", "[{")

    def start(self, text: str) -> int:
        i = text.find("[TOOL_CALLS]")
        if i >= 0:
            return i
        stripped = text.lstrip()
        return len(text) - len(stripped) if stripped.startswith("[{") else -1

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        i = self.start(text)
        if i < 0:
            return text, []
        body = text[i:].removeprefix("[TOOL_CALLS]").strip()
        try:
            objs = json.loads(body)
        except ValueError:
            return text, []
        objs = objs if isinstance(objs, list) else [objs]
        calls = [_call_from(o) for o in objs]
        if not calls or any(c is None for c in calls):
            return text, []
        return text[:i].rstrip(), calls  # type: ignore[return-value]


PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser)}
ALIASES = {"qwen": "hermes", "qwen2_5": "hermes", "qwen3": "hermes", "llama3": "llama3_json", "llama": "llama3_json"}


def get_parser(name: str) -> ToolParser:
    key = ALIASES.get(name, name)
    if key not in PARSERS:
        raise ValueError(f"unknown tool-call parser {name!r}; one of {sorted(PARSERS)}")
    return PARSERS[key]()


def detect_parser(template: str | None) -> ToolParser | None:
    """The family's parser, judged from the chat template's text; None if it shows no tool format."""
    if not template:
        return None
    if "<tool_call>" in template:
        return HermesParser()
    if "[TOOL_CALLS]" in template:
        return MistralParser()
    if "<|python_tag|>" in template or ('"parameters"' in template and "ipython" in template):
        return Llama3JsonParser()
    return None


def read_chat_template(model_dir: str | Path) -> str | None:
    """The raw chat template text of a model directory (tokenizer_config.json or chat_template.jinja)."""
    d = Path(model_dir)
    cfg = d / "tokenizer_config.json"
    if cfg.exists():
        template = json.loads(cfg.read_text()).get("chat_template")
        if isinstance(template, list):
            template = " ".join(t.get("template", "") for t in template)
        if template:
            return str(template)
    if (d / "chat_template.jinja").exists():
        return (d / "chat_template.jinja").read_text()
    return None


def call_deltas(calls: list[ToolCall], first_index: int = 0) -> list[dict[str, Any]]:
    """OpenAI's streamed shape: per call, its header (id, type, name), then its arguments."""
    out: list[dict[str, Any]] = []
    for k, c in enumerate(calls, first_index):
        out.append({"tool_calls": [{"index": k, "id": c.id, "type": "function",
                                    "function": {"name": c.name, "arguments": ""}}]})
        out.append({"tool_calls": [{"index": k, "function": {"arguments": c.arguments}}]})
    return out


class ToolCallStream:
    """Streams content until a tool call starts, then buffers; calls go out at the end."""

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self._buf = ""
        self._in_call = False
        self._hold = max(len(m) for m in parser.markers) - 1
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> str:
        """Content safe to send now."""
        self._buf += text
        if self._in_call:
            return ""
        i = self.parser.start(self._buf)
        if i >= 0:
            self._in_call = True
            out, self._buf = self._buf[:i], self._buf[i:]
            return out
        if isinstance(self.parser, Llama3JsonParser | MistralParser):
            # These start at the beginning of the reply: hold back only what may begin a marker.
            head = self._buf.lstrip()
            if any(m.startswith(head) for m in self.parser.markers):
                return ""
            out, self._buf = self._buf, ""
            self._hold = 0
            self.parser = _NeverParser()
            return out
        # hold back a tail that may be the start of a marker
        keep = 0
        for m in self.parser.markers:
            for n in range(min(len(m) - 1, len(self._buf)), 0, -1):
                if self._buf.endswith(m[:n]):
                    keep = max(keep, n)
                    break
        out, self._buf = self._buf[: len(self._buf) - keep], self._buf[len(self._buf) - keep :]
        return out

    def finish(self) -> str:
        """At the end: remaining content (if the buffered text held no valid call); calls in .calls."""
        text, self._buf = self._buf, ""
        if not self._in_call:
            return text
        content, calls = self.parser.parse(text)
        if not calls:
            return text
        self.calls = calls
        return content


class _NeverParser(ToolParser):
    markers = ("\0",)

    def start(self, text: str) -> int:
        return -1


def tool_parser_for(setting: str, model_dir: str | Path) -> ToolParser | None:
    """``--tool-call-parser``: a parser name, ``auto`` (from the chat template) or ``none``."""
    if setting in ("", "none"):
        return None
    if setting == "auto":
        return detect_parser(read_chat_template(model_dir))
    return get_parser(setting)
