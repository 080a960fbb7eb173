"""The built-in models: small Llama-architecture models made offline and deterministically.

``baton model build`` (and any service asked for a built-in name that finds no copy) writes a Hugging Face model directory: config.json, generation_config.json,
model.safetensors with seeded random weights, and a byte-level BPE tokenizer trained here on a
seeded synthetic corpus, with a ChatML chat template. No network, a few seconds. The weights are
random, so the text is gibberish; the shapes, files and code paths are those of a real Llama.

``baton model build-lora`` writes a LoRA adapter for a built-in base in PEFT's on-disk format
(adapter_config.json + adapter_model.safetensors), seeded too, so adapters can be served and
checked against ``peft`` without downloading anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BUILD_VERSION = 3  # bump when the recipe changes, so caches rebuild

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, IM_START, IM_END, PAD]

# ChatML with Hermes/Qwen-style tools: the tool signatures in a system turn, calls as
# <tool_call>{json}</tool_call>, tool results as <tool_response> in a user turn (so the frontend's
# "hermes" tool-call parser is detected from this template).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set start = 1 if (tools and messages and messages[0]['role'] == 'system') else 0 %}"
    "{% if tools %}"
    "{{ '<|im_start|>system\n' }}"
    "{% if start %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
    "{{ '# Tools\n\nYou may call one or more functions. Function signatures within <tools></tools>:\n<tools>' }}"
    "{% for tool in tools %}{{ '\n' + (tool | tojson) }}{% endfor %}"
    "{{ '\n</tools>\n\nFor each call, return a JSON object with the function name and arguments within "
    "<tool_call></tool_call> tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}"
    "\n</tool_call><|im_end|>\n' }}"
    "{% endif %}"
    "{% for message in messages[start:] %}"
    "{% if message['role'] == 'assistant' and message['tool_calls'] %}"
    "{{ '<|im_start|>assistant\n' + (message['content'] or '') }}"
    "{% for call in message['tool_calls'] %}"
    "{{ '<tool_call>\n{\"name\": ' + (call['function']['name'] | tojson) + ', \"arguments\": ' "
    "+ (call['function']['arguments'] | tojson) + '}\n</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|im_end|>\n' }}"
    "{% elif message['role'] == 'tool' %}"
    "{{ '<|im_start|>user\n<tool_response>\n' + (message['content'] or '') + '\n</tool_response><|im_end|>\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + (message['content'] or '') + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class BuiltinSpec:
    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_position_embeddings: int
    seed: int
    init_std: float


BUILTIN_MODELS: dict[str, BuiltinSpec] = {
    # For tests: a forward pass costs microseconds, so tests measure Baton, not matmuls.
    # Head size 32 (not 16): vLLM's CPU attention kernels have no head size below 32.
    "baton-tiny": BuiltinSpec("baton-tiny", 2048, 64, 176, 2, 2, 1, 4096, seed=1234, init_std=0.08),
    # For benchmarks: ~27M parameters, so compute rather than overhead dominates a step.
    "baton-small": BuiltinSpec("baton-small", 2048, 512, 1536, 8, 8, 4, 4096, seed=5678, init_std=0.04),
    # A second tiny base, other shapes and seed, so tests can serve two different models side by side.
    "baton-tiny-b": BuiltinSpec("baton-tiny-b", 2048, 96, 256, 3, 3, 1, 4096, seed=4321, init_std=0.08),
}
DEFAULT_MODEL = "baton-tiny"


def cache_dir() -> Path:
    return Path(os.environ.get("BATON_CACHE_DIR", Path.home() / ".cache" / "baton"))


def _corpus(seed: int = 42, n_sentences: int = 6000) -> list[str]:
    """A deterministic English-like corpus: seeded words from syllables, plus common words."""
    rng = random.Random(seed)
    common = (
        "the of and to in is you that it he was for on are as with his they at be this have from or one "
        "had by word but not what all were we when your can said there use an each which she do how their "
        "if will up other about out many then them these so some her would make like him into time has look "
        "two more write go see number no way could people my than first water been call who oil its now find "
        "long down day did get come made may part hello world model token cache prefix router worker baton "
        "request stream decode prefill block batch serve fast small large question answer assistant user system"
    ).split()
    syllables = ["ka", "lo", "mi", "ne", "ra", "to", "su", "vi", "de", "po", "an", "el", "or", "is", "un", "qu"]
    invented = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(1500)]
    words = common * 6 + invented
    out = []
    for _ in range(n_sentences):
        n = rng.randint(4, 18)
        sent = " ".join(rng.choice(words) for _ in range(n))
        punct = rng.choice([".", ".", ".", "?", "!", ",", ":"])
        num = f" {rng.randint(0, 9999)}" if rng.random() < 0.2 else ""
        out.append(sent.capitalize() + num + punct)
    return out


def build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def build_steps(name: str) -> int:
    """How many times ``build`` calls its ``on_step``: tokenizer, config, embeddings, each layer, head, file."""
    return BUILTIN_MODELS[name].num_layers + 5


def _weights(spec: BuiltinSpec, on_step: Callable[[str], None] = lambda _: None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(spec.seed)
    head_dim = spec.hidden_size // spec.num_heads
    h, kv = spec.hidden_size, spec.num_kv_heads * head_dim

    def lin(out_f: int, in_f: int) -> np.ndarray:
        return (rng.standard_normal((out_f, in_f), dtype=np.float32) * spec.init_std).astype(np.float32)

    w: dict[str, np.ndarray] = {"model.embed_tokens.weight": lin(spec.vocab_size, h)}
    on_step("embeddings")
    for i in range(spec.num_layers):
        on_step(f"layer {i + 1}/{spec.num_layers}")
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = lin(h, h)
        w[p + "self_attn.k_proj.weight"] = lin(kv, h)
        w[p + "self_attn.v_proj.weight"] = lin(kv, h)
        w[p + "self_attn.o_proj.weight"] = lin(h, h)
        w[p + "mlp.gate_proj.weight"] = lin(spec.intermediate_size, h)
        w[p + "mlp.up_proj.weight"] = lin(spec.intermediate_size, h)
        w[p + "mlp.down_proj.weight"] = lin(h, spec.intermediate_size)
        w[p + "input_layernorm.weight"] = np.ones(h, dtype=np.float32)
        w[p + "post_attention_layernorm.weight"] = np.ones(h, dtype=np.float32)
    w["model.norm.weight"] = np.ones(h, dtype=np.float32)
    w["lm_head.weight"] = lin(spec.vocab_size, h)
    on_step("lm head")
    return w


def build(name: str, out_dir: Path, on_step: Callable[[str], None] = lambda _: None) -> Path:
    """Write built-in model ``name`` into ``out_dir`` (created). ``on_step(what)`` is called as each
    of the ``build_steps(name)`` steps starts (a progress bar's hook)."""
    from safetensors.numpy import save_file

    spec = BUILTIN_MODELS[name]
    out_dir.mkdir(parents=True, exist_ok=True)
    on_step("training the tokenizer")
    tok = build_tokenizer(spec.vocab_size)
    tok.save(str(out_dir / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    vocab = tok.get_vocab_size()
    eos_ids = [ids[EOS], ids[IM_END]]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.hidden_size // spec.num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": ids[BOS],
        "eos_token_id": eos_ids,
        "pad_token_id": ids[PAD],
        "torch_dtype": "float32",
    }
    on_step("config")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "generation_config.json").write_text(
        json.dumps({"bos_token_id": ids[BOS], "eos_token_id": eos_ids, "pad_token_id": ids[PAD]}, indent=2)
    )
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": BOS,
                "eos_token": IM_END,
                "pad_token": PAD,
                "model_max_length": spec.max_position_embeddings,
                "chat_template": CHAT_TEMPLATE,
                "clean_up_tokenization_spaces": False,
            },
            indent=2,
        )
    )
    weights = _weights(spec, on_step)
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"][:vocab]
    weights["lm_head.weight"] = weights["lm_head.weight"][:vocab]
    on_step("writing model.safetensors")
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "baton_builtin.json").write_text(json.dumps({"name": name, "build_version": BUILD_VERSION}))
    return out_dir


def builtin_path(name: str) -> Path:
    return cache_dir() / "models" / f"{name}-v{BUILD_VERSION}"


def ensure_builtin(name: str, on_step: Callable[[str], None] = lambda _: None) -> Path:
    """Return the built-in model's directory, building it first if absent.

    Several processes may ask at once (``baton up`` starts them together): each builds into a
    private temporary directory and renames it into place; the first rename wins.
    """
    if name not in BUILTIN_MODELS:
        raise KeyError(f"unknown built-in model {name!r}; built-ins: {', '.join(BUILTIN_MODELS)}")
    final = builtin_path(name)
    if (final / "baton_builtin.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    try:
        build(name, tmp, on_step)
        # mkdtemp makes 0700: open the cache up so other users (e.g. a container's) can read it.
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "baton_builtin.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def directory_digest(path: Path) -> str:
    """SHA-256 over a model directory's files, to show builds are deterministic."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


# --- LoRA adapters for the built-in bases ------------------------------------------------------

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def linear_shapes(spec: BuiltinSpec) -> dict[str, tuple[str, int, int]]:
    """Each Llama linear's (parent module, out_features, in_features) in a built-in base."""
    h, i = spec.hidden_size, spec.intermediate_size
    kv = spec.num_kv_heads * (spec.hidden_size // spec.num_heads)
    return {
        "q_proj": ("self_attn", h, h),
        "k_proj": ("self_attn", kv, h),
        "v_proj": ("self_attn", kv, h),
        "o_proj": ("self_attn", h, h),
        "gate_proj": ("mlp", i, h),
        "up_proj": ("mlp", i, h),
        "down_proj": ("mlp", h, i),
    }


def lora_seed(base: str, name: str) -> int:
    """The default seed of adapter ``name``: fixed per (base, name), different between names."""
    return int.from_bytes(hashlib.sha256(f"{base}/{name}".encode()).digest()[:4], "little")


def build_lora(
    base: str,
    out_dir: Path,
    *,
    rank: int = 8,
    alpha: float | None = None,
    targets: tuple[str, ...] | list[str] = ("q_proj", "v_proj"),
    seed: int | None = None,
    use_rslora: bool = False,
    b_std: float = 0.05,
) -> Path:
    """Write a seeded LoRA adapter for built-in ``base`` into ``out_dir`` in PEFT's format.

    Tensor names are those ``peft``'s ``save_pretrained`` writes for a ``LlamaForCausalLM``
    (``base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight``: A is [r, in], B is
    [out, r]). B is random, not zero as in a fresh PEFT adapter, so the adapter visibly changes
    greedy outputs; A is scaled by 1/sqrt(in) so the update stays a fraction of the base's.
    """
    from safetensors.numpy import save_file

    if base not in BUILTIN_MODELS:
        raise KeyError(f"unknown built-in model {base!r}; built-ins: {', '.join(BUILTIN_MODELS)}")
    spec = BUILTIN_MODELS[base]
    shapes = linear_shapes(spec)
    unknown = [t for t in targets if t not in shapes]
    if unknown or not targets:
        raise ValueError(f"target modules must be among {', '.join(LORA_TARGETS)}; got {list(targets)}")
    if rank <= 0:
        raise ValueError(f"rank must be positive; got {rank}")
    alpha = float(2 * rank if alpha is None else alpha)
    rng = np.random.default_rng(lora_seed(base, out_dir.name) if seed is None else seed)
    tensors: dict[str, np.ndarray] = {}
    for layer in range(spec.num_layers):
        for target in LORA_TARGETS:  # a fixed order, so the bytes do not depend on the caller's order
            if target not in targets:
                continue
            parent, out_f, in_f = shapes[target]
            key = f"base_model.model.model.layers.{layer}.{parent}.{target}"
            tensors[key + ".lora_A.weight"] = (
                rng.standard_normal((rank, in_f), dtype=np.float32) / np.sqrt(in_f)
            ).astype(np.float32)
            tensors[key + ".lora_B.weight"] = (rng.standard_normal((out_f, rank), dtype=np.float32) * b_std).astype(
                np.float32
            )
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": [t for t in LORA_TARGETS if t in targets],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": use_rslora,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out_dir / "adapter_model.safetensors").chmod(0o644)  # safetensors writes 0600; others serve it too
    return out_dir


def lora_path(name: str) -> Path:
    return cache_dir() / "loras" / name
