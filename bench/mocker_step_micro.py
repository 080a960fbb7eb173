"""The mocker engine's step alone (schedule, execute, update), no event loop: microseconds per token.

    PYTHONPATH=<tree> python bench/mocker_step_micro.py

B requests (12-token prompts, 16 tokens each) are queued, then stepped until done (their prefill
step included); the figure is the fastest of 60 rounds, per generated token.
"""

from __future__ import annotations

import itertools
import time

from shared.engines.base import EngineConfig
from shared.engines.core import AddRequest
from shared.engines.mocker import MockerEngine
from shared.messages import SamplingParams

ids = itertools.count()


def run(B: int, tokens: int = 16, prompt: int = 12, rounds: int = 60) -> float:
    eng = MockerEngine(EngineConfig(engine="mocker", model="baton-tiny", speedup=1e9))
    assert eng.scheduler is not None
    sp = SamplingParams(max_tokens=tokens, ignore_eos=True)
    best = 1e9
    for _ in range(rounds):
        for _b in range(B):
            i = next(ids)
            eng._apply(AddRequest(f"r{i}", [(i * 7 + k) % 1000 + 1 for k in range(prompt)], sp))
        t = time.perf_counter()
        while eng.scheduler.has_work():
            eng._step_once()
        dt = time.perf_counter() - t
        best = min(best, dt)
    return best / (B * tokens) * 1e6


if __name__ == "__main__":
    for B in (1, 8, 64):
        print(f"B={B:3d}  {run(B):6.2f} us/token (fastest of 60 rounds, admission and prefill step included)")
