"""Llama-family decoder (Llama, Mistral, Qwen2) over a paged KV cache, in torch.

One forward pass takes a flattened batch of tokens from many sequences (varlen): decodes (one
token each) and prefill chunks together. New K/V are written into per-layer block pools first
(``slot_mapping``), then each sequence attends over its own blocks read through its block table.
Prefill chunks attend one sequence at a time (few per step, each big enough to amortise the call).

Two paths compute the same thing:
  * fused (CPU, when ``cpu_kernels`` could be built): C kernels for rotary + KV write, residual
    add + RMSNorm, SiLU * up, and decode attention that reads the pool in place;
  * plain torch ops (any device, or no compiler): decodes gathered into one padded, masked batch.
Weights are plain tensors applied with ``F.linear`` (no nn.Module: per-module Python overhead is a
visible share of a small model's step), prepacked for oneDNN on CPU; q/k/v and gate/up are fused
into one matmul each.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from shared.engines.cpu_kernels import CpuKernels, load_cpu_kernels

if TYPE_CHECKING:
    from shared.engines.lora import LoraBatch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    sliding_windows: tuple[int | None, ...]  # per layer; None: full attention

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ModelArgs:
        archs = cfg.get("architectures") or []
        known = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}
        if archs and not set(archs) & known:
            raise ValueError(
                f"unsupported architecture {archs}; the torch engine runs {', '.join(sorted(known))}"
            )
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported activation {cfg.get('hidden_act')!r}")
        heads = cfg["num_attention_heads"]
        layers = cfg["num_hidden_layers"]
        # transformers 5 writes rope_parameters; 4.x wrote rope_theta and rope_scaling.
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = float(rope.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"unsupported rope_scaling type {rope_type!r}")
        windows = _sliding_windows(cfg, layers)
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope_theta=theta,
            rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
            sliding_windows=windows,
        )


def _sliding_windows(cfg: dict[str, Any], layers: int) -> tuple[int | None, ...]:
    window = cfg.get("sliding_window")
    if not window or cfg.get("use_sliding_window") is False:
        return (None,) * layers
    layer_types = cfg.get("layer_types")
    if layer_types:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if cfg.get("model_type") == "qwen2":  # Qwen2: only layers from max_window_layers on slide
        first = cfg.get("max_window_layers", layers)
        return tuple(window if i >= first else None for i in range(layers))
    return (window,) * layers


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Per-pair rotary frequencies, with Llama 3 / linear scaling applied as transformers does."""
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = args.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / float(scaling["factor"])
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_ctx = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_ctx / high) & ~(wavelen > old_ctx / low)
    return torch.where(medium, smoothed, scaled)


@dataclass
class StepInputs:
    """Tensors describing one step's flattened batch (built by the engine from a ScheduledBatch).

    Token order: ``num_decodes`` decode tokens first, then each prefill chunk's tokens in turn.
    """

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64: block * block_size + offset where each new K/V goes
    logits_indices: torch.Tensor  # [S] rows whose next-token logits are wanted
    num_decodes: int
    decode_block_table: torch.Tensor | None  # [D * max_blocks] padded block ids, row after row
    decode_mask: torch.Tensor | None  # [D, 1, 1, max_blocks*block_size] bool: True where a key is real
    decode_window_mask: torch.Tensor | None  # same, with the sliding window applied (None if no layer slides)
    # per prefill chunk: (start row in the flat batch, new tokens, tokens already cached, block ids)
    prefills: list[tuple[int, int, int, torch.Tensor]]
    # LoRA adapters of this step's rows (shared.engines.lora.LoraRegistry.plan); None: no row has one
    lora: LoraBatch | None = None


class LlamaModel:
    """Weights plus a varlen, paged forward pass. Not an nn.Module: nothing here trains."""

    def __init__(
        self, args: ModelArgs, weights: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device
    ) -> None:
        self.args = args
        self.dtype = dtype
        self.device = device

        def take(name: str) -> torch.Tensor:
            return weights.pop(name).to(device=device, dtype=dtype).contiguous()

        def maybe(name: str) -> torch.Tensor | None:
            return take(name) if name in weights else None

        self.embed = take("model.embed_tokens.weight")
        self.layers: list[dict[str, torch.Tensor | None]] = []
        for i in range(args.num_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            qkv_bias = [maybe(a + f"{n}_proj.bias") for n in "qkv"]
            self.layers.append(
                {
                    "in_norm": take(p + "input_layernorm.weight"),
                    "qkv": torch.cat([take(a + f"{n}_proj.weight") for n in "qkv"]),
                    "qkv_bias": torch.cat(qkv_bias) if all(b is not None for b in qkv_bias) else None,  # type: ignore[misc]
                    "o": take(a + "o_proj.weight"),
                    "o_bias": maybe(a + "o_proj.bias"),
                    "post_norm": take(p + "post_attention_layernorm.weight"),
                    "gate_up": torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]),
                    "down": take(p + "mlp.down_proj.weight"),
                }
            )
        self.norm = take("model.norm.weight")
        lm_head = weights.pop("lm_head.weight", None)
        if args.tie_word_embeddings or lm_head is None:
            self.lm_head = self.embed
        else:
            self.lm_head = lm_head.to(device=device, dtype=dtype).contiguous()
        self.inv_freq = rope_inv_freq(args).to(device)
        # Fused C kernels for norms, rotary + cache writes and paged decode attention (CPU only).
        self.kernels: CpuKernels | None = (
            load_cpu_kernels() if device.type == "cpu" and dtype in CpuKernels.dtypes else None
        )
        self.prepacked = _prepack_linears(self, device, dtype)
        self.k_caches: list[torch.Tensor] = []
        self.v_caches: list[torch.Tensor] = []
        self.block_size = 0

    # --- KV pool ------------------------------------------------------------------------------

    def kv_bytes_per_token(self) -> int:
        a = self.args
        return (
            2 * a.num_layers * a.num_kv_heads * a.head_dim * torch.empty((), dtype=self.dtype).element_size()
        )

    def allocate_kv(self, num_blocks: int, block_size: int) -> None:
        """One [num_blocks, block_size, kv_heads, head_dim] pool per layer for K and for V.

        Zeroed, not empty: padded attention reads unused slots (masked out), and masked
        garbage could still be NaN, which a zero softmax weight does not cancel.
        """
        a = self.args
        shape = (num_blocks, block_size, a.num_kv_heads, a.head_dim)
        self.block_size = block_size
        self._ws_k = self._ws_v = torch.empty((0, *shape[1:]), dtype=self.dtype, device=self.device)
        self.k_caches = [_zeros(shape, self.dtype, self.device) for _ in range(a.num_layers)]
        self.v_caches = [_zeros(shape, self.dtype, self.device) for _ in range(a.num_layers)]

    def _workspace(self, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Reused buffers for gathered K/V blocks.

        A fresh multi-megabyte tensor per layer would be mmapped and page-faulted in every time
        (glibc returns big frees to the OS); that cost as much as the copy itself.
        """
        if self._ws_k.shape[0] < num_blocks:
            shape = (max(num_blocks, 2 * self._ws_k.shape[0]), *self.k_caches[0].shape[1:])
            self._ws_k = torch.empty(shape, dtype=self.dtype, device=self.device)
            self._ws_v = torch.empty(shape, dtype=self.dtype, device=self.device)
        return self._ws_k[:num_blocks], self._ws_v[:num_blocks]

    # --- forward ------------------------------------------------------------------------------

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # transformers' LlamaRMSNorm, computed in fp32 whatever the model dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.args.rms_norm_eps)
        return weight * xf.to(x.dtype)

    def forward(self, inp: StepInputs) -> torch.Tensor:
        """Logits [S, vocab] (fp32) for the rows in ``inp.logits_indices``."""
        if self.kernels is not None:
            return self._forward_fused(inp, self.kernels)
        a = self.args
        n_heads, n_kv, hd = a.num_heads, a.num_kv_heads, a.head_dim
        num_tokens = inp.input_ids.shape[0]
        # Rotary tables once per step, shared by every layer (fp32, as transformers does).
        freqs = inp.positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos().to(self.dtype)[:, None, :]
        sin = emb.sin().to(self.dtype)[:, None, :]
        half = hd // 2
        q_end, k_end = n_heads, n_heads + n_kv

        lora = inp.lora
        h = F.embedding(inp.input_ids, self.embed)
        for i, layer in enumerate(self.layers):
            x = self._rms_norm(h, layer["in_norm"])  # type: ignore[arg-type]
            qkv = self._linear(x, layer["qkv"], layer["qkv_bias"])  # type: ignore[arg-type]
            if lora is not None:
                lora.apply(i, "qkv", x, qkv)
            qkv = qkv.view(num_tokens, n_heads + 2 * n_kv, hd)
            qk = qkv[:, :k_end]
            rotated = torch.cat((-qk[..., half:], qk[..., :half]), dim=-1)
            qk = qk * cos + rotated * sin
            q, k, v = qk[:, :q_end], qk[:, q_end:], qkv[:, k_end:]
            attn = self._attention(i, q, k, v, inp).reshape(num_tokens, n_heads * hd)
            o = self._linear(attn, layer["o"], layer["o_bias"])  # type: ignore[arg-type]
            if lora is not None:
                lora.apply(i, "o", attn, o)
            h = h + o
            x = self._rms_norm(h, layer["post_norm"])  # type: ignore[arg-type]
            gate_up = self._linear(x, layer["gate_up"])  # type: ignore[arg-type]
            if lora is not None:
                lora.apply(i, "gate_up", x, gate_up)
            gate, up = gate_up.chunk(2, dim=-1)
            act = F.silu(gate) * up
            down = self._linear(act, layer["down"])  # type: ignore[arg-type]
            if lora is not None:
                lora.apply(i, "down", act, down)
            h = h + down
        h = self._rms_norm(h[inp.logits_indices], self.norm)
        return self._linear(h, self.lm_head).float()

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if weight.is_mkldnn:  # prepacked for oneDNN (see _prepack_linears)
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        return F.linear(x, weight, bias)

    def _forward_fused(self, inp: StepInputs, kern: CpuKernels) -> torch.Tensor:
        """The same forward as :meth:`forward`, with the elementwise chains and decode attention fused.

        Per layer: norm, qkv matmul, rotary + KV write (one kernel), attention, o matmul, residual
        add + norm (one kernel), gate/up matmul, SiLU * up, down matmul; the next layer's norm
        takes the down projection's residual add.
        """
        a = self.args
        n_heads, n_kv, hd = a.num_heads, a.num_kv_heads, a.head_dim
        num_tokens = inp.input_ids.shape[0]
        freqs = inp.positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        cos, sin = freqs.cos(), freqs.sin()  # [T, hd/2] fp32, as the unfused path before its cast
        n_dec = inp.num_decodes
        table = ctx_lens = None
        if n_dec:
            assert inp.decode_block_table is not None
            table = inp.decode_block_table.view(n_dec, -1)
            ctx_lens = inp.positions[:n_dec] + 1
        scale = hd**-0.5
        eps = a.rms_norm_eps

        lora = inp.lora
        h = F.embedding(inp.input_ids, self.embed)
        x = torch.empty_like(h)
        kern.add_rms_norm(h, None, self.layers[0]["in_norm"], x, eps)  # type: ignore[arg-type]
        for i, layer in enumerate(self.layers):
            k_pool, v_pool = self.k_caches[i], self.v_caches[i]
            qkv = self._linear(x, layer["qkv"], layer["qkv_bias"])  # type: ignore[arg-type]
            if lora is not None:
                lora.apply(i, "qkv", x, qkv)
            qkv = qkv.view(num_tokens, n_heads + 2 * n_kv, hd)
            kern.rope_and_cache(qkv, cos, sin, inp.slot_mapping, k_pool, v_pool, n_heads, n_kv)
            q, k, v = qkv[:, :n_heads], qkv[:, n_heads : n_heads + n_kv], qkv[:, n_heads + n_kv :]
            attn = torch.empty((num_tokens, n_heads, hd), dtype=self.dtype, device=self.device)
            if n_dec:
                kern.paged_decode_attention(
                    q[:n_dec], k_pool, v_pool, table, ctx_lens, attn[:n_dec], scale, a.sliding_windows[i]  # type: ignore[arg-type]
                )
            if inp.prefills:
                self._prefill_attention(i, q, k, v, inp, attn)
            attn_flat = attn.view(num_tokens, n_heads * hd)
            o = self._linear(attn_flat, layer["o"], layer["o_bias"])  # type: ignore[arg-type]
            if lora is not None:
                lora.apply(i, "o", attn_flat, o)
            kern.add_rms_norm(h, o, layer["post_norm"], x, eps)  # type: ignore[arg-type]
            gate_up = self._linear(x, layer["gate_up"])  # type: ignore[arg-type]
            if lora is not None:
                lora.apply(i, "gate_up", x, gate_up)
            act = kern.silu_mul(gate_up)
            down = self._linear(act, layer["down"])  # type: ignore[arg-type]
            if lora is not None:
                lora.apply(i, "down", act, down)
            next_norm = self.layers[i + 1]["in_norm"] if i + 1 < len(self.layers) else self.norm
            kern.add_rms_norm(h, down, next_norm, x, eps)  # type: ignore[arg-type]
        return self._linear(x[inp.logits_indices], self.lm_head).float()

    def _attention(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inp: StepInputs
    ) -> torch.Tensor:
        """q [T, H, hd], k/v [T, KVH, hd] -> [T, H, hd]; writes k/v into the pool first."""
        a = self.args
        k_cache, v_cache = self.k_caches[layer], self.v_caches[layer]
        flat_shape = (-1, a.num_kv_heads, a.head_dim)
        k_cache.view(flat_shape).index_copy_(0, inp.slot_mapping, k)
        v_cache.view(flat_shape).index_copy_(0, inp.slot_mapping, v)
        window = a.sliding_windows[layer]
        out = torch.empty_like(q)
        n_dec = inp.num_decodes
        group = a.num_heads // a.num_kv_heads
        if n_dec:
            table = inp.decode_block_table
            assert table is not None
            # index_select, not advanced indexing: whole-block copies, not a per-element gather (10x on CPU)
            ws_k, ws_v = self._workspace(table.shape[0])
            ctx_shape = (n_dec, -1, a.num_kv_heads, a.head_dim)
            keys = torch.index_select(k_cache, 0, table, out=ws_k).view(ctx_shape).transpose(1, 2)
            values = torch.index_select(v_cache, 0, table, out=ws_v).view(ctx_shape).transpose(1, 2)
            # [D, KVH, L, hd]: each KV head's query group rides in the "query length" slot, no repeat_kv
            qd = q[:n_dec].view(n_dec, a.num_kv_heads, group, a.head_dim)
            mask = inp.decode_window_mask if window is not None else inp.decode_mask
            att = F.scaled_dot_product_attention(qd, keys, values, attn_mask=mask)
            out[:n_dec] = att.reshape(n_dec, a.num_heads, a.head_dim)
        self._prefill_attention(layer, q, k, v, inp, out)
        return out

    def _prefill_attention(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inp: StepInputs, out: torch.Tensor
    ) -> None:
        """Each prefill chunk attends over its cached context (already in the pool) and itself."""
        k_cache, v_cache = self.k_caches[layer], self.v_caches[layer]
        window = self.args.sliding_windows[layer]
        for start, n_new, n_cached, blocks in inp.prefills:
            qp = q[start : start + n_new].transpose(0, 1)  # [H, n_new, hd]
            if n_cached == 0:  # the whole context is this chunk: attend to its own k/v, no gather
                keys = k[start : start + n_new].transpose(0, 1)  # [KVH, n_new, hd]
                values = v[start : start + n_new].transpose(0, 1)
            else:
                ctx = n_cached + n_new
                ws_k, ws_v = self._workspace(blocks.shape[0])
                keys = torch.index_select(k_cache, 0, blocks, out=ws_k).flatten(0, 1)[:ctx].transpose(0, 1)
                values = torch.index_select(v_cache, 0, blocks, out=ws_v).flatten(0, 1)[:ctx].transpose(0, 1)
            # 4-D (batch of one): torch's CPU flash kernel takes GQA only with a batch dimension;
            # 3-D inputs fall back to the unfused math path, 3-4x slower on a 512-token chunk.
            qp, keys, values = qp[None], keys[None], values[None]
            if n_cached == 0 and window is None:
                att = F.scaled_dot_product_attention(qp, keys, values, is_causal=True, enable_gqa=True)
            else:
                mask = chunk_mask(n_cached, n_new, window, q.device)
                att = F.scaled_dot_product_attention(qp, keys, values, attn_mask=mask, enable_gqa=True)
            out[start : start + n_new] = att[0].transpose(0, 1)


def _prepack_linears(model: LlamaModel, device: torch.device, dtype: torch.dtype) -> bool:
    """Reorder the projection weights once into oneDNN's blocked layout, in place; True if done.

    On CPU at decode batch sizes, oneDNN's prepacked matmul beats the default path (MKL for fp32,
    oneDNN on the plain layout for bf16) by 1.2-1.7x: see docs/benchmarks.md. The embedding stays
    plain (a tied lm_head gets its own packed copy). ``BATON_ONEDNN_LINEAR=0`` turns it off.
    """
    if (
        device.type != "cpu"
        or dtype not in (torch.float32, torch.bfloat16)
        or not torch.backends.mkldnn.is_available()
        or os.environ.get("BATON_ONEDNN_LINEAR", "1").lower() in ("0", "false", "no", "off")
    ):
        return False
    pack = torch.ops.mkldnn._reorder_linear_weight
    try:
        # Layer by layer, so the plain copies go as the packed ones come: peak memory stays near
        # the weights' size. A failure half way leaves a mix, which _linear handles per weight.
        for i, layer in enumerate(model.layers):
            model.layers[i] = {
                key: pack(w, 16) if key in ("qkv", "o", "gate_up", "down") else w for key, w in layer.items()
            }  # type: ignore[misc]
        model.lm_head = pack(model.lm_head, 16)
    except (RuntimeError, AttributeError):  # a torch built without this op: plain matmuls
        return False
    return True


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed tensor; on CPU backed by anonymous mmap, so memory is committed only as blocks get used.

    A generous default pool then costs nothing until traffic fills it.
    """
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    count = math.prod(shape)
    buf = mmap.mmap(-1, max(count * torch.empty((), dtype=dtype).element_size(), 1))  # zero pages, lazily
    if hasattr(mmap, "MADV_HUGEPAGE"):  # fewer TLB misses when attention walks blocks all over the pool
        buf.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(buf, dtype=dtype, count=count).view(shape)


def chunk_mask(n_cached: int, n_new: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Boolean [n_new, n_cached + n_new] mask: query i (at n_cached + i) sees keys j <= its position."""
    q_pos = torch.arange(n_cached, n_cached + n_new, device=device)[:, None]
    k_pos = torch.arange(n_cached + n_new, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= q_pos - k_pos < window
    return allowed


def load_model(model_dir: str | Path, dtype: str = "float32", device: str = "cpu") -> LlamaModel:
    """Load config.json and every *.safetensors shard of a Hugging Face Llama-family directory."""
    from safetensors.torch import load_file

    d = Path(model_dir)
    cfg = json.loads((d / "config.json").read_text())
    args = ModelArgs.from_config(cfg)
    shards = sorted(d.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no *.safetensors in {d}")
    weights: dict[str, torch.Tensor] = {}
    for shard in shards:
        weights.update(load_file(str(shard)))
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return LlamaModel(args, weights, DTYPES[dtype], torch.device(device))
