"""shared/supervisor.py with real child processes: output, restart counting, crash loops, stopping."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

from shared.supervisor import CrashWindow, spawn, stop_processes

PY = sys.executable


def run(coro):
    return asyncio.run(coro)


def test_spawn_writes_the_log_file_in_its_own_session(tmp_path: Path) -> None:
    async def main() -> tuple[int, int]:
        proc = await spawn([PY, "-c", "import os, sys; print(os.getsid(0)); print('err', file=sys.stderr)"],
                           os.environ, log_path=tmp_path / "logs" / "child.log")
        return await proc.wait(), proc.pid

    code, pid = run(main())
    lines = (tmp_path / "logs" / "child.log").read_text().split()
    assert code == 0
    assert lines[0] == str(pid)  # a session of its own: a Ctrl-C reaches only the parent
    assert "err" in lines  # stderr goes to the same file


def test_spawn_pipe_gives_the_output_to_the_parent() -> None:
    async def main() -> bytes:
        proc = await spawn([PY, "-c", "print('hello')"], os.environ, pipe=True)
        assert proc.stdout is not None
        out = await proc.stdout.read()
        await proc.wait()
        return out

    assert run(main()).strip() == b"hello"


def test_crash_window_counts_exits_in_the_window_and_detects_a_loop() -> None:
    now = [100.0]
    w = CrashWindow(limit=2, window=60.0, clock=lambda: now[0])
    assert w.record() == 1 and w.record() == 2
    assert not w.looping
    assert w.backoff() == 1.0
    w.record()
    assert w.looping  # a third exit within the minute: more than the limit
    now[0] += 61  # they age out
    assert w.count == 0 and not w.looping


def test_restart_until_crash_loop_with_a_real_crashing_process() -> None:
    """The loop baton up runs: restart a child that exits, give up when it crash-loops."""
    async def main() -> tuple[int, list[int]]:
        w = CrashWindow(limit=3)
        codes = []
        starts = 0
        while True:
            proc = await spawn([PY, "-c", "import sys; sys.exit(3)"], os.environ)
            starts += 1
            codes.append(await proc.wait())
            w.record()
            if w.looping:
                return starts, codes

    starts, codes = run(main())
    assert starts == 4 and codes == [3, 3, 3, 3]


def test_stop_processes_terminates_then_kills_the_stubborn(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    stubborn = (f"import signal, time, pathlib; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                f"pathlib.Path({str(ready)!r}).touch(); time.sleep(60)")

    async def main() -> tuple[int | None, int | None, float]:
        polite = await spawn([PY, "-c", "import time; time.sleep(60)"], os.environ)
        hard = await spawn([PY, "-c", stubborn], os.environ)
        deadline = time.monotonic() + 20
        while not ready.exists():  # its SIGTERM handler is set
            assert time.monotonic() < deadline, "child did not start"
            await asyncio.sleep(0.02)
        t = time.monotonic()
        await stop_processes([polite, hard], grace=1.0)
        return polite.returncode, hard.returncode, time.monotonic() - t

    polite, hard, took = run(main())
    assert polite == -signal.SIGTERM
    assert hard == -signal.SIGKILL
    assert 0.9 < took < 10


def test_stop_processes_without_terminate_sends_no_second_sigterm(tmp_path: Path) -> None:
    """A draining child (SIGTERM sent already) must not get another: to a service it means 'now'."""
    marker = tmp_path / "terms"
    child = (f"import signal, time, pathlib, sys\n"
             f"p = pathlib.Path({str(marker)!r})\n"
             f"def on_term(*a):\n"
             f"    p.write_text(p.read_text() + 'T' if p.exists() else 'T')\n"
             f"    if p.read_text() == 'TT': sys.exit(9)\n"
             f"signal.signal(signal.SIGTERM, on_term)\n"
             f"pathlib.Path({str(marker)!r} + '.ready').touch()\n"
             f"t = time.time()\n"
             f"while time.time() - t < 0.5 or not p.exists(): time.sleep(0.01)\n"
             f"sys.exit(0)\n")

    async def main() -> int | None:
        proc = await spawn([PY, "-c", child], os.environ)
        deadline = time.monotonic() + 20
        while not Path(str(marker) + ".ready").exists():
            assert time.monotonic() < deadline, "child did not start"
            await asyncio.sleep(0.02)
        proc.send_signal(signal.SIGTERM)  # the drain
        await stop_processes([proc], grace=10.0, terminate=False)
        return proc.returncode

    assert run(main()) == 0
    assert marker.read_text() == "T"
