"""Next-token sampling for a batch: greedy at temperature 0, else temperature, top-k and top-p.

Each seeded request draws from its own ``torch.Generator``, so its output depends on its seed
alone, not on which requests share its batch. Unseeded requests share one engine generator.
"""

from __future__ import annotations

import torch

from shared.engines.scheduler import Request
from shared.engines.structured import Matcher, apply_bitmasks


class SamplerState:
    """Per-request sampling state, kept in ``Request.state`` by the torch engine."""

    __slots__ = ("generator", "grammar", "greedy", "min_tokens_ban")

    def __init__(self, req: Request, vocab_size: int, shared: torch.Generator) -> None:
        sp = req.sampling
        self.greedy = sp.temperature == 0
        if sp.seed is not None and not self.greedy:
            self.generator = torch.Generator().manual_seed(sp.seed)
        else:
            self.generator = shared
        # Before min_tokens, stop ids (EOS included) must not be sampled at all.
        self.min_tokens_ban = [t for t in req.stop_ids if 0 <= t < vocab_size] if sp.min_tokens > 0 else []
        # Structured outputs: set by the engine when SamplingParams.structured is set.
        self.grammar: Matcher | None = None


class Sampler:
    def __init__(self, vocab_size: int, seed: int = 0) -> None:
        self.vocab_size = vocab_size
        self.shared_generator = torch.Generator().manual_seed(seed)

    def state_for(self, req: Request) -> SamplerState:
        return SamplerState(req, self.vocab_size, self.shared_generator)

    def sample(self, logits: torch.Tensor, reqs: list[Request]) -> list[int]:
        """One token per row of ``logits`` [S, vocab] (fp32, CPU), row i for ``reqs[i]``."""
        states: list[SamplerState] = [r.state for r in reqs]
        for i, (req, st) in enumerate(zip(reqs, states, strict=True)):
            if st.min_tokens_ban and req.num_output_tokens < req.min_tokens:
                logits[i, st.min_tokens_ban] = float("-inf")
        grammars = [st.grammar for st in states]
        constrained = any(g is not None for g in grammars)
        if constrained:
            apply_bitmasks(logits, grammars)
        tokens = self._draw(logits, reqs, states)
        if constrained:
            for g, token in zip(grammars, tokens, strict=True):
                if g is not None:
                    g.accept_token(token)  # a rejected token ends the choice (g.is_terminated())
        return tokens

    def _draw(self, logits: torch.Tensor, reqs: list[Request], states: list[SamplerState]) -> list[int]:
        greedy = logits.argmax(dim=-1)
        rows = [i for i, st in enumerate(states) if not st.greedy]
        if not rows:
            return greedy.tolist()
        sps = [reqs[i].sampling for i in rows]
        lg = logits[rows] / torch.tensor([sp.temperature for sp in sps], dtype=logits.dtype)[:, None]
        top_k = [sp.top_k if 0 < sp.top_k < self.vocab_size else 0 for sp in sps]
        top_p = [sp.top_p for sp in sps]
        order = None
        if any(top_k) or any(p < 1.0 for p in top_p):
            lg, order = lg.sort(dim=-1, descending=True)
            if any(top_k):
                k = torch.tensor([k or self.vocab_size for k in top_k])
                lg.masked_fill_(torch.arange(lg.shape[-1])[None, :] >= k[:, None], float("-inf"))
            if any(p < 1.0 for p in top_p):
                probs = lg.softmax(dim=-1)
                # drop a token once the ones before it already cover top_p (the first always stays)
                before = probs.cumsum(dim=-1) - probs
                lg.masked_fill_(before > torch.tensor(top_p, dtype=lg.dtype)[:, None], float("-inf"))
        probs = lg.softmax(dim=-1)
        out = greedy.tolist()
        for j, i in enumerate(rows):
            choice = int(torch.multinomial(probs[j], 1, generator=states[i].generator))
            out[i] = int(order[j, choice]) if order is not None else choice
        return out
