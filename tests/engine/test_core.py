"""The engine core with a runner of the test's own: the seam the torch runner and the mocker plug into."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from shared.engines.base import EngineConfig, EngineOutput
from shared.engines.core import (
    AbortRequest,
    AddRequest,
    EngineCore,
    GrammarRefused,
    ModelRunner,
    PoolSpec,
    StepResult,
)
from shared.engines.request import Request, RequestStatus
from shared.engines.scheduler import ScheduledBatch
from shared.messages import SamplingParams, StructuredOutput

pytestmark = pytest.mark.anyio


class CountingRunner(ModelRunner):
    """Each sampled token is the request's length so far; a prompt starting with 666 breaks the step."""

    def __init__(self, threaded: bool) -> None:
        self.threaded = threaded
        self.kv_pools = []
        self.steps = 0

    def load(self) -> PoolSpec:
        return PoolSpec(num_blocks=64, max_model_len=256, vocab_size=1000)

    def new_state(self, req: Request) -> str:
        return f"state of {req.request_id}"

    def execute(self, batch: ScheduledBatch) -> StepResult:
        self.steps += 1
        if any(r.token_ids[0] == 666 for r in batch.samplers):
            raise RuntimeError("boom")
        return StepResult([len(r.token_ids) for r in batch.samplers], None)

    def compile_grammar(self, structured: StructuredOutput) -> None:
        raise GrammarRefused("not here")


class CountingEngine(EngineCore):
    name = "counting"


async def collect(stream: AsyncIterator[EngineOutput]) -> tuple[list[int], EngineOutput]:
    tokens: list[int] = []
    last = None
    async for out in stream:
        tokens += out.token_ids
        last = out
    assert last is not None
    return tokens, last


@pytest.mark.parametrize("threaded", [True, False])
async def test_a_runner_of_its_own_plugs_into_the_core(threaded: bool) -> None:
    runner = CountingRunner(threaded)
    engine = CountingEngine(EngineConfig(block_size=4, max_num_seqs=4), runner)
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        await engine.wait_ready()
        tokens, last = await collect(engine.generate("a", [1, 2, 3], SamplingParams(max_tokens=4)))
        assert tokens == [3, 4, 5, 6] and last.finish_reason == "length"
        # A step that raises fails the requests in it, not the engine.
        _, broken = await collect(engine.generate("b", [666, 1], SamplingParams(max_tokens=4)))
        assert broken.finish_reason == "error" and "boom" in (broken.error or "")
        again, _ = await collect(engine.generate("c", [7], SamplingParams(max_tokens=2)))
        assert again == [1, 2]
        # The runner refuses a structured output: a client error, nothing queued.
        steps = runner.steps
        _, refused = await collect(engine.generate("d", [1], SamplingParams(structured=StructuredOutput(kind="regex", spec="a"))))
        assert refused.error == "invalid structured output: not here" and runner.steps == steps
        # Limits of this engine come from the runner's pool spec.
        _, too_long = await collect(engine.generate("e", [1] * 300, SamplingParams()))
        assert too_long.finish_reason == "error" and "at most 255" in (too_long.error or "")
        tg.cancel_scope.cancel()
    assert engine.scheduler is not None and engine.scheduler.kv.num_used_blocks == 0
    late = [o async for o in engine.generate("late", [1], SamplingParams())]
    assert late[-1].error == "engine is not running"


def test_inbox_messages_are_typed_and_applied_by_kind() -> None:
    engine = CountingEngine(EngineConfig(block_size=4), CountingRunner(threaded=False))
    assert engine.scheduler is not None  # a runner on the loop is loaded at once
    assert engine._apply(AddRequest("x", [1, 2], SamplingParams(max_tokens=3))) == []
    req = engine.scheduler.requests["x"]
    assert req.status is RequestStatus.WAITING and req.state == "state of x"
    (out,) = engine._apply(AbortRequest("x"))
    assert out.finish_reason == "abort" and req.status is RequestStatus.FINISHED
    assert engine._apply(AbortRequest("x")) == []  # gone: nothing to end
