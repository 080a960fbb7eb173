"""Disaggregation at the engine level: a prefill engine and a decode engine in one process, KV
bytes copied between their pools exactly as a transport would. Outputs must equal an aggregated
run, and every pool must be whole afterwards."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import anyio
import pytest

from shared.engines.base import Engine, EngineConfig, EngineOutput
from shared.engines.scheduler import Scheduler
from shared.kv_transport.base import cut, merged_boundaries
from shared.messages import SamplingParams

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

BS = 4
_rng = random.Random(3)
SHARED = [_rng.randrange(3, 2000) for _ in range(21)]
PROMPTS = [
    SHARED + [_rng.randrange(3, 2000) for _ in range(15)],
    SHARED + [_rng.randrange(3, 2000) for _ in range(9)],  # prefix hits on both sides
    [_rng.randrange(3, 2000) for _ in range(70)],  # several prefill chunks
    [_rng.randrange(3, 2000) for _ in range(8)],  # exactly two blocks: nothing partial
    [_rng.randrange(3, 2000) for _ in range(2)],
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def copy_kv(src: list[memoryview], dst: list[memoryview]) -> None:
    """What a KvTransport does: the same byte stream, cut at both sides' run boundaries."""
    pieces = merged_boundaries([len(v) for v in src], [len(v) for v in dst])
    for s, d in zip(cut(src, pieces), cut(dst, pieces), strict=True):
        d[:] = s


async def collect(stream: AsyncIterator[EngineOutput]) -> tuple[list[int], EngineOutput]:
    tokens: list[int] = []
    last = None
    async for out in stream:
        tokens += out.token_ids
        last = out
    assert last is not None and last.finish_reason is not None
    return tokens, last


async def disagg(prefill: Engine, decode: Engine, rid: str, prompt: list[int],
                 sampling: SamplingParams) -> tuple[list[int], EngineOutput]:
    """The orchestration of services/decode/disagg.py and services/prefill/worker.py, minus the network."""
    dst, cached_blocks = decode.reserve_remote_prefill(rid, prompt)
    assert cached_blocks * BS == decode.cached_prefix_tokens(prompt)
    assert len(dst) + cached_blocks == -(-len(prompt) // BS)
    blocks, first, _ = await prefill.prefill_and_hold(f"{rid}:p", prompt, sampling)
    try:
        assert len(blocks) == len(dst) + cached_blocks
        copy_kv(prefill.kv_views(blocks[cached_blocks:]), decode.kv_views(dst))
    finally:
        prefill.release_held(f"{rid}:p")
    return await collect(decode.generate_after_remote_prefill(rid, prompt, sampling, first))


class Engines:
    """Three engines (aggregated, prefill, decode) whose step loops run inside ``async with``."""

    def __init__(self, **config: object) -> None:
        from shared.engines import make_engine

        cfg = {"block_size": BS, "max_batched_tokens": 32, "num_blocks": 96, **config}
        self.agg, self.prefill, self.decode = (make_engine(EngineConfig(**cfg)) for _ in range(3))  # type: ignore[arg-type]

    async def __aenter__(self) -> Engines:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        for e in (self.agg, self.prefill, self.decode):
            self._tg.start_soon(e.run)
            await e.wait_ready()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._tg.cancel_scope.cancel()
        await self._tg.__aexit__(None, None, None)

    def assert_pools_whole(self) -> None:
        for e in (self.agg, self.prefill, self.decode):
            st = e.stats()
            assert st.kv_blocks_used == 0, (e.name, st)
            sched = e.scheduler  # type: ignore[attr-defined]
            assert not sched.reserved and not sched.held and not sched.requests


ENGINES = [
    pytest.param({"engine": "torch", "model": "baton-tiny"}, id="torch"),
    pytest.param({"engine": "mocker", "model": "baton-tiny", "speedup": 1e9}, id="mocker"),
]


@pytest.mark.parametrize("config", ENGINES)
async def test_disaggregated_equals_aggregated(config: dict) -> None:
    async with Engines(**config) as e:
        samplings = [
            SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
            SamplingParams(max_tokens=12, temperature=0.9, top_k=50, seed=11, ignore_eos=True),
            SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),  # the first token is all
        ]
        for si, sp in enumerate(samplings):
            for i, prompt in enumerate(PROMPTS):
                want, want_fin = await collect(e.agg.generate(f"a{si}-{i}", prompt, sp))
                got, fin = await disagg(e.prefill, e.decode, f"d{si}-{i}", prompt, sp)
                assert got == want, (si, i)
                assert fin.finish_reason == want_fin.finish_reason == "length"
                assert fin.num_prompt_tokens == len(prompt)
        # The second prompt's shared prefix was a hit on the decode side: those blocks were not sent.
        assert e.decode.stats().prefix_hit_tokens > 0
        assert e.prefill.stats().prefix_hit_tokens > 0
        # Adopted prompts entered the prefix cache, and their KV events were recorded.
        stored, _, _ = e.decode.kv_events.drain()
        assert sum(len(s.block_hashes) for s in stored) >= len(PROMPTS[2]) // BS
        assert e.decode.cached_prefix_tokens(PROMPTS[2]) == (len(PROMPTS[2]) - 1) // BS * BS
        e.assert_pools_whole()


@pytest.mark.parametrize("config", ENGINES)
async def test_release_and_abort_always_free_blocks(config: dict) -> None:
    async with Engines(**config) as e:
        sp = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
        prompt = PROMPTS[2]
        # A reservation given back (its remote prefill failed) frees everything, twice is harmless.
        blocks, _ = e.decode.reserve_remote_prefill("r1", prompt)
        assert e.decode.stats().kv_blocks_used == len(blocks)
        with pytest.raises(RuntimeError):
            e.decode.reserve_remote_prefill("r1", prompt)  # duplicate id
        e.decode.release_remote_prefill("r1")
        e.decode.release_remote_prefill("r1")
        # Held blocks given back.
        await e.prefill.prefill_and_hold("p1", prompt, sp)
        assert e.prefill.stats().kv_blocks_used > 0
        e.prefill.release_held("p1")
        # A prefill cancelled mid-way leaves nothing held.
        with anyio.move_on_after(0):
            await e.prefill.prefill_and_hold("p2", list(reversed(prompt)), sp)
        # An adopted request closed early is aborted like any other.
        got, first_out = [], None
        dst, cached = e.decode.reserve_remote_prefill("r2", prompt)
        blocks, first, _ = await e.prefill.prefill_and_hold("p3", prompt, sp)
        copy_kv(e.prefill.kv_views(blocks[cached:]), e.decode.kv_views(dst))
        e.prefill.release_held("p3")
        stream = e.decode.generate_after_remote_prefill("r2", prompt, sp, first)
        async for out in stream:
            first_out = first_out or out
            got += out.token_ids
            if len(got) >= 3:
                break
        await stream.aclose()  # type: ignore[attr-defined]
        assert first_out is not None and first_out.token_ids == [first]
        # A pool too small for the prompt refuses the reservation.
        with pytest.raises(RuntimeError):
            e.decode.reserve_remote_prefill("huge", list(range(3, 3 + 96 * BS + 1)))
        with anyio.fail_after(10):
            while e.prefill.stats().kv_blocks_used or e.decode.stats().kv_blocks_used:
                await anyio.sleep(0.01)
        e.assert_pools_whole()


async def test_mocker_detects_misplaced_kv() -> None:
    async with Engines(engine="mocker", model="baton-tiny", speedup=1e9) as e:
        sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        prompt = PROMPTS[2]
        dst, cached = e.decode.reserve_remote_prefill("r", prompt)
        blocks, first, _ = await e.prefill.prefill_and_hold("p", prompt, sp)
        copy_kv(e.prefill.kv_views(list(reversed(blocks[cached:]))), e.decode.kv_views(dst))  # wrong order
        e.prefill.release_held("p")
        _, fin = await collect(e.decode.generate_after_remote_prefill("r", prompt, sp, first))
        assert fin.finish_reason == "error" and "KV block" in (fin.error or "")
        e.assert_pools_whole()


def test_scheduler_reserve_adopt_hold_accounting() -> None:
    sched = Scheduler(num_blocks=16, block_size=BS, max_num_seqs=4, max_batched_tokens=64)
    prompt = list(range(10, 23))  # 13 tokens: 3 full blocks and a partial one
    req = sched.reserve("r", prompt)
    assert len(req.blocks) == 4 and req.num_cached_blocks == 0 and sched.kv.num_used_blocks == 4
    out = sched.adopt("r", SamplingParams(max_tokens=3), 7)
    assert out.token_ids == [7] and out.finish_reason is None
    assert sched.kv.pool.num_cached == 3  # the full prompt blocks are in the prefix cache now
    assert sched.kv.cached_prefix_tokens(prompt) == 12
    # A second reservation for the same prompt reuses those three blocks: only the last is new.
    req2 = sched.reserve("r2", prompt)
    assert req2.num_cached_blocks == 3 and req2.blocks[:3] == req.blocks[:3]
    sched.release_reserved("r2")
    # A held prefill: one token, then the blocks stay until released.
    held = sched.add("h", prompt, SamplingParams(max_tokens=50), hold=True)
    assert not isinstance(held, EngineOutput)
    while "h" not in sched.held:
        batch = sched.schedule()
        sched.update(batch, [9] * len(batch.samplers))
    assert held.blocks and sched.kv.num_used_blocks > 0
    assert sched.abort("h") is not None  # abort reaches held requests too
    while sched.has_work():
        batch = sched.schedule()
        sched.update(batch, [9] * len(batch.samplers))
    assert sched.kv.num_used_blocks == 0
    # Adopting with no reservation, or with parameters this engine cannot run, fails and leaks nothing.
    assert sched.adopt("nobody", SamplingParams(), 1).finish_reason == "error"
    sched.reserve("bad", prompt)
    assert sched.adopt("bad", SamplingParams(max_tokens=0), 1).finish_reason == "error"
    assert sched.kv.num_used_blocks == 0
