"""KvBlockIndex against a brute-force reference (sets per worker) on random workloads."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from shared.messages import KvEventBatch, KvStored
from shared.routing.kv_index import (
    EventOutcome,
    KvBlockIndex,
    WorkerSlots,
    depths_by_slot,
    prefix_depths,
)

# A small universe of hashes makes workers share blocks; a few 64-bit ones keep the real shape.
HASHES = st.one_of(st.integers(0, 40), st.integers(2**63, 2**63 + 3), st.integers(2**64 - 3, 2**64 - 1))
RUNS = st.lists(HASHES, min_size=0, max_size=12)
# Up to 70 workers: masks cross the 64-bit boundary.
WORKERS = st.integers(0, 69).map(lambda i: f"w{i}")


class Reference:
    """What the index must say, the slow obvious way."""

    def __init__(self) -> None:
        self.blocks: dict[str, set[int]] = {}
        self.last_seq: dict[str, int] = {}

    def apply(self, b: KvEventBatch) -> EventOutcome:
        held = self.blocks.setdefault(b.worker_id, set())
        last = self.last_seq.get(b.worker_id, 0)
        outcome = EventOutcome.APPLIED
        if last:
            if b.seq == last + 1:
                pass
            elif b.seq <= last:
                if b.seq != 1:
                    return EventOutcome.DUPLICATE
                held.clear()
                outcome = EventOutcome.RESTARTED
            else:
                held.clear()
                outcome = EventOutcome.GAP
        elif b.seq != 1 and not b.cleared:
            outcome = EventOutcome.FIRST_GAP
        self.last_seq[b.worker_id] = b.seq
        if b.tier != 1:
            return EventOutcome.OTHER_TIER if outcome is EventOutcome.APPLIED else outcome
        if b.cleared:
            held.clear()
        for run in b.stored:
            held.update(run.block_hashes)
        held.difference_update(b.removed)
        return outcome

    def overlaps(self, hashes: list[int]) -> dict[str, int]:
        out = {}
        for w, held in self.blocks.items():
            n = 0
            while n < len(hashes) and hashes[n] in held:
                n += 1
            if n:
                out[w] = n
        return out


def check_same(index: KvBlockIndex, ref: Reference, queries: list[list[int]]) -> None:
    for w, held in ref.blocks.items():
        assert index.worker_blocks(w) == held, w
        assert index.block_count(w) == len(held), w
    union = set().union(*ref.blocks.values()) if ref.blocks else set()
    assert set(index.holders) == union
    assert all(index.holders.values())  # no zero masks left behind
    assert index.num_entries == sum(len(s) for s in ref.blocks.values())
    for q in queries:
        assert index.overlaps(q) == ref.overlaps(q), q


batch_st = st.builds(
    lambda w, seq_step, stored, removed, cleared, tier: (w, seq_step, stored, removed, cleared, tier),
    WORKERS,
    st.sampled_from([1, 1, 1, 1, 1, 1, 0, 2, -3, "restart"]),  # mostly in order; dups, gaps, restarts
    st.lists(RUNS, max_size=3),
    st.lists(HASHES, max_size=8),
    st.sampled_from([False] * 9 + [True]),
    st.sampled_from([1] * 9 + [2]),
)


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(st.one_of(batch_st, st.tuples(st.just("drop"), WORKERS)), min_size=1, max_size=40),
    queries=st.lists(st.lists(HASHES, min_size=1, max_size=10), min_size=1, max_size=6),
)
def test_index_matches_reference(ops: list, queries: list[list[int]]) -> None:
    index = KvBlockIndex()
    ref = Reference()
    seqs: dict[str, int] = {}
    for op in ops:
        if op[0] == "drop":
            index.drop_worker(op[1])
            ref.blocks.pop(op[1], None)
            ref.last_seq.pop(op[1], None)
            seqs.pop(op[1], None)
            continue
        w, step, stored, removed, cleared, tier = op
        seq = 1 if step == "restart" else max(1, seqs.get(w, 0) + step)
        seqs[w] = max(seqs.get(w, 0), seq) if step != "restart" else 1
        batch = KvEventBatch(worker_id=w, seq=seq, stored=[KvStored(block_hashes=r) for r in stored],
                             removed=removed, cleared=cleared, tier=tier)
        assert index.apply(batch) == ref.apply(batch)
    # Queries: random ones plus every worker's own blocks (full hits).
    own = [sorted(s) for s in ref.blocks.values() if s]
    check_same(index, ref, queries + own)
    # Snapshot round trip reaches the same index.
    copy = KvBlockIndex()
    copy.restore(index.snapshot(stream_seq=7, created_at=0.0))
    check_same(copy, ref, queries + own)
    for w in ref.blocks:
        assert copy.last_seq(w) == index.last_seq(w)


@settings(max_examples=200, deadline=None)
@given(
    maps=st.lists(st.dictionaries(HASHES, st.integers(1, 2**70)), min_size=1, max_size=4),
    query=st.lists(HASHES, min_size=0, max_size=12),
)
def test_prefix_depths_union_matches_brute_force(maps: list[dict[int, int]], query: list[int]) -> None:
    slots = set()
    for m in maps:
        for v in m.values():
            slots.update(i for i in range(71) if v >> i & 1)
    expected = {}
    for s in slots:
        n = 0
        while n < len(query) and any(m.get(query[n], 0) >> s & 1 for m in maps):
            n += 1
        if n:
            expected[s] = n
    assert depths_by_slot(prefix_depths(query, maps)) == expected


def test_chained_prefix_walk_stops_at_first_miss() -> None:
    from shared.kv_hash import block_hashes

    index = KvBlockIndex()
    prompt = list(range(160))  # 10 blocks of 16
    hashes = block_hashes(prompt, 16)
    index.store("a", hashes[:6])
    index.store("b", hashes[:3])
    index.store("c", hashes[4:])  # holds a tail but not its head: useless for this prompt
    assert index.overlaps(hashes) == {"a": 6, "b": 3}
    other = block_hashes([7, *prompt[1:]], 16)  # differs in the first token: no block matches
    assert index.overlaps(other) == {}


def test_worker_bound_forces_resync() -> None:
    index = KvBlockIndex(max_blocks_per_worker=10)
    index.store("a", list(range(8)))
    assert index.block_count("a") == 8 and "a" not in index.needs_resync
    index.store("a", list(range(100, 105)))  # 13 > 10: lost removals, start over
    assert index.block_count("a") == 0 and "a" in index.needs_resync
    assert index.holders == {}


def test_global_bound_clears_fullest_worker() -> None:
    index = KvBlockIndex(max_indexed_blocks=20)
    index.store("a", list(range(12)))
    index.store("b", list(range(100, 112)))
    assert index.num_entries <= 20
    assert index.needs_resync == {"a"} or index.needs_resync == {"b"}


def test_runs_stay_compact_under_churn() -> None:
    index = KvBlockIndex()
    for i in range(2000):
        index.store("a", [i * 4 + k for k in range(4)])
        if i >= 10:
            index.remove("a", [(i - 10) * 4 + k for k in range(4)])
    w = index._workers["a"]
    assert w.count == 40
    assert w.runs_len <= 2 * w.count + 256 + 4


def test_slots_are_reused_lowest_first() -> None:
    slots = WorkerSlots()
    assert [slots.slot(x) for x in "abc"] == [0, 1, 2]
    slots.release("b")
    slots.release("a")
    assert slots.slot("d") == 0 and slots.slot("e") == 1 and slots.slot("f") == 3


@settings(max_examples=60, deadline=None)
@given(
    batches=st.lists(st.tuples(st.integers(0, 3), st.lists(RUNS, max_size=2), st.lists(HASHES, max_size=6)),
                     min_size=2, max_size=30),
    cut=st.integers(0, 30),
    interleave=st.integers(0, 30),
)
def test_snapshot_taken_while_events_arrive_restores_exactly(batches, cut: int, interleave: int) -> None:
    """Parts are taken one worker at a time with events applied in between; replaying the stream
    from the seq read before the first part still reaches the live index."""
    seqs: dict[str, int] = {}
    stream = []
    for w, stored, removed in batches:
        wid = f"w{w}"
        seqs[wid] = seqs.get(wid, 0) + 1
        stream.append(KvEventBatch(worker_id=wid, seq=seqs[wid], stored=[KvStored(block_hashes=r) for r in stored],
                                   removed=removed))
    cut = min(cut, len(stream))
    live = KvBlockIndex()
    for b in stream[:cut]:
        live.apply(b)
    stream_seq = cut  # what the router reads before it starts the parts
    parts, pos = [], cut
    for part in live.snapshot_parts():
        parts.append(part)
        for b in stream[pos:pos + interleave % 3]:  # events land between parts
            live.apply(b)
        pos = min(len(stream), pos + interleave % 3)
    for b in stream[pos:]:
        live.apply(b)
    from shared.routing.kv_index import encode_snapshot

    restored = KvBlockIndex()
    restored.restore(encode_snapshot(stream_seq, 0.0, parts))
    for b in stream[stream_seq:]:
        restored.apply(b)
    for wid in seqs:
        assert restored.worker_blocks(wid) == live.worker_blocks(wid)
    assert restored.holders == live.holders
