"""Where one decode step of the torch engine's model goes, part by part.

    python bench/engine_step_profile.py [--dtype bfloat16] [--batch 16] [--context 192] [--steps 30]

Builds baton-small, fills a KV pool for ``batch`` sequences of ``context`` tokens, and times
``forward`` on one decode token per sequence, with timers around the matmuls and each fused
kernel. It prints milliseconds per step for each part, with and without the fused kernels.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

if "OMP_WAIT_POLICY" not in os.environ:  # as the engine does, before torch loads
    os.environ.setdefault("GOMP_SPINCOUNT", "30000")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from shared.engines.torch_model import LlamaModel, StepInputs, load_model
from shared.models import resolve_model

BLOCK = 16


def decode_inputs(batch: int, context: int) -> StepInputs:
    """One new token per sequence at position ``context``; sequence i owns a run of blocks."""
    per_seq = -(-(context + 1) // BLOCK)
    table = torch.arange(batch * per_seq).view(batch, per_seq)
    pos = torch.full((batch,), context)
    slots = table[:, context // BLOCK] * BLOCK + context % BLOCK
    mask = (torch.arange(per_seq * BLOCK)[None, :] <= pos[:, None])[:, None, None, :]
    ids = torch.randint(5, 2000, (batch,))
    return StepInputs(ids, pos, slots, torch.arange(batch), batch, table.flatten(), mask, None, [])


def timed(parts: dict[str, float], name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            parts[name] += time.perf_counter() - t

    return wrapper


def profile(model: LlamaModel, inp: StepInputs, steps: int) -> tuple[float, dict[str, float]]:
    parts: dict[str, float] = defaultdict(float)
    originals: list[tuple[Any, str, Any]] = []
    targets: list[tuple[Any, str, str]] = [(model, "_linear", "matmuls")]
    if model.kernels is not None:
        targets += [
            (model.kernels, "paged_decode_attention", "decode attention"),
            (model.kernels, "add_rms_norm", "add + RMSNorm"),
            (model.kernels, "rope_and_cache", "rope + KV write"),
            (model.kernels, "silu_mul", "SiLU x up"),
        ]
    with torch.inference_mode():
        for _ in range(5):
            model.forward(inp)
        for obj, attr, name in targets:
            originals.append((obj, attr, getattr(obj, attr)))
            setattr(obj, attr, timed(parts, name, getattr(obj, attr)))
        times = []
        try:
            for _ in range(steps):
                t = time.perf_counter()
                model.forward(inp)
                times.append(time.perf_counter() - t)
        finally:
            for obj, attr, fn in originals:
                setattr(obj, attr, fn)
    return statistics.median(times), {k: v / steps for k, v in parts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="baton-small")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=192)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(resolve_model(args.model).path, args.dtype)
    model.allocate_kv(args.batch * (-(-(args.context + 1) // BLOCK)) + 1, BLOCK)
    inp = decode_inputs(args.batch, args.context)
    fused = model.kernels
    print(
        f"{args.model} {args.dtype}, batch {args.batch}, context {args.context}, threads {args.threads}, "
        f"kernels {'loaded' if fused else 'unavailable'}, prepacked matmuls {model.prepacked}"
    )
    for label, kernels in (("fused", fused), ("plain attention/norms", None)):
        if label == "fused" and fused is None:
            continue
        model.kernels = kernels
        step, parts = profile(model, inp, args.steps)
        other = step - sum(parts.values())
        print(f"\n{label}: {step * 1e3:.2f} ms per step (median of {args.steps})")
        for name, seconds in sorted(parts.items(), key=lambda kv: -kv[1]):
            print(f"  {name:18s} {seconds * 1e3:6.2f} ms")
        print(f"  {'everything else':18s} {other * 1e3:6.2f} ms")


if __name__ == "__main__":
    main()
