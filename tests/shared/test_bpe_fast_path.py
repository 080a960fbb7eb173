"""The byte-level BPE fast path (shared/bpe_fast_path.py) gives the ids HF's pipeline gives."""

from __future__ import annotations

import logging
import re
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Regex, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HfTokenizer
from tokenizers import models as tok_models

from shared import bpe_fast_path
from shared.bpe_fast_path import ByteLevelFastPath, ascii_regex, probe_texts
from shared.builtin_model import _corpus
from shared.models import resolve_model
from shared.tokenizer import Tokenizer

# Llama 3's pre-tokenizer split (a fact about that tokenizer, used as test data).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def _train(pre_tokenizer: object, normalizer: object = None, vocab_size: int = 700) -> HfTokenizer:
    tok = HfTokenizer(tok_models.BPE(ignore_merges=True))
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(n_sentences=800), trainer=trainer)
    return tok


@cache
def llama3_style() -> str:
    """A small tokenizer of Llama 3's shape: NFC, an isolating Split then a bytes-only ByteLevel,
    BOS by a TemplateProcessing inside a Sequence, and a normalized (non-special) added word."""
    tok = _train(pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                          pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
                 normalizers.NFC())
    bos = tok.token_to_id(SPECIALS[0])
    tok.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False),
                                              processors.TemplateProcessing(single=f"{SPECIALS[0]} $A",
                                                                            special_tokens=[(SPECIALS[0], bos)])])
    tok.add_tokens(["bazinga"])  # normalized: matched after the special tokens, on normalized text
    return tok.to_str()


@cache  # one per tokenizer: the probe check at construction takes a few tens of ms
def _fast(tokenizer_json: str) -> tuple[HfTokenizer, ByteLevelFastPath | None]:
    hf = HfTokenizer.from_str(tokenizer_json)
    return hf, ByteLevelFastPath.for_tokenizer(hf, tokenizer_json)


def _tiny_json() -> str:
    return (resolve_model("baton-tiny", None).path / "tokenizer.json").read_text()


ASCII = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=127), max_size=80)
WITH_ADDED = st.lists(st.one_of(ASCII, st.sampled_from([*SPECIALS, "<|im_start|>", "<|im_end|>", "bazinga", "<|"])),
                      max_size=6).map("".join)


@pytest.mark.parametrize("which", ["baton-tiny", "llama3-style"])
def test_supported_shapes_get_a_fast_path_that_matches_hf_on_the_probes(which: str) -> None:
    hf, fast = _fast(_tiny_json() if which == "baton-tiny" else llama3_style())
    assert fast is not None
    texts = probe_texts([*SPECIALS, "bazinga"], count=200, seed=7)
    for text in texts:
        for specials in (True, False):
            assert fast.encode(text, specials) == hf.encode(text, add_special_tokens=specials).ids, repr(text)


@pytest.mark.parametrize("which", ["baton-tiny", "llama3-style"])
@given(text=WITH_ADDED, specials=st.booleans())
@settings(max_examples=400, deadline=None)
def test_matches_hf_on_any_ascii_text(which: str, text: str, specials: bool) -> None:
    hf, fast = _fast(_tiny_json() if which == "baton-tiny" else llama3_style())
    assert fast is not None
    assert fast.encode(text, specials) == hf.encode(text, add_special_tokens=specials).ids


@given(st.text(max_size=40), st.booleans())
@settings(max_examples=200, deadline=None)
def test_non_ascii_text_is_left_to_hf(text: str, specials: bool) -> None:
    hf, fast = _fast(llama3_style())
    assert fast is not None
    assert fast.encode(text, specials) == hf.encode(text, add_special_tokens=specials).ids


def test_shapes_it_does_not_read_get_no_fast_path() -> None:
    # SentencePiece-style (Metaspace) pre-tokenizer
    meta = _train(pre_tokenizers.Metaspace())
    assert _fast(meta.to_str())[1] is None
    # ByteLevel that adds a prefix space
    assert _fast(_train(pre_tokenizers.ByteLevel(add_prefix_space=True)).to_str())[1] is None
    # a split pattern with a Unicode class the ASCII translation does not know
    upper = _train(pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\p{Lu}?\p{Ll}+|\s+|."), behavior="isolated"),
                                            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]))
    assert _fast(upper.to_str())[1] is None
    # an added token that strips the whitespace beside it
    hf = HfTokenizer.from_str(_tiny_json())
    from tokenizers import AddedToken
    hf.add_special_tokens([AddedToken("<mask>", lstrip=True)])
    assert _fast(hf.to_str())[1] is None
    # truncation configured in the file
    hf = HfTokenizer.from_str(_tiny_json())
    hf.enable_truncation(8)
    assert _fast(hf.to_str())[1] is None


def test_a_misread_shape_is_caught_by_the_probes(monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    # As if the translation got the pattern wrong: whitespace glued to the word before it.
    monkeypatch.setattr(bpe_fast_path, "ascii_regex", lambda _pattern: re.compile(r"\S+\s*|\s+"))
    with caplog.at_level(logging.WARNING, logger="baton.tokenizer"):
        assert ByteLevelFastPath.for_tokenizer(HfTokenizer.from_str(_tiny_json()), _tiny_json()) is None
    assert "fast path off" in caplog.text


def test_ascii_translation_of_unicode_classes() -> None:
    pat = ascii_regex(r" ?[^\s\p{L}\p{N}]+| ?\p{L}+|\p{N}{1,3}")
    assert pat is not None
    assert pat.findall("ab12345 !?x") == ["ab", "123", "45", " !?", "x"]
    assert ascii_regex(r"\p{Lu}+") is None
    assert ascii_regex(r"[[:alpha:]]") is None  # nested class syntax


def test_piece_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    hf = HfTokenizer.from_str(_tiny_json())
    fast = ByteLevelFastPath.for_tokenizer(hf, _tiny_json())
    assert fast is not None
    monkeypatch.setattr(bpe_fast_path, "MAX_CACHED_IDS", 6)
    fast._pieces.clear()
    fast._pieces.num_ids = 0
    text = "one two three four five six seven " + "-" * (bpe_fast_path.MAX_CACHED_PIECE + 10)
    assert fast.encode(text) == hf.encode(text).ids
    assert 0 < fast._pieces.num_ids <= 6
    assert fast._pieces.num_ids == sum(map(len, fast._pieces.values()))
    assert all(len(p) <= bpe_fast_path.MAX_CACHED_PIECE for p in fast._pieces)


def test_tokenizer_uses_it_and_the_gil_free_path_agrees() -> None:
    tok = Tokenizer(resolve_model("baton-tiny", None).path)
    assert tok._fast is not None
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What's 2+2? Say it twice."}]
    assert tok.encode_chat(messages) == tok.encode_chat(messages, gil_free=True)
    text = "Measure the overhead of every hop in the stack."
    assert tok.encode(text) == tok.encode(text, gil_free=True) == tok._tok.encode(text).ids
