"""KV tiers: bit-exact round trips, demotion, corruption detection, restart reuse, eviction policies."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.engines.eviction import LruPolicy, S3FifoPolicy
from shared.engines.kv_tiers import TIER_DISK, TIER_HOST, DiskTier, HostTier, TieredKvStore


def block(i: int, n: int = 4096) -> bytes:
    return np.random.default_rng(i).integers(0, 256, n, dtype=np.uint8).tobytes()


def test_host_and_disk_round_trip_bit_exact(tmp_path) -> None:
    host = HostTier(8)
    disk = DiskTier(tmp_path, 8)
    for i in range(5):
        host.put(1000 + i, block(i))
        disk.put(2000 + i, block(i))
    for i in range(5):
        assert host.get(1000 + i) == block(i)
        assert disk.get(2000 + i) == block(i)
    assert host.get(99) is None and disk.get(99) is None


def test_demotion_to_disk_and_promotion(tmp_path) -> None:
    stored: list[tuple[int, list[int]]] = []
    removed: list[tuple[int, list[int]]] = []
    store = TieredKvStore(host_blocks=2, disk_dir=tmp_path, disk_blocks=10, policy="lru",
                          on_stored=lambda t, hs: stored.append((t, hs)), on_removed=lambda t, hs: removed.append((t, hs)))
    for i in range(5):
        assert store.offload(i, block(i))
    store.flush()
    assert store.contains(4) == TIER_HOST and store.contains(0) == TIER_DISK
    tier, data = store.lookup(0)
    assert tier == TIER_DISK and data == block(0)
    store.flush()
    assert store.contains(0) == TIER_HOST  # a disk hit comes back up for the next turn
    assert any(t == TIER_DISK for t, _ in stored) and any(t == TIER_HOST for t, _ in removed)
    assert store.lookup(12345) is None
    store.close()


def test_corrupt_and_truncated_blocks_are_dropped(tmp_path) -> None:
    disk = DiskTier(tmp_path, 8)
    disk.put(7, block(7))
    disk.put(8, block(8))
    f7 = tmp_path / f"{7:016x}.kv"
    raw = bytearray(f7.read_bytes())
    raw[-100] ^= 0xFF  # one flipped bit in the payload
    f7.write_bytes(bytes(raw))
    f8 = tmp_path / f"{8:016x}.kv"
    f8.write_bytes(f8.read_bytes()[:-10])  # truncated
    assert disk.get(7) is None and disk.get(8) is None
    assert disk.stats.corrupt == 2
    assert not f7.exists() and not f8.exists() and 7 not in disk and 8 not in disk


def test_restarted_worker_reuses_its_disk_blocks(tmp_path) -> None:
    disk = DiskTier(tmp_path, 8)
    for i in range(3):
        disk.put(i, block(i))
    (tmp_path / "garbage.kv").write_bytes(b"not a block")
    again = DiskTier(tmp_path, 8)
    assert sorted(again.keys()) == [0, 1, 2]
    assert again.get(1) == block(1)
    assert not (tmp_path / "garbage.kv").exists()
    stored: list[int] = []
    TieredKvStore(host_blocks=0, disk_dir=tmp_path, disk_blocks=8,
                  on_stored=lambda t, hs: stored.extend(hs)).close()
    assert sorted(stored) == [0, 1, 2]  # announced to routers at start


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 30)), max_size=300), st.integers(1, 12))
@settings(max_examples=200)
def test_lru_matches_reference(ops: list[tuple[bool, int]], cap: int) -> None:
    lru = LruPolicy(cap)
    ref: list[int] = []
    for is_insert, k in ops:
        if is_insert:
            evicted = lru.insert(k)
            if k in ref:
                ref.remove(k)
                ref.append(k)
                assert evicted == []
            else:
                ref.append(k)
                expect = ref[: max(0, len(ref) - cap)]
                ref = ref[len(expect):]
                assert evicted == expect
        else:
            hit = lru.touch(k)
            assert hit == (k in ref)
            if hit:
                ref.remove(k)
                ref.append(k)
        assert sorted(ref) == sorted(k for k in range(31) if k in lru)


@given(st.lists(st.tuples(st.sampled_from(["insert", "touch", "remove"]), st.integers(0, 40)), max_size=400),
       st.integers(1, 20))
@settings(max_examples=200)
def test_s3fifo_invariants(ops: list[tuple[str, int]], cap: int) -> None:
    p = S3FifoPolicy(cap)
    held: set[int] = set()
    for op, k in ops:
        if op == "insert":
            evicted = p.insert(k)
            held |= {k}
            held -= set(evicted)
            assert k in p and not set(evicted) & {kk for kk in held}
        elif op == "touch":
            assert p.touch(k) == (k in held)
        else:
            p.remove(k)
            held.discard(k)
        assert len(p) <= cap
        assert {kk for kk in range(41) if kk in p} == held


def test_s3fifo_resists_a_scan_that_flushes_lru() -> None:
    """A hot block reused between long runs of one-time blocks (a shared system prompt among
    single-turn prompts) survives in S3-FIFO and is flushed out of LRU."""
    lru, s3 = LruPolicy(20), S3FifoPolicy(20)
    hits = {"lru": 0, "s3": 0}
    for p, name in ((lru, "lru"), (s3, "s3")):
        new = iter(range(1000, 100000))
        p.insert(0)
        p.touch(0)
        for _ in range(30):
            for _ in range(25):  # more one-time blocks than the cache holds
                p.insert(next(new))
            if p.touch(0):
                hits[name] += 1
            else:
                p.insert(0)  # a miss: recomputed and cached again
    assert hits["s3"] > hits["lru"]
