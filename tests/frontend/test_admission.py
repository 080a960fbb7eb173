"""Admission units: the fair queue (priority, weights, arrival), the slots and their bounded wait,
the tokens-a-minute counter, the keys file's tenant settings and the priority check."""

from __future__ import annotations

from collections import Counter

import anyio
import pytest

from services.frontend.access import (
    ANONYMOUS,
    AccessControl,
    ConfigError,
    Tenant,
    TokenRateLimiter,
    load_tenants,
)
from services.frontend.admission import Admission, AdmissionSettings, FairQueue, Ticket
from services.frontend.openai_api import RequestError
from services.frontend.request import check_priority, check_session_id
from shared.messages import LoadReport

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"

# --- the fair queue ----------------------------------------------------------------------------


def drain(q: FairQueue) -> list[Ticket]:
    out = []
    while (t := q.pop()) is not None:
        out.append(t)
    return out


def test_priority_first_then_arrival() -> None:
    q = FairQueue()
    tickets = [Ticket(p, "t", 1.0) for p in (5, 0, -3, 0, 5)]
    for t in tickets:
        q.push(t)
    order = drain(q)
    assert [t.priority for t in order] == [-3, 0, 0, 5, 5]
    # equal priority, one tenant: first come, first served
    assert order[1] is tickets[1] and order[2] is tickets[3] and order[3] is tickets[0]


def test_equal_weights_alternate_however_many_one_tenant_sends() -> None:
    q = FairQueue()
    for _ in range(100):
        q.push(Ticket(0, "heavy", 1.0))
    for _ in range(10):
        q.push(Ticket(0, "light", 1.0))
    first20 = [t.tenant for t in drain(q)[:20]]
    assert Counter(first20) == {"heavy": 10, "light": 10}


def test_weights_share_in_proportion() -> None:
    q = FairQueue()
    for _ in range(300):
        q.push(Ticket(0, "gold", 3.0))
        q.push(Ticket(0, "free", 1.0))
    first = Counter(t.tenant for t in drain(q)[:200])
    assert first["gold"] == pytest.approx(150, abs=2) and first["free"] == pytest.approx(50, abs=2)


def test_a_tenant_arriving_late_gets_no_credit_for_its_idle_time() -> None:
    q = FairQueue()
    for _ in range(50):
        q.push(Ticket(0, "a", 1.0))
    for _ in range(40):
        q.pop()
    for _ in range(10):
        q.push(Ticket(0, "b", 1.0))
    # b starts from the current virtual time: it alternates with a, it does not take 10 in a row.
    nxt = [t.tenant for t in drain(q)[:6]]
    assert nxt.count("a") == 3 and nxt.count("b") == 3


def test_priority_beats_fair_share() -> None:
    q = FairQueue()
    for _ in range(5):
        q.push(Ticket(10, "light", 1.0))
    for _ in range(5):
        q.push(Ticket(-1, "heavy", 1.0))
    assert [t.tenant for t in drain(q)] == ["heavy"] * 5 + ["light"] * 5


def test_dropped_tickets_are_skipped_and_not_counted() -> None:
    q = FairQueue()
    a, b, c = Ticket(0, "x", 1.0), Ticket(0, "x", 1.0), Ticket(0, "x", 1.0)
    for t in (a, b, c):
        q.push(t)
    q.drop(a)
    assert len(q) == 2
    assert drain(q) == [b, c]
    assert len(q) == 0


# --- slots ---------------------------------------------------------------------------------------

T = Tenant("t")


async def test_cap_queues_and_releases_in_priority_order() -> None:
    adm = Admission(AdmissionSettings(max_running=1))
    order: list[int] = []
    gate = anyio.Event()

    async def hold() -> None:
        async with adm.slot(T, 0):
            await gate.wait()

    async def request(priority: int) -> None:
        async with adm.slot(T, priority):
            order.append(priority)

    async with anyio.create_task_group() as tg:
        tg.start_soon(hold)
        await wait_for(lambda: adm.running == 1)
        for p in (3, 1, 2):
            tg.start_soon(request, p)
        await wait_for(lambda: len(adm.queue) == 3)
        assert adm.running == 1 and order == []
        gate.set()
    assert order == [1, 2, 3]
    assert adm.running == 0 and len(adm.queue) == 0


async def test_reserved_slots_are_for_high_priority_only() -> None:
    adm = Admission(AdmissionSettings(max_running=3, reserved=1))
    gate = anyio.Event()
    started: list[int] = []

    async def request(priority: int) -> None:
        async with adm.slot(T, priority):
            started.append(priority)
            await gate.wait()

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(request, 5)
        await wait_for(lambda: len(adm.queue) == 1)
        assert adm.running == 2  # the third low-priority request waits: the last slot is reserved
        tg.start_soon(request, -1)
        await wait_for(lambda: -1 in started)
        assert adm.running == 3 and len(adm.queue) == 1
        gate.set()
    assert sorted(started) == [-1, 5, 5, 5]


async def test_bounded_wait_is_a_503_with_retry_after_and_frees_its_place() -> None:
    adm = Admission(AdmissionSettings(max_running=1, queue_timeout=0.2, max_queued=1))
    gate = anyio.Event()

    async def hold() -> None:
        async with adm.slot(T, 0):
            await gate.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(hold)
        await wait_for(lambda: adm.running == 1)
        with pytest.raises(RequestError) as waited:
            async with adm.slot(T, 0):
                pass
        assert waited.value.status == 503 and waited.value.code == "overloaded"
        assert any(k == b"retry-after" and int(v) >= 1 for k, v in waited.value.headers)
        assert len(adm.queue) == 0
        # a full queue refuses at once
        async with anyio.create_task_group() as inner:
            inner.start_soon(_enter, adm)
            await wait_for(lambda: len(adm.queue) == 1)
            with pytest.raises(RequestError) as full:
                async with adm.slot(T, 0):
                    pass
            assert full.value.status == 503 and "waiting" in full.value.message
            inner.cancel_scope.cancel()
        gate.set()
    assert adm.running == 0 and len(adm.queue) == 0


async def test_no_queue_at_all_still_admits_while_there_is_room() -> None:
    adm = Admission(AdmissionSettings(max_running=1, max_queued=0))
    async with adm.slot(T, 0):
        with pytest.raises(RequestError) as full:
            async with adm.slot(T, 0):
                pass
        assert full.value.status == 503
    async with adm.slot(T, 0):
        assert adm.running == 1


async def test_a_caller_leaving_the_queue_leaves_no_trace() -> None:
    adm = Admission(AdmissionSettings(max_running=1))
    gate = anyio.Event()

    async def hold() -> None:
        async with adm.slot(T, 0):
            await gate.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(hold)
        await wait_for(lambda: adm.running == 1)
        with anyio.move_on_after(0.05):
            async with adm.slot(T, 0):
                raise AssertionError("admitted past the cap")
        assert len(adm.queue) == 0
        gate.set()
    assert adm.running == 0


async def test_load_reports_hold_requests_while_every_worker_has_a_queue() -> None:
    workers = ["w1", "w2"]
    adm = Admission(AdmissionSettings(worker_waiting=2), live_workers=lambda: workers)
    adm.on_load(LoadReport(worker_id="w1", role="decode", timestamp=0, waiting=3))
    adm.on_load(LoadReport(worker_id="w2", role="decode", timestamp=0, waiting=1))
    assert not adm.fleet_full()  # w2 has room
    adm.on_load(LoadReport(worker_id="w2", role="decode", timestamp=0, waiting=2))
    assert adm.fleet_full()
    gate = anyio.Event()
    entered: list[str] = []

    async def request(name: str) -> None:
        async with adm.slot(T, 0):
            entered.append(name)
            await gate.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(request, "first")  # nothing of ours running: one always goes
        await wait_for(lambda: entered == ["first"])
        tg.start_soon(request, "second")
        await wait_for(lambda: len(adm.queue) == 1)
        adm.on_load(LoadReport(worker_id="w1", role="decode", timestamp=0, waiting=0))  # room again
        await wait_for(lambda: entered == ["first", "second"])
        gate.set()


async def _enter(adm: Admission) -> None:
    async with adm.slot(T, 0):
        pass


async def wait_for(cond, timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not cond():
            await anyio.sleep(0.001)


# --- tokens a minute -----------------------------------------------------------------------------


def test_tpm_counts_prompt_and_completion_as_used() -> None:
    tpm = TokenRateLimiter()
    tpm.check("a", 600, 100, now=0.0)
    tpm.charge("a", 600, 100, now=0.0)  # prompt
    tpm.charge("a", 600, 450, now=0.0)  # completion tokens, as they stream
    assert tpm.remaining("a", 600, now=0.0) == pytest.approx(50)
    with pytest.raises(RequestError) as e:
        tpm.check("a", 600, 100, now=0.0)
    err = e.value
    assert err.status == 429 and err.code == "rate_limit_exceeded"
    assert "TPM" in err.message and "Limit 600" in err.message and "Requested 100" in err.message
    headers = dict(err.headers)
    assert headers[b"x-ratelimit-limit-tokens"] == b"600" and int(headers[b"retry-after"]) == 5  # 50 tokens at 10/s
    tpm.check("b", 600, 100, now=0.0)  # another tenant has its own budget
    tpm.check("a", 600, 100, now=5.0)  # refilled at 10 tokens a second


def test_tpm_a_long_answer_goes_into_debt_and_waits_it_out() -> None:
    tpm = TokenRateLimiter()
    tpm.charge("a", 60, 90, now=0.0)  # 30 over the minute's budget
    assert tpm.remaining("a", 60, now=0.0) == pytest.approx(-30)
    with pytest.raises(RequestError):
        tpm.check("a", 60, 1, now=30.0)
    tpm.check("a", 60, 1, now=31.0)


def test_tpm_a_prompt_over_the_whole_limit_says_so() -> None:
    with pytest.raises(RequestError) as e:
        TokenRateLimiter().check("a", 100, 101, now=0.0)
    assert "alone exceeds the limit" in e.value.message


# --- tenants from the keys file ------------------------------------------------------------------


def test_keys_file_settings(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("BATON_API_KEYS", raising=False)
    keys = tmp_path / "keys"
    keys.write_text("# paying\nsk-gold weight=4 tpm=1000 name=gold\nsk-free rpm=2  # free tier\nsk-plain\n")
    tenants = load_tenants(str(keys))
    assert tenants["sk-gold"] == Tenant("gold", 4.0, 1000, 0.0)
    assert tenants["sk-free"] == Tenant("key#3", 1.0, 0, 2.0)
    assert tenants["sk-plain"].weight == 1.0
    ac = AccessControl(tenants, None)
    assert ac.tenant_of(ac.admit("Bearer sk-gold", "10.0.0.1")).name == "gold"
    assert ac.tenant_of("10.0.0.1").name == ANONYMOUS
    ac.admit("Bearer sk-free", "10.0.0.1")  # rpm=2: a burst of one, then 429
    with pytest.raises(RequestError) as e:
        ac.admit("Bearer sk-free", "10.0.0.1")
    assert e.value.status == 429
    ac.admit("Bearer sk-plain", "10.0.0.1")  # no limit of its own, none by default


@pytest.mark.parametrize("line", ["sk-x weight=0", "sk-x tpm=-1", "sk-x colour=red", "sk-x weight=abc", "sk-x tpm"])
def test_bad_key_settings_stop_the_start(tmp_path, line: str) -> None:
    keys = tmp_path / "keys"
    keys.write_text(line + "\n")
    with pytest.raises(ConfigError, match="line 1"):
        load_tenants(str(keys))


# --- the priority and session checks -------------------------------------------------------------


def test_priority_body_wins_header_fills_in_range_enforced() -> None:
    assert check_priority(None, None, (-10, 10)) == 0
    assert check_priority(None, " -3 ", (-10, 10)) == -3
    assert check_priority(4, "-3", (-10, 10)) == 4
    for body, header in ((11, None), (None, "-11"), (None, "high")):
        with pytest.raises(RequestError) as e:
            check_priority(body, header, (-10, 10))
        assert e.value.status == 400 and e.value.param == "priority"


def test_session_id_checked() -> None:
    assert check_session_id(None) == "" and check_session_id("conv-1") == "conv-1"
    for bad in ("x" * 300, "a\nb", "caf\u00e9"):
        with pytest.raises(RequestError):
            check_session_id(bad)
