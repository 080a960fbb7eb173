"""Mocker engine: same scheduler and KV accounting as the torch engine, deterministic tokens."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import anyio
import anyio.lowlevel
import pytest

from shared.engines import EngineConfig, make_engine
from shared.engines.base import EngineOutput
from shared.engines.mocker import MockerEngine
from shared.kv_hash import block_hashes
from shared.messages import SamplingParams, StructuredOutput

pytestmark = pytest.mark.anyio

FAST = {"engine": "mocker", "model": "no-such-model", "speedup": 1e9}


async def collect(stream: AsyncIterator[EngineOutput]) -> tuple[list[int], EngineOutput]:
    tokens: list[int] = []
    last = None
    async for out in stream:
        tokens += out.token_ids
        last = out
    assert last is not None and last.finish_reason is not None
    return tokens, last


async def test_generate_is_deterministic_and_honours_max_tokens() -> None:
    eng = make_engine(EngineConfig(**FAST))
    assert isinstance(eng, MockerEngine) and eng.model_name == "no-such-model"
    async with anyio.create_task_group() as tg:
        tg.start_soon(eng.run)
        await eng.wait_ready()
        prompt = list(range(3, 40))
        a, fin = await collect(eng.generate("a", prompt, SamplingParams(max_tokens=20, seed=7)))
        b, _ = await collect(eng.generate("b", [9, 9, 9], SamplingParams(max_tokens=20, seed=7)))
        c, _ = await collect(eng.generate("c", prompt, SamplingParams(max_tokens=20, seed=8)))
        d, _ = await collect(eng.generate("d", prompt, SamplingParams(max_tokens=20)))
        e, _ = await collect(eng.generate("e", prompt, SamplingParams(max_tokens=20)))
        tg.cancel_scope.cancel()
    assert len(a) == 20 and fin.finish_reason == "length" and fin.num_prompt_tokens == len(prompt)
    assert a == b  # same seed, same tokens whatever the prompt
    assert a != c and d == e and d != a
    assert all(0 <= t < 2048 for t in a + c + d)


async def test_stop_token_ids_and_eos_of_the_builtin_vocab() -> None:
    eng = MockerEngine(EngineConfig(engine="mocker", model="baton-tiny", speedup=1e9))
    assert eng.model_name == "baton-tiny" and eng.eos_token_ids
    async with anyio.create_task_group() as tg:
        tg.start_soon(eng.run)
        free, _ = await collect(eng.generate("a", [5, 6, 7], SamplingParams(max_tokens=64, seed=1)))
        stop_at = free[10]
        cut, fin = await collect(
            eng.generate("b", [5, 6, 7], SamplingParams(max_tokens=64, seed=1, stop_token_ids=[stop_at]))
        )
        tg.cancel_scope.cancel()
    assert not set(free) & set(eng.eos_token_ids)  # special tokens never come out
    assert cut == free[: free.index(stop_at) + 1] and fin.finish_reason == "stop"


async def test_block_accounting_prefix_hits_and_kv_events() -> None:
    bs = 16
    eng = MockerEngine(EngineConfig(**FAST, block_size=bs, num_blocks=64))
    system = list(range(100, 148))  # 3 full blocks shared by every request
    async with anyio.create_task_group() as tg:
        tg.start_soon(eng.run)
        _, first = await collect(eng.generate("a", [*system, 1, 2, 3], SamplingParams(max_tokens=4)))
        stats = eng.stats()
        assert stats.kv_blocks_used == 0 and stats.kv_blocks_total == 64
        _, second = await collect(eng.generate("b", [*system, 4, 5], SamplingParams(max_tokens=4)))
        tg.cancel_scope.cancel()
    assert first.num_cached_tokens == 0 and second.num_cached_tokens == 48
    assert eng.stats().prefix_hit_tokens == 48 and eng.stats().prompt_tokens == 51 + 50
    stored, removed, cleared = eng.kv_events.drain()
    announced = [h for ev in stored for h in ev.block_hashes]
    # exactly the full, computed blocks, once each: prompt a's 3 blocks (its 4th never filled)
    assert announced == block_hashes(system, bs) and not removed and not cleared
    assert set(announced) == set(eng.scheduler.kv.pool.cached)


async def test_client_hangup_aborts_and_frees_blocks() -> None:
    eng = MockerEngine(EngineConfig(engine="mocker", model="no-such-model", speedup=1e4, num_blocks=32))
    async with anyio.create_task_group() as tg:
        tg.start_soon(eng.run)
        stream = eng.generate("a", list(range(40)), SamplingParams(max_tokens=1000, ignore_eos=True))
        got = 0
        async for out in stream:
            got += len(out.token_ids)
            if got == 3:
                break
        assert eng.stats().running == 1 and eng.stats().kv_blocks_used > 0
        await stream.aclose()  # type: ignore[attr-defined]
        assert eng.stats().running == 0 and eng.stats().kv_blocks_used == 0

        # an explicit abort ends the stream with finish_reason "abort"
        async def abort_soon() -> None:
            eng.abort("b")

        results: list[EngineOutput] = []
        async for out in eng.generate("b", [1, 2, 3], SamplingParams(max_tokens=1000)):
            results.append(out)
            if len(results) == 2:
                tg.start_soon(abort_soon)
        tg.cancel_scope.cancel()
    assert results[-1].finish_reason == "abort" and eng.stats().kv_blocks_used == 0


async def test_pressure_preempts_and_finishes_all() -> None:
    eng = MockerEngine(EngineConfig(**FAST, block_size=4, num_blocks=24, max_num_seqs=16))
    outs: dict[str, list[int]] = {}

    async def one(i: int) -> None:
        outs[f"r{i}"], fin = await collect(
            eng.generate(f"r{i}", [50 + i] * (10 + i), SamplingParams(max_tokens=30, seed=i))
        )
        assert fin.finish_reason == "length"

    async with anyio.create_task_group() as tg:
        tg.start_soon(eng.run)
        async with anyio.create_task_group() as clients:
            for i in range(20):
                clients.start_soon(one, i)
        tg.cancel_scope.cancel()
    assert len(outs) == 20 and all(len(t) == 30 for t in outs.values())
    stats = eng.stats()
    assert stats.preemptions > 0 and stats.kv_blocks_used == 0 and stats.running == stats.waiting == 0


async def test_timing_model_paces_steps() -> None:
    # 20 decode steps of 5 ms each (speedup 1) take at least ~100 ms of wall time
    eng = MockerEngine(
        EngineConfig(
            engine="mocker",
            model="no-such-model",
            decode_step_s=5e-3,
            decode_s_per_seq=0.0,
            prefill_s_per_token=0.0,
        )
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(eng.run)
        t0 = time.perf_counter()
        await collect(eng.generate("a", [1, 2], SamplingParams(max_tokens=20)))
        elapsed = time.perf_counter() - t0
        tg.cancel_scope.cancel()
    assert 0.095 <= elapsed < 2.0


async def test_huge_speedup_is_cheap() -> None:
    # The brief: >2,000 16-token requests/s per worker at speedup 1e9. Asserted loosely (shared CI
    # cores); bench/engine_bench.py-style runs measure ~10k/s here.
    eng = MockerEngine(EngineConfig(**FAST))
    n = 1000

    async def one(i: int) -> None:
        toks, _ = await collect(eng.generate(f"r{i}", [7] * 20 + [i], SamplingParams(max_tokens=16)))
        assert len(toks) == 16

    async with anyio.create_task_group() as tg:
        tg.start_soon(eng.run)
        t0 = time.perf_counter()
        async with anyio.create_task_group() as clients:
            for i in range(n):
                clients.start_soon(one, i)
        rate = n / (time.perf_counter() - t0)
        tg.cancel_scope.cancel()
    assert rate > 1000, f"{rate:.0f} requests/s"


async def test_stopping_the_mocker_ends_open_streams() -> None:
    eng = MockerEngine(EngineConfig(engine="mocker", model="no-such-model", speedup=1.0))
    outs: list[EngineOutput] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(eng.run)
        stream = eng.generate("r", [1, 2, 3], SamplingParams(max_tokens=10_000))
        outs.append(await stream.__anext__())  # type: ignore[attr-defined]
        tg.cancel_scope.cancel()
    async for out in stream:
        outs.append(out)
    assert outs[-1].finish_reason == "abort" and eng.stats().kv_blocks_used == 0


async def test_n_and_logprobs_are_fake_but_well_formed() -> None:
    eng = MockerEngine(EngineConfig(**FAST))
    prompt = list(range(3, 40))
    sp = SamplingParams(max_tokens=6, n=3, seed=5, logprobs=4, prompt_logprobs=2)
    async with anyio.create_task_group() as tg:
        tg.start_soon(eng.run)
        outs = [o async for o in eng.generate("lp", prompt, sp)]
        again = [o async for o in eng.generate("lp2", prompt, sp)]
        tg.cancel_scope.cancel()
    per: dict[int, list[int]] = {}
    for o in outs:
        assert o.error is None
        per.setdefault(o.choice, []).extend(o.token_ids)
        assert len(o.logprobs or []) == len(o.token_ids)
        for p, t in zip(o.logprobs or [], o.token_ids, strict=True):
            assert p.token.token_id == t and p.token.logprob <= 0 and len(p.top) == 4
            assert all(0 <= a.token_id < eng.vocab_size and a.logprob <= 0 for a in p.top)
            assert [a.logprob for a in p.top] == sorted((a.logprob for a in p.top), reverse=True)
    assert sorted(per) == [0, 1, 2] and all(len(t) == 6 for t in per.values())
    assert len({tuple(t) for t in per.values()}) == 3  # each choice its own stream
    assert sum(o.finish_reason is not None for o in outs) == 3
    prompt_lps = [o.prompt_logprobs for o in outs if o.prompt_logprobs]
    assert len(prompt_lps) == 1 and [p.token.token_id for p in prompt_lps[0]] == prompt[1:]
    assert all(len(p.top) == 2 for p in prompt_lps[0])
    same = {}
    for o in again:
        same.setdefault(o.choice, []).extend(o.token_ids)
    assert same == per  # seeded: reproducible
    assert eng.stats().kv_blocks_used == 0


async def _turns_of_outputs(eng: MockerEngine, max_tokens: int) -> list[int]:
    """The event-loop turn (counted by a task that yields once a turn) each output arrived in."""
    turn = 0
    seen: list[int] = []

    async def count_turns() -> None:
        nonlocal turn
        while True:
            turn += 1
            await anyio.lowlevel.checkpoint()

    def on_output(out: EngineOutput) -> bool:
        seen.extend([turn] * len(out.token_ids))
        return out.finish_reason is None

    async with anyio.create_task_group() as tg:
        tg.start_soon(eng.run)
        tg.start_soon(count_turns)
        eng.listen("t", on_output)
        last, fin = await collect(eng.generate("t", [4, 5, 6], SamplingParams(max_tokens=max_tokens)))
        tg.cancel_scope.cancel()
    # The listener saw every output (each step's tokens: one, or a multi-step batch's run); the
    # stream got the last one only.
    assert len(seen) == max_tokens and last == fin.token_ids and fin.finish_reason == "length"
    return seen


async def test_near_free_decode_steps_share_a_loop_turn_but_the_first_token_goes_out_alone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A long enough burst budget that a loaded CI box cannot run out of it. The prefill step (the
    # first token) has a turn of its own, the next turn one step (so the first token's message is
    # written before any burst), then every other decode step runs in one turn.
    monkeypatch.setattr("shared.engines.core.BURST_S", 5.0)
    turns = await _turns_of_outputs(MockerEngine(EngineConfig(**FAST)), 16)
    assert turns[0] < turns[1] < turns[2] and len(set(turns[2:])) == 1, turns


async def test_a_burst_ends_within_its_real_time_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shared.engines.core.BURST_S", 0.0)  # no budget: one step a turn, as a slow mocker
    eng = MockerEngine(EngineConfig(**FAST))
    eng.runner.multi_step_tokens = 0  # the budget alone: one plain step per call
    turns = await _turns_of_outputs(eng, 16)
    assert len(set(turns)) == 16, turns


async def test_a_multi_step_batch_is_one_call_of_a_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    # No burst budget, but a near-free mocker takes its decode steps several to a call: after the
    # prefill's turn and the plain step of the turn after it, the other 14 tokens come in one call.
    monkeypatch.setattr("shared.engines.core.BURST_S", 0.0)
    eng = MockerEngine(EngineConfig(**FAST))
    assert eng.runner.multi_step_tokens > 0
    turns = await _turns_of_outputs(eng, 16)
    assert turns[0] < turns[1] < turns[2] and len(set(turns[2:])) == 1, turns


def _drive(eng: MockerEngine, multi_step_tokens: int) -> tuple[dict[str, list[EngineOutput]], int]:
    """Step ``eng``'s scheduler and runner by hand until idle; each request's outputs, and the calls."""
    sched, runner = eng.scheduler, eng.runner
    assert sched is not None
    outs: dict[str, list[EngineOutput]] = {}
    calls = 0
    while sched.has_work():
        batch = sched.schedule(multi_step_tokens)
        result = runner.execute(batch)
        if result.runs is not None:
            assert batch.steps > 1 and batch.num_decodes == len(batch.entries)
            got = sched.update_runs(batch, result.runs, result.run_logprobs)
        else:
            got = sched.update(batch, result.tokens, result.logprobs)
        calls += 1
        for out in got:
            outs.setdefault(out.request_id, []).append(out)
    return outs, calls


def test_multi_step_batches_give_what_single_steps_give() -> None:
    """Same tokens, logprobs, finish reasons and usage, a stop token honoured mid-run, the same
    blocks cached and none left in use, in fewer calls."""
    from shared.engines.core import AddRequest

    def run(multi_step_tokens: int) -> tuple[dict[str, list[EngineOutput]], int, MockerEngine]:
        eng = MockerEngine(EngineConfig(**FAST, block_size=4))
        probe = MockerEngine(EngineConfig(**FAST, block_size=4))
        # request "s" stops at its 7th token: find that token from a plain run of the same seed
        first, _ = _drive_one(probe, [7, 8, 9], SamplingParams(max_tokens=12, seed=5, ignore_eos=True))
        requests = [
            ("a", [1, 2, 3, 4, 5], SamplingParams(max_tokens=20, ignore_eos=True)),
            ("b", [1, 2, 3, 4, 6], SamplingParams(max_tokens=3, logprobs=2, ignore_eos=True)),
            ("s", [7, 8, 9], SamplingParams(max_tokens=12, seed=5, stop_token_ids=[first[6]], ignore_eos=True)),
            ("m", [7, 8, 9], SamplingParams(max_tokens=12, seed=5, stop_token_ids=[first[1]], min_tokens=4,
                                            ignore_eos=True)),
        ]
        for rid, prompt, sp in requests:
            eng._apply(AddRequest(rid, prompt, sp))
        outs, calls = _drive(eng, multi_step_tokens)
        return outs, calls, eng

    single, single_calls, eng1 = run(0)
    multi, multi_calls, eng2 = run(64)
    assert multi_calls < single_calls
    assert any(len(o.token_ids) > 1 for os in multi.values() for o in os)  # some calls were multi-step

    def flat(outs: list[EngineOutput]) -> tuple:
        return ([t for o in outs for t in o.token_ids], [lp for o in outs for lp in (o.logprobs or [])],
                outs[-1].finish_reason, outs[-1].num_prompt_tokens)

    assert {r: flat(o) for r, o in multi.items()} == {r: flat(o) for r, o in single.items()}
    assert single["s"][-1].finish_reason == "stop" and len(flat(single["s"])[0]) == 7
    assert len(flat(single["m"])[0]) > 2  # min_tokens held the early stop token back
    assert len(flat(single["b"])[1]) == 3 and len(flat(single["a"])[0]) == 20
    for eng in (eng1, eng2):
        assert eng.stats().kv_blocks_used == 0
    # the same blocks' contents cached (in other block ids: slots are allocated a run ahead)
    assert set(eng1.scheduler.kv.pool.cached) == set(eng2.scheduler.kv.pool.cached)  # type: ignore[union-attr]


def _drive_one(eng: MockerEngine, prompt: list[int], sp: SamplingParams) -> tuple[list[int], str | None]:
    from shared.engines.core import AddRequest

    eng._apply(AddRequest("x", prompt, sp))
    outs, _ = _drive(eng, 0)
    return [t for o in outs["x"] for t in o.token_ids], outs["x"][-1].finish_reason


def test_a_multi_step_batch_only_when_every_running_request_is_a_plain_decode() -> None:
    from shared.engines.core import AddRequest

    eng = MockerEngine(EngineConfig(**FAST, block_size=4))
    sched = eng.scheduler
    assert sched is not None
    eng._apply(AddRequest("a", [1, 2, 3], SamplingParams(max_tokens=40, ignore_eos=True)))
    assert sched.schedule(64).steps == 1  # a prefill: one step
    sched.update(*_sample(eng, sched.schedule(0)))
    eng._apply(AddRequest("b", [4, 5, 6], SamplingParams(max_tokens=40, ignore_eos=True)))
    assert sched.schedule(64).steps == 1  # something waits: one step (it is admitted)
    batch = sched.schedule(0)  # (the test's own step: a's decode and b's prefill)
    sched.update(*_sample(eng, batch))
    batch = sched.schedule(64)
    assert batch.steps == 16 and [n for _, n in batch.entries] == [16, 16]  # 64 tokens over 2 requests, 16 at most
    for req, n in batch.entries:  # slots for every step's token, allocated now
        assert len(req.blocks) * 4 >= req.num_computed_tokens + n
    assert sched.schedule(0).steps == 1 and sched.schedule(3).steps == 1  # off, or under 2 steps each


def test_a_multi_step_batch_takes_all_its_blocks_or_none() -> None:
    """A pool too small for every run's blocks gives a single step, and no blocks are taken for it
    (blocks taken for some runs could make the single step preempt)."""
    from shared.engines.core import AddRequest

    eng = MockerEngine(EngineConfig(**FAST, block_size=4, num_blocks=6))
    sched = eng.scheduler
    assert sched is not None
    for rid in ("a", "b"):
        eng._apply(AddRequest(rid, [1, 2, 3] if rid == "a" else [4, 5, 6], SamplingParams(max_tokens=40, ignore_eos=True)))
    sched.update(*_sample(eng, sched.schedule(0)))  # both prefilled: one block each, 4 free
    free = sched.kv.pool.num_free
    assert free == 4 and len(sched.running) == 2
    batch = sched.schedule(64)  # 16 steps each would need 4 more blocks each: 8 > 4
    assert batch.steps == 1 and sched.kv.pool.num_free == free  # each decode's slot is in its block already


def _sample(eng: MockerEngine, batch):  # type: ignore[no-untyped-def]
    result = eng.runner.execute(batch)
    return batch, result.tokens, result.logprobs


async def test_steps_that_simulate_time_run_one_a_turn() -> None:
    # 5 us a step: more than NEAR_FREE_STEP_S, so never back to back, however fast they compute.
    eng = MockerEngine(EngineConfig(engine="mocker", model="no-such-model", speedup=1000.0))
    turns = await _turns_of_outputs(eng, 16)
    assert len(set(turns)) == 16, turns


async def test_with_an_after_delivery_callback_the_burst_follows_the_first_token_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The callback (the worker's reply flush) runs as each turn's deliveries end, so the first
    # token is on its way before the next turn: that turn may burst. It sees every output of its
    # turn already delivered.
    monkeypatch.setattr("shared.engines.core.BURST_S", 5.0)
    eng = MockerEngine(EngineConfig(**FAST))
    delivered_at: list[int] = []
    seen_before: list[int] = []
    assert eng.on_delivered(lambda: delivered_at.append(len(seen_before))) is True
    real_put = eng._queues.put

    def put(outputs: list[EngineOutput]) -> None:
        seen_before.extend(t for o in outputs for t in o.token_ids)
        real_put(outputs)

    monkeypatch.setattr(eng._queues, "put", put)
    turns = await _turns_of_outputs(eng, 16)
    assert turns[0] < turns[1] and len(set(turns[1:])) == 1, turns
    assert 1 in delivered_at and 16 in delivered_at, delivered_at  # after the first token's turn, after the burst's


async def test_submit_now_hands_the_request_over_before_returning() -> None:
    eng = MockerEngine(EngineConfig(engine="mocker", model="no-such-model", speedup=1e4, num_blocks=32))
    sp = SamplingParams(max_tokens=12, seed=5, ignore_eos=True)
    prompt = list(range(3, 30))
    async with anyio.create_task_group() as tg:
        tg.start_soon(eng.run)
        await eng.wait_ready()
        want, _ = await collect(eng.generate("g", prompt, sp))
        stream = eng.submit_now("s", prompt, sp)
        assert stream is not None and eng.stats().waiting + eng.stats().running == 1  # no await in between
        got, fin = await collect(stream)
        assert got == want and fin.finish_reason == "length" and not stream.open
        stream.close()  # finished: closing again aborts nothing
        assert eng.stats().kv_blocks_used == 0

        # a grammar to compile first: generate() only
        assert eng.submit_now("x", prompt, SamplingParams(max_tokens=4, structured=StructuredOutput(
            kind="regex", spec="a+"))) is None
        tg.cancel_scope.cancel()

    slow = MockerEngine(EngineConfig(engine="mocker", model="no-such-model", speedup=1.0, num_blocks=32))
    long = SamplingParams(max_tokens=1000, ignore_eos=True)  # seconds of simulated steps
    async with anyio.create_task_group() as tg:
        tg.start_soon(slow.run)
        await slow.wait_ready()
        # closed before it finished (its task never ran, or gave up): aborted, its blocks freed
        early = slow.submit_now("e", prompt, long)
        assert early is not None and slow.stats().waiting + slow.stats().running == 1
        early.close()
        assert slow.stats().waiting + slow.stats().running == 0 and slow.stats().kv_blocks_used == 0

        # cancelled while it waits for an output: aborted too
        waiting = slow.submit_now("w", prompt, long)
        assert waiting is not None
        got_some = 0
        with anyio.move_on_after(0.2):
            async for out in waiting:
                got_some += len(out.token_ids)
        assert 0 < got_some < 1000 and not waiting.open
        assert slow.stats().running == 0 and slow.stats().kv_blocks_used == 0
        tg.cancel_scope.cancel()
