"""Sampler on synthetic logits: greedy, top-k, top-p, seeds and min_tokens."""

from __future__ import annotations

from tests.require import require_module

torch = require_module("torch", "pip install 'baton[torch]'")

from shared.engines.request import Request  # noqa: E402
from shared.engines.sampling import Sampler  # noqa: E402
from shared.messages import SamplingParams  # noqa: E402

VOCAB = 32


def request(sampler: Sampler, stop_ids: frozenset[int] = frozenset(), **sp: object) -> Request:
    req = Request("r", [1, 2, 3], SamplingParams(**sp), stop_ids)  # type: ignore[arg-type]
    req.state = sampler.state_for(req)
    return req


def logits_rows(n: int) -> torch.Tensor:
    # descending preference: token 7 > 3 > 11 > everything else (equal)
    row = torch.zeros(VOCAB)
    row[7], row[3], row[11] = 5.0, 4.0, 3.0
    return row.repeat(n, 1)


def draws(sampler: Sampler, req: Request, n: int = 200) -> list[int]:
    return [sampler.sample(logits_rows(1), [req])[0] for _ in range(n)]


def test_greedy_and_degenerate_filters_pick_the_argmax() -> None:
    s = Sampler(VOCAB)
    assert set(draws(s, request(s, temperature=0.0), 5)) == {7}
    assert set(draws(s, request(s, temperature=1.0, top_k=1))) == {7}
    assert set(draws(s, request(s, temperature=1.0, top_p=0.01))) == {7}


def test_top_k_and_top_p_cut_the_tail() -> None:
    s = Sampler(VOCAB)
    assert set(draws(s, request(s, temperature=1.0, top_k=2, seed=1))) == {7, 3}
    # softmax mass: 7 ~0.63, 3 ~0.23, 11 ~0.09; top_p 0.8 keeps 7 and 3 only
    assert set(draws(s, request(s, temperature=1.0, top_p=0.8, seed=2))) == {7, 3}
    wide = set(draws(s, request(s, temperature=1.0, seed=3), 400))
    assert {7, 3, 11} <= wide and len(wide) > 3


def test_temperature_sharpens() -> None:
    s = Sampler(VOCAB)
    hot = draws(s, request(s, temperature=2.0, seed=4), 400)
    cold = draws(s, request(s, temperature=0.3, seed=4), 400)
    assert cold.count(7) > hot.count(7)


def test_seed_fixes_the_draws_whatever_the_batch() -> None:
    s = Sampler(VOCAB)
    alone = draws(s, request(s, temperature=1.0, seed=42), 50)
    mate = request(s, temperature=1.0)
    seeded = request(s, temperature=1.0, seed=42)
    in_batch = [s.sample(logits_rows(2), [mate, seeded])[1] for _ in range(50)]
    assert in_batch == alone
    assert draws(s, request(s, temperature=1.0, seed=43), 50) != alone


def test_min_tokens_bans_stop_ids_until_reached() -> None:
    s = Sampler(VOCAB)
    req = request(s, frozenset({7}), temperature=0.0, min_tokens=2)
    assert s.sample(logits_rows(1), [req])[0] == 3
    req.token_ids += [3, 3]  # two tokens out: the ban lifts
    assert s.sample(logits_rows(1), [req])[0] == 7
