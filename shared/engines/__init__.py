"""Engines behind one interface (:class:`Engine`): torch (default), mocker, vLLM."""

from __future__ import annotations

from shared.engines.base import Engine, EngineConfig, EngineOutput, EngineStats, KvEventBuffer

ENGINES = ("torch", "mocker", "vllm")


def make_engine(config: EngineConfig) -> Engine:
    """Build the configured engine; heavy imports (torch, vllm) happen only when chosen."""
    if config.engine == "mocker":
        from shared.engines.mocker import MockerEngine

        return MockerEngine(config)
    if config.engine == "torch":
        from shared.engines.torch_engine import TorchEngine

        return TorchEngine(config)
    if config.engine == "vllm":
        from shared.engines.vllm_engine import VllmEngine

        return VllmEngine(config)
    raise ValueError(f"unknown engine {config.engine!r}; choose one of {', '.join(ENGINES)}")


__all__ = ["ENGINES", "Engine", "EngineConfig", "EngineOutput", "EngineStats", "KvEventBuffer", "make_engine"]
