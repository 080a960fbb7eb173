"""Structured outputs in the torch engine: xgrammar bitmasks over a random-weight model's logits.

The built-in model's weights are random, so any valid output is the grammar's doing."""

from __future__ import annotations

import json

import anyio
import pytest

torch = pytest.importorskip("torch")
xgrammar = pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

from shared.builtin_model import ensure_builtin  # noqa: E402
from shared.engines.structured import (  # noqa: E402
    GrammarBackend,
    StructuredOutputError,
    apply_bitmasks,
    check_spec,
)
from shared.messages import SamplingParams, StructuredOutput  # noqa: E402
from shared.tokenizer import Tokenizer  # noqa: E402
from tests.engine.test_torch_engine import Running, collect  # noqa: E402

pytestmark = pytest.mark.anyio

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(ensure_builtin("baton-tiny"))


def test_bitmask_covers_logits_wider_than_the_tokenizer(tokenizer: Tokenizer) -> None:
    width = tokenizer.vocab_size + 64  # models pad their vocab; padded ids are never allowed
    backend = GrammarBackend.for_model(tokenizer.model_dir, width, tokenizer.eos_token_ids)
    m = backend.matcher(backend.compile(StructuredOutput(kind="choice", spec='["yes", "no"]')))
    logits = torch.zeros(3, width)
    logits[1, tokenizer.vocab_size:] = 100.0  # the padding would win if it were not masked
    apply_bitmasks(logits, [None, m, None])
    assert torch.isfinite(logits[0]).all() and torch.isfinite(logits[2]).all()  # rows without a grammar
    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    assert allowed and all(t < tokenizer.vocab_size for t in allowed)
    assert all(tokenizer.decode([t]) and ("yes".startswith(tokenizer.decode([t])) or
                                          "no".startswith(tokenizer.decode([t]))) for t in allowed)
    # a token the grammar rejects ends it: the row then allows exactly one token, never NaNs
    (z,) = tokenizer.encode("z", add_special_tokens=False)
    assert not m.is_terminated() and not m.accept_token(z) and m.is_terminated()
    logits = torch.zeros(1, width)
    apply_bitmasks(logits, [m])
    assert torch.isfinite(logits[0]).sum() == 1


def test_compile_cache_and_errors(tokenizer: Tokenizer) -> None:
    backend = GrammarBackend.for_model(tokenizer.model_dir, tokenizer.vocab_size, tokenizer.eos_token_ids)
    so = StructuredOutput(kind="json_schema", spec=json.dumps(SCHEMA))
    assert backend.compile(so) is backend.compile(StructuredOutput(kind="json_schema", spec=json.dumps(SCHEMA)))
    assert backend.compiles == 1
    for bad in (StructuredOutput(kind="json_schema", spec="{"), StructuredOutput(kind="json_schema", spec='{"type": 3}'),
                StructuredOutput(kind="regex", spec="(("), StructuredOutput(kind="grammar", spec="root ::= nowhere"),
                StructuredOutput(kind="choice", spec="[]")):
        with pytest.raises(StructuredOutputError):
            check_spec(bad)
        with pytest.raises(StructuredOutputError):
            backend.compile(bad)


async def test_engine_json_schema_finishes_by_itself(tokenizer: Tokenizer) -> None:
    so = StructuredOutput(kind="json_schema", spec=json.dumps(SCHEMA))
    prompt = tokenizer.encode("Give me a person as JSON:")
    async with Running(model="baton-tiny", num_blocks=256) as engine:
        results: list[tuple[list[int], str | None]] = []

        async def one(seed: int, temperature: float) -> None:
            sp = SamplingParams(max_tokens=200, temperature=temperature, seed=seed, structured=so)
            tokens, last = await collect(engine.generate(f"r{seed}-{temperature}", prompt, sp))
            results.append((tokens, last.finish_reason))

        async def plain() -> None:  # an unconstrained neighbour in the same batch stays unconstrained
            tokens, last = await collect(engine.generate("plain", prompt, SamplingParams(max_tokens=30, ignore_eos=True)))
            assert last.finish_reason == "length" and len(tokens) == 30

        async with anyio.create_task_group() as tg:
            tg.start_soon(plain)
            for seed in range(4):
                tg.start_soon(one, seed, 1.0)
            tg.start_soon(one, 0, 0.0)
    assert len(results) == 5
    for tokens, finish in results:
        assert finish == "stop", (finish, tokenizer.decode(tokens))
        jsonschema.validate(json.loads(tokenizer.decode(tokens)), SCHEMA)


async def test_engine_bad_grammar_is_a_request_error_and_choice_ends(tokenizer: Tokenizer) -> None:
    prompt = tokenizer.encode("Pick:")
    async with Running(model="baton-tiny", num_blocks=64) as engine:
        _, last = await collect(engine.generate(
            "bad", prompt, SamplingParams(max_tokens=8, structured=StructuredOutput(kind="regex", spec="(("))))
        assert last.finish_reason == "error" and "regex" in (last.error or "")
        tokens, last = await collect(engine.generate(
            "choice", prompt, SamplingParams(max_tokens=50, ignore_eos=True,
                                             structured=StructuredOutput(kind="choice", spec='["red", "green"]'))))
        # ignore_eos cannot keep a finished grammar going: it ends with "stop"
        assert last.finish_reason == "stop" and tokenizer.decode(tokens) in ("red", "green")
        # max_tokens shorter than the grammar needs: "length", never a hang
        tokens, last = await collect(engine.generate(
            "short", prompt, SamplingParams(max_tokens=3, structured=StructuredOutput(kind="regex", spec="a{20}"))))
        assert last.finish_reason == "length" and tokenizer.decode(tokens) == "a" * len(tokenizer.decode(tokens))


async def test_every_choice_of_n_follows_the_grammar(tokenizer: Tokenizer) -> None:
    """n > 1: each forked choice starts its own matcher at the grammar's start (a shared or
    uncopied matcher would leave choices 1..n-1 unconstrained or mid-grammar)."""
    so = StructuredOutput(kind="json_schema", spec=json.dumps(SCHEMA))
    prompt = tokenizer.encode("Give me a person as JSON:")
    async with Running(model="baton-tiny", num_blocks=256) as engine:
        by_choice: dict[int, list[int]] = {}
        finishes: dict[int, str | None] = {}
        async for out in engine.generate("n3", prompt, SamplingParams(max_tokens=200, temperature=1.0, seed=5, n=3,
                                                                     structured=so)):
            by_choice.setdefault(out.choice, []).extend(out.token_ids)
            if out.finish_reason is not None:
                finishes[out.choice] = out.finish_reason
    assert sorted(by_choice) == [0, 1, 2]
    for c, tokens in by_choice.items():
        assert finishes[c] == "stop", (c, tokenizer.decode(tokens))
        jsonschema.validate(json.loads(tokenizer.decode(tokens)), SCHEMA)
