"""Block pool and prefix-cache accounting, and the KV events it records."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from shared.engines.base import KvEventBuffer
from shared.engines.kv_cache import BlockPool, KvCacheManager
from shared.kv_hash import ROOT_HASH, block_hashes

BS = 4


@dataclass
class Seq:
    token_ids: list[int]
    num_computed_tokens: int = 0
    blocks: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    num_cached_blocks: int = 0
    hash_root: int = ROOT_HASH


def compute_all(kv: KvCacheManager, seq: Seq) -> list[int]:
    """Admit a sequence with its prefix hits, 'compute' the rest and cache its full blocks."""
    hit = kv.lookup_prefix(seq)
    computed = len(hit) * BS
    assert kv.allocate_slots(seq, len(seq.token_ids) - computed, hit)
    seq.num_computed_tokens = len(seq.token_ids)
    kv.cache_computed(seq)
    return hit


def replay(events: KvEventBuffer) -> set[int]:
    """What a router's index would hold after applying the drained events in order."""
    held: set[int] = set()
    stored, removed, _ = events.drain()
    for ev in stored:
        held.update(ev.block_hashes)
    held.difference_update(removed)
    return held


def test_pool_counts_and_double_free() -> None:
    pool = BlockPool(8)
    a = pool.allocate(3)
    assert (pool.num_used, pool.num_free) == (3, 5)
    with pytest.raises(RuntimeError):
        pool.allocate(6)
    pool.free(a)
    assert (pool.num_used, pool.num_free) == (0, 8)
    with pytest.raises(RuntimeError):
        pool.free(a[:1])


def test_shared_prefix_is_reused_and_refcounted() -> None:
    events = KvEventBuffer()
    kv = KvCacheManager(16, BS, True, events)
    a = Seq(list(range(10)))  # 2 full blocks + 2 tokens
    assert compute_all(kv, a) == []
    assert kv.num_used_blocks == 3
    b = Seq([*list(range(8)), 99, 98, 97])
    hit = compute_all(kv, b)
    assert hit == a.blocks[:2]
    assert b.blocks[:2] == a.blocks[:2] and b.blocks[2] != a.blocks[2]
    assert kv.num_used_blocks == 4
    assert kv.pool.ref_counts[a.blocks[0]] == 2
    kv.free(a)
    assert kv.num_used_blocks == 3  # shared blocks stay with b
    kv.free(b)
    assert kv.num_used_blocks == 0 and kv.num_free_blocks == 16
    # freed but still cached: a third sequence hits them without anyone holding them
    c = Seq(list(range(9)))
    assert len(compute_all(kv, c)) == 2
    assert replay(events) == set(block_hashes(list(range(8)), BS))


def test_last_token_always_computed() -> None:
    kv = KvCacheManager(16, BS, True)
    compute_all(kv, Seq(list(range(8))))
    again = Seq(list(range(8)))
    # the whole prompt is cached, yet its last block is recomputed to get logits
    assert len(kv.lookup_prefix(again)) == 1


def test_eviction_is_lru_and_announced() -> None:
    events = KvEventBuffer()
    kv = KvCacheManager(4, BS, True, events)
    old, new = Seq(list(range(100, 108))), Seq(list(range(200, 208)))
    for s in (old, new):
        compute_all(kv, s)
        kv.free(s)
    assert kv.pool.num_cached == 4 and kv.num_free_blocks == 4
    replay(events)
    # two fresh blocks must evict the least recently freed content: `old`'s
    fresh = Seq(list(range(300, 308)))
    compute_all(kv, fresh)
    _, removed, _ = events.drain()
    assert set(removed) == set(block_hashes(old.token_ids, BS))
    assert len(kv.lookup_prefix(Seq(list(range(200, 209))))) == 2


def test_duplicate_content_kept_once_and_event_runs_stay_chained() -> None:
    events = KvEventBuffer()
    kv = KvCacheManager(16, BS, True, events)
    tokens = list(range(12))
    a, b = Seq([*tokens, 1]), Seq(tokens[:4] + [7] * 8 + [1])
    # both allocate before either is computed: the same first block is computed twice
    for s in (a, b):
        assert kv.allocate_slots(s, len(s.token_ids), kv.lookup_prefix(s))
    for s in (a, b):
        s.num_computed_tokens = len(s.token_ids)
        kv.cache_computed(s)
    stored, _, _ = events.drain()
    ha, hb = block_hashes(a.token_ids, BS), block_hashes(b.token_ids, BS)
    assert stored[0].block_hashes == ha and stored[0].parent_hash is None
    # b's first block duplicates a's: not announced again; b's own run hangs off that hash
    assert stored[1].block_hashes == hb[1:] and stored[1].parent_hash == hb[0]
    assert kv.pool.num_cached == 5
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == 16


def test_no_prefix_caching_means_no_hits_no_events() -> None:
    events = KvEventBuffer()
    kv = KvCacheManager(8, BS, False, events)
    s = Seq(list(range(9)))
    compute_all(kv, s)
    kv.free(s)
    assert compute_all(kv, Seq(list(range(9)))) == []
    assert events.drain() == ([], [], False)


def test_allocate_fails_without_side_effects() -> None:
    kv = KvCacheManager(3, BS, True)
    s = Seq(list(range(20)))
    assert not kv.allocate_slots(s, 20)
    assert s.blocks == [] and kv.num_free_blocks == 3
    assert kv.allocate_slots(s, 12)
    assert kv.num_free_blocks == 0
