"""Disaggregated prefill/decode over the UCX transport, with real processes end to end.

nats-server, router, frontend, one prefill worker and two decode workers (one aggregated, one
disaggregated), the KV transport set to ``ucx`` on every worker (``BATON_KV_TRANSPORT``). Greedy
output through the prefill worker and a UCX transfer must be token for token the aggregated
worker's; the remote path is proven taken by the decode worker's metrics and the UCX endpoint it
advertised. The TCP twin with more prompt shapes is ``test_disagg_e2e.py``; this one stays short.
"""

from __future__ import annotations

import importlib.util
import random

import anyio
import nats
import pytest

from shared.messages import SamplingParams
from tests.conftest import e2e_engine
from tests.disagg.util import DisaggStack, aggregated_beside_disaggregated, generate_direct, latest_loads
from tests.procs import wait_until
from tests.require import missing

pytestmark = pytest.mark.timeout(180)

DECISIONS = "baton_disagg_decisions_total"


@pytest.fixture()
def ucx_stack(tmp_path):
    if importlib.util.find_spec("ucxx") is None:
        missing("ucxx is not installed (pip install 'baton[ucx]')")
    if e2e_engine() != "torch":
        pytest.skip("greedy equality needs the torch engine (BATON_TEST_ENGINE asks for another)")
    with aggregated_beside_disaggregated(tmp_path, env={"BATON_KV_TRANSPORT": "ucx"}) as s:
        yield s


def test_ucx_greedy_identical_aggregated_and_disaggregated(ucx_stack: DisaggStack) -> None:
    s = ucx_stack
    # The disaggregated worker's KV listener is a UCX one (not the TCP default).
    wait_until(lambda: "KV transport ucx at ucx://" in s.decoders[1].log(), 10, 0.1, "UCX listener logged")
    rng = random.Random(11)
    prompts = [
        [rng.randrange(3, 2000) for _ in range(40)],  # a partial last block
        [rng.randrange(3, 2000) for _ in range(300)],  # chunked on the prefill worker
        [rng.randrange(3, 2000) for _ in range(64)],  # whole blocks only
    ]
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)

    async def main() -> None:
        nc = await nats.connect(s.nats.url)
        try:
            with anyio.fail_after(60):  # the decode worker learns of the prefill worker through discovery
                n = 0
                while s.metric("decode-1", DECISIONS, decision="remote") < 1:
                    r = await generate_direct(nc, "decode-dis", f"warm-{n}", list(range(5, 60 + n)), greedy)
                    assert r.finish_reason == "length", r
                    n += 1
            before = s.metric("decode-1", DECISIONS, decision="remote")
            results: dict[tuple[str, int], list[int]] = {}

            async def one(worker: str, i: int, prompt: list[int]) -> None:
                r = await generate_direct(nc, worker, f"{worker}-{i}", prompt, greedy)
                assert r.finish_reason == "length" and r.error is None, r
                assert len(r.tokens) == greedy.max_tokens
                results[(worker, i)] = r.tokens

            async with anyio.create_task_group() as tg:  # concurrent: batched decodes and transfers
                for i, p in enumerate(prompts):
                    tg.start_soon(one, "decode-agg", i, p)
                    tg.start_soon(one, "decode-dis", i, p)
            for i in range(len(prompts)):
                assert results[("decode-dis", i)] == results[("decode-agg", i)], i
            # Every prompt went remote over UCX (none fell back), and the aggregated worker stayed local.
            assert s.metric("decode-1", DECISIONS, decision="remote") - before == len(prompts)
            assert s.metric("decode-1", DECISIONS, decision="fallback_local") == 0
            assert s.metric("decode-0", DECISIONS, decision="remote") == 0
            assert s.metric("prefill-0", "baton_prefill_kv_blocks_sent_total") > 0
            await latest_loads(nc, ["decode-agg", "decode-dis"], lambda r: r.kv_blocks_used == 0, 15)
            s.wait_metric("prefill-0", "baton_prefill_kv_blocks_used", lambda v: v == 0, 10)
        finally:
            await nc.close()

    anyio.run(main)
