"""The sampler: runs the logits-processor pipeline over one step's rows and draws the tokens.

Each seeded request draws from its own ``torch.Generator``, so its output depends on its seed
alone, not on which requests share its batch; choice ``i`` of an ``n > 1`` request is seeded with
``seed + i``. Unseeded requests share one engine generator.

Structured outputs plug in here: a request whose state has a ``grammar`` (set by the engine, see
:mod:`shared.engines.structured`) has its row masked by ``apply_bitmasks`` before anything else
changes the logits, and each chosen token is fed back with ``grammar.accept_token``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from shared.engines.request import Request
from shared.engines.sampling import processors as P
from shared.engines.sampling.logprobs import position_logprobs
from shared.messages import PositionLogprobs


class SamplerState:
    """Per-request sampling state, kept in ``Request.state`` by the torch engine."""

    __slots__ = ("generator", "grammar", "greedy", "min_tokens_ban", "prompt_logprobs")

    def __init__(self, req: Request, vocab_size: int, shared: torch.Generator) -> None:
        sp = req.sampling
        self.greedy = sp.temperature == 0
        if sp.seed is not None and not self.greedy:
            self.generator = torch.Generator().manual_seed((sp.seed + req.choice) & 0xFFFF_FFFF_FFFF_FFFF)
        else:
            self.generator = shared
        # Before min_tokens, stop ids (EOS included) must not be sampled at all.
        self.min_tokens_ban = [t for t in req.stop_ids if 0 <= t < vocab_size] if sp.min_tokens > 0 else []
        self.grammar: Any = None  # a structured-output matcher (accept_token, bitmask), set by the engine
        # Gathered over prefill chunks (choice 0 only); None once sent, or when not asked for.
        self.prompt_logprobs: list[PositionLogprobs] | None = (
            [] if sp.prompt_logprobs >= 0 and req.choice == 0 else None)


@dataclass(slots=True)
class SampleResult:
    tokens: list[int]
    logprobs: list[PositionLogprobs | None]  # per row; None where the request asked for none


class Sampler:
    def __init__(self, vocab_size: int, seed: int = 0) -> None:
        self.vocab_size = vocab_size
        self.shared_generator = torch.Generator().manual_seed(seed)

    def state_for(self, req: Request) -> SamplerState:
        return SamplerState(req, self.vocab_size, self.shared_generator)

    def sample(self, logits: torch.Tensor, reqs: list[Request]) -> list[int]:
        """One token per row of ``logits`` [S, vocab] (fp32, CPU), row i for ``reqs[i]``."""
        return self.step(logits, reqs).tokens

    def step(self, logits: torch.Tensor, reqs: list[Request]) -> SampleResult:
        """Tokens (and logprobs where asked) for each row; ``logits`` is changed in place."""
        states: list[SamplerState] = [r.state for r in reqs]
        sps = [r.sampling for r in reqs]
        # 1. logprobs come from the raw logits: keep the rows that want them before any change
        lp_rows = [i for i, sp in enumerate(sps) if sp.logprobs >= 0]
        raw = logits[lp_rows] if lp_rows else None  # advanced indexing copies
        # 2. structured outputs
        grammars = [st.grammar for st in states]
        if any(g is not None for g in grammars):
            from shared.engines.structured import apply_bitmasks

            apply_bitmasks(logits, grammars)
        # 3. logit_bias, 4. min_tokens
        rows = [i for i, sp in enumerate(sps) if sp.logit_bias]
        if rows:
            P.apply_logit_bias(logits, rows, [sps[i].logit_bias for i in rows])
        rows = [i for i, (r, st) in enumerate(zip(reqs, states, strict=True))
                if st.min_tokens_ban and r.num_output_tokens < r.min_tokens]
        if rows:
            P.apply_bans(logits, rows, [states[i].min_tokens_ban for i in rows])
        # 5. penalties
        rows = [i for i, sp in enumerate(sps)
                if sp.repetition_penalty != 1.0 or sp.presence_penalty or sp.frequency_penalty]
        if rows:
            P.apply_penalties(
                logits, rows,
                [reqs[i].token_ids[: reqs[i].num_prompt_tokens] for i in rows],
                [reqs[i].token_ids[reqs[i].num_prompt_tokens :] for i in rows],
                [sps[i].repetition_penalty for i in rows],
                [sps[i].presence_penalty for i in rows],
                [sps[i].frequency_penalty for i in rows],
            )
        # 6. greedy rows take the argmax; the others are drawn
        out = logits.argmax(dim=-1).tolist()
        rows = [i for i, st in enumerate(states) if not st.greedy]
        if rows:
            for i, token in zip(rows, self._draw(logits[rows], [sps[i] for i in rows], [states[i] for i in rows]),
                                strict=True):
                out[i] = token
        for st, token in zip(states, out, strict=True):
            if st.grammar is not None:
                st.grammar.accept_token(token)
        logprobs: list[PositionLogprobs | None] = [None] * len(reqs)
        if raw is not None:
            for i, pl in zip(lp_rows, position_logprobs(raw, [out[i] for i in lp_rows],
                                                        [sps[i].logprobs for i in lp_rows]), strict=True):
                logprobs[i] = pl
        return SampleResult(out, logprobs)

    def _draw(self, lg: torch.Tensor, sps: list[Any], states: list[SamplerState]) -> list[int]:
        """temperature -> min_p -> top_k -> top_p, then one draw per row from its generator."""
        lg = P.apply_temperature(lg, torch.tensor([sp.temperature for sp in sps], dtype=lg.dtype))
        min_p = [sp.min_p for sp in sps]
        if any(min_p):
            lg = P.apply_min_p(lg, torch.tensor(min_p, dtype=lg.dtype))
        top_k = [sp.top_k if 0 < sp.top_k < self.vocab_size else 0 for sp in sps]
        top_p = [sp.top_p for sp in sps]
        order = None
        if any(top_k) or any(p < 1.0 for p in top_p):
            lg, order = P.apply_top_k_top_p(lg, torch.tensor(top_k), torch.tensor(top_p, dtype=lg.dtype))
        probs = lg.softmax(dim=-1)
        out: list[int] = []
        for j, st in enumerate(states):
            choice = int(torch.multinomial(probs[j], 1, generator=st.generator))
            out.append(int(order[j, choice]) if order is not None else choice)
        return out
