"""Engine throughput on one machine: Baton's torch engine vs transformers ``generate``.

    python bench/engine_bench.py [--model baton-small] [--batches 1,16,64] [--prompt-len 128] [--output-len 128]

For each batch size every backend runs two workloads on the same random prompts:
  * prefill: ``batch`` prompts with one output token each -> prefill tokens/s
  * generate: ``batch`` prompts, ``output_len`` tokens each (EOS ignored) -> output tokens/s, and
    the time between consecutive output tokens of a request (p50/p99 TPOT)
All requests of a batch arrive at once. Backends: ``baton-torch``, ``baton-torch-plain`` (the
same engine without its fused C kernels and prepacked matmuls), ``transformers``, and ``vllm``
(added by ``bench/vllm_bench.py``). Each runs in a child process of its own and they take turns
at each batch size, in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import statistics
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

# Before torch loads OpenMP: the engine's setting (short spins, then sleep), for every backend.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "30000")
import torch

from shared.engines.base import EngineConfig
from shared.messages import SamplingParams
from shared.models import resolve_model


@dataclass
class RunResult:
    seconds: float
    tokens: int  # prompt tokens (prefill run) or output tokens (generate run)
    gaps: list[float] = field(default_factory=list)  # seconds between a request's consecutive tokens


@dataclass
class Row:
    backend: str
    batch: int
    output_tok_s: float
    prefill_tok_s: float
    tpot_p50_ms: float
    tpot_p99_ms: float


class Backend(ABC):
    name: str

    def __init__(self, model: str, max_batch: int, dtype: str) -> None:
        self.model = model
        self.max_batch = max_batch
        self.dtype = dtype

    def start(self) -> None:  # noqa: B027 - optional hook
        """Load the model (not timed)."""

    def stop(self) -> None:  # noqa: B027 - optional hook
        """Release what start() took."""

    @abstractmethod
    def run(self, prompts: list[list[int]], output_len: int) -> RunResult:
        """Generate ``output_len`` tokens for every prompt, all submitted at once."""


class TorchEngineBackend(Backend):
    """Baton's torch engine, driven through its public async interface."""

    name = "baton-torch"

    def start(self) -> None:
        from shared.engines.torch_engine import TorchEngine

        self.loop = asyncio.new_event_loop()
        self.engine = TorchEngine(
            EngineConfig(
                engine="torch",
                model=self.model,
                max_num_seqs=self.max_batch,
                max_batched_tokens=2048,
                dtype=self.dtype,
            )
        )
        self.task = self.loop.create_task(self.engine.run())
        self.loop.run_until_complete(self.engine.wait_ready())
        self.n = 0

    def stop(self) -> None:
        self.task.cancel()
        self.loop.run_until_complete(asyncio.gather(self.task, return_exceptions=True))
        self.loop.close()

    def run(self, prompts: list[list[int]], output_len: int) -> RunResult:
        params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
        gaps: list[float] = []

        async def one(prompt: list[int]) -> int:
            self.n += 1
            count, last = 0, None
            async for out in self.engine.generate(f"bench-{self.n}", prompt, params):
                now = time.perf_counter()
                if last is not None and out.token_ids:
                    gaps.append((now - last) / len(out.token_ids))
                last = now
                count += len(out.token_ids)
            return count

        async def all_at_once() -> int:
            return sum(await asyncio.gather(*(one(p) for p in prompts)))

        t0 = time.perf_counter()
        produced = self.loop.run_until_complete(all_at_once())
        seconds = time.perf_counter() - t0
        assert produced == output_len * len(prompts)
        return RunResult(seconds, produced, gaps)


class TorchPlainBackend(TorchEngineBackend):
    """The torch engine without its fused C kernels or prepacked matmuls: plain torch ops."""

    name = "baton-torch-plain"

    def start(self) -> None:
        # Read when the model loads; in its own process (the default), this touches no other backend.
        os.environ["BATON_CPU_KERNELS"] = "0"
        os.environ["BATON_ONEDNN_LINEAR"] = "0"
        super().start()


class TransformersBackend(Backend):
    """transformers ``generate`` on one padded batch (prompts have equal length: no padding)."""

    name = "transformers"

    def start(self) -> None:
        from transformers import AutoModelForCausalLM, LogitsProcessor

        self.model_hf = AutoModelForCausalLM.from_pretrained(
            resolve_model(self.model).path, dtype=getattr(torch, self.dtype)
        ).eval()

        class StepClock(LogitsProcessor):
            """Called once per generated token of the whole batch: a timestamp per step."""

            def __init__(self) -> None:
                self.times: list[float] = []

            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
                self.times.append(time.perf_counter())
                return scores

        self.clock_cls = StepClock

    def run(self, prompts: list[list[int]], output_len: int) -> RunResult:
        from transformers import LogitsProcessorList

        clock = self.clock_cls()
        ids = torch.tensor(prompts)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model_hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=output_len,
                min_new_tokens=output_len,
                do_sample=False,
                logits_processor=LogitsProcessorList([clock]),
                pad_token_id=0,
            )
        seconds = time.perf_counter() - t0
        produced = (out.shape[1] - ids.shape[1]) * ids.shape[0]
        assert produced == output_len * len(prompts)
        step_gaps = [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)]
        return RunResult(seconds, produced, step_gaps * len(prompts))


class IsolatedBackend(Backend):
    """Runs another backend in a child process of its own; run() crosses a pipe.

    Why: OpenMP (libgomp) keeps a thread team per thread that ran a parallel op, and with more
    team threads in a process than CPUs it stops spinning between ops. Two backends in one process
    (transformers on the main thread, Baton's step thread) slowed each other by ~30%. Each in its
    own process, every backend runs as it would alone; they still take turns, in one run.
    """

    def __init__(self, inner: type[Backend], model: str, max_batch: int, dtype: str, threads: int) -> None:
        super().__init__(model, max_batch, dtype)
        self.inner, self.threads = inner, threads
        self.name = inner.name

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_serve_backend,
            args=(self.inner, self.model, self.max_batch, self.dtype, self.threads, child),
            daemon=False,  # vLLM's backend starts processes of its own; stop() ends the child
        )
        self.proc.start()
        child.close()
        self._reply(timeout=900)  # loaded and warmed up

    def _reply(self, timeout: float) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"{self.name} gave no answer in {timeout:.0f} s")
        reply = self.conn.recv()
        if isinstance(reply, BaseException):
            raise RuntimeError(f"{self.name} failed in its process") from reply
        return reply

    def run(self, prompts: list[list[int]], output_len: int) -> RunResult:
        self.conn.send((prompts, output_len))
        return self._reply(timeout=3600)

    def stop(self) -> None:
        proc = getattr(self, "proc", None)
        if proc is None:  # never started
            return
        if proc.is_alive():
            try:
                self.conn.send(None)
            except OSError:  # the child is gone already
                pass
            proc.join(timeout=120)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=10)


def _serve_backend(
    inner: type[Backend], model: str, max_batch: int, dtype: str, threads: int, conn: Connection
) -> None:
    """Child side of :class:`IsolatedBackend`: start, warm up, then answer run requests."""
    torch.set_num_threads(threads)
    try:
        backend = inner(model, max_batch, dtype)
        backend.start()
        backend.run([[1, 2, 3]], 4)  # warm-up: first-call allocations, thread start
    except BaseException as e:
        conn.send(e)
        return
    conn.send("ready")
    try:
        while (msg := conn.recv()) is not None:
            try:
                conn.send(backend.run(*msg))
            except Exception as e:
                conn.send(e)
    finally:
        backend.stop()


BACKENDS: dict[str, type[Backend]] = {
    "baton-torch": TorchEngineBackend,
    "baton-torch-plain": TorchPlainBackend,
    "transformers": TransformersBackend,
    # "vllm": VllmBackend,  (the vLLM adapter's engineer adds it: same Backend interface)
}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def prompts(rng: random.Random, batch: int, length: int, vocab_size: int) -> list[list[int]]:
    return [[rng.randrange(5, vocab_size) for _ in range(length)] for _ in range(batch)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="baton-small")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--backends", default="baton-torch,transformers", help=f"any of {', '.join(BACKENDS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1, help="runs per backend and batch; the best is kept")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="every backend")
    ap.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch threads, every backend"
    )
    ap.add_argument(
        "--same-process",
        action="store_true",
        help="run every backend in this process (default: each in a child process of its own)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["BATON_TORCH_THREADS"] = str(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    vocab = resolve_model(args.model)  # build the built-in model first, outside any timing
    from shared.tokenizer import Tokenizer

    vocab_size = Tokenizer(vocab.path).vocab_size
    rng = random.Random(args.seed)
    print(
        f"model {args.model} ({args.dtype}), prompt {args.prompt_len} tokens, output {args.output_len} tokens, "
        f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}"
    )

    # Every backend stays loaded and they take turns at each batch size, so a noisy neighbour on a
    # shared CPU hurts them alike; with --repeats, each keeps its best run.
    classes = [BACKENDS[name] for name in args.backends.split(",")]
    if args.same_process:
        backends = [cls(args.model, max(batches), args.dtype) for cls in classes]
    else:
        backends = [IsolatedBackend(cls, args.model, max(batches), args.dtype, args.threads) for cls in classes]
    rows: list[Row] = []
    try:
        for backend in backends:
            backend.start()
            if args.same_process:
                backend.run([[1, 2, 3]], 4)  # warm-up: first-call allocations, thread start
        for batch in batches:
            best: dict[str, Row] = {}
            for _ in range(args.repeats):
                for backend in backends:
                    # fresh prompts per run: no backend gets prefix-cache hits from an earlier run
                    pre = backend.run(prompts(rng, batch, args.prompt_len, vocab_size), 1)
                    gen = backend.run(prompts(rng, batch, args.prompt_len, vocab_size), args.output_len)
                    row = Row(
                        backend.name,
                        batch,
                        output_tok_s=gen.tokens / gen.seconds,
                        prefill_tok_s=batch * args.prompt_len / pre.seconds,
                        tpot_p50_ms=1e3 * statistics.median(gen.gaps) if gen.gaps else float("nan"),
                        tpot_p99_ms=1e3 * percentile(gen.gaps, 99),
                    )
                    print(
                        f"  {row.backend:14s} batch {batch:3d}: {row.output_tok_s:8.1f} out tok/s  "
                        f"{row.prefill_tok_s:8.1f} prefill tok/s",
                        flush=True,
                    )
                    old = best.get(row.backend)
                    if old is None or row.output_tok_s > old.output_tok_s:
                        best[row.backend] = row
            rows += best.values()
    finally:
        for backend in backends:
            backend.stop()
    rows.sort(key=lambda r: (r.backend != "baton-torch", r.backend, r.batch))

    print()
    print(
        f"| {'backend':14s} | batch | output tok/s | prefill tok/s | TPOT p50 ms | TPOT p99 ms | vs transformers |"
    )
    print(
        f"|{'-' * 16}|-------|--------------|---------------|-------------|-------------|-----------------|"
    )
    base = {r.batch: r.output_tok_s for r in rows if r.backend == "transformers"}
    for r in rows:
        ratio = f"{r.output_tok_s / base[r.batch]:.2f}x" if r.batch in base else "-"
        print(
            f"| {r.backend:14s} | {r.batch:5d} | {r.output_tok_s:12.1f} | {r.prefill_tok_s:13.1f} "
            f"| {r.tpot_p50_ms:11.2f} | {r.tpot_p99_ms:11.2f} | {ratio:>15s} |"
        )


if __name__ == "__main__":
    main()
