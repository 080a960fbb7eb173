"""Fused CPU kernels for the torch engine (``cpu_kernels.c``), built on first use.

The C source is compiled once per machine with the system C compiler into Baton's cache
directory (keyed by the source, the compiler and the CPU's instruction set) and loaded with
ctypes, which releases the GIL for the call. No compiler, a failed build, a non-CPU device or
``BATON_CPU_KERNELS=0``: :func:`load_cpu_kernels` returns None and the model runs its plain torch
path, which computes the same thing with more, smaller ops.

The library is linked against ``libgomp.so.1``; loaded after torch, the dynamic linker resolves it
to the copy torch already holds, so the kernels share torch's OpenMP threads and thread count.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from shared.builtin_model import cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
_lock = threading.Lock()
_loaded: dict[str, CpuKernels | None] = {}

_p = ctypes.c_void_p
_i = ctypes.c_int64
_f = ctypes.c_float
_SIGNATURES = {
    # q, k pool, v pool, table, ctx_lens, out, q_stride, D, H, KVH, hd, bs, max_blocks, scale, window
    "paged_decode_attention": [_p, _p, _p, _p, _p, _p, _i, _i, _i, _i, _i, _i, _i, _f, _i],
    # h, delta (or NULL), weight, out, rows, N, eps
    "add_rms_norm": [_p, _p, _p, _p, _i, _i, _f],
    # qkv, cos, sin, slots, k pool, v pool, tokens, H, KVH, hd
    "rope_and_cache": [_p, _p, _p, _p, _p, _p, _i, _i, _i, _i],
    # gate_up, out, tokens, I
    "silu_mul": [_p, _p, _i, _i],
}


class CpuKernels:
    """Typed wrappers over the compiled library. Tensors must be contiguous unless noted."""

    dtypes = frozenset(_SUFFIX)

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.path = path
        self._fns: dict[tuple[str, torch.dtype], ctypes._CFuncPtr] = {}
        for name, argtypes in _SIGNATURES.items():
            for dtype, suffix in _SUFFIX.items():
                fn = getattr(lib, f"{name}_{suffix}")
                fn.argtypes = argtypes
                fn.restype = None
                self._fns[(name, dtype)] = fn

    def paged_decode_attention(
        self,
        q: torch.Tensor,
        k_pool: torch.Tensor,
        v_pool: torch.Tensor,
        block_table: torch.Tensor,
        ctx_lens: torch.Tensor,
        out: torch.Tensor,
        scale: float,
        window: int | None,
    ) -> None:
        """q [D, H, hd] (rows may be strided), pools [blocks, bs, KVH, hd], table [D, max_blocks]."""
        d, h, hd = q.shape
        _, bs, kvh, _ = k_pool.shape
        assert q.stride(2) == 1 and q.stride(1) == hd and out.is_contiguous()
        assert block_table.dtype == ctx_lens.dtype == torch.int64 and block_table.is_contiguous()
        self._fns[("paged_decode_attention", q.dtype)](
            q.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), block_table.data_ptr(),
            ctx_lens.data_ptr(), out.data_ptr(), q.stride(0), d, h, kvh, hd, bs,
            block_table.shape[1], scale, window or 0,
        )  # fmt: skip

    def add_rms_norm(
        self, h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, out: torch.Tensor, eps: float
    ) -> None:
        """``h += delta`` (in place, if given), then ``out = rms_norm(h) * weight``; all [rows, N]."""
        rows, n = h.shape
        assert h.is_contiguous() and out.is_contiguous() and (delta is None or delta.is_contiguous())
        self._fns[("add_rms_norm", h.dtype)](
            h.data_ptr(), None if delta is None else delta.data_ptr(), weight.data_ptr(), out.data_ptr(),
            rows, n, eps,
        )  # fmt: skip

    def rope_and_cache(
        self,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: torch.Tensor,
        k_pool: torch.Tensor,
        v_pool: torch.Tensor,
        num_heads: int,
        num_kv_heads: int,
    ) -> None:
        """Rotate q and k heads of ``qkv`` [T, H + 2*KVH, hd] in place; write k, v at ``slots``."""
        tokens, _, hd = qkv.shape
        assert qkv.is_contiguous() and cos.dtype == sin.dtype == torch.float32 and slots.dtype == torch.int64
        self._fns[("rope_and_cache", qkv.dtype)](
            qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), slots.data_ptr(), k_pool.data_ptr(),
            v_pool.data_ptr(), tokens, num_heads, num_kv_heads, hd,
        )  # fmt: skip


    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` for ``gate_up`` [T, 2*I] (gate first) -> a new [T, I] tensor."""
        tokens, two_i = gate_up.shape
        assert gate_up.is_contiguous()
        out = torch.empty((tokens, two_i // 2), dtype=gate_up.dtype, device=gate_up.device)
        self._fns[("silu_mul", gate_up.dtype)](gate_up.data_ptr(), out.data_ptr(), tokens, two_i // 2)
        return out


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return ""


def _compile(cc: str, out: Path) -> None:
    """Build into a temporary file and rename: concurrent workers never load half a library."""
    base = [cc, "-O3", "-march=native", "-std=gnu11", "-shared", "-fPIC", str(SOURCE)]
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        # With OpenMP first; a compiler without libgomp still gets single-threaded kernels.
        for extra in (["-fopenmp"], ["-fopenmp-simd"]):
            proc = subprocess.run([*base, *extra, "-o", tmp, "-lm"], capture_output=True, text=True, timeout=120)
            if proc.returncode == 0:
                os.replace(tmp, out)
                return
        raise RuntimeError(proc.stderr.strip()[-2000:])
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_cpu_kernels() -> CpuKernels | None:
    """The compiled kernels, or None (disabled, no compiler, or the build failed: logged once)."""
    if os.environ.get("BATON_CPU_KERNELS", "1").lower() in ("0", "false", "no", "off"):
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        key = "no-compiler"
    else:
        ident = hashlib.blake2b(digest_size=10)
        ident.update(SOURCE.read_bytes())
        ident.update(cc.encode())
        ident.update(_cpu_flags().encode())
        key = ident.hexdigest()
    with _lock:
        if key in _loaded:
            return _loaded[key]
        kernels: CpuKernels | None = None
        if cc is None:
            log.warning("no C compiler found: the torch engine runs without its fused CPU kernels")
        else:
            path = cache_dir() / "kernels" / f"cpu_kernels-{key}.so"
            try:
                if not path.exists():
                    _compile(cc, path)
                kernels = CpuKernels(ctypes.CDLL(str(path)), path)
            except Exception as e:  # a missing kernel must never stop the engine
                log.warning("fused CPU kernels unavailable (%s): using the plain torch path", e)
        _loaded[key] = kernels
        return kernels
