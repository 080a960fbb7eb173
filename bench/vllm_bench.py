"""vLLM's rows of the engine benchmark: Baton's vLLM adapter (vLLM v1 ``AsyncLLM``) on this machine.

    python bench/vllm_bench.py [--vllm-eager] [--omp-bind 0-1] [engine_bench options]

Same workloads, measurement and tables as ``bench/engine_bench.py`` (which it drives, adding the
``vllm`` backend), e.g. ``--backends baton-torch,vllm,transformers,transformers-static --dtypes
float32,bfloat16 --batches 1,16,64 --repeats 3``. Needs vLLM installed (the ``vllm`` extra).

What vLLM gets, so it is compared like with like:

* the same dtype as every other backend (``dtype`` in its engine arguments, checked in the report);
* the same cores: its model runs in a worker process whose OpenMP threads vLLM pins to the cores
  in ``VLLM_CPU_OMP_THREADS_BIND``. Its ``auto`` keeps one core back for the scheduler, which on a
  2-core machine leaves the model one core; by default here it gets ``0-(threads-1)``, the same
  thread count Baton and transformers get (``--omp-bind auto`` restores vLLM's default);
* compilation where its CPU backend supports it (``enforce_eager=False``: vLLM's CPU platform
  traces the model once with Dynamo and compiles it with Inductor). If that fails to start, the
  backend falls back to eager and says so in the report; ``--vllm-eager`` forces eager;
* no KV events in the measured process (the adapter's bridge re-hashes every stored block; a
  benchmark of the engine alone has no router to feed);
* a fixed KV pool (``num_gpu_blocks_override``) with room for the largest batch, so
  ``VLLM_CPU_KVCACHE_SPACE`` and the host's free memory play no part.

The report names the vLLM CPU kernel build that this CPU loads (vLLM picks ``_C`` with AVX-512 +
BF16, ``_C_AVX512`` or ``_C_AVX2`` by the CPU's flags).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import engine_bench
from bench.engine_bench import TorchEngineBackend
from shared.engines.base import EngineConfig

BLOCK_SIZE = 32  # vLLM's CPU attention needs a multiple of 32


def vllm_cpu_build() -> str:
    """Which of vLLM's CPU kernel libraries this CPU loads (vLLM's own rule, platforms/cpu.py)."""
    import torch

    if torch.cpu._is_avx512_supported():
        lib = "_C (AVX-512 + BF16)" if torch.cpu._is_avx512_bf16_supported() else "_C_AVX512"
    else:
        lib = "_C_AVX2"
    amx = "AMX" if torch.cpu._is_amx_tile_supported() else "no AMX"
    return f"{lib}, {amx}"


class VllmBackend(TorchEngineBackend):
    """Baton's vLLM engine adapter; it shares the Engine interface, so run() and stop() are the
    torch backend's, and both see the same step budget (2048 tokens)."""

    name = "vllm"

    def start(self) -> None:
        self.compile_note = ""
        eager = os.environ.get("BATON_BENCH_VLLM_EAGER") == "1"
        if not eager:
            try:
                self._start(enforce_eager=False)
                self.compile_note = "compiled (Dynamo trace once + Inductor)"
                return
            except Exception as e:  # compile unsupported or broken here: measure eager, and say so
                self.compile_note = f"eager: compile failed ({type(e).__name__}: {str(e)[:120]})"
                print(f"  vllm: {self.compile_note}; retrying eager", flush=True)
                self._stop_quietly()
        self._start(enforce_eager=True)
        self.compile_note = self.compile_note or "eager (--vllm-eager)"

    def _start(self, enforce_eager: bool) -> None:
        from shared.engines.vllm_engine import VllmEngine

        self.loop = asyncio.new_event_loop()
        # Pool: room for the largest batch at 1024 tokens each; fixed, so runs don't depend on the
        # host's free memory (vLLM sizes an unset pool from it).
        blocks = max(self.max_batch, 1) * 1024 // BLOCK_SIZE + 1
        self.engine = VllmEngine(
            EngineConfig(engine="vllm", model=self.model, block_size=BLOCK_SIZE, num_blocks=blocks,
                         max_num_seqs=max(self.max_batch, 1), max_batched_tokens=2048, dtype=self.dtype),
            max_model_len=1024,
            engine_args={"enforce_eager": enforce_eager},
            kv_events=False,
        )
        args = self.engine._engine_args_obj(None)
        assert args.dtype == self.dtype, f"vLLM would run in {args.dtype}, not {self.dtype}"
        self.task = self.loop.create_task(self.engine.run())
        t0 = time.perf_counter()
        self.loop.run_until_complete(self.engine.wait_ready())
        print(f"  vllm {self.dtype} ready in {time.perf_counter() - t0:.1f} s", flush=True)
        self.n = 0

    def _stop_quietly(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()

    def describe(self) -> str:
        llm = self.engine._llm
        dtype = getattr(getattr(llm, "model_config", None), "dtype", "?")  # what vLLM actually runs
        return (f"vllm {self.dtype} (vLLM model_config.dtype {dtype}), {self.compile_note}, "
                f"VLLM_CPU_OMP_THREADS_BIND={os.environ.get('VLLM_CPU_OMP_THREADS_BIND', 'auto')}, "
                f"kernels {vllm_cpu_build()}, KV events off")


def main() -> None:
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--omp-bind", default=None,
                    help="VLLM_CPU_OMP_THREADS_BIND (default: 0-(threads-1), every core the others get)")
    ap.add_argument("--vllm-eager", action="store_true", help="enforce_eager=True (no compile)")
    ours, rest = ap.parse_known_args()
    threads = int(rest[rest.index("--threads") + 1]) if "--threads" in rest else (os.cpu_count() or 1)
    # Read by vLLM's worker process, which inherits our environment.
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ours.omp_bind or f"0-{threads - 1}"
    if ours.vllm_eager:
        os.environ["BATON_BENCH_VLLM_EAGER"] = "1"
    if not any(a.startswith("--backends") for a in rest):
        rest += ["--backends", "vllm"]
    engine_bench.BACKENDS["vllm"] = VllmBackend
    sys.argv = [sys.argv[0], *rest]
    engine_bench.main()


if __name__ == "__main__":  # vLLM spawns its engine processes: this guard is required
    main()
