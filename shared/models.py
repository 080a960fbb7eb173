"""Model resolution: a built-in name or a Hugging Face model directory -> a local directory."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from shared.builtin_model import BUILTIN_MODELS, ensure_builtin


@dataclass(frozen=True)
class ModelRef:
    name: str  # the name clients use in "model"
    path: Path


def resolve_model(model: str, served_name: str | None = None) -> ModelRef:
    """``baton-tiny``/``baton-small`` build on first use; anything else must be a directory."""
    if model in BUILTIN_MODELS:
        return ModelRef(served_name or model, ensure_builtin(model))
    p = Path(model).expanduser()
    if not (p / "config.json").exists():
        raise FileNotFoundError(
            f"model {model!r} is neither a built-in ({', '.join(BUILTIN_MODELS)}) nor a directory "
            "with config.json (Hugging Face layout); model hubs are not contacted"
        )
    return ModelRef(served_name or p.resolve().name, p.resolve())


DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_dtype(dtype: str, model_dir: Path, device: str = "cpu") -> str:
    """The dtype to run ``model_dir`` in: ``auto`` is the checkpoint's own (config.json).

    As with vLLM's ``auto``, a bf16 checkpoint runs in bf16 and an fp32 one in fp32 (the built-in
    models: outputs match transformers token for token). Unlike vLLM, fp32 is not downcast: ask
    for ``bfloat16`` for the CPU speed-up. float16 runs as bfloat16 on CPU, where fp16 matmuls
    are slow. A checkpoint that names no dtype runs in fp32.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if dtype == "auto":
        try:
            cfg = json.loads((model_dir / "config.json").read_text())
        except (OSError, ValueError):
            cfg = {}
        # transformers 5 writes "dtype"; 4.x wrote "torch_dtype"
        dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32").removeprefix("torch.")
        if dtype not in DTYPES[1:]:
            dtype = "float32"
    if dtype == "float16" and device == "cpu":
        dtype = "bfloat16"
    return dtype
