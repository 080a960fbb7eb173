"""Each logits processor against a plain per-row reference, plus the sampler's logprobs and seams."""

from __future__ import annotations

import math
import random

import pytest

torch = pytest.importorskip("torch")

from shared.engines.request import Request  # noqa: E402
from shared.engines.sampling import Sampler  # noqa: E402
from shared.engines.sampling import processors as P  # noqa: E402
from shared.messages import SamplingParams  # noqa: E402

V = 40


def rand_logits(rows: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, V, generator=g) * 3


def test_logit_bias_matches_reference() -> None:
    lg = rand_logits(3)
    ref = lg.clone()
    bias = [{1: 5.0, 7: -2.5}, {39: 100.0}]
    P.apply_logit_bias(lg, [0, 2], bias)
    ref[0, 1] += 5.0
    ref[0, 7] -= 2.5
    ref[2, 39] += 100.0
    assert torch.equal(lg, ref)


def test_bans_set_minus_inf_only_where_asked() -> None:
    lg = rand_logits(2)
    ref = lg.clone()
    P.apply_bans(lg, [1], [[3, 4]])
    ref[1, 3] = ref[1, 4] = float("-inf")
    assert torch.equal(lg, ref)


def reference_penalties(row: list[float], prompt: list[int], out: list[int], rep: float, pres: float,
                        freq: float) -> list[float]:
    row = list(row)
    seen = set(prompt) | set(out)
    for t in range(len(row)):
        if t in seen and rep != 1.0:
            row[t] = row[t] / rep if row[t] > 0 else row[t] * rep
        c = out.count(t)
        row[t] -= freq * c + (pres if c else 0.0)
    return row


def test_penalties_match_vllm_semantics_reference() -> None:
    rng = random.Random(1)
    lg = rand_logits(4, seed=1)
    base = lg.clone()
    prompts = [[rng.randrange(V) for _ in range(rng.randrange(1, 10))] for _ in range(3)]
    outs = [[rng.randrange(V) for _ in range(rng.randrange(0, 12))] for _ in range(3)]
    params = [(1.5, 0.0, 0.0), (1.0, 0.7, 0.3), (0.8, -0.5, 1.1)]
    P.apply_penalties(lg, [0, 1, 3], prompts, outs, [p[0] for p in params], [p[1] for p in params],
                      [p[2] for p in params])
    for k, row in enumerate([0, 1, 3]):
        ref = reference_penalties(base[row].tolist(), prompts[k], outs[k], *params[k])
        assert lg[row].tolist() == pytest.approx(ref, abs=1e-5)
    assert torch.equal(lg[2], base[2])  # untouched row


def test_min_p_top_k_top_p_match_reference() -> None:
    lg = rand_logits(3, seed=2)
    min_p = torch.tensor([0.0, 0.2, 0.5])
    out = P.apply_min_p(lg, min_p)
    for r in range(3):
        probs = lg[r].softmax(-1)
        keep = probs >= probs.max() * min_p[r]
        assert torch.equal(torch.isfinite(out[r]), keep)
    sorted_lg, order = P.apply_top_k_top_p(lg, torch.tensor([0, 3, 0]), torch.tensor([1.0, 1.0, 0.6]))
    kept = [set(order[r][torch.isfinite(sorted_lg[r])].tolist()) for r in range(3)]
    assert kept[0] == set(range(V))
    assert kept[1] == set(lg[1].topk(3).indices.tolist())
    probs, idx = lg[2].softmax(-1).sort(descending=True)
    cum, ref = 0.0, set()
    for p, i in zip(probs.tolist(), idx.tolist(), strict=True):  # smallest head reaching 0.6
        if cum > 0.6:
            break
        ref.add(i)
        cum += p
    assert kept[2] == ref


def req_for(sampler: Sampler, prompt: list[int], out: list[int], **sp: object) -> Request:
    r = Request("r", prompt, SamplingParams(**sp), frozenset({0}))  # type: ignore[arg-type]
    r.token_ids += out
    r.state = sampler.state_for(r)
    return r


def test_logprobs_are_raw_and_sorted() -> None:
    s = Sampler(V)
    lg = rand_logits(2, seed=3)
    raw = lg.log_softmax(-1)
    reqs = [req_for(s, [1, 2], [], temperature=0.0, logprobs=4, logit_bias={5: 50.0}),
            req_for(s, [1, 2], [], temperature=0.0)]
    res = s.step(lg.clone(), reqs)
    assert res.tokens[0] == 5  # the bias decided the token ...
    lp = res.logprobs[0]
    assert lp is not None and lp.token.token_id == 5
    assert lp.token.logprob == pytest.approx(raw[0, 5].item(), abs=1e-6)  # ... not its logprob
    assert [t.token_id for t in lp.top] == raw[0].topk(4).indices.tolist()
    assert res.logprobs[1] is None


def test_min_tokens_bans_stop_ids_then_lets_them_through() -> None:
    s = Sampler(V)
    lg = torch.zeros(1, V)
    lg[0, 0] = 10.0  # the stop id is the argmax
    early = req_for(s, [1], [3], temperature=0.0, min_tokens=3)
    late = req_for(s, [1], [3, 3, 3], temperature=0.0, min_tokens=3)
    assert s.sample(lg.clone(), [early]) != [0]
    assert s.sample(lg.clone(), [late]) == [0]


def test_choices_seeded_from_seed_plus_index() -> None:
    s = Sampler(V)
    a = req_for(s, [1], [], temperature=1.0, seed=9)
    b = Request("r", [1], SamplingParams(temperature=1.0, seed=8), frozenset())
    b.choice = 1
    b.state = s.state_for(b)
    lg = rand_logits(1, seed=4)
    assert [s.sample(lg.clone(), [a])[0] for _ in range(20)] == [s.sample(lg.clone(), [b])[0] for _ in range(20)]


class _Grammar:
    """Allows only even tokens; records what it was fed."""

    def __init__(self) -> None:
        self.accepted: list[int] = []

    def accept_token(self, token: int) -> bool:
        self.accepted.append(token)
        return True


def test_grammar_seam_masks_then_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    calls = []

    def apply_bitmasks(logits: torch.Tensor, grammars: list[object]) -> None:
        calls.append(list(grammars))
        for r, g in enumerate(grammars):
            if g is not None:
                logits[r, 1::2] = -math.inf

    fake = types.ModuleType("shared.engines.structured")
    fake.apply_bitmasks = apply_bitmasks  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "shared.engines.structured", fake)
    s = Sampler(V)
    lg = torch.zeros(2, V)
    lg[:, 7] = 5.0
    free, bound = req_for(s, [1], [], temperature=0.0), req_for(s, [1], [], temperature=0.0)
    bound.state.grammar = g = _Grammar()
    out = s.sample(lg, [free, bound])
    assert out[0] == 7 and out[1] % 2 == 0
    assert calls == [[None, g]] and g.accepted == [out[1]]
