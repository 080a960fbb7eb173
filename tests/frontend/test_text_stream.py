"""Units of the text stream: tokens to the caller's text, however the worker chunked them.

A byte-level fake tokenizer (token i is the byte i) makes a multi-byte character span several
tokens, as byte-level BPE vocabularies do; the real baton-tiny tokenizer checks the same on
real merges.
"""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from services.frontend.request import TextOptions
from services.frontend.text_stream import Delta, ReplyText, TextStream, coalesce
from shared.messages import GenerateError, TokenChunk
from shared.models import resolve_model
from shared.tokenizer import IncrementalDetokenizer, Tokenizer


class ByteTokenizer:
    """Token i is byte i; text is the bytes decoded as UTF-8 (broken characters as U+FFFD)."""

    vocab_size = 256

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def detokenizer(self, skip_special_tokens: bool = True) -> Any:
        return IncrementalDetokenizer(self, skip_special_tokens=skip_special_tokens)  # type: ignore[arg-type]


def ids(text: str) -> list[int]:
    return list(text.encode())


def cut(tokens: list[int], cuts: list[int]) -> list[list[int]]:
    points = sorted({c % (len(tokens) + 1) for c in cuts} | {0, len(tokens)})
    return [tokens[a:b] for a, b in itertools.pairwise(points)]


def stream_text(tokenizer: Any, chunks: list[list[int]], options: TextOptions) -> tuple[list[str], bool]:
    """The texts a TextStream emits for these chunks (the last one finishing the choice)."""
    ts = TextStream(tokenizer, options)
    out: list[str] = []
    for i, c in enumerate(chunks):
        text, stopped = ts.push(c, last=i == len(chunks) - 1)
        out.append(text)
        if stopped:
            return out, True
    return out, False


def test_a_character_split_over_tokens_comes_out_whole() -> None:
    # "é" is 2 bytes, "€" 3, "😀" 4: each token is one byte, so every character spans tokens.
    text = "aé€😀b"
    texts, _ = stream_text(ByteTokenizer(), [[t] for t in ids(text)], TextOptions())
    assert "".join(texts) == text
    assert all("\ufffd" not in t for t in texts)  # never half a character
    assert texts[:3] == ["a", "", "é"]  # held until its second byte arrived


def test_an_unfinished_character_is_flushed_at_the_end() -> None:
    texts, _ = stream_text(ByteTokenizer(), [ids("a"), ids("€")[:2]], TextOptions())
    assert "".join(texts) == "a\ufffd"  # what the model said, as best it decodes


@given(st.text(alphabet="ab€c😀", max_size=12), st.lists(st.integers(0, 60), max_size=6))
@settings(max_examples=200, deadline=None)
def test_chunking_never_changes_the_text(text: str, cuts: list[int]) -> None:
    tokens = ids(text)
    texts, _ = stream_text(ByteTokenizer(), cut(tokens, cuts) or [[]], TextOptions())
    assert "".join(texts) == text


@given(st.text(alphabet="abcé", max_size=20), st.lists(st.integers(0, 60), max_size=6), st.booleans())
@settings(max_examples=300, deadline=None)
def test_stop_strings_across_chunk_boundaries(text: str, cuts: list[int], include: bool) -> None:
    stops = ["bc", "éa"]
    tokens = ids(text)
    texts, stopped = stream_text(ByteTokenizer(), cut(tokens, cuts) or [[]], TextOptions(stops, include))
    # Expected: the text up to the first stop string to complete (with it, when included).
    ends = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
    if ends:
        end, start, _ = min(ends)
        assert stopped
        assert "".join(texts) == text[: end if include else start]
    else:
        assert not stopped and "".join(texts) == text


def test_text_that_may_start_a_stop_string_is_held_back() -> None:
    ts = TextStream(ByteTokenizer(), TextOptions(["END"]))
    assert ts.push(ids("abcE"), last=False) == ("ab", False)  # the last len("END") - 1 characters wait
    assert ts.push(ids("N"), last=False) == ("c", False)
    assert ts.push(ids("Dxyz"), last=False) == ("", True)


def test_held_back_text_goes_out_when_the_choice_ends() -> None:
    ts = TextStream(ByteTokenizer(), TextOptions(["END"]))
    assert ts.push(ids("abEN"), last=False) == ("ab", False)
    assert ts.push([], last=True) == ("EN", False)


def test_real_tokenizer_detokenizes_multibyte_text_token_by_token() -> None:
    tok = Tokenizer(resolve_model("baton-tiny").path)
    text = "naïve café: 3€ 😀 ok"
    tokens = tok.encode(text, add_special_tokens=False)
    texts, _ = stream_text(tok, [[t] for t in tokens], TextOptions())
    assert "".join(texts) == tok.decode(tokens)
    assert all("\ufffd" not in t for t in texts)


def chunk(tokens: list[int], finish: str | None = None, choice: int = 0) -> TokenChunk:
    return TokenChunk(request_id="r", index=0, token_ids=tokens, finish_reason=finish, choice=choice)


def test_reply_text_cuts_each_choice_at_its_own_stop_and_drops_its_tail() -> None:
    reply = ReplyText(ByteTokenizer(), TextOptions(["x"]), n=2)
    d0 = reply.feed(chunk(ids("ax"), choice=0), "w")
    assert d0 == Delta("a", ids("ax"), "stop", None, "w", 0)
    assert reply.done == [True, False] and not reply.all_done
    assert reply.feed(chunk(ids("more"), choice=0), "w") is None  # the worker's tail of a cut choice
    d1 = reply.feed(chunk(ids("bb"), "length", choice=1), "w")
    assert d1 is not None and (d1.text, d1.finish_reason) == ("bb", "length")
    assert reply.all_done and reply.completion_tokens == 4


def test_reply_text_ignores_unknown_choices_and_empty_chunks() -> None:
    reply = ReplyText(ByteTokenizer(), TextOptions(), n=1)
    assert reply.feed(chunk([1], choice=3), "w") is None
    assert reply.feed(chunk([]), "w") is None
    assert not reply.any_tokens


def test_coalesce_joins_runs_of_one_choice_and_stops_at_an_error() -> None:
    err = GenerateError(request_id="r", code=500, message="boom")
    merged = coalesce([chunk([1]), chunk([2]), chunk([3], choice=1), chunk([4], "stop", choice=1), err, chunk([5])])
    assert [(c.choice, c.token_ids, c.finish_reason) for c in merged[:2]] == [(0, [1, 2], None), (1, [3, 4], "stop")]
    assert merged[2] is err and len(merged) == 3
