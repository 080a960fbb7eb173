"""Running a service actor as a process: logging, uvloop, signals, graceful drain."""

from __future__ import annotations

import errno
import gc
import logging
import os
import signal
from typing import Protocol

import anyio

from shared.bus import BusError
from shared.preflight import fail
from shared.telemetry import setup_logging
from shared.tracing import setup_tracing

log = logging.getLogger("baton.runtime")


class Actor(Protocol):
    async def run(self) -> None: ...

    async def drain(self) -> None:
        """Stop taking new work and finish what is in flight (bounded by the caller)."""


async def run_until_signalled(actor: Actor, drain_timeout: float = 30.0) -> None:
    """Run ``actor.run()``; on SIGTERM/SIGINT drain it (bounded), then cancel. A second signal cancels now."""
    async with anyio.create_task_group() as tg:

        async def on_signals() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("received %s: draining (up to %.0fs)", signal.Signals(signum).name, drain_timeout)
                    tg.start_soon(drain_then_cancel)
                    break
                async for _ in signals:
                    log.info("second signal: stopping now")
                    tg.cancel_scope.cancel()

        async def drain_then_cancel() -> None:
            with anyio.move_on_after(drain_timeout):
                await actor.drain()
            tg.cancel_scope.cancel()

        tg.start_soon(on_signals)
        await actor.run()
        tg.cancel_scope.cancel()


DEFAULT_DRAIN_TIMEOUT = 30.0

# The young generation's size before a collection (CPython's default is 700). A request in flight
# allocates hundreds of small objects that live for its whole life: with 700, they are scanned
# again and again and promoted to the old generations, whose collections then cost milliseconds.
GC_YOUNG_THRESHOLD = 20_000


def settle_heap() -> None:
    """Collect once, then exempt everything alive now (modules, the tokenizer, templates,
    connections: what a service holds for its whole life) from later collections, so they scan
    only what requests allocate. Called at start and again by an actor once it is ready."""
    gc.collect()
    gc.freeze()
    if os.environ.get("BATON_GC_DEFAULTS") != "1":  # 1: CPython's thresholds (to compare)
        gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)


def run_service(actor: Actor, service: str, log_level: str = "info", drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
                log_format: str = "text") -> None:
    """Run a service process. A bus it cannot reach or that refuses it, or an address it cannot
    listen on, ends the process with one clear line and exit code 2, not a traceback."""
    try:
        setup_logging(service, log_level, log_format)
    except ValueError as e:
        fail(service, f"{e} (--log-format / BATON_LOG_FORMAT)")
    setup_tracing(service)
    settle_heap()
    try:
        anyio.run(run_until_signalled, actor, drain_timeout, backend_options={"use_uvloop": True})
    except (BusError, OSError, BaseExceptionGroup) as e:
        fatal = _leaves(e, BusError) or [leaf for leaf in _leaves(e, OSError) if leaf.errno == errno.EADDRINUSE]
        if not fatal:
            raise
        reason = str(fatal[0])
        if isinstance(fatal[0], OSError):
            reason += "; stop the process holding that address or choose another port"
        fail(service, reason)


def _leaves(group: BaseException, kind: type[BaseException]) -> list[BaseException]:
    if isinstance(group, BaseExceptionGroup):
        return [leaf for sub in group.exceptions for leaf in _leaves(sub, kind)]
    return [group] if isinstance(group, kind) else []
