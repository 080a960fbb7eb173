"""Torch engine: the engine core (shared scheduler and KV accounting) driving a paged
Llama-family model through the torch model runner.

Everything but the model lives in :mod:`shared.engines.core` (step loop in a worker thread,
inbox, output streams, disaggregation) and :mod:`shared.engines.model_runner` (batch to tensors,
forward, logits, sampling); this module only wires them together for a model reference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shared.engines.base import EngineConfig
from shared.engines.core import EngineCore

# Not torch itself first: model_runner sets the OpenMP spin policy before torch loads.
from shared.engines.model_runner import TorchModelRunner, device_type
from shared.models import resolve_dtype, resolve_model
from shared.tokenizer import eos_token_ids

if TYPE_CHECKING:
    from shared.engines.sampling import Sampler
    from shared.engines.torch_model import LlamaModel


class TorchEngine(EngineCore):
    name = "torch"
    runner: TorchModelRunner

    def __init__(self, config: EngineConfig) -> None:
        self.model_ref = resolve_model(config.model)
        self.model_name = self.model_ref.name
        self.dtype = resolve_dtype(config.dtype, self.model_ref.path, device_type(config.device))
        self.eos_token_ids = eos_token_ids(self.model_ref.path)
        super().__init__(config, TorchModelRunner(config, self.model_ref, self.dtype, self.eos_token_ids))
        # KV export/import reads and writes the pool from the event loop: CPU memory only.
        self.supports_remote_prefill = device_type(config.device) == "cpu"

    @property
    def model(self) -> LlamaModel | None:
        return self.runner.model

    @property
    def sampler(self) -> Sampler | None:
        return self.runner.sampler
