"""A worker's measured capacity, and ``baton profile``, which measures it on the deployed engine.

The profile is data (JSON), made once per engine/model/hardware and read by the SLA policy:

* prefill points: for a prompt length, the time to first token of a lone request and the prompt
  tokens/s one worker sustains when saturated;
* decode points: for a batch of ``c`` sequences decoding together, the inter-token latency and
  the output tokens/s.

``baton profile`` runs the engine in-process (no NATS: capacity is the engine's) with the same
EngineConfig a worker would get, so the numbers include the engine's own overheads.

Capacity model (used by :meth:`WorkerProfile.decode_capacity`): a request costs a worker
``osl * ITL(c) / c`` seconds of decoding in a batch of ``c`` (the largest batch whose ITL meets the
target and whose KV fits) plus ``isl / prefill_tokens_per_s`` seconds of prefill. A worker busy a
fraction ``rho`` of its time stretches a lone request's TTFT to about ``ttft0 / (1 - rho)``
(processor sharing), so the TTFT target bounds the utilisation to ``1 - ttft0 / target``.
"""

from __future__ import annotations

import functools
import math
import random
import time
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Annotated

import msgspec
import typer

from shared.builtin_model import DEFAULT_MODEL
from shared.cli_options import (
    BlockSize,
    EngineName,
    MaxBatchedTokens,
    MaxNumSeqs,
    MockerSpeedup,
    Model,
    NumBlocks,
)
from shared.progress import progress


class PrefillPoint(msgspec.Struct, kw_only=True):
    isl: int
    ttft_s: float  # a lone request's time to first token
    tokens_per_s: float  # prompt tokens/s with the worker saturated by prefills


class DecodePoint(msgspec.Struct, kw_only=True):
    concurrency: int
    itl_s: float  # mean inter-token latency with `concurrency` sequences decoding
    tokens_per_s: float  # output tokens/s of the whole batch
    isl: int = 0
    osl: int = 0


class WorkerProfile(msgspec.Struct, kw_only=True):
    engine: str
    model: str
    block_size: int = 16
    kv_blocks_total: int = 0
    max_num_seqs: int = 0
    config: dict = msgspec.field(default_factory=dict)  # the EngineConfig it was measured with
    created: float = 0.0
    prefill: list[PrefillPoint] = msgspec.field(default_factory=list)
    decode: list[DecodePoint] = msgspec.field(default_factory=list)

    # --- persistence ----------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(msgspec.json.format(msgspec.json.encode(self), indent=2) + b"\n")

    @classmethod
    def load(cls, path: str | Path) -> WorkerProfile:
        prof = msgspec.json.decode(Path(path).read_bytes(), type=cls)
        if not prof.prefill or not prof.decode:
            raise ValueError(f"{path}: a profile needs prefill and decode points")
        return prof

    # --- interpolation --------------------------------------------------------------------

    def ttft0(self, isl: float) -> float:
        pts = sorted(self.prefill, key=lambda p: p.isl)
        return max(1e-6, _interp(isl, [p.isl for p in pts], [p.ttft_s for p in pts]))

    def prefill_tokens_per_s(self, isl: float) -> float:
        pts = sorted(self.prefill, key=lambda p: p.isl)
        # Throughput flattens out with length: hold the end values rather than extrapolate.
        return max(1.0, _interp(isl, [p.isl for p in pts], [p.tokens_per_s for p in pts], extrapolate=False))

    def itl(self, concurrency: float) -> float:
        pts = sorted(self.decode, key=lambda p: p.concurrency)
        return max(1e-6, _interp(concurrency, [p.concurrency for p in pts], [p.itl_s for p in pts]))

    def max_concurrency(self, itl_target: float, isl: float = 0.0, osl: float = 0.0) -> float:
        """The largest batch whose ITL meets the target (>= 1), within the KV pool and batch cap."""
        pts = sorted(self.decode, key=lambda p: p.concurrency)
        best = 1.0
        for a, b in pairwise(pts):
            if b.itl_s <= itl_target:
                best = b.concurrency
            elif a.itl_s <= itl_target:  # crosses inside this segment
                best = a.concurrency + (itl_target - a.itl_s) / (b.itl_s - a.itl_s) * (b.concurrency - a.concurrency)
                break
            else:
                break
        if len(pts) == 1 and pts[0].itl_s <= itl_target:
            best = pts[0].concurrency
        if self.kv_blocks_total and (isl or osl):
            per_seq = math.ceil((isl + osl) / max(1, self.block_size))
            best = min(best, max(1.0, self.kv_blocks_total / max(1, per_seq)))
        if self.max_num_seqs:
            best = min(best, float(self.max_num_seqs))
        return max(1.0, best)

    def decode_capacity(self, isl: float, osl: float, itl_target: float, ttft_target: float,
                        prefill_share: float = 0.0, max_util: float = 0.9) -> Capacity:
        """Requests/s one worker serves within both targets (prefill_share: prompts computed elsewhere)."""
        isl = max(isl, 1.0)
        osl = max(osl, 1.0)
        c = self.max_concurrency(itl_target, isl, osl)
        itl = self.itl(c)
        decode_ws = osl * itl / c
        own = 1.0 - prefill_share
        prefill_ws = own * isl / self.prefill_tokens_per_s(isl)
        ttft0 = own * self.ttft0(isl)
        util = _util(ttft0, ttft_target, max_util)
        by_time = util / (decode_ws + prefill_ws)
        by_slots = c / (ttft0 + osl * itl)  # Little's law: each request holds a batch slot this long
        return Capacity(min(by_time, by_slots), c, util, decode_ws + prefill_ws, decode_ws)

    def prefill_capacity(self, isl: float, ttft_target: float, max_util: float = 0.9) -> float:
        """Prefill jobs/s one prefill worker serves within the TTFT target."""
        isl = max(isl, 1.0)
        return _util(self.ttft0(isl), ttft_target, max_util) * self.prefill_tokens_per_s(isl) / isl


@dataclass(slots=True)
class Capacity:
    requests_per_s: float
    concurrency: float
    utilization: float
    ws_per_request: float  # worker-seconds one request costs (decode + own prefill)
    decode_ws_per_request: float


def _util(ttft0: float, target: float, max_util: float) -> float:
    if target <= 0:
        return max_util
    # A target below a lone request's TTFT cannot be met by adding workers; plan a light load anyway.
    return min(max_util, max(0.1, 1.0 - ttft0 / target))


def _interp(x: float, xs: list[float], ys: list[float], extrapolate: bool = True) -> float:
    if len(xs) == 1:
        return ys[0]
    if x <= xs[0] or x >= xs[-1]:
        if not extrapolate:
            return ys[0] if x <= xs[0] else ys[-1]
        i = 0 if x <= xs[0] else len(xs) - 2
    else:
        i = bisect_left(xs, x) - 1
    x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 != x0 else y0


# --- measuring -------------------------------------------------------------------------------


async def measure(config, isls: list[int], concurrencies: list[int], decode_isl: int, osl: int,
                  prefill_batch: int = 8, prefill_steps: int = 8, seed: int = 0,
                  on_step: Callable[[str], None] = lambda _: None) -> WorkerProfile:
    """Profile one engine built from ``config`` (an EngineConfig). ``on_step(what)`` is called as
    each of its ``2 + len(isls) + len(concurrencies)`` steps starts (a progress bar's hook)."""
    import anyio

    from shared.engines import make_engine
    from shared.messages import SamplingParams

    engine = make_engine(config)
    rng = random.Random(seed)
    vocab = int(getattr(engine, "vocab_size", 2048) or 2048)
    counter = 0

    def prompt(n: int) -> list[int]:
        # Distinct random prompts: nothing comes from the prefix cache.
        return [rng.randrange(16, vocab) for _ in range(n)]

    async def one(n_prompt: int, max_tokens: int) -> list[float]:
        """Token arrival times (perf_counter) of one request, after its start time."""
        nonlocal counter
        counter += 1
        times = [time.perf_counter()]
        sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        async for out in engine.generate(f"profile-{counter}", prompt(n_prompt), sampling):
            if out.error:
                raise RuntimeError(out.error)
            now = time.perf_counter()
            times.extend([now] * len(out.token_ids))
        return times

    async def batch(k: int, n_prompt: int, max_tokens: int) -> list[list[float]]:
        results: list[list[float]] = [[] for _ in range(k)]

        async def run(i: int) -> None:
            results[i] = await one(n_prompt, max_tokens)

        async with anyio.create_task_group() as tg:
            for i in range(k):
                tg.start_soon(run, i)
        return results

    prof = WorkerProfile(engine=config.engine, model=config.model, block_size=config.block_size,
                         max_num_seqs=config.max_num_seqs, config=msgspec.to_builtins(config), created=time.time())
    async with anyio.create_task_group() as tg:
        on_step("loading the engine")
        tg.start_soon(engine.run)
        await engine.wait_ready()
        on_step("warm-up")
        await batch(2, 32, 4)  # warm-up: first-call costs are not capacity
        for isl in isls:
            on_step(f"prefill, prompts of {isl} tokens")
            lone = [await one(isl, 1) for _ in range(3)]
            ttft = sorted(t[1] - t[0] for t in lone)[1]  # the median of three
            # Enough prompts for several engine steps, so one step more or less (engines differ in
            # whether a step's outputs come at its start or its end) hardly moves the figure.
            k = max(prefill_batch, math.ceil(prefill_steps * config.max_batched_tokens / isl))
            t0 = time.perf_counter()
            await batch(k, isl, 1)
            tps = k * isl / (time.perf_counter() - t0)
            prof.prefill.append(PrefillPoint(isl=isl, ttft_s=ttft, tokens_per_s=tps))
        for c in concurrencies:
            on_step(f"decode, batch of {c}")
            runs = await batch(c, decode_isl, osl)
            itls = [(t[-1] - t[1]) / (len(t) - 2) for t in runs if len(t) > 2]
            first = min(t[1] for t in runs)
            last = max(t[-1] for t in runs)
            tokens = sum(len(t) - 2 for t in runs)  # tokens after each request's first
            prof.decode.append(DecodePoint(concurrency=c, itl_s=sum(itls) / len(itls),
                                           tokens_per_s=tokens / max(last - first, 1e-9), isl=decode_isl, osl=osl))
        prof.kv_blocks_total = engine.stats().kv_blocks_total
        tg.cancel_scope.cancel()
    return prof


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.replace(",", " ").split()]


def main(
    out: Annotated[str, typer.Option("--out", "-o", help="Write the profile (JSON) here.")] = "baton-profile.json",
    model: Model = DEFAULT_MODEL,
    engine: EngineName = "torch",
    block_size: BlockSize = 16,
    num_blocks: NumBlocks = 0,
    max_num_seqs: MaxNumSeqs = 64,
    max_batched_tokens: MaxBatchedTokens = 512,
    mocker_speedup: MockerSpeedup = 1.0,
    isl: Annotated[str, typer.Option(help="Prompt lengths to profile prefill at (comma separated).")]
    = "64,256,1024",
    concurrency: Annotated[str, typer.Option(help="Batch sizes to profile decode at (comma separated).")]
    = "1,2,4,8,16,32,64",
    decode_isl: Annotated[int, typer.Option(help="Prompt length of the decode runs.")] = 128,
    osl: Annotated[int, typer.Option(help="Output tokens per request in the decode runs.")] = 32,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar (there is none off a terminal).")] = False,
) -> None:
    """Measure one worker's prefill and decode capacity on this engine; the SLA planner reads the JSON."""
    import anyio

    from shared.engines import EngineConfig

    config = EngineConfig(engine=engine, model=model, block_size=block_size, num_blocks=num_blocks,
                          max_num_seqs=max_num_seqs, max_batched_tokens=max_batched_tokens, speedup=mocker_speedup)
    concs = [c for c in _ints(concurrency) if c <= max_num_seqs] or [1]
    isls = _ints(isl)
    with progress(f"profiling the {engine} engine", 2 + len(isls) + len(concs), quiet=quiet) as bar:
        prof = anyio.run(functools.partial(measure, config, isls, concs, decode_isl, osl, on_step=bar.step))
    prof.save(out)
    for p in prof.prefill:
        typer.echo(f"prefill isl {p.isl:6d}: ttft {p.ttft_s * 1e3:8.2f} ms  {p.tokens_per_s:10.0f} tok/s")
    for d in prof.decode:
        typer.echo(f"decode  c {d.concurrency:4d}: itl {d.itl_s * 1e3:8.2f} ms  {d.tokens_per_s:10.0f} tok/s")
    typer.echo(f"wrote {out}")


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command()(main)

if __name__ == "__main__":
    app()
