"""Logits processors: each takes the step's logits ``[R, V]`` (fp32) and changes them in place.

Every function is batched: per-request parameters arrive as tensors with one entry per row (or
row lists for the sparse ones), and rows a processor does not apply to are left untouched.
Semantics follow vLLM's sampler:

* ``logit_bias``: ``logits[row, token] += bias`` (OpenAI: -100..100).
* ``min_tokens``: the stop ids (EOS included unless ``ignore_eos``) are set to -inf while a
  request has produced fewer than ``min_tokens`` tokens.
* repetition penalty (multiplicative, 1 = off) over tokens seen in the prompt *or* the output:
  a positive logit is divided by it, a negative one multiplied.
* presence / frequency penalties (additive) over *output* tokens only:
  ``logits -= presence * (count > 0) + frequency * count``.
* temperature divides; ``min_p`` drops tokens whose probability is below ``min_p`` times the
  top token's; ``top_k`` keeps the k most likely; ``top_p`` keeps the smallest head whose mass
  reaches p (the most likely token always stays).
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def apply_logit_bias(logits: torch.Tensor, rows: list[int], bias: list[dict[int, float]]) -> None:
    """Add each row's sparse bias (token id -> value), all rows in one scatter."""
    r_idx: list[int] = []
    t_idx: list[int] = []
    vals: list[float] = []
    for row, b in zip(rows, bias, strict=True):
        r_idx.extend([row] * len(b))
        t_idx.extend(b.keys())
        vals.extend(b.values())
    if r_idx:
        logits.index_put_((torch.tensor(r_idx), torch.tensor(t_idx)), torch.tensor(vals, dtype=logits.dtype),
                          accumulate=True)


def apply_bans(logits: torch.Tensor, rows: list[int], banned: list[list[int]]) -> None:
    """Set ``logits[row, t] = -inf`` for each row's banned tokens (min_tokens: its stop ids)."""
    r_idx: list[int] = []
    t_idx: list[int] = []
    for row, ids in zip(rows, banned, strict=True):
        r_idx.extend([row] * len(ids))
        t_idx.extend(ids)
    if r_idx:
        logits[torch.tensor(r_idx), torch.tensor(t_idx)] = NEG_INF


def token_counts(seqs: list[list[int]], vocab_size: int) -> torch.Tensor:
    """``[len(seqs), vocab]`` occurrence counts, built with one scatter over padded ids."""
    width = max((len(s) for s in seqs), default=0)
    counts = torch.zeros((len(seqs), vocab_size + 1), dtype=torch.float32)
    if width:
        # pad with an extra column (vocab_size) that is dropped afterwards
        ids = torch.full((len(seqs), width), vocab_size, dtype=torch.long)
        for i, s in enumerate(seqs):
            if s:
                ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    return counts[:, :vocab_size]


def apply_penalties(
    logits: torch.Tensor,
    rows: list[int],
    prompts: list[list[int]],
    outputs: list[list[int]],
    repetition: list[float],
    presence: list[float],
    frequency: list[float],
) -> None:
    """vLLM's repetition (prompt + output), presence and frequency (output) penalties on ``rows``."""
    if not rows:
        return
    vocab = logits.shape[1]
    idx = torch.tensor(rows)
    lg = logits[idx]
    out_counts = token_counts(outputs, vocab)
    rep = torch.tensor(repetition, dtype=lg.dtype)[:, None]
    if bool((rep != 1.0).any()):
        seen = (token_counts(prompts, vocab) > 0) | (out_counts > 0)
        scaled = torch.where(lg > 0, lg / rep, lg * rep)
        lg = torch.where(seen, scaled, lg)
    lg = lg - torch.tensor(frequency, dtype=lg.dtype)[:, None] * out_counts
    lg = lg - torch.tensor(presence, dtype=lg.dtype)[:, None] * (out_counts > 0).to(lg.dtype)
    logits[idx] = lg


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    return logits / temperature[:, None]


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens below ``min_p * p(top token)`` (rows with min_p 0 keep everything)."""
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p[:, None]
    return logits.masked_fill(probs < threshold, NEG_INF)


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row, cut it to top_k (0: no cut) then top_p; returns (sorted logits, sort order)."""
    lg, order = logits.sort(dim=-1, descending=True)
    vocab = lg.shape[-1]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab))
    lg = lg.masked_fill(torch.arange(vocab)[None, :] >= k[:, None], NEG_INF)
    if bool((top_p < 1.0).any()):
        probs = lg.softmax(dim=-1)
        # drop a token once the ones before it already cover top_p (the first always stays)
        before = probs.cumsum(dim=-1) - probs
        lg = lg.masked_fill(before > top_p[:, None], NEG_INF)
    return lg, order
