"""Per-step cost of structured outputs: batch-16 decoding on the torch engine, constrained vs not.

Each run starts ``--batch`` requests at once (same short prompt, max_tokens tokens each, EOS ignored)
and times the engine steps while the whole batch decodes. Sides alternate run by run (unconstrained,
regex, JSON schema), on one engine, so they share the model, threads, dtype and load. The grammars
cannot complete within max_tokens, so every side keeps all rows busy to the end; the first step
(prefill) and the compile (cached after the first run) are outside the timed window.

    python -m bench.structured_bench --model baton-small --batch 16 --max-tokens 64 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import anyio

from shared.engines.base import EngineConfig
from shared.engines.torch_engine import TorchEngine
from shared.messages import SamplingParams, StructuredOutput

# Grammars as applications send them. A row whose grammar completes early ends the timed window
# (see one_run), so every timed step has the whole batch busy. Counted repetitions and long
# minLength strings are far costlier per step (xgrammar walks the expanded rule): `--pathological`
# measures those too.
SIDES: dict[str, StructuredOutput | None] = {
    "unconstrained": None,
    "regex": StructuredOutput(kind="regex", spec="[a-z ,.]+"),
    "json_schema": StructuredOutput(kind="json_schema", spec=json.dumps({
        "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                         "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["name", "age", "tags"]})),
}
PATHOLOGICAL: dict[str, StructuredOutput | None] = {
    "regex_counted": StructuredOutput(kind="regex", spec="[a-z ,.]{4000,}"),
    "json_minlength": StructuredOutput(kind="json_schema", spec=json.dumps({
        "type": "object", "properties": {"text": {"type": "string", "minLength": 4000}}, "required": ["text"]})),
}


async def one_run(engine: TorchEngine, batch: int, max_tokens: int, so: StructuredOutput | None, tag: str) -> tuple[float, int]:
    """Seconds per decode step while the whole batch decodes, and how many tokens came back."""
    sp = SamplingParams(max_tokens=max_tokens, temperature=1.0, ignore_eos=True, structured=so, seed=1)
    prompt = list(range(10, 30))
    counts = [0] * batch
    marks: dict[str, tuple[float, int]] = {}

    async def req(i: int) -> None:
        async for out in engine.generate(f"{tag}-{i}", prompt, sp):
            counts[i] += len(out.token_ids)
            if "start" not in marks and min(counts) >= 1:  # every row past prefill
                marks["start"] = (time.perf_counter(), engine.num_steps)
            if out.finish_reason is not None and "end" not in marks:
                marks["end"] = (time.perf_counter(), engine.num_steps)

    async with anyio.create_task_group() as tg:
        for i in range(batch):
            tg.start_soon(req, i)
    (t0, s0), (t1, s1) = marks["start"], marks["end"]
    return (t1 - t0) / max(1, s1 - s0), sum(counts)


async def main(args: argparse.Namespace) -> None:
    engine = TorchEngine(EngineConfig(model=args.model, max_num_seqs=args.batch, max_batched_tokens=2048))
    sides = {**SIDES, **(PATHOLOGICAL if args.pathological else {})}
    results: dict[str, list[float]] = {k: [] for k in sides}
    tokens: dict[str, list[int]] = {k: [] for k in sides}
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        await engine.wait_ready()
        for name, so in sides.items():  # warm-up: compile, first-use costs
            await one_run(engine, args.batch, 8, so, f"warm-{name}")
        for r in range(args.repeats):
            for name, so in sides.items():
                step, n = await one_run(engine, args.batch, args.max_tokens, so, f"{name}-{r}")
                results[name].append(step)
                tokens[name].append(n)
        tg.cancel_scope.cancel()
    mask_ms = mask_cost(engine, args.batch, sides)
    base = statistics.median(results["unconstrained"])
    print(f"{args.model}, batch {args.batch}, {args.max_tokens} tokens/request, {args.repeats} runs/side, "
          f"{time.strftime('%Y-%m-%d')}")
    for name, steps in results.items():
        med = statistics.median(steps)
        errors = sum(1 for n in tokens[name] if n != args.batch * args.max_tokens)
        print(f"  {name:14s} median {med * 1e3:7.2f} ms/step  (min {min(steps) * 1e3:.2f}, max {max(steps) * 1e3:.2f})"
              f"  {100 * (med / base - 1):+6.1f}% vs unconstrained   runs cut short by a completed grammar: {errors}")
    for name, ms in mask_ms.items():
        print(f"  {name:14s} bitmask fill + apply + accept alone: {ms:.3f} ms/step for {args.batch} rows "
              f"({100 * ms / (base * 1e3):.1f}% of an unconstrained step)")


def mask_cost(engine: TorchEngine, batch: int, sides: dict[str, StructuredOutput | None],
              steps: int = 200) -> dict[str, float]:
    """The grammar work of one step in isolation: median ms over ``steps`` steps of ``batch`` rows."""
    import torch

    from shared.engines.structured import apply_bitmasks

    assert engine.runner._grammar_backend is not None and engine.model is not None
    backend = engine.runner._grammar_backend
    vocab = engine.model.args.vocab_size
    out: dict[str, float] = {}
    for name, so in sides.items():
        if so is None:
            continue
        matchers = [backend.matcher(backend.compile(so)) for _ in range(batch)]
        gen = torch.Generator().manual_seed(0)
        times = []
        for _ in range(steps):
            logits = torch.randn(batch, vocab, generator=gen)
            t = time.perf_counter()
            apply_bitmasks(logits, matchers)
            for m, tok in zip(matchers, logits.argmax(dim=-1).tolist(), strict=True):
                m.accept_token(tok)
            times.append(time.perf_counter() - t)
        out[name] = statistics.median(times) * 1e3
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="baton-small")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--pathological", action="store_true", help="also counted repetitions and long minLength")
    anyio.run(main, p.parse_args())
