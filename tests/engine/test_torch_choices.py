"""Torch engine: n > 1 shares the prompt's KV blocks, prompt logprobs agree with decoding, aborts free all."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import anyio
import pytest

pytest.importorskip("torch")

from shared.engines import EngineConfig, make_engine
from shared.engines.base import EngineOutput
from shared.messages import SamplingParams

pytestmark = pytest.mark.anyio

BS = 16


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def engine() -> AsyncIterator[object]:
    eng = make_engine(EngineConfig(engine="torch", model="baton-tiny", dtype="float32", num_blocks=512,
                                   block_size=BS, max_batched_tokens=64))
    async with anyio.create_task_group() as tg:
        tg.start_soon(eng.run)
        with anyio.fail_after(120):
            await eng.wait_ready()
        yield eng
        tg.cancel_scope.cancel()


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(5, 2000) for _ in range(n)]


async def run(eng, rid: str, ids: list[int], sp: SamplingParams, peak: list[int] | None = None) -> list[EngineOutput]:
    outs = []
    async for o in eng.generate(rid, ids, sp):
        outs.append(o)
        if peak is not None:
            peak.append(eng.stats().kv_blocks_used)
    return outs


async def test_n_shares_prompt_blocks(engine) -> None:
    ids = prompt(1, 200)  # 12.5 blocks: 12 full ones shared
    sp = dict(max_tokens=20, temperature=1.0, seed=3, ignore_eos=True)
    one: list[int] = []
    four: list[int] = []
    await run(engine, "n1", ids, SamplingParams(**sp), one)
    engine.scheduler.kv.pool.cached.clear()  # no help from the first request's cached blocks
    outs = await run(engine, "n4", ids, SamplingParams(n=4, **sp), four)
    per_choice: dict[int, list[int]] = {}
    for o in outs:
        per_choice.setdefault(o.choice, []).extend(o.token_ids)
    assert sorted(per_choice) == [0, 1, 2, 3] and all(len(t) == 20 for t in per_choice.values())
    assert len({tuple(t) for t in per_choice.values()}) == 4
    # 4 private tails (2 blocks each at most) on top of the 12 shared prompt blocks
    assert max(four) <= max(one) + 3 * 2
    assert engine.stats().kv_blocks_used == 0


async def test_prompt_logprobs_agree_with_decoding_and_chunking(engine) -> None:
    ids = prompt(2, 70)  # prefilled in chunks of 64
    first = await run(engine, "g", ids, SamplingParams(max_tokens=1, temperature=0.0, logprobs=2))
    g = first[0].logprobs[0]
    again = await run(engine, "p", [*ids, g.token.token_id], SamplingParams(max_tokens=1, temperature=0.0,
                                                                            prompt_logprobs=2))
    plps = again[0].prompt_logprobs
    assert plps is not None and len(plps) == len(ids)
    assert [p.token.token_id for p in plps] == [*ids[1:], g.token.token_id]
    assert plps[-1].token.logprob == pytest.approx(g.token.logprob, abs=1e-4)
    assert [t.token_id for t in plps[-1].top] == [t.token_id for t in g.top]
    # a prefix-cache hit does not skip positions: the prompt is computed again
    third = await run(engine, "p2", [*ids, g.token.token_id], SamplingParams(max_tokens=1, temperature=0.0,
                                                                            prompt_logprobs=0))
    assert [round(p.token.logprob, 4) for p in third[0].prompt_logprobs] == [round(p.token.logprob, 4) for p in plps]


async def test_abort_of_n_frees_every_choice(engine) -> None:
    ids = prompt(3, 50)
    it = engine.generate("ab", ids, SamplingParams(n=3, max_tokens=200, temperature=1.0, ignore_eos=True))
    seen = set()
    async for o in it:
        seen.add(o.choice)
        if len(seen) == 3:
            break
    await it.aclose()
    with anyio.fail_after(10):
        while engine.stats().kv_blocks_used or engine.stats().running:
            await anyio.sleep(0.01)
