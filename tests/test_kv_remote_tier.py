"""G4, the remote KV tier: a worker pulls a prompt's blocks from a peer's host tier over the KV
transport instead of recomputing them, and the greedy output is the same."""

from __future__ import annotations

import random
import uuid

import anyio
import nats
import pytest

from shared import subjects
from shared.messages import GenerateRequest, SamplingParams, TokenChunk, encode, generate_reply_decoder
from tests.conftest import e2e_engine
from tests.procs import Stack

pytestmark = pytest.mark.timeout(180)

_rng = random.Random(3)
PROMPT = [_rng.randrange(5, 2000) for _ in range(100)]  # 6 full blocks of 16
FILLERS = [[_rng.randrange(5, 2000) for _ in range(200)] for _ in range(3)]


async def generate(nc, worker: str, tokens: list[int], **hint: object) -> tuple[list[int], TokenChunk]:
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    req = GenerateRequest(request_id=uuid.uuid4().hex, token_ids=tokens, model="baton-tiny", stream=False,
                          sampling=SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), **hint)
    await nc.publish(subjects.generate(worker), encode(req), reply=inbox)
    with anyio.fail_after(60):
        reply = generate_reply_decoder.decode((await sub.next_msg(timeout=60)).data)
    await sub.unsubscribe()
    assert isinstance(reply, TokenChunk) and reply.finish_reason == "length", reply
    return reply.token_ids, reply


@pytest.fixture()
def tiered(tmp_path):
    if e2e_engine() != "torch":
        pytest.skip("the KV tiers hold real KV bytes only with the torch engine")
    s = Stack(tmp_path, "torch", decode_workers=2, decode_ids=["decode-a", "decode-b"],
              extra_decode_args=["--num-blocks", "16", "--host-kv-blocks", "256", "--no-disagg"])
    try:
        yield s.start()
    finally:
        s.stop()


def test_worker_pulls_blocks_from_a_peers_host_tier(tiered: Stack) -> None:
    async def main() -> None:
        nc = await nats.connect(tiered.nats.url)
        try:
            reference, _ = await generate(nc, "decode-a", PROMPT)
            for f in FILLERS:  # push the prompt's blocks out of decode-a's device pool, into its host tier
                await generate(nc, "decode-a", f)
            # decode-b has never seen the prompt; told decode-a holds it, it pulls instead of computing.
            pulled, chunk = await generate(nc, "decode-b", PROMPT, kv_source="decode-a", kv_source_blocks=6)
            assert pulled == reference
            assert chunk.usage.cached_tokens >= 5 * 16  # served from pulled blocks, not recomputed
            # Without the hint, a worker that never saw a prompt computes all of it.
            other = [_rng.randrange(5, 2000) for _ in range(100)]
            _, cold = await generate(nc, "decode-b", other)
            assert cold.usage.cached_tokens == 0
        finally:
            await nc.close()

    anyio.run(main)
