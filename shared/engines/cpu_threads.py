"""How many matmul threads a torch engine process runs, and how engines on one host share its CPUs.

A torch engine runs one OpenMP thread team, by default as wide as the CPUs it may use. Two such
engine processes on one host (``baton up`` with a decode and a prefill worker, the planner's local
workers) then run twice as many threads as there are cores, and every parallel region of a step
waits for a team thread the other process holds: on 2 CPUs, three 1,500-token requests over two
workers took 68 s against 2.5 s on one worker. A launcher that starts several engine processes on
one host therefore gives each an equal share of the CPUs (:func:`shared_threads_env`); an
operator's own ``BATON_TORCH_THREADS`` always wins.

No torch import here: launchers (``baton up``, the planner) use this module too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

THREADS_ENV = "BATON_TORCH_THREADS"
TORCH_ENGINES = ("torch", "")  # "": the worker's own default engine, torch


def host_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, so a container's or taskset's cpuset counts)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def torch_threads() -> int:
    """Threads for matmuls: BATON_TORCH_THREADS, else the CPUs this process may run on."""
    env = os.environ.get(THREADS_ENV)
    if env:
        return max(1, int(env))
    return host_cpus()


def shared_threads_env(engine_processes: int, engine: str = "torch",
                       env: Mapping[str, str] | None = None, cpus: int | None = None) -> dict[str, str]:
    """The variables for each of ``engine_processes`` engine processes a launcher runs on this host.

    Torch engines get an equal share of the CPUs, at least one thread each. Nothing when there is
    only one, when the engine is not torch (the mocker runs no matmuls; vLLM binds its own
    threads), or when the operator set ``BATON_TORCH_THREADS`` (the launcher's environment is passed
    on to its workers as it is).
    """
    env = os.environ if env is None else env
    if engine_processes <= 1 or engine not in TORCH_ENGINES or env.get(THREADS_ENV):
        return {}
    cpus = host_cpus() if cpus is None else cpus
    return {THREADS_ENV: str(max(1, cpus // engine_processes))}
