"""KV blocks held by n parallel choices of one prompt, against n = 1 (torch engine, baton-tiny).

The n choices share the prompt's full blocks (one prefill, forked); each adds only its private
tail. Reports the peak of ``kv_blocks_used`` while the request runs, median of --repeats runs.

    python -m bench.n_kv_blocks --prompt-tokens 1000 --max-tokens 32 --n 4
"""

from __future__ import annotations

import argparse
import random
import statistics

import anyio

from shared.engines import EngineConfig, make_engine
from shared.messages import SamplingParams


async def peak_blocks(eng, rid: str, ids: list[int], sp: SamplingParams) -> int:
    peak = 0
    async for _ in eng.generate(rid, ids, sp):
        peak = max(peak, eng.stats().kv_blocks_used)
    return peak


async def main(args: argparse.Namespace) -> None:
    eng = make_engine(EngineConfig(engine="torch", model=args.model, dtype="float32", num_blocks=2048,
                                   block_size=args.block_size, enable_prefix_caching=False))
    ids = [random.Random(0).randrange(5, 2000) for _ in range(args.prompt_tokens)]
    results: dict[int, list[int]] = {1: [], args.n: []}
    async with anyio.create_task_group() as tg:
        tg.start_soon(eng.run)
        await eng.wait_ready()
        for r in range(args.repeats):
            for n in (1, args.n):
                sp = SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=r, n=n, ignore_eos=True)
                results[n].append(await peak_blocks(eng, f"r{r}n{n}", ids, sp))
        tg.cancel_scope.cancel()
    one, many = statistics.median(results[1]), statistics.median(results[args.n])
    print(f"prompt {args.prompt_tokens} tokens, {args.max_tokens} new, block {args.block_size}, prefix cache off")
    print(f"n=1: peak KV blocks {results[1]} (median {one:g})")
    print(f"n={args.n}: peak KV blocks {results[args.n]} (median {many:g})")
    print(f"ratio n={args.n} / n=1: {many / one:.3f} (goal <= 1.3)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="baton-tiny")
    p.add_argument("--prompt-tokens", type=int, default=1000)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    anyio.run(main, p.parse_args())
