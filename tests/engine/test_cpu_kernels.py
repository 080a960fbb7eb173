"""The fused CPU kernels against plain torch, op by op and through a whole forward pass.

Each kernel gets random inputs shaped like a real step (GQA, scattered blocks, padded block
tables, sliding windows, head sizes on and off the vector path) in fp32 and bf16, and must agree
with the torch computation the unfused path runs. The model test checks that a mixed step
(decodes, fresh prefills, a chunk over a cached prefix) gives the same logits either way.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.require import missing, require_module

torch = require_module("torch", "pip install 'baton[torch]'")

import torch.nn.functional as F  # noqa: E402

from shared.engines import cpu_kernels  # noqa: E402
from shared.engines.cpu_kernels import CpuKernels, load_cpu_kernels  # noqa: E402
from shared.engines.torch_model import LlamaModel, ModelArgs, StepInputs  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: {"atol": 2e-5, "rtol": 1e-4}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}


@pytest.fixture(scope="module")
def kern() -> CpuKernels:
    k = load_cpu_kernels()
    if k is None:  # the engine falls back to plain torch; in CI that fallback must not hide a broken build
        if os.environ.get("BATON_CPU_KERNELS", "1").lower() in ("0", "false", "no", "off"):
            pytest.skip("fused kernels disabled by BATON_CPU_KERNELS")
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        missing("no C compiler here (apt-get install gcc)" if cc is None
                else f"the fused CPU kernels failed to build with {cc} (see the warning logged above)")
    return k


def reference_decode_attention(q, k_pool, v_pool, table, ctx_lens, scale, window):  # type: ignore[no-untyped-def]
    """Gather each sequence's keys through its block table; softmax(q k^T) v per query head."""
    d, h, hd = q.shape
    kvh = k_pool.shape[2]
    out = torch.empty(d, h, hd)
    for i in range(d):
        n = int(ctx_lens[i])
        keys = k_pool[table[i]].reshape(-1, kvh, hd)[:n].float()
        values = v_pool[table[i]].reshape(-1, kvh, hd)[:n].float()
        first = max(0, n - window) if window else 0
        keys, values = keys[first:], values[first:]
        for head in range(h):
            g = head // (h // kvh)
            p = torch.softmax((keys[:, g] @ q[i, head].float()) * scale, dim=0)
            out[i, head] = p @ values[:, g]
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "seqs", "window"),
    [
        (8, 4, 64, 6, None),  # GQA, one task per sequence
        (4, 4, 32, 2, None),  # MHA, few sequences: tasks split the heads
        (6, 2, 40, 5, None),  # head size off the 16-lane vector path
        (8, 2, 128, 3, 20),  # sliding window shorter than the contexts
    ],
)
def test_paged_decode_attention_matches_torch(
    kern: CpuKernels, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, seqs: int, window: int | None
) -> None:
    gen = torch.Generator().manual_seed(heads * head_dim + seqs)
    bs, num_blocks = 16, 64
    k_pool = torch.randn(num_blocks, bs, kv_heads, head_dim, generator=gen).to(dtype)
    v_pool = torch.randn(num_blocks, bs, kv_heads, head_dim, generator=gen).to(dtype)
    ctx_lens = torch.tensor([1, 17, 50, 33, 70, 16][:seqs], dtype=torch.int64)
    max_blocks = -(-int(ctx_lens.max()) // bs) + 1  # one spare column: padding must be ignored
    table = torch.randperm(num_blocks, generator=gen)[: seqs * max_blocks].view(seqs, max_blocks).contiguous()
    # q as the model passes it: a strided view of the fused qkv rows
    qkv = torch.randn(seqs, heads + 2 * kv_heads, head_dim, generator=gen).to(dtype)
    q = qkv[:, :heads]
    out = torch.empty(seqs, heads, head_dim, dtype=dtype)
    scale = head_dim**-0.5
    kern.paged_decode_attention(q, k_pool, v_pool, table, ctx_lens, out, scale, window)
    expected = reference_decode_attention(q, k_pool, v_pool, table, ctx_lens, scale, window)
    torch.testing.assert_close(out.float(), expected, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_delta", [True, False])
@pytest.mark.parametrize("rows", [3, 300])  # one thread, and the OpenMP path
def test_add_rms_norm_matches_torch(kern: CpuKernels, dtype: torch.dtype, with_delta: bool, rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    n = 200  # not a multiple of 16: the scalar tail runs too
    h = torch.randn(rows, n, generator=gen).to(dtype)
    delta = torch.randn(rows, n, generator=gen).to(dtype) if with_delta else None
    weight = torch.rand(n, generator=gen).to(dtype) + 0.5
    expected_h = h + delta if delta is not None else h.clone()
    hf = expected_h.float()
    normed = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    expected = weight * normed
    out = torch.empty_like(h)
    kern.add_rms_norm(h, delta, weight, out, 1e-5)
    torch.testing.assert_close(h, expected_h, atol=0, rtol=0)
    torch.testing.assert_close(out.float(), expected.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_and_cache_matches_torch(kern: CpuKernels, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    tokens, heads, kv_heads, hd, bs = 5, 4, 2, 32, 16
    qkv = torch.randn(tokens, heads + 2 * kv_heads, hd, generator=gen).to(dtype)
    positions = torch.tensor([0, 7, 100, 3, 55])
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    cos, sin = freqs.cos(), freqs.sin()
    slots = torch.tensor([3, 40, 17, 0, 63])
    k_pool = torch.zeros(4, bs, kv_heads, hd, dtype=dtype)
    v_pool = torch.zeros_like(k_pool)

    emb_cos = torch.cat((cos, cos), -1).to(dtype)[:, None]
    emb_sin = torch.cat((sin, sin), -1).to(dtype)[:, None]
    qk = qkv[:, : heads + kv_heads]
    rotated = torch.cat((-qk[..., hd // 2 :], qk[..., : hd // 2]), dim=-1)
    expected_qk = qk * emb_cos + rotated * emb_sin
    expected_v = qkv[:, heads + kv_heads :].clone()

    kern.rope_and_cache(qkv, cos, sin, slots, k_pool, v_pool, heads, kv_heads)
    torch.testing.assert_close(qkv[:, : heads + kv_heads].float(), expected_qk.float(), **TOL[dtype])
    flat_k, flat_v = k_pool.view(-1, kv_heads, hd), v_pool.view(-1, kv_heads, hd)
    torch.testing.assert_close(flat_k[slots], qkv[:, heads : heads + kv_heads], atol=0, rtol=0)
    torch.testing.assert_close(flat_v[slots], expected_v, atol=0, rtol=0)
    untouched = torch.ones(flat_k.shape[0], dtype=torch.bool)
    untouched[slots] = False
    assert not flat_k[untouched].any() and not flat_v[untouched].any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_torch(kern: CpuKernels, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(4)
    gate_up = (torch.randn(7, 2 * 90, generator=gen) * 6).to(dtype)  # wide range: exp's tails
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(kern.silu_mul(gate_up).float(), (F.silu(gate) * up).float(), **TOL[dtype])


def test_disabled_or_unbuildable_kernels_fall_back(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("BATON_CPU_KERNELS", "0")
    assert load_cpu_kernels() is None
    monkeypatch.delenv("BATON_CPU_KERNELS")
    monkeypatch.setenv("BATON_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.setattr(cpu_kernels, "_loaded", {})
    assert load_cpu_kernels() is None


def tiny_model(dtype: torch.dtype, window: int | None) -> LlamaModel:
    args = ModelArgs.from_config(
        {
            "architectures": ["MistralForCausalLM" if window else "LlamaForCausalLM"],
            "vocab_size": 97,
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            "sliding_window": window,
        }
    )
    gen = torch.Generator().manual_seed(5)
    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(97, 64, generator=gen)}
    for i in range(2):
        p = f"model.layers.{i}."
        for name, shape in {
            "self_attn.q_proj": (64, 64),
            "self_attn.k_proj": (32, 64),
            "self_attn.v_proj": (32, 64),
            "self_attn.o_proj": (64, 64),
            "mlp.gate_proj": (96, 64),
            "mlp.up_proj": (96, 64),
            "mlp.down_proj": (64, 96),
        }.items():
            w[p + name + ".weight"] = torch.randn(*shape, generator=gen) * 0.15
        w[p + "input_layernorm.weight"] = torch.rand(64, generator=gen) + 0.5
        w[p + "post_attention_layernorm.weight"] = torch.rand(64, generator=gen) + 0.5
    w["model.norm.weight"] = torch.rand(64, generator=gen) + 0.5
    w["lm_head.weight"] = torch.randn(97, 64, generator=gen) * 0.1
    return LlamaModel(args, w, dtype, torch.device("cpu"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 24])
def test_fused_forward_matches_plain_forward(kern: CpuKernels, dtype: torch.dtype, window: int | None) -> None:
    """Prefill three prompts, continue one over its cached prefix, then decode all: both paths."""
    bs = 16
    gen = torch.Generator().manual_seed(6)
    lengths = [40, 17, 70]
    tokens = [torch.randint(0, 97, (n,), generator=gen) for n in lengths]
    blocks = [torch.arange(i * 8, i * 8 + 8) for i in range(3)]

    def prefill(chunks: list[tuple[int, int, int]]) -> StepInputs:
        ids, pos, slots, pre, rows, row = [], [], [], [], [], 0
        for s, a, b in chunks:
            p = torch.arange(a, b)
            ids.append(tokens[s][a:b])
            pos.append(p)
            slots.append(blocks[s][p // bs] * bs + p % bs)
            pre.append((row, b - a, a, blocks[s][: -(-b // bs)]))
            row += b - a
            rows.append(row - 1)
        return StepInputs(
            torch.cat(ids), torch.cat(pos), torch.cat(slots), torch.tensor(rows), 0, None, None, None, pre
        )

    def decode(positions: list[int], new: list[int]) -> StepInputs:
        nb = max(-(-(p + 1) // bs) for p in positions)
        table = torch.stack([blocks[i][:nb] for i in range(3)]).flatten()
        pos = torch.tensor(positions)
        key = torch.arange(nb * bs)[None, :]
        mask = (key <= pos[:, None])[:, None, None, :]
        wmask = ((key <= pos[:, None]) & (pos[:, None] - key < window))[:, None, None, :] if window else None
        slots = torch.stack([blocks[i][p // bs] * bs + p % bs for i, p in enumerate(positions)])
        return StepInputs(torch.tensor(new), pos, slots, torch.arange(3), 3, table, mask, wmask, [])

    model = tiny_model(dtype, window)
    model.allocate_kv(24, bs)
    steps = [
        prefill([(0, 0, 40), (1, 0, 17), (2, 0, 32)]),
        prefill([(2, 32, 70)]),  # a chunk over a cached prefix
        decode([40, 17, 70], [7, 8, 9]),
        decode([41, 18, 71], [10, 11, 12]),
    ]
    results = {}
    with torch.inference_mode():
        for name, k in (("plain", None), ("fused", kern)):
            model.kernels = k
            for pool in model.k_caches + model.v_caches:
                pool.zero_()
            results[name] = [model.forward(s) for s in steps]
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 0.1, "rtol": 0.05}
    for plain, fused in zip(results["plain"], results["fused"], strict=True):
        torch.testing.assert_close(fused, plain, **tol)
