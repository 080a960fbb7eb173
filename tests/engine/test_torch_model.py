"""Config parsing for the Llama family: rope variants, windows, rejections."""

from __future__ import annotations

import pytest

from tests.require import require_module

torch = require_module("torch", "pip install 'baton[torch]'")
transformers = require_module("transformers", "pip install 'baton[test]'")

from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

from shared.engines.torch_model import ModelArgs, chunk_mask, rope_inv_freq  # noqa: E402

BASE = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 100,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
LLAMA3 = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


@pytest.mark.parametrize("rope_type", ["llama3", "linear"])
def test_rope_scaling_in_transformers_4_layout_matches_transformers(rope_type: str) -> None:
    scaling = {"rope_type": rope_type, **(LLAMA3 if rope_type == "llama3" else {"factor": 4.0})}
    # transformers 4.x wrote rope_theta and rope_scaling at the top level ("type" in older files)
    legacy = {
        **BASE,
        "rope_theta": 500000.0,
        "rope_scaling": {"type" if rope_type == "linear" else "rope_type": rope_type, **scaling},
    }
    ours = rope_inv_freq(ModelArgs.from_config(legacy))
    hf_config = transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=4, rope_scaling=scaling, rope_theta=500000.0
    )
    theirs, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")
    assert attention_factor == 1.0
    torch.testing.assert_close(ours, theirs.float())


def test_default_rope_and_head_dim() -> None:
    args = ModelArgs.from_config({**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 1000.0}})
    assert args.rope_theta == 1000.0 and args.rope_scaling is None and args.head_dim == 16
    expected = 1.0 / (1000.0 ** (torch.arange(0, 16, 2).float() / 16))
    torch.testing.assert_close(rope_inv_freq(args), expected)


def test_unsupported_configs_are_refused() -> None:
    with pytest.raises(ValueError, match="rope"):
        ModelArgs.from_config({**BASE, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(ValueError, match="architecture"):
        ModelArgs.from_config({**BASE, "architectures": ["GPT2LMHeadModel"]})


def test_sliding_windows_per_layer() -> None:
    mistral = ModelArgs.from_config({**BASE, "model_type": "mistral", "sliding_window": 8})
    assert mistral.sliding_windows == (8, 8)
    qwen_off = ModelArgs.from_config(
        {**BASE, "model_type": "qwen2", "sliding_window": 8, "use_sliding_window": False}
    )
    assert qwen_off.sliding_windows == (None, None)
    qwen_on = ModelArgs.from_config(
        {
            **BASE,
            "model_type": "qwen2",
            "sliding_window": 8,
            "use_sliding_window": True,
            "max_window_layers": 1,
        }
    )
    assert qwen_on.sliding_windows == (None, 8)


def test_chunk_mask() -> None:
    # 3 new tokens after 2 cached: query i sees keys 0..2+i; with window 2 only the last two
    assert chunk_mask(2, 3, None, torch.device("cpu")).int().tolist() == [
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
    ]
    assert chunk_mask(2, 3, 2, torch.device("cpu")).int().tolist() == [
        [0, 1, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 0, 1, 1],
    ]
