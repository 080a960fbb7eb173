"""Structured outputs: xgrammar grammars turned into token bitmasks over the batch's logits.

A :class:`GrammarBackend` is built once per engine from the model's tokenizer directory (the
``tokenizers`` library, no transformers) and the model's vocab size, which may exceed the
tokenizer's: the extra logits columns are never allowed. Compiled grammars are cached (LRU by
``(kind, spec)``); compiling a big schema takes milliseconds to seconds, so engines compile at
admission in a worker thread, never on the step loop.

Per request the engine keeps a :class:`Matcher` in the sampler state (``state.grammar``). Each step
the sampling pipeline calls :func:`apply_bitmasks` on the logits before sampling and
:meth:`Matcher.accept_token` after. A matcher that terminated (the grammar is complete and a stop
token was taken) or that cannot go on (a token it rejects: the grammar can no longer be satisfied)
reports :meth:`Matcher.is_terminated`, and the scheduler ends the choice with ``"stop"``.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from shared.messages import StructuredOutput

log = logging.getLogger(__name__)


class StructuredOutputError(ValueError):
    """The constraint cannot be compiled (bad schema, regex or grammar): a client error."""


_XGRAMMAR_PREFIX = re.compile(r"\[[\d:]+\] \S+?:\d+: ")


def _reason(e: Exception) -> str:
    """xgrammar's message without its C++ log prefix ("[01:34:49] /project/cpp/x.cc:83: ")."""
    return _XGRAMMAR_PREFIX.sub("", str(e)).strip()


def _xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError as e:  # pragma: no cover - xgrammar ships with the torch extra
        raise RuntimeError("structured outputs need xgrammar (pip install 'baton[torch]')") from e
    return xgrammar


# OpenAI's JSON mode promises an object, not any JSON value.
JSON_OBJECT_SCHEMA = '{"type": "object"}'


def choice_grammar(choices: Sequence[str]) -> str:
    """EBNF accepting exactly one of ``choices`` (JSON string escapes are valid EBNF escapes)."""
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


def parse_choices(spec: str) -> list[str]:
    try:
        choices = json.loads(spec)
    except ValueError as e:
        raise StructuredOutputError(f"choice must be a JSON list of strings: {e}") from None
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise StructuredOutputError("choice must be a non-empty list of strings")
    return choices


def json_schema_text(spec: str) -> str:
    try:
        schema = json.loads(spec)
    except ValueError as e:
        raise StructuredOutputError(f"the JSON schema is not valid JSON: {e}") from None
    if not isinstance(schema, dict | bool):
        raise StructuredOutputError("a JSON schema must be an object")
    return json.dumps(_bounded_strings_without_control_chars(schema))


def _bounded_strings_without_control_chars(node: Any) -> Any:
    """Work around xgrammar 0.2.8: a string with minLength/maxLength (and no pattern) compiles to
    ``[^"\\\r\n]{m,n}``, which lets raw control characters (invalid JSON) through. Such strings get an
    equivalent pattern over characters JSON allows unescaped."""
    if isinstance(node, list):
        return [_bounded_strings_without_control_chars(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _bounded_strings_without_control_chars(v) for k, v in node.items()}
    if (out.get("type") == "string" and ("minLength" in out or "maxLength" in out)
            and not {"pattern", "format", "enum", "const"} & out.keys()):
        lo = int(out.pop("minLength", 0))
        hi = out.pop("maxLength", None)
        bound = "" if hi is None else str(int(hi))
        out["pattern"] = r'^[^"\\\x00-\x1f]{' + f"{lo},{bound}" + "}$"
    return out


def check_spec(so: StructuredOutput) -> None:
    """Validate ``so`` without a tokenizer (cheap: no vocabulary pass). Raises StructuredOutputError.

    The frontend calls this where xgrammar is installed, so a bad schema is a 400 naming its
    field before anything is routed; engines compile (and so check) again at admission."""
    xg = _xgrammar()
    try:
        if so.kind == "json_schema":
            xg.Grammar.from_json_schema(json_schema_text(so.spec), any_whitespace=False)
        elif so.kind == "regex":
            xg.Grammar.from_regex(so.spec)
        elif so.kind == "choice":
            xg.Grammar.from_ebnf(choice_grammar(parse_choices(so.spec)))
        elif so.kind == "grammar":
            xg.Grammar.from_ebnf(so.spec)
    except StructuredOutputError:
        raise
    except Exception as e:  # xgrammar raises RuntimeError/ValueError/InvalidJSONError with the reason
        raise StructuredOutputError(f"cannot compile the {so.kind.replace('_', ' ')}: {_reason(e)}") from None


def tokenizer_info(model_dir: str | Path, vocab_size: int, stop_token_ids: Sequence[int]) -> Any:
    """xgrammar's view of the tokenizer in ``model_dir`` (tokenizer.json), padded to ``vocab_size``."""
    from tokenizers import Tokenizer as HfTokenizer

    xg = _xgrammar()
    tok = HfTokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    size = tok.get_vocab_size(with_added_tokens=True)
    vocab = [""] * max(size, 0)
    for text, tid in tok.get_vocab(with_added_tokens=True).items():
        if 0 <= tid < size:
            vocab[tid] = text
    # Same detection xgrammar's from_huggingface does (byte-level, byte-fallback or raw vocab), on
    # the serialized tokenizer, so the frontend's light dependencies suffice.
    meta = xg.TokenizerInfo._detect_metadata_from_hf(tok.to_str())
    return xg.TokenizerInfo(
        vocab,
        vocab_type=meta["vocab_type"],
        vocab_size=max(vocab_size, size),
        stop_token_ids=list(stop_token_ids) or None,
        add_prefix_space=meta["add_prefix_space"],
    )


class GrammarBackend:
    """Compiles StructuredOutputs for one model and makes matchers; thread-safe."""

    def __init__(self, info: Any, *, cache_size: int = 256, max_threads: int = 2) -> None:
        xg = _xgrammar()
        self.info = info
        self.vocab_size: int = info.vocab_size
        self._compiler = xg.GrammarCompiler(info, max_threads=max_threads, cache_enabled=False)
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.compiles = 0  # cache misses, for tests and metrics

    @classmethod
    def for_model(cls, model_dir: str | Path, vocab_size: int, stop_token_ids: Sequence[int]) -> GrammarBackend:
        return cls(tokenizer_info(model_dir, vocab_size, stop_token_ids))

    def compile(self, so: StructuredOutput) -> Any:
        """The compiled grammar for ``so`` (cached). Raises StructuredOutputError."""
        key = (so.kind, so.spec)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        compiled = self._compile(so)
        with self._lock:
            self.compiles += 1
            self._cache[key] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, so: StructuredOutput) -> Any:
        c = self._compiler
        try:
            if so.kind == "json_schema":
                # Compact JSON (no free whitespace): a weak or random model cannot pad forever.
                return c.compile_json_schema(json_schema_text(so.spec), any_whitespace=False)
            if so.kind == "json_object":
                return c.compile_json_schema(JSON_OBJECT_SCHEMA, any_whitespace=False)
            if so.kind == "regex":
                return c.compile_regex(so.spec)
            if so.kind == "choice":
                return c.compile_grammar(choice_grammar(parse_choices(so.spec)))
            if so.kind == "grammar":
                return c.compile_grammar(so.spec)
        except StructuredOutputError:
            raise
        except Exception as e:
            raise StructuredOutputError(f"cannot compile the {so.kind.replace('_', ' ')}: {_reason(e)}") from None
        raise StructuredOutputError(f"unknown structured output kind {so.kind!r}")

    def matcher(self, compiled: Any) -> Matcher:
        return Matcher(compiled)


class Matcher:
    """One request's position in its grammar."""

    __slots__ = ("_compiled", "_m", "failed")

    def __init__(self, compiled: Any) -> None:
        self._compiled = compiled
        self._m = _xgrammar().GrammarMatcher(compiled)
        self.failed = False  # a token the grammar rejects: it can no longer be satisfied

    def fresh(self) -> Matcher:
        """A matcher at the grammar's start: for another choice (n > 1) of the same request."""
        return Matcher(self._compiled)

    def accept_token(self, token_id: int) -> bool:
        if self.failed or self._m.is_terminated():
            return False
        ok = bool(self._m.accept_token(token_id))
        if not ok:
            self.failed = True
        return ok

    def is_terminated(self) -> bool:
        return self.failed or self._m.is_terminated()

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self._m.fill_next_token_bitmask(bitmask, row)


def apply_bitmasks(logits: torch.Tensor, matchers: Sequence[Matcher | None]) -> None:
    """Mask, in place, the tokens each row's grammar forbids; rows without a matcher are untouched.

    One bitmask for the constrained rows, filled row by row (xgrammar's C++), applied in one call.
    The mask spans the logits' whole width, so ids past the tokenizer's vocab are forbidden too.
    A row whose grammar allows nothing (it failed) keeps one finite logit, so sampling still
    returns a token (which the matcher then rejects, ending the choice) instead of NaNs."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return
    xg = _xgrammar()
    width = logits.shape[-1]
    bitmask = xg.allocate_token_bitmask(logits.shape[0], width)  # all ones: everything allowed
    for i in rows:
        m = matchers[i]
        assert m is not None
        if m.is_terminated():
            bitmask[i].zero_()
        else:
            m.fill(bitmask, i)
    xg.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=width, indices=rows)
    # Rows whose grammar allows nothing (checked on the small bitmask, not the logits).
    dead = [rows[j] for j in (bitmask[rows] == 0).all(dim=-1).nonzero().flatten().tolist()]
    for i in dead:
        logits[i, 0] = 0.0
