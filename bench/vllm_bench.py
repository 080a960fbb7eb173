"""vLLM's row of the engine benchmark: Baton's vLLM adapter (vLLM v1 ``AsyncLLM``) on this machine.

    .venv-vllm/bin/python bench/vllm_bench.py [--batches 1,16] [--omp-bind auto] [engine_bench options]

Same workloads, measurement and table as ``bench/engine_bench.py`` (which it drives, adding the
``vllm`` backend); other backends can run alongside for a side-by-side table, e.g.
``--backends vllm,baton-torch,transformers``. Needs vLLM installed (the ``vllm`` extra).

On CPU vLLM runs the model in a worker process whose OpenMP threads it pins to cores, keeping one
core back for its scheduler and our process (``VLLM_CPU_OMP_THREADS_BIND=auto``); on a 2-core
machine the model then computes on 1 core. ``--omp-bind 0-1`` gives it both (then it shares them).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import engine_bench
from bench.engine_bench import TorchEngineBackend
from shared.engines.base import EngineConfig

BLOCK_SIZE = 32  # vLLM's CPU attention needs a multiple of 32


class VllmBackend(TorchEngineBackend):
    """Baton's vLLM engine adapter; it shares the Engine interface, so run() and stop() are the
    torch backend's, and both see the same step budget (2048 tokens)."""

    name = "vllm"

    def start(self) -> None:
        from shared.engines.vllm_engine import VllmEngine

        self.loop = asyncio.new_event_loop()
        # Pool: room for the largest batch at 1024 tokens each; fixed, so runs don't depend on the
        # host's free memory (vLLM sizes an unset pool from it).
        blocks = max(self.max_batch, 1) * 1024 // BLOCK_SIZE + 1
        self.engine = VllmEngine(
            EngineConfig(engine="vllm", model=self.model, block_size=BLOCK_SIZE, num_blocks=blocks,
                         max_num_seqs=max(self.max_batch, 1), max_batched_tokens=2048),
            max_model_len=1024,
        )
        self.task = self.loop.create_task(self.engine.run())
        t0 = time.perf_counter()
        self.loop.run_until_complete(self.engine.wait_ready())
        print(f"  vllm engine ready in {time.perf_counter() - t0:.1f} s", flush=True)
        self.n = 0


def main() -> None:
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--omp-bind", default=None, help="VLLM_CPU_OMP_THREADS_BIND (auto | nobind | 0-1 ...)")
    ours, rest = ap.parse_known_args()
    if ours.omp_bind:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ours.omp_bind  # read by vLLM's worker process
    if not any(a.startswith("--backends") for a in rest):
        rest += ["--backends", "vllm"]
    if not any(a.startswith("--batches") for a in rest):
        rest += ["--batches", "1,16"]
    engine_bench.BACKENDS["vllm"] = VllmBackend
    sys.argv = [sys.argv[0], *rest]
    engine_bench.main()


if __name__ == "__main__":  # vLLM spawns its engine processes: this guard is required
    main()
