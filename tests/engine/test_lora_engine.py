"""LoRA wired into the engine core: adapter slots at admission, prefix hashes per adapter, load and
unload between steps, the mocker's simulated adapters, and the second base model's adapter through
the torch engine (greedy parity with peft in a batch mixing it and the bare model)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import anyio
import pytest

from shared.engines import EngineConfig, make_engine
from shared.engines.adapters import SimulatedAdapters, lora_modules
from shared.engines.request import Request, RequestStatus
from shared.engines.scheduler import Scheduler
from shared.kv_hash import adapter_root
from shared.messages import SamplingParams

BS = 4


def sched(max_loras: int = 1, **kw: object) -> tuple[Scheduler, SimulatedAdapters]:
    adapters = SimulatedAdapters(max_loras, load_s=0.5)
    s = Scheduler(num_blocks=64, block_size=BS, max_num_seqs=8, max_batched_tokens=64, adapters=adapters,
                  **kw)  # type: ignore[arg-type]
    return s, adapters


def add(s: Scheduler, rid: str, lora: str = "", n: int = 6, max_tokens: int = 3) -> Request:
    root = adapter_root(lora, "d") if lora else adapter_root(None)
    req = s.add(rid, list(range(10, 10 + n)), SamplingParams(max_tokens=max_tokens, ignore_eos=True), lora=lora,
                hash_root=root)
    assert isinstance(req, Request)
    return req


def step(s: Scheduler) -> list:
    batch = s.schedule()
    return s.update(batch, [7] * len(batch.samplers))


def test_all_slots_pinned_waits_others_go_first_then_lru_reloads() -> None:
    s, adapters = sched(max_loras=1)
    adapters.add("x", "/x")
    adapters.add("y", "/y")
    x, y, bare = add(s, "rx", "x"), add(s, "ry", "y"), add(s, "rb")
    s.schedule()
    # x holds the only slot; y waits (not an error), and the bare request behind it is admitted.
    assert x.status == RequestStatus.RUNNING and bare.status == RequestStatus.RUNNING
    assert y.status == RequestStatus.WAITING and y.lora_slot == -1 and s.waiting[0] is y
    while x.status != RequestStatus.FINISHED:
        step(s)
    assert adapters._pins.get("x") is None  # released when it finished
    while s.has_work():
        step(s)
    assert y.status == RequestStatus.FINISHED
    assert (adapters.loads, adapters.evictions) == (2, 1) and adapters.resident() == ["y"]


def test_adapter_kept_across_preemption_and_released_on_abort() -> None:
    s, adapters = sched(max_loras=2)
    adapters.add("x", "/x")
    req = add(s, "r", "x")
    s.schedule()
    slot = req.lora_slot
    assert slot >= 0 and adapters._pins["x"] == 1
    s._preempt(req)  # the KV pool ran dry
    assert req.status == RequestStatus.WAITING and req.lora_slot == slot and adapters._pins["x"] == 1
    s.schedule()  # admitted again: no second pin
    assert adapters._pins["x"] == 1 and adapters.loads == 1
    out = s.abort("r")
    assert out is not None and out.finish_reason == "abort" and "x" not in adapters._pins


def test_unloaded_while_queued_ends_with_404() -> None:
    s, adapters = sched(max_loras=1)
    adapters.add("x", "/x")
    add(s, "r", "x")
    adapters.remove("x")
    s.schedule()
    [out] = s.rejected
    assert (out.request_id, out.finish_reason, out.error_code) == ("r", "error", 404)
    assert "not loaded" in (out.error or "") and not s.has_work()


def test_forked_choices_each_pin_the_adapter() -> None:
    s, adapters = sched(max_loras=1)
    adapters.add("x", "/x")
    req = s.add("r", list(range(10, 20)), SamplingParams(max_tokens=2, ignore_eos=True, n=3), lora="x")
    assert isinstance(req, Request)
    step(s)
    assert adapters._pins["x"] == 3
    while s.has_work():
        step(s)
    assert "x" not in adapters._pins


def test_prefix_blocks_never_mix_adapters() -> None:
    s, _ = sched(max_loras=2)
    s.adapters.add("x", "/x")  # type: ignore[union-attr]
    first = add(s, "bare", n=12, max_tokens=1)
    while s.has_work():
        step(s)
    assert first.block_hashes  # cached under the bare root
    other = add(s, "x1", "x", n=12, max_tokens=1)
    while s.has_work():
        step(s)
    assert other.num_cached_tokens == 0  # same tokens, other adapter: no hit
    again = add(s, "x2", "x", n=12, max_tokens=1)
    while s.has_work():
        step(s)
    assert again.num_cached_tokens == 8  # same adapter: its own blocks hit
    assert set(first.block_hashes).isdisjoint(other.block_hashes)


def test_lora_modules_option() -> None:
    assert lora_modules(" a=/x , b=/y/z ") == [("a", "/x"), ("b", "/y/z")]
    assert lora_modules("") == []
    for bad in ("a", "=x", "a="):
        with pytest.raises(ValueError, match="name=path"):
            lora_modules(bad)


def test_mocker_engine_adapters_load_cost_404_and_unload() -> None:
    async def main() -> None:
        eng = make_engine(EngineConfig(engine="mocker", model="baton-tiny", max_loras=1, lora_load_s=0.2,
                                       lora_modules="x=/x", speedup=1.0))
        sp = SamplingParams(max_tokens=2, ignore_eos=True)

        async def run(rid: str, lora: str) -> tuple[float, object]:
            t0 = anyio.current_time()
            last = None
            async for out in eng.generate(rid, list(range(5, 30)), sp, lora=lora):
                last = out
            return anyio.current_time() - t0, last

        async with anyio.create_task_group() as tg:
            tg.start_soon(eng.run)
            assert eng.loras()[0][0] == "x" and eng.loras_resident() == []
            cold, _ = await run("a", "x")
            warm, _ = await run("b", "x")
            assert cold >= 0.2 > warm  # the simulated load is paid once, while it stays resident
            assert await eng.load_lora("y", "/y")
            _, out = await run("c", "y")  # evicts x (one slot)
            assert eng.loras_resident() == ["y"] and eng.runner.adapters.evictions == 1  # type: ignore[union-attr]
            _, out = await run("d", "nope")
            assert out.error_code == 404 and "not loaded" in out.error  # type: ignore[union-attr]
            await eng.unload_lora("y")
            _, out = await run("e", "y")
            assert out.error_code == 404  # type: ignore[union-attr]
            tg.cancel_scope.cancel()

    anyio.run(main)


def test_torch_engine_second_base_model_adapter_matches_peft_mixed(tmp_path: Path) -> None:
    from tests.require import require_module

    torch = require_module("torch", "pip install 'baton[torch]'")
    require_module("peft", "pip install 'baton[test]'")
    from shared.builtin_model import build_lora
    from tests.engine.test_lora import MAX_NEW, PROMPTS, peft_reference

    tb = build_lora("baton-tiny-b", tmp_path / "demo-tb", rank=8, targets=["q_proj", "k_proj", "o_proj", "down_proj"])
    ref = peft_reference("baton-tiny-b", {"tb": tb})
    assert ref["tb"][1] != ref[None][1]

    async def main() -> None:
        eng = make_engine(EngineConfig(engine="torch", model="baton-tiny-b", dtype="float32", max_loras=2))
        sp = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)

        async def run(i: int, lora: str) -> list[int]:
            toks: list[int] = []
            async for out in eng.generate(f"r{i}", PROMPTS[i], sp, lora=lora):
                assert out.error is None, out.error
                toks += out.token_ids
            return toks

        async with anyio.create_task_group() as tg:
            tg.start_soon(eng.run)
            await eng.wait_ready()
            await eng.load_lora("tb", str(tb))
            assignment = ["tb", "", "tb", "", "tb", ""]
            got = await asyncio.gather(*(run(i, a) for i, a in enumerate(assignment)))  # one batch, mixed
            for i, a in enumerate(assignment):
                assert got[i] == ref[a or None][1][i], (i, a)
            registry = eng.runner.adapters
            assert registry.resident_bytes() > 0
            await eng.unload_lora("tb")
            assert registry.resident_bytes() == 0 and eng.loras() == []  # the weights are freed
            with pytest.raises(ValueError, match="rank"):
                await eng.load_lora("big", str(build_lora("baton-tiny-b", tmp_path / "big", rank=128)))
            assert await run(0, "") == ref[None][1][0]  # still serving
            tg.cancel_scope.cancel()

    torch.manual_seed(0)
    anyio.run(main)
