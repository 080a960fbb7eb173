"""The KV routing policy: cache affinity against load, pending work, predictions, modes."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest

from shared.kv_hash import block_hashes
from shared.messages import KvEventBatch, KvStored, LoadReport, RouteRequest, WorkerInfo
from shared.routing.kv_policy import PENDING_MARGIN_S, KvRouter, KvRouterConfig
from shared.routing.policy import ROUTER_MODES, RandomChoice, RoundRobin, make_policy

BS = 16


def workers(n: int, block_size: int = BS) -> list[WorkerInfo]:
    return [WorkerInfo(worker_id=f"w{i}", role="decode", model="m", block_size=block_size) for i in range(n)]


def tokens(seed: int, n: int) -> list[int]:
    return [(seed * 1_000_003 + i * 7) % 30_000 for i in range(n)]


def request(toks: list[int]) -> RouteRequest:
    return RouteRequest(request_id="r", model="m", token_ids=toks)


def cache(router: KvRouter, worker_id: str, toks: list[int], seq: int = 1) -> None:
    router.index.apply(KvEventBatch(worker_id=worker_id, seq=seq,
                                    stored=[KvStored(block_hashes=block_hashes(toks, BS))]))


def load(router: KvRouter, worker_id: str, now: float, used: int = 0, queued: int = 0, running: int = 0) -> None:
    router.on_load(LoadReport(worker_id=worker_id, role="decode", timestamp=0, kv_blocks_used=used,
                              kv_blocks_total=10_000, running=running, prefill_tokens_queued=queued), now)


def test_modes() -> None:
    assert set(ROUTER_MODES) == {"kv", "kv-approx", "round-robin", "random"}
    assert isinstance(make_policy("round-robin"), RoundRobin)
    assert isinstance(make_policy("random", 1), RandomChoice)
    kv, approx = make_policy("kv"), make_policy("kv-approx")
    assert isinstance(kv, KvRouter) and kv.config.use_kv_events and kv.name == "kv"
    assert isinstance(approx, KvRouter) and not approx.config.use_kv_events and approx.name == "kv-approx"
    with pytest.raises(ValueError):
        make_policy("nope")


def test_cached_prefix_wins_over_idle_workers() -> None:
    r = KvRouter(KvRouterConfig(seed=0))
    prefix = tokens(1, 64 * BS)
    cache(r, "w2", prefix)
    w, overlap = r.choose_worker(request(prefix + tokens(2, 40)), workers(4))
    assert (w.worker_id, overlap) == ("w2", 64)


def test_load_outweighs_a_small_overlap_and_weight_tunes_it() -> None:
    prefix = tokens(1, 4 * BS)
    prompt = prefix + tokens(2, 60 * BS)
    for weight, expect in ((1.0, "w1"), (100.0, "w0")):
        r = KvRouter(KvRouterConfig(seed=0, overlap_weight=weight))
        cache(r, "w0", prefix)
        load(r, "w0", now=0.0, used=200)  # w0 is busy decoding
        load(r, "w1", now=0.0, used=0)
        w, _ = r.choose_worker(request(prompt), workers(2))
        assert w.worker_id == expect, weight


def test_queued_prefill_counts_against_a_worker() -> None:
    r = KvRouter(KvRouterConfig(seed=0))
    prefix = tokens(1, 8 * BS)
    cache(r, "w0", prefix)
    cache(r, "w1", prefix)
    load(r, "w0", now=0.0, queued=5000)
    w, overlap = r.choose_worker(request(prefix + [1] * 30), workers(2))
    assert (w.worker_id, overlap) == ("w1", 8)


def test_burst_of_cold_requests_spreads_evenly() -> None:
    r = KvRouter(KvRouterConfig(seed=0))
    ws = workers(8)
    chosen = Counter(r.choose_worker(request(tokens(i, 20 * BS)), ws)[0].worker_id for i in range(64))
    assert set(chosen.values()) == {8}, chosen


def test_burst_sharing_a_new_prefix_spreads_then_sticks() -> None:
    r = KvRouter(KvRouterConfig(seed=0))
    ws = workers(4)
    prefix = tokens(5, 50 * BS)
    # At once: each queued copy makes its worker look busier than an idle one, so they spread.
    chosen = set()
    for i in range(4):
        w, overlap, hashes = r.decide(request(prefix + [i] * 8), ws, now=0.0)
        r.record(w, hashes, overlap, len(prefix) + 8, now=0.0)
        chosen.add(w.worker_id)
    assert len(chosen) == 4


def test_prefix_sent_once_is_predicted_before_events_arrive() -> None:
    r = KvRouter(KvRouterConfig(seed=0))
    ws = workers(4)
    prefix = tokens(5, 50 * BS)
    first, overlap, hashes = r.decide(request(prefix + [1] * 8), ws, now=0.0)
    r.record(first, hashes, overlap, len(prefix) + 8, now=0.0)
    for w in ws:  # its prefill is done (the report says so); no KV event has arrived yet
        load(r, w.worker_id, now=1.0)
    second, overlap, _ = r.decide(request(prefix + [2] * 8), ws, now=1.0)
    assert second.worker_id == first.worker_id and overlap == 50


def test_pending_work_is_dropped_once_a_report_covers_it() -> None:
    r = KvRouter(KvRouterConfig(seed=0))
    ws = workers(2)
    w, overlap, hashes = r.decide(request(tokens(1, 10 * BS)), ws, now=100.0)
    r.record(w, hashes, overlap, 10 * BS, now=100.0)
    ld = r.loads[w.worker_id]
    assert (ld.pending_requests, ld.pending_blocks, ld.pending_prefill_tokens) == (1, 10, 10 * BS)
    load(r, w.worker_id, now=100.0 + PENDING_MARGIN_S / 2, used=10)  # too soon to include it
    assert ld.pending_requests == 1
    load(r, w.worker_id, now=100.0 + PENDING_MARGIN_S * 2, used=10)
    assert (ld.pending_requests, ld.pending_blocks, ld.pending_prefill_tokens) == (0, 0, 0)
    assert ld.active_blocks == 10


def test_approx_mode_learns_from_its_decisions_and_forgets_after_ttl() -> None:
    r = make_policy("kv-approx", 0, KvRouterConfig(prediction_ttl=10.0))
    assert isinstance(r, KvRouter)
    ws = workers(4)
    prefix = tokens(9, 30 * BS)
    w, overlap, hashes = r.decide(request(prefix), ws, now=0.0)
    assert overlap == 0
    r.record(w, hashes, overlap, len(prefix), now=0.0)
    for t in (1.0, 2.0):  # pending work expires with these reports; the prediction stays
        for x in ws:
            load(r, x.worker_id, now=t)
    w2, overlap2, _ = r.decide(request(prefix + [3] * 16), ws, now=2.0)
    assert (w2.worker_id, overlap2) == (w.worker_id, 30)
    _, overlap3, _ = r.decide(request(prefix), ws, now=30.0)
    assert overlap3 == 0  # aged out


def test_temperature_samples_but_prefers_the_cheap_worker() -> None:
    r = KvRouter(KvRouterConfig(seed=3, temperature=0.2))
    prefix = tokens(1, 32 * BS)
    cache(r, "w0", prefix)
    ws = workers(4)
    picks = Counter()
    for _ in range(400):
        w, _, _ = r.decide(request(prefix + [1] * 4), ws, now=0.0)
        picks[w.worker_id] += 1
    assert picks["w0"] > 300 and len(picks) > 1, picks


def test_precomputed_hashes_are_used_when_the_block_size_matches() -> None:
    r = KvRouter()
    toks = tokens(1, 4 * BS)
    fake = [11, 12, 13]
    req = SimpleNamespace(request_id="r", model="m", token_ids=toks, block_hashes=fake, block_size=BS)
    assert r.request_hashes(req, BS) is fake  # type: ignore[arg-type]
    assert r.request_hashes(req, 32) == block_hashes(toks, 32)  # type: ignore[arg-type]


def test_mixed_block_sizes_hash_per_size() -> None:
    r = KvRouter(KvRouterConfig(seed=0))
    toks = tokens(4, 64 * 32)
    r.index.apply(KvEventBatch(worker_id="big", seq=1, stored=[KvStored(block_hashes=block_hashes(toks, 32))]))
    ws = [*workers(2), WorkerInfo(worker_id="big", role="decode", model="m", block_size=32)]
    w, overlap = r.choose_worker(request(toks + [1] * 8), ws)
    assert (w.worker_id, overlap) == ("big", 64)


def test_forgotten_worker_slot_is_reused_only_after_predictions_age_out() -> None:
    r = KvRouter(KvRouterConfig(prediction_ttl=4.0))
    ws = workers(1)
    w, overlap, hashes = r.decide(request(tokens(1, 4 * BS)), ws, now=0.0)
    r.record(w, hashes, overlap, 4 * BS, now=0.0)
    slot = r.slots.get("w0")
    r.forget_worker("w0", now=1.0)
    assert r.slots.get("w0") == slot  # its predicted bits are still around
    r.maintain(now=6.0)
    assert r.slots.get("w0") is None


def test_prefill_done_event_ends_pending_prefill_and_next_turn_sticks() -> None:
    # Back-to-back turns of one conversation, no load report in between: once the worker's events
    # show the first prompt cached, its pending prefill no longer repels the second turn.
    r = KvRouter(KvRouterConfig(seed=0))
    ws = workers(3)
    turn1 = tokens(8, 40 * BS)
    w1, overlap, hashes = r.decide(request(turn1), ws, now=0.0)
    r.record(w1, hashes, overlap, len(turn1), now=0.0)
    ld = r.loads[w1.worker_id]
    assert ld.pending_prefill_tokens == len(turn1) - 0 and ld.pending_blocks == 40
    batch = KvEventBatch(worker_id=w1.worker_id, seq=1, stored=[KvStored(block_hashes=hashes[:24]),
                                                                KvStored(block_hashes=hashes[24:])])
    r.index.apply(batch)
    r.on_kv_events(batch)
    assert ld.pending_prefill_tokens == 0 and ld.pending_blocks == 40  # still decoding, as far as we know
    w2, overlap2 = r.choose_worker(request(turn1 + tokens(9, 3 * BS)), ws)
    assert (w2.worker_id, overlap2) == (w1.worker_id, 40)


def _prefilled(r: KvRouter, worker_id: str, hashes: list[int], seq: int) -> None:
    batch = KvEventBatch(worker_id=worker_id, seq=seq, stored=[KvStored(block_hashes=hashes)])
    r.on_kv_events(batch, r.index.apply(batch))


def _report(r: KvRouter, worker_id: str, now: float, kv_seq: int, used: int = 0) -> None:
    r.on_load(LoadReport(worker_id=worker_id, role="decode", timestamp=0, kv_blocks_used=used,
                         kv_blocks_total=10_000, kv_seq=kv_seq), now)


@pytest.mark.parametrize("report_first", [False, True])
def test_report_with_the_kv_seq_of_a_prefill_ends_its_pending_work_at_once(report_first: bool) -> None:
    # A report taken after the worker announced a prompt's blocks (its kv_seq) shows that request,
    # however soon after the decision it arrives, and whichever of the two paths delivers first.
    r = KvRouter(KvRouterConfig(seed=0))
    ws = workers(2)
    toks = tokens(3, 10 * BS)
    w, overlap, hashes = r.decide(request(toks), ws, now=100.0)
    r.record(w, hashes, overlap, len(toks), now=100.0)
    ld = r.loads[w.worker_id]
    soon = 100.0 + PENDING_MARGIN_S / 10  # within the time margin: only the kv_seq can end it
    _report(r, w.worker_id, soon, kv_seq=6)  # taken before the prefill: shows nothing of it
    assert (ld.pending_requests, ld.pending_blocks) == (1, 10)
    if report_first:
        _report(r, w.worker_id, soon, kv_seq=7)
        assert ld.pending_requests == 1  # not yet known to be in batch 7
        _prefilled(r, w.worker_id, hashes, seq=7)
    else:
        _prefilled(r, w.worker_id, hashes, seq=7)
        assert (ld.pending_requests, ld.pending_blocks, ld.pending_prefill_tokens) == (1, 10, 0)
        _report(r, w.worker_id, soon, kv_seq=7)
    assert (ld.pending_requests, ld.pending_blocks, ld.pending_prefill_tokens) == (0, 0, 0)
    assert not ld.pending and not ld.seen and not ld.pending_by_last_hash


def test_finished_requests_do_not_repel_a_repeat_from_the_worker_caching_it() -> None:
    # The e2e flake: w0 served prefixes A and B (both finished, blocks freed into its cache); w1
    # is idle. Until a report shows w0's requests, they count as 2 x 42 blocks in use there, which
    # outweighs A's cached 40 blocks, and A's repeat went to w1 with nothing cached.
    r = KvRouter(KvRouterConfig(seed=0))
    ws = workers(2)
    a, b = tokens(1, 40 * BS) + [1] * 20, tokens(2, 40 * BS) + [2] * 20
    for i, toks in enumerate((a, b)):
        hashes = block_hashes(toks, BS)
        r.record(ws[0], hashes, 0, len(toks), now=100.0)
        _prefilled(r, "w0", hashes, seq=i + 1)
    _report(r, "w1", 100.05, kv_seq=3)
    _report(r, "w0", 100.05, kv_seq=2)  # both finished: nothing in use
    w, overlap, _ = r.decide(request(a[:-20] + [3] * 20), ws, now=100.1)
    assert (w.worker_id, overlap) == ("w0", 40)


def test_reports_without_a_kv_seq_still_end_pending_work_by_time() -> None:
    r = KvRouter(KvRouterConfig(seed=0))
    ws = workers(2)
    toks = tokens(4, 10 * BS)
    w, overlap, hashes = r.decide(request(toks), ws, now=100.0)
    r.record(w, hashes, overlap, len(toks), now=100.0)
    _prefilled(r, w.worker_id, hashes, seq=1)
    ld = r.loads[w.worker_id]
    _report(r, w.worker_id, 100.0 + PENDING_MARGIN_S / 2, kv_seq=0)  # an older worker: no kv_seq
    assert ld.pending_requests == 1
    _report(r, w.worker_id, 100.0 + PENDING_MARGIN_S * 2, kv_seq=0)
    assert (ld.pending_requests, ld.pending_blocks) == (0, 0) and not ld.pending and not ld.seen


def tier_event(router: KvRouter, worker_id: str, toks: list[int], seq: int, tier: int) -> None:
    batch = KvEventBatch(worker_id=worker_id, seq=seq, tier=tier, stored=[KvStored(block_hashes=block_hashes(toks, BS))])
    router.on_kv_events(batch, router.index.apply(batch))


def test_lower_tier_hit_beats_a_miss_but_not_a_device_hit() -> None:
    prompt = tokens(5, 32 * BS)
    # w1 holds the prompt in host memory: cheaper than recomputing it on w0 or w2.
    r = KvRouter(KvRouterConfig(seed=0))
    r.index.apply(KvEventBatch(worker_id="w0", seq=1))  # give every worker a slot
    r.index.apply(KvEventBatch(worker_id="w2", seq=1))
    tier_event(r, "w1", prompt, seq=1, tier=2)
    w, overlap = r.choose_worker(request(prompt + tokens(6, 8)), workers(3))
    assert w.worker_id == "w1" and overlap == 0  # no device overlap; the host tier decided
    # w2 now holds it on the device: a device hit wins over w1's host copy.
    cache(r, "w2", prompt, seq=2)
    w, overlap = r.choose_worker(request(prompt + tokens(7, 8)), workers(3))
    assert w.worker_id == "w2" and overlap == 32
    # A worker that dropped its host blocks is no longer credited.
    removal = KvEventBatch(worker_id="w1", seq=2, tier=2, removed=block_hashes(prompt, BS))
    r.on_kv_events(removal, r.index.apply(removal))
    assert not r.lower_index.holders


def test_peer_hint_names_the_worker_holding_more_of_the_prompt() -> None:
    """G4: when load sends a prompt away from the worker that holds it in its host tier, the
    decision names that worker as the source to pull the blocks from."""
    prompt = tokens(8, 24 * BS)
    r = KvRouter(KvRouterConfig(seed=0))
    r.index.apply(KvEventBatch(worker_id="w0", seq=1))
    tier_event(r, "w1", prompt, seq=1, tier=2)
    now = 1000.0
    load(r, "w0", now)
    load(r, "w1", now, used=5000, queued=50_000)  # w1 is swamped: the prompt goes to w0
    w, _ = r.choose_worker(request(prompt + tokens(9, 8)), workers(2))
    assert w.worker_id == "w0"
    assert r.last_hint == ("w1", 24)
    # Nobody holds more than the chosen worker: no hint.
    w, _ = r.choose_worker(request(tokens(10, 10 * BS)), workers(2))
    assert r.last_hint is None


# --- LoRA adapters ------------------------------------------------------------------------------


def lora_request(toks: list[int], lora: str) -> RouteRequest:
    return RouteRequest(request_id="r", model="m", token_ids=toks, lora=lora)


def test_worker_holding_the_adapter_wins_unless_much_busier() -> None:
    prompt = tokens(3, 4 * BS)
    for used_w1, weight, expect in ((10, 32.0, "w1"), (10, 0.0, "w0"), (100, 32.0, "w0")):
        r = KvRouter(KvRouterConfig(seed=0, lora_load_weight=weight))
        load(r, "w0", now=0.0, used=0)
        r.on_load(LoadReport(worker_id="w1", role="decode", timestamp=0, kv_blocks_used=used_w1,
                             kv_blocks_total=10_000, loras_resident=["a"]), 0.0)
        w, _ = r.choose_worker(lora_request(prompt, "a"), workers(2))
        assert w.worker_id == expect, (used_w1, weight)


def test_adapter_sent_counts_as_resident_until_a_report_says_otherwise() -> None:
    r = KvRouter(KvRouterConfig(seed=0))
    for i in range(2):
        load(r, f"w{i}", now=0.0)

    def route(seed: int, now: float) -> str:
        req = lora_request(tokens(seed, 40), "a")
        w, overlap, hashes = r.decide(req, workers(2), now)
        r.record(w, hashes, overlap, len(req.token_ids), now, "a")
        return w.worker_id

    first = route(4, 1.0)
    # The next requests for "a" follow it there before any report (its load is under way).
    assert all(route(seed, 1.0 + seed / 100) == first for seed in range(5, 9))
    # A report taken well after the decisions, without "a" resident (evicted since): the preference goes.
    r.on_load(LoadReport(worker_id=first, role="decode", timestamp=0, kv_blocks_total=10_000), 10.0)
    assert not r.loads[first].has_lora("a")
    r.on_load(LoadReport(worker_id=first, role="decode", timestamp=0, kv_blocks_total=10_000,
                         loras_resident=["a"]), 11.0)
    assert r.loads[first].has_lora("a")


def test_lora_prompts_hash_under_the_adapter_root() -> None:
    from shared.kv_hash import adapter_root
    from shared.messages import LoraInfo

    r = KvRouter(KvRouterConfig(seed=0))
    ws = [WorkerInfo(worker_id=f"w{i}", role="decode", model="m", block_size=BS,
                     loras=[LoraInfo(name="a", digest="d1")]) for i in range(2)]
    prefix = tokens(7, 8 * BS)
    cache(r, "w1", prefix)  # the bare model's blocks
    w, overlap = r.choose_worker(lora_request(prefix, "a"), ws)
    assert overlap == 0  # not the adapter's blocks
    r = KvRouter(KvRouterConfig(seed=0))
    r.index.apply(KvEventBatch(worker_id="w0", seq=1, stored=[KvStored(
        block_hashes=block_hashes(prefix, BS, adapter_root("a", "d1")))]))
    w, overlap = r.choose_worker(lora_request([*prefix, 1], "a"), ws)
    assert (w.worker_id, overlap) == ("w0", 8)


def test_router_core_only_considers_workers_with_the_adapter() -> None:
    from shared.messages import LoraInfo, RouteError
    from shared.routing.core import RouterCore, RoutingSettings

    ws = [WorkerInfo(worker_id="w0", role="decode", model="m", block_size=BS),
          WorkerInfo(worker_id="w1", role="decode", model="m", block_size=BS, loras=[LoraInfo(name="a")])]
    view = SimpleNamespace(workers=lambda role=None, model=None: ws)
    core = RouterCore(RoutingSettings(mode="round-robin"), bus=None, view=view)  # type: ignore[arg-type]
    for _ in range(3):
        decision, _ = core.decide(lora_request(tokens(1, 20), "a"))
        assert decision.worker_id == "w1"
    missing, _ = core.decide(lora_request(tokens(1, 20), "b"))
    assert isinstance(missing, RouteError) and missing.code == 404
