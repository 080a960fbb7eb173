"""Child processes kept on a short leash: how ``baton up`` and the planner's local connector
start, restart and stop the services and workers they own.

- :func:`spawn` starts a child in its own session (a Ctrl-C reaches only the parent, which stops
  children in order) that the kernel sends SIGTERM, a drain, if the parent dies (Linux), with its
  output to a log file, a pipe, or the parent's own.
- :class:`CrashWindow` counts unexpected exits in a sliding window: past its limit a child is in a
  crash loop and restarting it stops, and it says how long to back off before the next restart.
- :func:`stop_processes` stops children the way every Baton service expects: SIGTERM (each
  drains), a grace period for all of them together, then SIGKILL for what is left.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """preexec_fn: the kernel sends SIGTERM to the child when its parent dies (Linux; elsewhere nothing)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


async def spawn(argv: list[str], env: Mapping[str, str], *, log_path: Path | None = None,
                pipe: bool = False) -> asyncio.subprocess.Process:
    """Start ``argv`` with ``env``. Output (stdout and stderr together): appended to ``log_path``,
    else a pipe (``pipe``: ``proc.stdout``, for the parent to relay), else the parent's own."""
    out: int | None = None
    fd: int | None = None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        out = fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    elif pipe:
        out = asyncio.subprocess.PIPE
    try:
        return await asyncio.create_subprocess_exec(
            *argv, env=dict(env), stdout=out, stderr=asyncio.subprocess.STDOUT if out is not None else None,
            stdin=asyncio.subprocess.DEVNULL, preexec_fn=die_with_parent, start_new_session=True)
    finally:
        if fd is not None:
            os.close(fd)


class CrashWindow:
    """Unexpected exits in the last ``window`` seconds; more than ``limit`` of them is a crash loop."""

    def __init__(self, limit: int = 5, window: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._exits: list[float] = []

    def _trim(self) -> None:
        now = self._clock()
        self._exits = [t for t in self._exits if now - t < self.window]

    def record(self) -> int:
        """Count one exit; return how many fell in the window."""
        self._trim()
        self._exits.append(self._clock())
        return len(self._exits)

    @property
    def count(self) -> int:
        self._trim()
        return len(self._exits)

    @property
    def looping(self) -> bool:
        return self.count > self.limit

    def backoff(self) -> float:
        """Seconds to wait before the next restart: longer the more it crashed, at most 5."""
        return min(0.5 * self.count, 5.0)


async def stop_processes(procs: Iterable[asyncio.subprocess.Process], grace: float, *, terminate: bool = True) -> None:
    """SIGTERM every live one, give them ``grace`` seconds together, then SIGKILL the rest.
    ``terminate=False``: they were sent SIGTERM already (a second one means "stop now" to a service)."""
    live = [p for p in procs if p.returncode is None]
    for p in live if terminate else ():
        try:
            p.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        await asyncio.wait_for(asyncio.gather(*(p.wait() for p in live)), max(0.01, grace))
    except TimeoutError:
        pass
    for p in live:
        if p.returncode is None:
            p.kill()
            await p.wait()
