"""Log-probabilities from the model's raw logits (before penalties, bias and temperature).

This is vLLM's default (``logprobs_mode=raw_logprobs``): a logprob says what the model thinks of
a token, whatever the request then did to its logits. One ``log_softmax`` and one ``topk`` cover
every row that asks, in one batched call.
"""

from __future__ import annotations

import torch

from shared.messages import PositionLogprobs, TokenLogprob

MAX_TOP_LOGPROBS = 20


def position_logprobs(logits: torch.Tensor, tokens: list[int], top: list[int]) -> list[PositionLogprobs]:
    """For each row of ``logits`` [R, V]: ``tokens[r]``'s logprob and the ``top[r]`` most likely."""
    if not tokens:
        return []
    lp = logits.float().log_softmax(dim=-1)
    chosen = lp.gather(1, torch.tensor(tokens, dtype=torch.long)[:, None])[:, 0].tolist()
    k = max(top)
    top_vals: list[list[float]] = []
    top_ids: list[list[int]] = []
    if k > 0:
        vals, ids = lp.topk(k, dim=-1)
        top_vals, top_ids = vals.tolist(), ids.tolist()
    out: list[PositionLogprobs] = []
    for r, (token, lpv) in enumerate(zip(tokens, chosen, strict=True)):
        alts = [TokenLogprob(t, v) for t, v in zip(top_ids[r][: top[r]], top_vals[r][: top[r]], strict=True)] if top[r] else []
        out.append(PositionLogprobs(TokenLogprob(token, lpv), alts))
    return out


def prompt_position_logprobs(logits: torch.Tensor, next_tokens: list[int], top: int) -> list[PositionLogprobs]:
    """Prompt logprobs for one sequence: row i of ``logits`` predicted ``next_tokens[i]``."""
    return position_logprobs(logits, next_tokens, [top] * len(next_tokens))
