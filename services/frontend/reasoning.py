"""Reasoning parser: splits a reasoning model's ``<think>…</think>`` from its answer.

``--reasoning-parser think`` (Qwen3 style) treats text as reasoning only inside ``<think>`` tags;
``deepseek_r1`` starts in reasoning, since its chat template writes the opening ``<think>`` into the
prompt, so the reply holds only the closing tag. Streamed, text that may be the start of a tag is
held back until the next delta shows whether it is one.
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"
PARSERS = ("think", "qwen3", "deepseek_r1")


def _tag_prefix_len(text: str, tag: str) -> int:
    """Length of the longest tail of ``text`` that begins ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningStream:
    """Feed text deltas; get (reasoning, content) pieces back."""

    def __init__(self, parser: str = "think") -> None:
        if parser not in PARSERS:
            raise ValueError(f"unknown reasoning parser {parser!r}; one of {list(PARSERS)}")
        self._in_reasoning = parser == "deepseek_r1"
        self._seen_any = False  # only a reply's start may open reasoning
        self._done = False  # after </think>, everything is content
        self._buf = ""
        self._strip_newlines = False  # just after a tag: its newlines are layout, not text

    def feed(self, text: str) -> tuple[str, str]:
        self._buf += text
        reasoning = content = ""
        while self._buf:
            if self._strip_newlines:
                self._buf = self._buf.lstrip("\n")
                if not self._buf:
                    break
                self._strip_newlines = False
            if self._done:
                content += self._buf
                self._buf = ""
                break
            if self._in_reasoning:
                i = self._buf.find(CLOSE)
                if i >= 0:
                    reasoning += self._buf[:i]
                    self._buf = self._buf[i + len(CLOSE):]
                    self._in_reasoning, self._done, self._strip_newlines = False, True, True
                    continue
                keep = _tag_prefix_len(self._buf, CLOSE)
                reasoning += self._buf[: len(self._buf) - keep]
                self._buf = self._buf[len(self._buf) - keep:]
                break
            # not yet in reasoning: only a leading <think> opens it
            head = self._buf.lstrip()
            if head.startswith(OPEN):
                self._buf = head[len(OPEN):]
                self._in_reasoning, self._strip_newlines = True, True
                continue
            if OPEN.startswith(head) and not self._seen_any:
                break  # could still become <think>: wait
            self._done = True
        self._seen_any = self._seen_any or bool(reasoning or content)
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        text, self._buf = self._buf, ""
        if self._in_reasoning:
            return text, ""
        return "", text


def split_reasoning(text: str, parser: str = "think") -> tuple[str | None, str]:
    """(reasoning_content or None, content) of a whole reply."""
    stream = ReasoningStream(parser)
    r1, c1 = stream.feed(text)
    r2, c2 = stream.finish()
    reasoning = r1 + r2
    return (reasoning if reasoning or text.lstrip().startswith(OPEN) or CLOSE in text else None), c1 + c2
