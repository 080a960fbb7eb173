"""Cost of LoRA in the torch engine's forward step: a batch of decodes, adapters mixed or none.

Compares, in one process on the same weights, threads and inputs, interleaved repeat by repeat:
  * ``pre-hook``: LlamaModel from a git revision before the LoRA hook (``--before``), no adapters;
  * ``none``: the current LlamaModel, no adapters (the hook's cost when unused);
  * ``N mixed``: N adapters, rows assigned round-robin (an adapter's rows apart: gather + scatter);
  * ``N grouped``: N adapters, each adapter's rows contiguous (slices, no gather).

    PYTHONPATH=$PWD python bench/lora_step.py --model baton-small --batch 16 --before 60654f5
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from shared.builtin_model import build_lora, ensure_builtin
from shared.engines.lora import LoraRegistry, row_slots
from shared.engines.torch_model import StepInputs, load_model

BLOCK = 16


def old_model_module(rev: str):
    """torch_model.py as it was at ``rev``, imported under another name."""
    src = subprocess.run(["git", "show", f"{rev}:shared/engines/torch_model.py"], capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "torch_model_before.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("torch_model_before", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["torch_model_before"] = mod
    spec.loader.exec_module(mod)
    return mod


def decode_step(step_cls, batch: int, ctx: int, device: str, lora=None):
    blocks_per_seq = ctx // BLOCK + 1
    positions = torch.full((batch,), ctx, dtype=torch.int64)
    table = torch.arange(batch * blocks_per_seq)
    slots = torch.arange(batch) * blocks_per_seq * BLOCK + ctx
    mask = (torch.arange(blocks_per_seq * BLOCK)[None, :] <= positions[:, None])[:, None, None, :]
    ids = torch.arange(batch, dtype=torch.int64) + 10
    args = tuple(t.to(device) if isinstance(t, torch.Tensor) else t
                 for t in (ids, positions, slots, torch.arange(batch), batch, table, mask, None, []))
    return step_cls(*args, lora=lora) if lora is not None else step_cls(*args)


def time_steps(model, step, n: int) -> float:
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        for _ in range(3):
            model.forward(step)
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            model.forward(step)
        sync()
        return (time.perf_counter() - t0) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="baton-small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    ap.add_argument("--before", default="", help="git revision of torch_model.py before the hook ('' to skip)")
    ap.add_argument("--plain", action="store_true", help="plain torch path instead of the fused CPU kernels")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    model_dir = ensure_builtin(a.model)
    model = load_model(model_dir, device=a.device)
    if a.plain:
        model.kernels = None
    blocks = a.batch * (a.ctx // BLOCK + 1)
    model.allocate_kv(blocks, BLOCK)
    cases: dict[str, tuple[object, StepInputs]] = {}
    if a.before:
        old = old_model_module(a.before)
        before = old.load_model(model_dir, device=a.device)
        if a.plain:
            before.kernels = None
        before.allocate_kv(blocks, BLOCK)
        cases["pre-hook"] = (before, decode_step(old.StepInputs, a.batch, a.ctx, a.device))
    cases["none"] = (model, decode_step(StepInputs, a.batch, a.ctx, a.device))

    registry = LoraRegistry(model.args, model.dtype, model.device, max_loras=4)
    targets = a.targets.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(4):
            registry.add(f"ad{k}", build_lora(a.model, Path(tmp) / f"ad{k}", rank=a.rank, targets=targets))
    slots = [registry.acquire(f"ad{k}") for k in range(4)]
    for n in (1, 2, 4):
        mixed = [(slots[i % n], 1) for i in range(a.batch)]
        grouped = [(slots[i * n // a.batch], 1) for i in range(a.batch)]
        cases[f"{n} mixed"] = (model, decode_step(StepInputs, a.batch, a.ctx, a.device, registry.plan(row_slots(mixed))))
        if n > 1:
            cases[f"{n} grouped"] = (model, decode_step(StepInputs, a.batch, a.ctx, a.device, registry.plan(row_slots(grouped))))

    results: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(a.repeats):  # interleaved, so drifting machine load hits every case alike
        for name, (m, step) in cases.items():
            results[name].append(time_steps(m, step, a.steps))
    path = "plain" if a.plain or a.device != "cpu" else ("fused" if model.kernels is not None else "plain (no kernels)")
    print(f"# {a.model} {path} fp32, decode batch {a.batch}, ctx {a.ctx}, LoRA rank {a.rank} on {a.targets}, "
          f"threads {torch.get_num_threads()}, {a.repeats} x {a.steps} steps, device {a.device}, loadavg {os.getloadavg()}")
    base = statistics.median(results["none"])
    print(f"{'case':<12} {'median ms':>10} {'min':>8} {'max':>8} {'vs none':>8}")
    for name, times in results.items():
        med = statistics.median(times)
        print(f"{name:<12} {med:>10.3f} {min(times):>8.3f} {max(times):>8.3f} {med / base:>8.2f}x")


if __name__ == "__main__":
    main()
