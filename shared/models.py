"""Model resolution: a built-in name or a Hugging Face model directory -> a local directory."""

from __future__ import annotations

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
