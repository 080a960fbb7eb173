"""The torch engine with host and disk KV tiers: evicted prefixes come back bit-exact instead of
being recomputed, greedy output is unchanged, corrupt disk blocks are recomputed, pools stay whole."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.require import require_module

require_module("torch", "pip install 'baton[torch]'")

from shared.engines.base import ViewBlockIO  # noqa: E402
from shared.kv_hash import block_hashes  # noqa: E402
from tests.engine.test_torch_engine import Running, collect, greedy  # noqa: E402

pytestmark = pytest.mark.anyio

BLOCK = 4
_rng = random.Random(7)
CONVERSATION = [_rng.randrange(5, 2000) for _ in range(40)]  # 10 full blocks
FILLERS = [[_rng.randrange(5, 2000) for _ in range(40)] for _ in range(4)]  # enough to evict it


async def run(engine, tag: str, prompt: list[int]) -> list[int]:
    tokens, fin = await collect(engine.generate(tag, prompt, greedy(6)))
    assert fin.finish_reason == "length"
    return tokens


def cached_bytes(engine, prompt: list[int]) -> dict[int, bytes]:
    """The pool bytes of every full block of ``prompt`` still cached on the device, by hash."""
    pool = engine.scheduler.kv.pool
    io = ViewBlockIO(engine.kv_views)
    return {h: io.read(pool.cached[h]) for h in block_hashes(prompt, BLOCK) if h in pool.cached}


async def scenario(tmp_path: Path | None, **tiers: object) -> tuple[list[int], list[int], dict, dict, object]:
    # 24 blocks: the conversation (11 with its output) is evicted by the fillers.
    async with Running(num_blocks=24, **tiers) as engine:
        first = await run(engine, "turn-1", CONVERSATION)
        before = cached_bytes(engine, CONVERSATION)
        for i, f in enumerate(FILLERS):
            await run(engine, f"filler-{i}", f)
        assert len(cached_bytes(engine, CONVERSATION)) < len(before)  # evicted from the device
        if engine.kv_tiers is not None:
            engine.kv_tiers.flush()  # the background writer has stored every evicted block
        hits_before = engine.stats().prefix_hit_tokens
        again = await run(engine, "turn-2", CONVERSATION)
        after = cached_bytes(engine, CONVERSATION)
        stats = engine.stats()
        assert stats.kv_blocks_used == 0 and stats.running == 0  # the pool is whole
        return first, again, before, after, (stats.prefix_hit_tokens - hits_before, engine)


async def test_host_tier_brings_prefix_back_bit_exact() -> None:
    base_first, base_again, _, _, (base_hits, _) = await scenario(None)
    first, again, before, after, (hits, engine) = await scenario(None, host_kv_blocks=64)
    assert first == base_first and again == base_again == first  # greedy output unchanged by offload
    assert base_hits == 0  # without tiers the evicted prefix is recomputed
    assert hits >= 8 * BLOCK  # with a host tier it came back from host memory instead
    assert engine.scheduler.kv.onboarded_blocks >= 8
    # Bit-exact round trip of the blocks that came back from the host. The prompt's last block is
    # recomputed (its last token always is), and a recomputation at another batch shape need not
    # match bit for bit on every CPU (it differs on some), so it is not compared.
    onboarded = block_hashes(CONVERSATION, BLOCK)[: hits // BLOCK]
    assert len(onboarded) >= 8 and all(h in before and h in after for h in onboarded)
    assert all(before[h] == after[h] for h in onboarded)
    assert engine.tier_events[2].drain()[0]  # host-tier stores were announced for routers


async def test_disk_tier_and_corruption(tmp_path: Path) -> None:
    disk = tmp_path / "kv"
    first, again, _, _, (hits, _engine) = await scenario(tmp_path, disk_kv_dir=str(disk), disk_kv_blocks=64)
    assert again == first and hits >= 8 * BLOCK
    # Corrupt every block on disk: the next onboarding must detect it and recompute instead.
    for f in disk.glob("*.kv"):
        raw = bytearray(f.read_bytes())
        raw[-1] ^= 0x01
        f.write_bytes(bytes(raw))
    first2, again2, _, _, (_hits2, engine2) = await scenario(tmp_path, disk_kv_dir=str(disk), disk_kv_blocks=64)
    assert first2 == first and again2 == first  # still the right answer
    assert engine2.kv_tiers.disk.stats.corrupt >= 1
