"""Disaggregated prefill/decode with real processes (nats-server, router, frontend, workers).

Greedy output through a prefill worker and a KV transfer is token for token the output of an
aggregated worker; the remote path is proven taken by the decode worker's own metrics; the block
pools of every worker are whole afterwards.
"""

from __future__ import annotations

import random

import anyio
import msgspec
import nats
import pytest

from shared import subjects
from shared.messages import GenerateRequest, SamplingParams, TokenChunk, generate_reply_decoder
from tests.conftest import e2e_engine
from tests.disagg.util import DisaggStack, aggregated_beside_disaggregated, generate_direct, latest_loads

pytestmark = pytest.mark.timeout(180)

DECISIONS = "baton_disagg_decisions_total"


@pytest.fixture()
def torch_stack(tmp_path):
    if e2e_engine() != "torch":
        pytest.skip("greedy equality needs the torch engine")
    # Chunked prefill on the prefill worker too (the decode worker's budget is the default 512).
    with aggregated_beside_disaggregated(tmp_path) as s:
        yield s


async def generate_choices(nc: nats.NATS, worker_id: str, request_id: str, prompt: list[int],
                           sampling: SamplingParams) -> dict[int, list[int]]:
    """A generate request straight to a decode worker, read until its last chunk (the one with usage)."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    out: dict[int, list[int]] = {}
    try:
        req = GenerateRequest(request_id=request_id, token_ids=prompt, sampling=sampling)
        await nc.publish(subjects.generate(worker_id), msgspec.msgpack.encode(req), reply=inbox)
        with anyio.fail_after(60):
            while True:
                reply = generate_reply_decoder.decode((await sub.next_msg(timeout=60)).data)
                assert isinstance(reply, TokenChunk), reply
                out.setdefault(reply.choice, []).extend(reply.token_ids)
                if reply.usage is not None:
                    return out
    finally:
        await sub.unsubscribe()


def test_torch_greedy_identical_aggregated_and_disaggregated(torch_stack: DisaggStack) -> None:
    s = torch_stack
    rng = random.Random(5)
    system = [rng.randrange(3, 2000) for _ in range(70)]  # a shared prefix: prefix-cache hits on both sides
    prompts = [
        [rng.randrange(3, 2000) for _ in range(40)],
        [rng.randrange(3, 2000) for _ in range(300)],  # chunked on the prefill worker
        [rng.randrange(3, 2000) for _ in range(64)],  # whole blocks, nothing partial
        system + [rng.randrange(3, 2000) for _ in range(30)],
        [rng.randrange(3, 2000) for _ in range(600)],  # chunked on both sides
    ]
    second_wave = [system + [rng.randrange(3, 2000) for _ in range(25)]]  # hits the cached system prompt
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=42, ignore_eos=True)

    async def main() -> None:
        nc = await nats.connect(s.nats.url)
        try:
            # The decode worker learns of the prefill worker through discovery: wait for a remote decision.
            with anyio.fail_after(60):
                n = 0
                while s.metric("decode-1", DECISIONS, decision="remote") < 1:
                    r = await generate_direct(nc, "decode-dis", f"warm-{n}", list(range(5, 60 + n)), greedy)
                    assert r.finish_reason == "length", r
                    n += 1
            before = s.metric("decode-1", DECISIONS, decision="remote")
            # Fresh prompts each round: a prompt the decode worker has cached is (rightly) prefilled locally.
            rounds = [("greedy", greedy, prompts), ("seeded", seeded, [p[::-1] for p in prompts]),
                      ("greedy2", greedy, second_wave)]
            for sp_name, sp, wave in rounds:
                results: dict[tuple[str, int], list[int]] = {}

                async def one(worker: str, i: int, prompt: list[int], sp: SamplingParams = sp,
                              tag: str = sp_name, results: dict = results) -> None:
                    r = await generate_direct(nc, worker, f"{worker}-{tag}-{len(prompt)}-{i}", prompt, sp)
                    assert r.finish_reason == "length" and r.error is None, r
                    assert len(r.tokens) == sp.max_tokens
                    results[(worker, i)] = r.tokens

                async with anyio.create_task_group() as tg:  # concurrent: batched decodes too
                    for i, p in enumerate(wave):
                        tg.start_soon(one, "decode-agg", i, p)
                        tg.start_soon(one, "decode-dis", i, p)
                for i in range(len(wave)):
                    assert results[("decode-dis", i)] == results[("decode-agg", i)], (sp_name, i)
            # Every one of those prompts went remote (none fell back), and the aggregated worker stayed local.
            remote = s.metric("decode-1", DECISIONS, decision="remote") - before
            assert remote == sum(len(w) for _, _, w in rounds), s.metrics_text("decode-1")
            assert s.metric("decode-1", DECISIONS, decision="fallback_local") == 0
            assert s.metric("decode-0", DECISIONS, decision="remote") == 0
            assert s.metric("prefill-0", "baton_prefill_kv_blocks_sent_total") > 0
            # The second wave reused the cached system prompt on the decode side (gauge refreshed each second).
            s.wait_metric("decode-1", "baton_worker_prefix_cache_hit_tokens", lambda v: v >= 64, 10)
            # n > 1 is prefilled locally on a disaggregated decode worker (a remote prefill hands
            # back one first token), every choice streamed with its index.
            remote_before = s.metric("decode-1", DECISIONS, decision="remote")
            choices = await generate_choices(nc, "decode-dis", "n-two", prompts[1][::-2], SamplingParams(
                n=2, max_tokens=8, temperature=1.0, seed=1, ignore_eos=True))
            assert sorted(choices) == [0, 1] and all(len(t) == 8 for t in choices.values())
            assert s.metric("decode-1", DECISIONS, decision="remote") == remote_before
            # Idle again: every pool is whole.
            await latest_loads(nc, ["decode-agg", "decode-dis"], lambda r: r.kv_blocks_used == 0, 15)
            s.wait_metric("prefill-0", "baton_prefill_kv_blocks_used", lambda v: v == 0, 10)
        finally:
            await nc.close()

    anyio.run(main)
