"""Engine throughput on one machine: Baton's torch engine vs transformers ``generate`` (and vLLM,
added by ``bench/vllm_bench.py``), like with like.

    python bench/engine_bench.py [--model baton-small] [--batches 1,16,64] [--dtypes float32,bfloat16]
        [--backends baton-torch,transformers,transformers-static] [--repeats 3] [--json out.json]

For each batch size every backend runs two workloads on the same kind of random prompts:
  * prefill: ``batch`` prompts with one output token each -> prefill tokens/s
  * generate: ``batch`` prompts, ``output_len`` tokens each (EOS ignored) -> output tokens/s, and
    the time between consecutive output tokens of a request (p50/p99 TPOT)
All requests of a batch arrive at once. Every backend runs in every dtype of ``--dtypes`` (so
transformers is compared at its best dtype, whichever that is), each (backend, dtype) in a child
process of its own with the same torch thread count. All stay loaded; at each batch size each
repeat runs every one of them once, in an order rotated per repeat, so a noisy neighbour on a
shared CPU hits all sides alike. Tables give the median and the min-max spread over the repeats
and the failed runs; ``--json`` keeps every run. Backends: ``baton-torch``, ``baton-torch-plain``
(the same engine without its fused C kernels and prepacked matmuls), ``transformers`` (dynamic KV
cache), ``transformers-static`` (``cache_implementation="static"``), ``vllm`` (vllm_bench.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import random
import statistics
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any

# Before torch loads OpenMP: the engine's setting (short spins, then sleep), for every backend.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "30000")
import torch

from shared.engines.base import EngineConfig
from shared.messages import SamplingParams
from shared.models import resolve_model
from shared.progress import track


@dataclass
class RunResult:
    seconds: float
    tokens: int  # prompt tokens (prefill run) or output tokens (generate run)
    gaps: list[float] = field(default_factory=list)  # seconds between a request's consecutive tokens


@dataclass
class Sample:
    """One measured repeat of one (backend, dtype) at one batch size; ``error`` set if it failed."""

    backend: str
    dtype: str
    batch: int
    repeat: int
    output_tok_s: float = float("nan")
    prefill_tok_s: float = float("nan")
    tpot_p50_ms: float = float("nan")
    tpot_p99_ms: float = float("nan")
    load1: float = float("nan")  # 1-minute load average when the run ended
    error: str | None = None


class Backend(ABC):
    name: str

    def __init__(self, model: str, max_batch: int, dtype: str) -> None:
        self.model = model
        self.max_batch = max_batch
        self.dtype = dtype

    def start(self) -> None:  # noqa: B027 - optional hook
        """Load the model (not timed)."""

    def describe(self) -> str:
        """How this backend was configured, as it ended up (for the report)."""
        return f"{self.name} {self.dtype}, torch threads {torch.get_num_threads()}"

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
        self.engine.kv_events.drain()  # no worker publishes them here; don't let the buffer grow
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

    cache_kwargs: dict[str, Any] = {}  # generate()'s KV cache: its default, the dynamic cache

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
                **self.cache_kwargs,
            )
        seconds = time.perf_counter() - t0
        produced = (out.shape[1] - ids.shape[1]) * ids.shape[0]
        assert produced == output_len * len(prompts)
        step_gaps = [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)]
        return RunResult(seconds, produced, step_gaps * len(prompts))


class TransformersStaticBackend(TransformersBackend):
    """transformers with a preallocated static KV cache (its recommended setting for torch.compile;
    on CPU without compile it may help or hurt: both are measured)."""

    name = "transformers-static"
    cache_kwargs = {"cache_implementation": "static"}


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
        self.description = self._reply(timeout=1800)  # loaded and warmed up (vLLM may compile)

    def describe(self) -> str:
        return self.description

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
    conn.send(backend.describe())
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
    "transformers-static": TransformersStaticBackend,
    # "vllm": VllmBackend, added by bench/vllm_bench.py (same Backend interface)
}
SHORT = {"float32": "fp32", "bfloat16": "bf16"}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def prompts(rng: random.Random, batch: int, length: int, vocab_size: int) -> list[list[int]]:
    return [[rng.randrange(5, vocab_size) for _ in range(length)] for _ in range(batch)]


def cpu_report() -> str:
    """The CPU features the backends' kernels pick from (torch's own dispatch level too)."""
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile") if f in flags]
    return f"CPU {os.cpu_count()} logical CPUs, ISA {' '.join(isa) or '?'}, torch dispatch {torch.backends.cpu.get_cpu_capability()}"


def measure(backend: Backend, dtype: str, batch: int, repeat: int, rng: random.Random, args: argparse.Namespace,
            vocab_size: int) -> Sample:
    """One repeat: a prefill run and a generate run, on fresh prompts (no prefix-cache hits)."""
    sample = Sample(backend.name, dtype, batch, repeat)
    try:
        pre = backend.run(prompts(rng, batch, args.prompt_len, vocab_size), 1)
        gen = backend.run(prompts(rng, batch, args.prompt_len, vocab_size), args.output_len)
    except Exception as e:  # counted in the table, the run goes on
        sample.error = f"{type(e).__name__}: {e.__cause__ or e}"[:300]
    else:
        sample.output_tok_s = gen.tokens / gen.seconds
        sample.prefill_tok_s = batch * args.prompt_len / pre.seconds
        sample.tpot_p50_ms = 1e3 * statistics.median(gen.gaps) if gen.gaps else float("nan")
        sample.tpot_p99_ms = 1e3 * percentile(gen.gaps, 99)
    sample.load1 = os.getloadavg()[0]
    return sample


def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    """median (min-max) of the finite values; '-' if none."""
    ok = [v for v in values if v == v]
    if not ok:
        return "-"
    med = statistics.median(ok)
    if len(ok) == 1:
        return fmt.format(med)
    return f"{fmt.format(med)} ({fmt.format(min(ok))}-{fmt.format(max(ok))})"


def report(samples: list[Sample], dtypes: list[str], batches: list[int]) -> str:
    """Markdown: one table per dtype (every backend in it), then the ratios Baton needs to meet."""
    out: list[str] = []
    names = list(dict.fromkeys(s.backend for s in samples))
    by = {}
    for s in samples:
        by.setdefault((s.backend, s.dtype, s.batch), []).append(s)
    for dtype in dtypes:
        out += [f"\n**{dtype}** (median (min-max) over the repeats; errors = failed runs / runs)\n",
                "| backend | batch | output tok/s | prefill tok/s | TPOT p50 ms | TPOT p99 ms | errors |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        for name in names:
            for batch in batches:
                rows = by.get((name, dtype, batch), [])
                if not rows:
                    continue
                ok = [r for r in rows if r.error is None]
                out.append(
                    f"| {name} | {batch} | {spread([r.output_tok_s for r in ok])} | "
                    f"{spread([r.prefill_tok_s for r in ok])} | {spread([r.tpot_p50_ms for r in ok], '{:.1f}')} | "
                    f"{spread([r.tpot_p99_ms for r in ok], '{:.1f}')} | {len(rows) - len(ok)}/{len(rows)} |")
    # Ratios: Baton against vLLM in the same dtype; against transformers' best (dtype, cache) at that batch.
    tf = [n for n in names if n.startswith("transformers")]
    out += ["\n**Ratios** (output tok/s; median of the per-repeat ratios, min-max; repeats were interleaved)\n",
            "| dtype | batch | Baton / vLLM (same dtype) | transformers best (median) | Baton / transformers best |",
            "|---|---:|---:|---|---:|"]

    def per_repeat(a: list[Sample], b: list[Sample]) -> list[float]:
        bb = {s.repeat: s.output_tok_s for s in b if s.error is None}
        return [s.output_tok_s / bb[s.repeat] for s in a if s.error is None and s.repeat in bb]

    for dtype in dtypes:
        for batch in batches:
            baton = by.get(("baton-torch", dtype, batch), [])
            if not baton:
                continue
            vs_vllm = spread(per_repeat(baton, by.get(("vllm", dtype, batch), [])), "{:.2f}x")
            best_key, best_med = None, 0.0
            for name in tf:
                for d in dtypes:
                    ok = [s.output_tok_s for s in by.get((name, d, batch), []) if s.error is None]
                    if ok and statistics.median(ok) > best_med:
                        best_key, best_med = (name, d), statistics.median(ok)
            if best_key is None:
                tf_cell, vs_tf = "-", "-"
            else:
                tf_cell = f"{best_key[0]} {SHORT.get(best_key[1], best_key[1])} ({best_med:.0f})"
                vs_tf = spread(per_repeat(baton, by[(*best_key, batch)]), "{:.2f}x")
            out.append(f"| {SHORT.get(dtype, dtype)} | {batch} | {vs_vllm} | {tf_cell} | {vs_tf} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="baton-small")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--backends", default="baton-torch,transformers,transformers-static",
                    help=f"any of {', '.join(BACKENDS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs per backend and batch")
    ap.add_argument("--dtypes", "--dtype", default="float32,bfloat16",
                    help="every backend runs in each of these (float32, bfloat16)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, every backend")
    ap.add_argument("--json", default="", help="write every run here")
    ap.add_argument("--report", default="", help="print the tables of a saved --json file, run nothing")
    args = ap.parse_args()
    if args.report:
        with open(args.report) as f:
            saved = json.load(f)
        print(report([Sample(**s) for s in saved["samples"]], saved["args"]["dtypes"].split(","),
                     [int(b) for b in saved["args"]["batches"].split(",")]))
        return
    torch.set_num_threads(args.threads)
    os.environ["BATON_TORCH_THREADS"] = str(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    dtypes = args.dtypes.split(",")
    vocab = resolve_model(args.model)  # build the built-in model first, outside any timing
    from shared.tokenizer import Tokenizer

    vocab_size = Tokenizer(vocab.path).vocab_size
    rng = random.Random(args.seed)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    print(f"{started}: model {args.model}, prompt {args.prompt_len} tokens, output {args.output_len} tokens, "
          f"torch threads {args.threads}, load average {os.getloadavg()[0]:.2f}\n{cpu_report()}", flush=True)

    backends = [IsolatedBackend(BACKENDS[name], args.model, max(batches), dtype, args.threads)
                for dtype in dtypes for name in args.backends.split(",")]
    samples: list[Sample] = []
    setup: list[str] = []

    def save() -> None:
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"started": started, "args": vars(args), "cpu": cpu_report(), "setup": setup,
                           "samples": [asdict(s) for s in samples]}, f, indent=1)

    try:
        for backend in backends:
            t0 = time.perf_counter()
            backend.start()
            setup.append(f"{backend.describe()} (ready in {time.perf_counter() - t0:.0f} s)")
            print("  " + setup[-1], flush=True)
        for batch in batches:
            for repeat in track(range(args.repeats), "repeats"):
                k = repeat % len(backends)  # rotate who goes first: no backend always runs after the same one
                for backend in backends[k:] + backends[:k]:
                    s = measure(backend, backend.dtype, batch, repeat, rng, args, vocab_size)
                    samples.append(s)
                    save()  # after every run: an interrupted benchmark keeps what it measured
                    print(f"  {s.backend:20s} {s.dtype:8s} batch {batch:3d} #{repeat}: "
                          + (f"ERROR {s.error}" if s.error else
                             f"{s.output_tok_s:8.1f} out tok/s {s.prefill_tok_s:8.1f} prefill tok/s")
                          + f"  load {s.load1:.2f}", flush=True)
    finally:
        for backend in backends:
            backend.stop()
    loads = [s.load1 for s in samples]
    print(f"\nload average (1 min) during the runs: {min(loads):.2f}-{max(loads):.2f}" if loads else "")
    print(report(samples, dtypes, batches))
    save()


if __name__ == "__main__":
    main()
