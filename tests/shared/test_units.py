"""Unit tests of the contracts in shared/ (the frontend's are in tests/frontend/)."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import messages as m
from shared.builtin_model import build, directory_digest
from shared.kv_hash import ROOT_HASH, block_hashes, extend_hashes
from shared.models import resolve_model
from shared.routing.policy import RandomChoice, RoundRobin, make_policy
from shared.tokenizer import StopStringMatcher, Tokenizer


def test_block_hashes_are_chained_and_prefix_stable() -> None:
    a = list(range(100))
    b = list(range(64)) + [999] * 36
    ha, hb = block_hashes(a, 16), block_hashes(b, 16)
    assert len(ha) == 6  # only full blocks
    assert ha[:4] == hb[:4] and ha[4] != hb[4]
    # Chained: the same block content after a different prefix hashes differently.
    c = [7] * 16 + a[16:32]
    assert block_hashes(c, 16)[1] != ha[1]
    assert block_hashes(a, 16, parent=ROOT_HASH + 1)[0] != ha[0]
    assert all(0 <= h < 2**64 for h in ha)


@given(st.lists(st.integers(0, 50_000), max_size=200), st.integers(1, 32), st.integers(0, 200))
def test_extend_hashes_equals_full(tokens: list[int], block: int, cut: int) -> None:
    cut = min(cut, len(tokens))
    partial = block_hashes(tokens[:cut], block)
    assert extend_hashes(partial, tokens, block) == block_hashes(tokens, block)


@given(st.text(alphabet="abcxyz", max_size=60), st.lists(st.text(alphabet="abcxyz", min_size=1, max_size=4), max_size=3),
       st.lists(st.integers(1, 7), max_size=20))
@settings(max_examples=300)
def test_stop_matcher_emits_text_up_to_first_stop(text: str, stops: list[str], cuts: list[int]) -> None:
    pieces, i = [], 0
    for c in cuts:
        pieces.append(text[i : i + c])
        i += c
    pieces.append(text[i:])
    matcher = StopStringMatcher(stops)
    out, stopped = [], False
    for p in pieces:
        emitted, stopped = matcher.push(p)
        out.append(emitted)
        if stopped:
            break
    if not stopped:
        out.append(matcher.flush())
    # The stop that completes first wins (ties: the one starting first).
    ends = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
    expected = text[: min(ends)[1]] if ends else text
    assert "".join(out) == expected
    assert stopped == bool(ends)


def test_builtin_model_is_deterministic(tmp_path) -> None:
    a = build("baton-tiny", tmp_path / "a")
    b = build("baton-tiny", tmp_path / "b")
    assert directory_digest(a) == directory_digest(b)


def test_tokenizer_roundtrip_and_incremental_detok() -> None:
    tok = Tokenizer(resolve_model("baton-tiny").path)
    text = "Héllo wörld 🎉, the router sends tokens."
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    detok = tok.detokenizer()
    assert "".join(detok.add([i]) for i in ids) + detok.flush() == text
    chat = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert chat.count(tok.encode("", add_special_tokens=True)[0]) == 1  # exactly one BOS
    assert tok.eos_token_ids


def test_messages_roundtrip_tagged_unions() -> None:
    chunk = m.TokenChunk(request_id="r", index=3, token_ids=[1, 2], finish_reason="length",
                         usage=m.Usage(prompt_tokens=5, completion_tokens=5))
    err = m.GenerateError(request_id="r", code=400, message="bad")
    assert m.generate_reply_decoder.decode(m.encode(chunk)) == chunk
    assert m.generate_reply_decoder.decode(m.encode(err)) == err
    dec = m.RouteDecision(worker_id="w", subject="s", cancel_subject="c")
    assert m.route_reply_decoder.decode(m.encode(dec)) == dec
    with pytest.raises(msgspec.ValidationError):
        m.generate_request_decoder.decode(m.encode(chunk))  # a chunk is not a request


def test_policies() -> None:
    workers = [m.WorkerInfo(worker_id=f"w{i}", role="decode", model="x") for i in (2, 0, 1)]
    rr = RoundRobin()
    req = m.RouteRequest(request_id="r", model="x", token_ids=[1])
    assert [rr.choose_worker(req, workers)[0].worker_id for _ in range(6)] == ["w0", "w1", "w2"] * 2
    rnd = RandomChoice(seed=1)
    picks = {rnd.choose_worker(req, workers)[0].worker_id for _ in range(50)}
    assert picks == {"w0", "w1", "w2"}
    with pytest.raises(ValueError):
        make_policy("psychic")


def test_resolve_dtype_reads_the_checkpoint_for_auto(tmp_path: Path) -> None:
    import json

    from shared.models import resolve_dtype, resolve_model

    def checkpoint(name: str, cfg: dict[str, str]) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
        return d

    assert resolve_dtype("auto", checkpoint("v5", {"dtype": "bfloat16"})) == "bfloat16"  # transformers 5
    assert resolve_dtype("auto", checkpoint("v4", {"torch_dtype": "float32"})) == "float32"  # 4.x
    assert resolve_dtype("auto", checkpoint("none", {})) == "float32"
    half = checkpoint("half", {"torch_dtype": "float16"})
    assert resolve_dtype("auto", half) == "bfloat16"  # fp16 matmuls are slow on CPU
    assert resolve_dtype("auto", half, device="cuda") == "float16"
    assert resolve_dtype("bfloat16", half) == "bfloat16"  # explicit wins
    assert resolve_dtype("auto", resolve_model("baton-tiny").path) == "float32"
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int4", half)
