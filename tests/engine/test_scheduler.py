"""Continuous batching: chunked prefill, preemption under KV pressure, stop conditions."""

from __future__ import annotations

from collections import defaultdict

from shared.engines.base import EngineOutput, KvEventBuffer
from shared.engines.request import Request
from shared.engines.scheduler import ScheduledBatch, Scheduler, preemption_victim
from shared.messages import SamplingParams

BS = 4
EOS = 1


def make(num_blocks: int = 64, max_num_seqs: int = 8, budget: int = 32, **kw: object) -> Scheduler:
    return Scheduler(
        num_blocks=num_blocks,
        block_size=BS,
        max_num_seqs=max_num_seqs,
        max_batched_tokens=budget,
        eos_token_ids=[EOS],
        **kw,  # type: ignore[arg-type]
    )


def fake_token(req: Request) -> int:
    """A token that depends only on the sequence so far, like greedy decoding of a real model."""
    return 10 + (sum(req.token_ids) * 31 + len(req.token_ids)) % 1000


def drive(
    sched: Scheduler, max_steps: int = 10_000
) -> tuple[dict[str, list[int]], dict[str, EngineOutput], list[ScheduledBatch]]:
    tokens: dict[str, list[int]] = defaultdict(list)
    final: dict[str, EngineOutput] = {}
    batches = []
    for _ in range(max_steps):
        if not sched.has_work():
            break
        batch = sched.schedule()
        assert batch.entries, "work pending but nothing scheduled: a hang"
        assert batch.num_tokens <= sched.max_batched_tokens
        assert len(sched.running) <= sched.max_num_seqs
        batches.append(batch)
        for out in sched.update(batch, [fake_token(r) for r in batch.samplers]):
            tokens[out.request_id] += out.token_ids
            if out.finish_reason:
                final[out.request_id] = out
    assert not sched.has_work()
    return dict(tokens), final, batches


def add(sched: Scheduler, rid: str, prompt: list[int], **sp: object) -> Request:
    req = sched.add(rid, prompt, SamplingParams(**sp))  # type: ignore[arg-type]
    assert isinstance(req, Request)
    return req


def test_chunked_prefill_keeps_decodes_running() -> None:
    sched = make(budget=16)
    add(sched, "short", [5, 6, 7], max_tokens=20, ignore_eos=True)
    sched.update(sched.schedule(), [100])  # "short" now decodes
    add(sched, "long", list(range(10, 70)), max_tokens=2, ignore_eos=True)
    chunks = []
    while sched.requests["long"].num_output_tokens == 0:
        batch = sched.schedule()
        # the running decode is always first and never starved by the 60-token prompt
        assert batch.entries[0][0].request_id == "short" and batch.entries[0][1] == 1
        assert batch.num_decodes == 1
        chunks += [n for r, n in batch.entries if r.request_id == "long"]
        sched.update(batch, [fake_token(r) for r in batch.samplers])
    assert chunks == [15, 15, 15, 15]


def test_preemption_under_pressure_finishes_everything_with_same_output() -> None:
    prompts = {f"r{i}": [20 + i] * (5 + 2 * i) for i in range(12)}
    params = {"max_tokens": 24, "ignore_eos": True}  # the longest needs 51 of the 56 slots

    roomy = make(num_blocks=512, max_num_seqs=16, budget=64)
    for rid, p in prompts.items():
        add(roomy, rid, p, **params)
    expected, _, _ = drive(roomy)

    events = KvEventBuffer()
    tight = make(num_blocks=14, max_num_seqs=16, budget=64, kv_events=events)
    for rid, p in prompts.items():
        add(tight, rid, p, **params)
    got, final, _ = drive(tight)
    assert tight.num_preemptions > 0
    assert got == expected
    assert all(final[rid].finish_reason == "length" for rid in prompts)
    assert tight.kv.num_used_blocks == 0 and tight.kv.num_free_blocks == 14
    assert tight.stats().preemptions == tight.num_preemptions


def test_prompt_that_can_never_fit_errors_and_others_proceed() -> None:
    sched = make(num_blocks=4)
    out = sched.add("huge", list(range(17)), SamplingParams())
    assert isinstance(out, EngineOutput) and out.finish_reason == "error" and "KV cache" in (out.error or "")
    add(sched, "ok", list(range(16)), max_tokens=5, ignore_eos=True)
    tokens, final, _ = drive(sched)
    # 16 prompt tokens fill the pool: one token, then no room to decode it
    assert tokens["ok"] and final["ok"].finish_reason == "length"
    assert sched.kv.num_free_blocks == 4


def test_model_length_and_bad_input_rejected() -> None:
    sched = make(max_model_len=10, vocab_size=50)
    for prompt in ([], list(range(10)), [3, 60]):
        out = sched.add("x", prompt, SamplingParams())
        assert isinstance(out, EngineOutput) and out.finish_reason == "error"
    add(sched, "ok", list(range(7)), max_tokens=100, ignore_eos=True)
    tokens, final, _ = drive(sched)
    assert len(tokens["ok"]) == 3 and final["ok"].finish_reason == "length"


def test_stop_conditions() -> None:
    def run_one(**sp: object) -> tuple[list[int], str | None]:
        sched = make()
        add(sched, "r", [2, 3, 4], **sp)
        tokens, final, _ = drive(sched)
        return tokens["r"], final["r"].finish_reason

    free_run, reason = run_one(max_tokens=12, ignore_eos=True)
    assert len(free_run) == 12 and reason == "length"
    stop_at = free_run[5]
    first = free_run.index(stop_at)
    toks, reason = run_one(max_tokens=12, stop_token_ids=[stop_at])
    assert toks == free_run[: first + 1] and reason == "stop"
    # min_tokens: a stop id before min_tokens does not stop
    toks, reason = run_one(max_tokens=12, stop_token_ids=[free_run[0]], min_tokens=3)
    later = [i for i, t in enumerate(free_run) if t == free_run[0] and i >= 2]
    assert toks == free_run[: later[0] + 1] if later else len(toks) == 12


def test_eos_stops_unless_ignored() -> None:
    sched = make()
    req = add(sched, "r", [2, 3], max_tokens=10)
    sched.update(sched.schedule(), [50])
    (out,) = sched.update(sched.schedule(), [EOS])
    assert out.finish_reason == "stop" and out.token_ids == [EOS]
    assert sched.kv.num_used_blocks == 0 and not sched.has_work()
    req = add(sched, "r2", [2, 3], max_tokens=10, ignore_eos=True)
    sched.update(sched.schedule(), [EOS])
    assert req.status != 2 and sched.has_work()


def test_abort_frees_blocks_everywhere() -> None:
    sched = make(num_blocks=16, max_num_seqs=1)
    add(sched, "run", list(range(10)), max_tokens=50)
    add(sched, "wait", list(range(10)), max_tokens=50)
    sched.update(sched.schedule(), [7])
    assert sched.kv.num_used_blocks == 3 and len(sched.waiting) == 1
    out = sched.abort("run")
    assert out is not None and out.finish_reason == "abort"
    assert sched.abort("run") is None
    assert sched.abort("wait") is not None
    assert sched.kv.num_used_blocks == 0 and not sched.has_work()


def test_max_num_seqs_and_budget_respected() -> None:
    sched = make(num_blocks=256, max_num_seqs=3, budget=10)
    for i in range(7):
        add(sched, f"r{i}", [30 + i] * 9, max_tokens=6, ignore_eos=True)
    tokens, _, batches = drive(sched)
    assert all(len(t) == 6 for t in tokens.values()) and len(tokens) == 7
    assert max(len(b.entries) for b in batches) <= 3


# --- priorities (vLLM's: lower is served first, preempted last) ---------------------------------


def test_waiting_queue_is_ordered_by_priority_then_arrival() -> None:
    sched = make(max_num_seqs=1)
    for rid, priority in (("late-low", 5), ("normal-1", 0), ("urgent", -3), ("normal-2", 0)):
        add(sched, rid, [5, 6, 7], max_tokens=1, ignore_eos=True, priority=priority)
    assert [r.request_id for r in sched.waiting] == ["urgent", "normal-1", "normal-2", "late-low"]
    order = []
    while sched.has_work():
        batch = sched.schedule()
        order += [r.request_id for r, _ in batch.entries]
        sched.update(batch, [fake_token(r) for r in batch.samplers])
    assert order == ["urgent", "normal-1", "normal-2", "late-low"]


def test_kv_pressure_preempts_the_lowest_priority_first() -> None:
    # 8 blocks of 4: three requests of 8 prompt tokens take 6; growing to 12 tokens each needs 9
    sched = make(num_blocks=8, max_num_seqs=8, budget=64)
    add(sched, "high", [20] * 8, max_tokens=8, ignore_eos=True, priority=-1)
    add(sched, "low", [21] * 8, max_tokens=8, ignore_eos=True, priority=7)
    add(sched, "normal", [22] * 8, max_tokens=8, ignore_eos=True)
    victims: list[tuple[str, int]] = []
    while sched.num_preemptions == 0:
        running = [r.request_id for r in sched.running]
        batch = sched.schedule()
        if sched.num_preemptions:
            victims = [(r.request_id, r.priority) for r in sched.waiting]
            assert set(running) - {r.request_id for r in sched.running} == {"low"}
        sched.update(batch, [fake_token(r) for r in batch.samplers])
    assert victims == [("low", 7)]  # the newest admitted ("normal") stays: priority decides first
    _, final, _ = drive(sched)
    assert all(final[rid].finish_reason == "length" for rid in ("high", "low", "normal"))


def test_victim_choice_is_one_function() -> None:
    reqs = [Request(f"r{i}", [1], SamplingParams(priority=p), frozenset()) for i, p in enumerate((0, 3, 3, -2))]
    assert preemption_victim(reqs).request_id == "r2"  # lowest priority; of the two, the later admitted
    assert preemption_victim(reqs[:1]).request_id == "r0"
    same = [Request(f"s{i}", [1], SamplingParams(), frozenset()) for i in range(3)]
    assert preemption_victim(same) is same[-1]  # one priority: the most recently admitted, as before
