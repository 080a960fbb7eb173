"""A transfer abandoned while its bytes are landing (request cancelled, deadline passed) must stop
writing at once: the decode worker hands those blocks to other requests right after."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import numpy as np
import pytest

from shared.kv_transport import TransferError, make_transport

pytestmark = pytest.mark.timeout(60)

SIZE = 256 << 20  # far beyond socket buffers, so the transfer is still landing when abandoned


@pytest.mark.parametrize("how", ["forget", "wait_timeout"])
def test_tcp_abandon_mid_transfer_stops_writes(how: str) -> None:
    async def main() -> None:
        src = np.full(SIZE, 7, dtype=np.uint8)
        dst = np.zeros(SIZE, dtype=np.uint8)
        rx, tx = make_transport("tcp"), make_transport("tcp")
        await rx.start()
        await tx.start()
        sent: list[BaseException | None] = []
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(rx.run)
                token = rx.expect("t", [memoryview(dst)]).token

                async def send() -> None:
                    try:
                        await tx.send(rx.endpoint, "t", [memoryview(src)], timeout=30, token=token)
                        sent.append(None)
                    except TransferError as e:
                        sent.append(e)

                tg.start_soon(send)
                with anyio.fail_after(20):
                    while not dst[0]:  # the first bytes have landed: mid-transfer now
                        await anyio.lowlevel.checkpoint()
                if how == "forget":
                    rx.forget("t")
                else:
                    with pytest.raises(TransferError):
                        await rx.wait("t", timeout=0)
                landed = int(np.count_nonzero(dst))
                assert 0 < landed < SIZE
                with anyio.fail_after(20):
                    while not sent:
                        await anyio.sleep(0.01)
                assert isinstance(sent[0], TransferError)  # the sender learns it did not land
                assert int(np.count_nonzero(dst)) == landed  # and not one byte more arrived
                tg.cancel_scope.cancel()
        finally:
            await tx.close()
            await rx.close()

    anyio.run(main)
