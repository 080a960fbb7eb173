"""A request whose client leaves: ``_run_unless_disconnected`` cancels the request's own task
(no anyio CancelScope per request) and must leave that task as it found it. Its cancel is told
apart from any other cancel of the task, which goes on."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

from services.frontend.http_app import ClientGone, _run_unless_disconnected
from services.frontend.http_protocol import CLIENT_WATCH, ClientWatch


def _scope(watch: ClientWatch) -> dict[str, Any]:
    return {"extensions": {CLIENT_WATCH: watch}}


async def _no_receive() -> dict[str, Any]:
    raise AssertionError("the watch, not receive(), tells when the client leaves")


async def _leave_during(work: Callable[[], Awaitable[None]], started: asyncio.Event) -> None:
    """Run ``work`` as a request does, its client leaving once ``started`` is set; expects
    ClientGone and checks that nothing of the cancel is left on the task."""
    watch = ClientWatch()

    async def leave() -> None:
        await started.wait()
        watch._fire()  # what the connection does when its client is gone

    async with anyio.create_task_group() as tg:
        tg.start_soon(leave)
        with pytest.raises(ClientGone):
            await _run_unless_disconnected(work, _no_receive, _scope(watch))
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0)  # and the task still runs


def test_a_client_that_leaves_cancels_the_work_and_the_task_goes_on() -> None:
    async def main() -> None:
        started = asyncio.Event()
        seen: list[str] = []

        async def work() -> None:
            started.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise

        await _leave_during(work, started)
        assert seen == ["cancelled"]

    anyio.run(main)


def test_a_client_gone_before_the_work_starts_runs_no_work() -> None:
    async def main() -> None:
        watch = ClientWatch()
        watch._fire()
        ran: list[bool] = []

        async def work() -> None:
            ran.append(True)

        with pytest.raises(ClientGone):
            await _run_unless_disconnected(work, _no_receive, _scope(watch))
        assert ran == []

    anyio.run(main)


def test_work_that_swallows_the_cancel_still_ends_as_client_gone() -> None:
    async def main() -> None:
        started = asyncio.Event()

        async def work() -> None:
            started.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                pass  # e.g. a library that cleans up and returns

        await _leave_during(work, started)

    anyio.run(main)


def test_another_cancel_of_the_task_is_not_taken_for_the_client() -> None:
    async def main() -> None:
        watch = ClientWatch()
        started = asyncio.Event()

        async def work() -> None:
            started.set()
            await asyncio.sleep(30)

        async def request() -> None:
            await _run_unless_disconnected(work, _no_receive, _scope(watch))

        task = asyncio.get_running_loop().create_task(request())
        await started.wait()
        task.cancel()  # a shutdown, say
        watch._fire()  # and the client leaves in the same turn
        with pytest.raises(asyncio.CancelledError):
            await task

        started.clear()
        quiet = ClientWatch()
        task = asyncio.get_running_loop().create_task(_run_unless_disconnected(work, _no_receive, _scope(quiet)))
        await started.wait()
        task.cancel()  # no client left: the plain cancel goes through
        with pytest.raises(asyncio.CancelledError):
            await task

    anyio.run(main)


def test_work_that_finishes_is_not_cancelled() -> None:
    async def main() -> None:
        watch = ClientWatch()

        async def work() -> None:
            await asyncio.sleep(0)

        await _run_unless_disconnected(work, _no_receive, _scope(watch))
        watch._fire()  # the connection closing after the response: nothing to cancel any more
        await asyncio.sleep(0)

    anyio.run(main)
