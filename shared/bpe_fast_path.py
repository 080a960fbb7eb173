"""A faster prompt encoder for byte-level BPE tokenizers (GPT-2, Llama 3, Qwen 2 and their kin).

The HF ``tokenizers`` pipeline pays for alignment tracking on every character (its normalized
strings), whether or not offsets are asked for: about 0.3-0.45 µs a token on this project's CPUs,
20 µs for a one-line prompt. For ASCII text a byte-level BPE tokenizer needs much less:

1. split out the added tokens (``<|im_start|>``, ...), as the tokenizer's added vocabulary does:
   first the ones matched on the raw text, then those matched on normalized text (the same text
   here: every Unicode normal form leaves ASCII as it is), leftmost-longest;
2. split each stretch between them with the pre-tokenizer's regex (``re`` in ASCII mode, where
   ``\\p{L}``/``\\p{N}`` are the ASCII letters and digits and ``\\s`` is what Oniguruma's is there);
3. map each piece through the BPE model once and remember it: text repeats its words.

Anything else (non-ASCII text, another pre-tokenizer or normalizer, truncation, BPE dropout, added
tokens that strip or match whole words) is left to the HF pipeline: :meth:`ByteLevelFastPath.for_tokenizer`
returns None, or :meth:`encode` hands that text to HF. Before it is used, the fast path is checked
against HF on a fixed set of probe texts and dropped on any difference, so a tokenizer shape this
module reads wrongly costs speed, never different token ids.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Callable
from itertools import chain
from typing import Any

from tokenizers import Tokenizer as HfTokenizer

log = logging.getLogger("baton.tokenizer")

# The pattern HF's ByteLevel pre-tokenizer splits with when ``use_regex`` is on.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_NORMAL_FORMS = {"NFC", "NFD", "NFKC", "NFKD"}  # identity on ASCII
# The piece cache is filled by whatever text clients send, so it is bounded by what it holds:
# pieces longer than this (a run of dashes, say) are encoded each time, not kept, and the cache
# starts over once it holds this many ids (a few tens of MB at most).
MAX_CACHED_PIECE = 32
MAX_CACHED_IDS = 1 << 19


def _byte_alphabet() -> dict[int, str]:
    """The byte-level alphabet: each byte as the printable character BPE vocabularies spell it with."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


_BYTE_CHARS = _byte_alphabet()


def ascii_regex(pattern: str) -> re.Pattern[str] | None:
    """An Oniguruma pre-tokenizer pattern as a ``re`` pattern with the same matches on ASCII text,
    or None when it uses a class this translation does not know."""
    letters, digits = "A-Za-z", "0-9"
    out: list[str] = []
    i, in_class = 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            if pattern.startswith(("\\p{L}", "\\p{N}"), i):
                chars = letters if pattern[i + 3] == "L" else digits
                out.append(chars if in_class else f"[{chars}]")
                i += 5
                continue
            if pattern[i + 1] in "pPXRK":  # another Unicode class or an Oniguruma-only escape
                return None
            out.append(pattern[i:i + 2])
            i += 2
            continue
        if c == "[":
            if in_class:
                return None  # nested classes: not Python syntax
            in_class = True
        elif c == "]" and in_class:
            in_class = False
        out.append(c)
        i += 1
    try:
        return re.compile("".join(out), re.ASCII)
    except re.error:
        return None


def _split_pattern(config: dict[str, Any]) -> str | None:
    """The regex a supported pre-tokenizer splits with: ByteLevel with its own regex, or one
    isolating Split followed by a ByteLevel that only maps bytes."""
    pre = config.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel":
        return GPT2_PATTERN if pre.get("use_regex", True) and not pre.get("add_prefix_space") else None
    if pre.get("type") != "Sequence":
        return None
    steps = pre.get("pretokenizers") or []
    if len(steps) != 2:
        return None
    split, byte_level = steps
    if (split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert")
            or "Regex" not in (split.get("pattern") or {})):
        return None
    if byte_level.get("type") != "ByteLevel" or byte_level.get("use_regex", True) or byte_level.get("add_prefix_space"):
        return None
    return split["pattern"]["Regex"]


def _special_ids(config: dict[str, Any]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The ids a single sequence gets before and after it with ``add_special_tokens``."""
    post = config.get("post_processor")
    steps = [] if post is None else post.get("processors", []) if post.get("type") == "Sequence" else [post]
    prefix: list[int] = []
    suffix: list[int] = []
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel":
            continue  # offsets only
        if kind != "TemplateProcessing" or prefix or suffix:
            return None
        seen_sequence = False
        for item in step.get("single") or []:
            if "Sequence" in item:
                if seen_sequence or item["Sequence"].get("id") != "A":
                    return None
                seen_sequence = True
            elif "SpecialToken" in item:
                ids = (step.get("special_tokens") or {}).get(item["SpecialToken"]["id"], {}).get("ids")
                if not ids:
                    return None
                (suffix if seen_sequence else prefix).extend(int(i) for i in ids)
            else:
                return None
        if not seen_sequence:
            return None
    return tuple(prefix), tuple(suffix)


def _added_splitter(tokens: list[dict[str, Any]], normalized: bool) -> re.Pattern[str] | None:
    contents = sorted({t["content"] for t in tokens if bool(t.get("normalized")) == normalized and t["content"]},
                      key=len, reverse=True)  # longest first: leftmost-longest, as the added vocabulary matches
    # one capturing group: re.split keeps each match between the stretches
    return re.compile("(" + "|".join(map(re.escape, contents)) + ")") if contents else None


class _PieceIds(dict[str, tuple[int, ...]]):
    """Piece -> its BPE ids, filled on first sight (bounded by ids held; long pieces are not kept)."""

    def __init__(self, tokenize: Callable[[str], list[Any]]) -> None:
        super().__init__()
        self._tokenize = tokenize
        self.num_ids = 0  # ids held, over every piece

    def __missing__(self, piece: str) -> tuple[int, ...]:
        ids = tuple(t.id for t in self._tokenize(piece.encode().decode("latin-1").translate(_BYTE_CHARS)))
        if len(piece) <= MAX_CACHED_PIECE:
            if self.num_ids + len(ids) > MAX_CACHED_IDS:
                self.clear()
                self.num_ids = 0
            self[piece] = ids
            self.num_ids += len(ids)
        return ids


class ByteLevelFastPath:
    """Encodes ASCII text for one byte-level BPE tokenizer, with the ids HF's pipeline gives."""

    def __init__(self, hf: HfTokenizer, pattern: re.Pattern[str], special: tuple[tuple[int, ...], tuple[int, ...]],
                 added: list[dict[str, Any]]) -> None:
        self._hf = hf
        self._findall = pattern.findall
        self._prefix, self._suffix = special
        self._raw_added = _added_splitter(added, normalized=False)
        self._normalized_added = _added_splitter(added, normalized=True)
        self._added_ids = {t["content"]: int(t["id"]) for t in added}
        self._added_starts = "".join(sorted({t["content"][0] for t in added if t["content"]}))
        self._pieces = _PieceIds(hf.model.tokenize)

    @classmethod
    def for_tokenizer(cls, hf: HfTokenizer, tokenizer_json: str) -> ByteLevelFastPath | None:
        """The fast path for this tokenizer, or None when its shape is not one this module reads
        or the probe texts disagree with HF."""
        config = json.loads(tokenizer_json)
        model = config.get("model") or {}
        normalizer = config.get("normalizer")
        normal_ok = normalizer is None or normalizer.get("type") in _NORMAL_FORMS or (
            normalizer.get("type") == "Sequence"
            and all(n.get("type") in _NORMAL_FORMS for n in normalizer.get("normalizers") or []))
        added = config.get("added_tokens") or []
        if (model.get("type") != "BPE" or model.get("dropout") not in (None, 0, 0.0) or not normal_ok
                or hf.truncation is not None or hf.padding is not None
                or getattr(hf, "encode_special_tokens", False)
                or any(t.get("single_word") or t.get("lstrip") or t.get("rstrip") for t in added)):
            return None
        source = _split_pattern(config)
        pattern = ascii_regex(source) if source is not None else None
        special = _special_ids(config)
        if pattern is None or special is None:
            return None
        fast = cls(hf, pattern, special, added)
        problem = fast.differs_from_hf(probe_texts([t["content"] for t in added]))
        if problem is not None:
            log.warning("tokenizer fast path off: it gives other ids than the tokenizers library for %r", problem)
            return None
        return fast

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not text.isascii():
            return self._hf.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids
        ids = list(self._prefix) if add_special_tokens else []
        if any(c in text for c in self._added_starts):  # (a C-speed scan) an added token may be in it
            self._extend_split(ids, text, self._raw_added, self._normalized_added)
        else:
            self._extend(ids, text)
        if add_special_tokens:
            ids.extend(self._suffix)
        return ids

    def _extend(self, ids: list[int], segment: str) -> None:
        """``ids`` plus the ids of a stretch of ASCII text with no added token in it."""
        pieces = self._findall(segment)
        if sum(map(len, pieces)) != len(segment):  # the regex left characters out: HF keeps them
            ids += self._hf.encode_batch_fast([segment], add_special_tokens=False)[0].ids
        else:
            ids.extend(chain.from_iterable(map(self._pieces.__getitem__, pieces)))

    def _extend_split(self, ids: list[int], text: str, splitter: re.Pattern[str] | None,
                      then: re.Pattern[str] | None) -> None:
        """``ids`` plus those of ``text`` with the added tokens ``splitter`` finds split out, and
        each stretch between them split by ``then`` (the normalized added tokens) before its
        pieces: the added vocabulary's two passes."""
        if splitter is None:
            if then is None:
                self._extend(ids, text)
            else:
                self._extend_split(ids, text, then, None)
            return
        for i, part in enumerate(splitter.split(text)):  # stretch, token, stretch, ...
            if i % 2:
                ids.append(self._added_ids[part])
            elif part:
                if then is None:
                    self._extend(ids, part)
                else:
                    self._extend_split(ids, part, then, None)

    def differs_from_hf(self, texts: list[str]) -> str | None:
        """The first text this path encodes otherwise than HF (either ``add_special_tokens``), or None."""
        for text in texts:
            for specials in (True, False):
                if self.encode(text, specials) != self._hf.encode(text, add_special_tokens=specials).ids:
                    return text
        return None


def probe_texts(added: list[str], count: int = 400, seed: int = 19) -> list[str]:
    """Fixed ASCII texts that exercise a pre-tokenizer's regex: every kind of whitespace run,
    contractions, digit runs, punctuation, control characters and the added tokens among them."""
    rng = random.Random(seed)
    atoms = [*"abcXYZ019", " ", "  ", "\t", "\n", "\r\n", "\x0b", "\x0c", "\x1c", "\x00", "\x7f", "'", "'s", "'LL",
             "'ve", "'D", ".", ",", "!?", "-", "_", "...", "12345", "hello", " world", "The", "don't", "x1y2",
             "\n\n", "   \n", " \t ", "$", "(", "])", "#", "@", "`", "~", "^"]
    texts = ["", " ", "Hello world", "The quick brown fox jumps over the lazy dog.", "  leading and trailing  ",
             "line one\nline two\r\n\tindented", "I'm sure it's what we'd've said, isn't it?", "1234567 89 0.5",
             "def f(x):\n    return x ** 2  # square\n"]
    pool = atoms + added
    for _ in range(count):
        texts.append("".join(rng.choice(pool if rng.random() < 0.15 else atoms) for _ in range(rng.randint(1, 24))))
    return texts
