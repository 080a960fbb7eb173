"""Tokenizer, chat template and incremental detokenization from a model directory.

Uses the ``tokenizers`` library and a sandboxed Jinja chat template directly (no transformers),
so the frontend container stays small.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HfTokenizer

from shared.bpe_fast_path import ByteLevelFastPath


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # AddedToken serialised as a dict
        return value.get("content")
    return value


def eos_token_ids(model_dir: str | Path, token_to_id: Callable[[str], int | None] | None = None) -> tuple[int, ...]:
    """The model's end-of-sequence token ids: ``eos_token_id`` of generation_config.json, else of
    config.json, else tokenizer_config.json's ``eos_token`` looked up in the vocabulary. The one
    place they are read (the tokenizer, the torch engine and the vLLM adapter all ask here)."""
    d = Path(model_dir)
    for name in ("generation_config.json", "config.json"):
        p = d / name
        if p.exists():
            eos = json.loads(p.read_text()).get("eos_token_id")
            ids = [eos] if isinstance(eos, int) else [int(e) for e in eos] if isinstance(eos, list) else []
            if ids:
                return tuple(dict.fromkeys(ids))
    cfg = d / "tokenizer_config.json"
    token = _token_text(json.loads(cfg.read_text()).get("eos_token")) if cfg.exists() else None
    if token is None:
        return ()
    if token_to_id is None:
        if not (d / "tokenizer.json").exists():
            return ()
        try:
            token_to_id = HfTokenizer.from_file(str(d / "tokenizer.json")).token_to_id
        except Exception:  # a tokenizer.json this library cannot read: the configs were all we had
            return ()
    tid = token_to_id(token)
    return () if tid is None else (tid,)


class Tokenizer:
    def __init__(self, model_dir: str | Path) -> None:
        d = Path(model_dir)
        self.model_dir = d
        tokenizer_json = (d / "tokenizer.json").read_text()
        self._tok = HfTokenizer.from_str(tokenizer_json)
        # ASCII prompts of byte-level BPE tokenizers skip HF's per-character bookkeeping
        # (shared/bpe_fast_path.py); None: every prompt takes the HF pipeline.
        self._fast = ByteLevelFastPath.for_tokenizer(self._tok, tokenizer_json)
        cfg: dict[str, Any] = {}
        if (d / "tokenizer_config.json").exists():
            cfg = json.loads((d / "tokenizer_config.json").read_text())
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (d / "chat_template.jinja").exists():
            template = (d / "chat_template.jinja").read_text()
        self._template = compile_chat_template(template) if template else None
        self._special_tokens = {name: _token_text(cfg.get(name)) or "" for name in
                                ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
                                 "mask_token")}
        self.eos_token_ids = eos_token_ids(d, self._tok.token_to_id)
        self.vocab_size = self._tok.get_vocab_size()


    def encode(self, text: str, add_special_tokens: bool = True, gil_free: bool = False) -> list[int]:
        """``gil_free``: for a thread beside the event loop. The HF pipeline runs without the
        GIL; the fast path holds it, which on another thread would stall the loop for longer than
        running it on the loop itself."""
        if self._fast is not None and not gil_free:
            return self._fast.encode(text, add_special_tokens)
        # The batch "fast" encoder skips the character offsets (the ids are the same): about a
        # quarter less CPU per prompt. A batch of one runs serially unless TOKENIZERS_PARALLELISM
        # allows rayon, which the frontend turns off (services/frontend/service.py).
        return self._tok.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render as transformers' ``apply_chat_template(tokenize=False)`` does: the same Jinja
        environment and the same variables (special tokens, ``tools``/``documents`` when given)."""
        if self._template is None:
            raise ValueError("this model has no chat template; use /v1/completions")
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            **{k: v for k, v in kwargs.items() if v is not None}, **self._special_tokens,
        )

    def encode_chat(self, messages: list[dict[str, Any]], gil_free: bool = False, **kwargs: Any) -> list[int]:
        # The template writes BOS itself, so the tokenizer must not add another.
        return self.encode(self.apply_chat_template(messages, **kwargs), add_special_tokens=False, gil_free=gil_free)

    def detokenizer(self, skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, skip_special_tokens=skip_special_tokens)


def _raise_template_error(message: str) -> None:
    raise ValueError(f"chat template error: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # transformers' tojson, not Jinja's: no HTML escaping, non-ASCII kept (templates print tool
    # schemas with it, and the model was trained on that text).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def compile_chat_template(source: str) -> Any:
    """A chat template compiled in the environment transformers uses: sandboxed, trim_blocks and
    lstrip_blocks, loop controls (``{% break %}``/``{% continue %}``), ``raise_exception``,
    ``strftime_now`` and its ``tojson``; ``{% generation %}`` blocks render their body."""
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(Extension):
        # transformers' AssistantTracker marks assistant spans for training masks; we only render.
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            from jinja2 import nodes

            return nodes.Scope(body, lineno=lineno)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_template_error
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without re-decoding everything.

    Decodes a small window before the newest tokens and emits only text that is complete: a
    byte-level token may end inside a UTF-8 character, which decodes to U+FFFD until the next
    token finishes it.
    """

    __slots__ = ("_decode", "ids", "prefix_offset", "read_offset", "skip_special_tokens", "tokenizer")

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.skip_special_tokens = skip_special_tokens  # vLLM's request option: False keeps e.g. "</s>" in the text
        # The library's decode straight away (the windows are lists already); a stand-in tokenizer's own.
        raw = getattr(tokenizer, "_tok", None)
        self._decode = raw.decode if raw is not None else tokenizer.decode

    def _window(self, start: int, end: int | None = None) -> str:
        if start == end:  # an empty window (the first tokens): nothing to decode
            return ""
        return self._decode(self.ids[start:end], skip_special_tokens=self.skip_special_tokens)

    def add(self, new_ids: Sequence[int]) -> str:
        self.ids.extend(new_ids)
        prefix_text = self._window(self.prefix_offset, self.read_offset)
        full_text = self._window(self.prefix_offset)
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            delta = full_text[len(prefix_text) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is left at the end, incomplete characters included."""
        if self.read_offset == len(self.ids):  # every token's text is out already
            self.prefix_offset = self.read_offset
            return ""
        prefix_text = self._window(self.prefix_offset, self.read_offset)
        full_text = self._window(self.prefix_offset)
        self.prefix_offset = self.read_offset = len(self.ids)
        return full_text[len(prefix_text) :]


class StopStringMatcher:
    """Finds the first stop string in streamed text, holding back text that may start one.

    ``push(delta)`` returns ``(text_safe_to_emit, stopped)``; after a stop, the text up to (not
    including) the stop string has been emitted and the rest is dropped, as OpenAI does; with
    ``include_stop`` (vLLM's ``include_stop_str_in_output``) the stop string is emitted too.
    """

    def __init__(self, stops: Sequence[str], include_stop: bool = False) -> None:
        self.stops = [s for s in stops if s]
        self.include_stop = include_stop
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._buf = ""

    def push(self, delta: str) -> tuple[str, bool]:
        if not self.stops:
            return delta, False
        self._buf += delta
        # Generation stops when the first stop string *completes*, so pick the match that ends
        # first (ties: the one that starts first); the answer is then the same however the text
        # was chunked.
        best: tuple[int, int] | None = None
        for stop in self.stops:
            i = self._buf.find(stop)
            if i >= 0 and (best is None or (i + len(stop), i) < best):
                best = (i + len(stop), i)
        if best is not None:
            out, self._buf = self._buf[: best[0] if self.include_stop else best[1]], ""
            return out, True
        keep = min(self._hold, len(self._buf))
        out = self._buf[: len(self._buf) - keep]
        self._buf = self._buf[len(self._buf) - keep :]
        return out, False

    def flush(self) -> str:
        out, self._buf = self._buf, ""
        return out
