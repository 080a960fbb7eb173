"""``Bus.publish_soon``: a frontend's jobs leave without nats-py's flusher, the messages of one
event-loop turn in one socket write, in order and with their reply subjects (real nats-server)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import anyio
import pytest

from shared.bus import Bus
from tests.procs import with_bus

pytestmark = pytest.mark.timeout(60)


def test_one_turns_messages_leave_in_one_write_in_order(tmp_path: Path) -> None:
    async def body(receiver: Bus, url: str) -> None:
        sender = await Bus.connect(url, "sender")
        got: list[tuple[bytes, str]] = []
        all_in = asyncio.Event()

        async def on_msg(msg: Any) -> None:
            got.append((msg.data, msg.reply))
            if len(got) == 3:
                all_in.set()

        try:
            await receiver.subscribe("jobs.w1", on_msg)
            await receiver.nc.flush(timeout=5)
            transport = sender.nc._transport
            writes: list[int] = []
            writelines = transport.writelines

            def counting(lines: list[bytes]) -> None:
                writes.append(len(lines))
                writelines(lines)

            transport.writelines = counting
            for i in range(3):
                assert sender.publish_soon("jobs.w1", f"job {i}".encode(), reply=f"inbox.{i}")
            assert writes == []  # nothing written before the turn ends
            with anyio.fail_after(10):
                await all_in.wait()
            assert writes == [3]  # the three in one write
            assert got == [(f"job {i}".encode(), f"inbox.{i}") for i in range(3)]
        finally:
            await sender.close()
        assert not sender.publish_soon("jobs.w1", b"late")  # closed: the caller must publish()

    with_bus(tmp_path, body)
