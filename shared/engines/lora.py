"""LoRA adapters for the torch engine: load PEFT adapters, keep a few resident, apply them per row.

An adapter is a directory as ``peft``'s ``save_pretrained`` writes it: ``adapter_config.json``
(peft_type LORA, r, lora_alpha, target_modules, use_rslora) and ``adapter_model.safetensors`` with
``base_model.model.model.layers.N.<self_attn|mlp>.<proj>.lora_A.weight`` ([r, in]) and
``...lora_B.weight`` ([out, r]). A targeted linear computes ``W x + scale * B (A x)``, with
``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)`` under rsLoRA).

:class:`LlamaModel` fuses q/k/v and gate/up into one matmul each, so an adapter is packed to
match at load time: per layer and fused group, the A matrices are stacked along the rank
(``a_t``: [in, R]) and the B matrices placed block-diagonally with the scale folded in (``b_t``:
[R, out], zero where a member is not targeted). A group then costs one matmul pair per adapter.

A step's rows belong to different adapters or to none. :meth:`LoraRegistry.plan` turns a per-row
slot assignment into a :class:`LoraBatch`: one segment per adapter present (a slice when its rows
are contiguous, else an index tensor), and :meth:`LoraBatch.apply` adds each segment's update to
the base linear's output in place. The work is one matmul pair per adapter present per fused
linear, whatever the number of rows.

Errors, in their callers' shapes: :class:`LoraError` (the adapter does not fit this base, or its
files are unreadable: a 400 at load time), :class:`UnknownAdapterError` (no adapter by that name:
a 404), :class:`AdapterBusyError` (every resident slot is pinned by running requests, or the
adapter is being unloaded: retry later, a 503).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# The registry's errors live with the torch-free scheduler interface; re-exported here.
from shared.engines.adapters import AdapterBusyError, UnknownAdapterError, unpin
from shared.engines.torch_model import ModelArgs

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# Each Llama linear LoRA may target: (parent module, LlamaModel's fused group, member index in it)
MODULES: dict[str, tuple[str, str, int]] = {
    "q_proj": ("self_attn", "qkv", 0),
    "k_proj": ("self_attn", "qkv", 1),
    "v_proj": ("self_attn", "qkv", 2),
    "o_proj": ("self_attn", "o", 0),
    "gate_proj": ("mlp", "gate_up", 0),
    "up_proj": ("mlp", "gate_up", 1),
    "down_proj": ("mlp", "down", 0),
}
GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
# PEFT strips the adapter name (".default") when saving; accept it if a writer left it in.
_TENSOR_NAME = re.compile(
    r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight"
)


class LoraError(ValueError):
    """The adapter cannot be served on this base model (config, names, shapes, or unreadable files)."""


def linear_shapes(args: ModelArgs) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each targetable linear of the base model."""
    h, i = args.hidden_size, args.intermediate_size
    q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    return {
        "q_proj": (q, h),
        "k_proj": (kv, h),
        "v_proj": (kv, h),
        "o_proj": (h, q),
        "gate_proj": (i, h),
        "up_proj": (i, h),
        "down_proj": (h, i),
    }


@dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float
    targets: frozenset[str]  # among MODULES
    use_rslora: bool
    base_model: str | None

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def _resolve_targets(spec: Any, num_layers: int) -> frozenset[str]:
    """PEFT's target_modules: a list of names or name suffixes, a regex string, or "all-linear"."""
    full = {f"model.layers.{i}.{parent}.{name}": name for i in range(num_layers) for name, (parent, _, _) in MODULES.items()}
    supported = ", ".join(MODULES)
    if spec == "all-linear":
        return frozenset(MODULES)
    if isinstance(spec, str):
        try:
            pattern = re.compile(spec)
        except re.error as e:
            raise LoraError(f"target_modules regex {spec!r} is invalid: {e}") from None
        found = frozenset(name for path, name in full.items() if pattern.fullmatch(path))
        if not found:
            raise LoraError(f"target_modules regex {spec!r} matches none of this base model's linears ({supported})")
        return found
    if not isinstance(spec, list) or not spec or not all(isinstance(t, str) for t in spec):
        raise LoraError(f"target_modules must be a non-empty list of module names; got {spec!r}")
    found = set()
    for target in spec:
        names = {name for path, name in full.items() if path == target or path.endswith("." + target)}
        if not names:
            raise LoraError(
                f"target module {target!r} is not a linear this base model can adapt (LoRA on: {supported})"
            )
        found |= names
    return frozenset(found)


def read_config(adapter_dir: Path, args: ModelArgs, max_rank: int | None = None) -> LoraConfig:
    """Parse and check ``adapter_config.json`` against the base model; :class:`LoraError` if it does not fit."""
    path = adapter_dir / CONFIG_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise LoraError(f"{CONFIG_FILE} not found in {adapter_dir}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoraError(f"{CONFIG_FILE} is not readable JSON: {e}") from None
    if not isinstance(raw, dict):
        raise LoraError(f"{CONFIG_FILE} must hold a JSON object")
    if raw.get("peft_type") != "LORA":
        raise LoraError(f"peft_type must be 'LORA'; got {raw.get('peft_type')!r}")
    rank, alpha = raw.get("r"), raw.get("lora_alpha", raw.get("r"))
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise LoraError(f"r (the rank) must be a positive integer; got {rank!r}")
    if max_rank is not None and rank > max_rank:
        raise LoraError(f"rank {rank} exceeds this worker's maximum LoRA rank {max_rank}")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise LoraError(f"lora_alpha must be a number; got {alpha!r}")
    # Features whose math this engine does not implement: refused, never silently ignored.
    unsupported = {
        "use_dora": bool(raw.get("use_dora")),
        "bias": raw.get("bias", "none") not in ("none", None),
        "modules_to_save": bool(raw.get("modules_to_save")),
        "fan_in_fan_out": bool(raw.get("fan_in_fan_out")),
        "rank_pattern": bool(raw.get("rank_pattern")),
        "alpha_pattern": bool(raw.get("alpha_pattern")),
    }
    refused = [k for k, v in unsupported.items() if v]
    if refused:
        raise LoraError(f"unsupported LoRA options: {', '.join(f'{k}={raw.get(k)!r}' for k in refused)}")
    return LoraConfig(
        rank=rank,
        alpha=float(alpha),
        targets=_resolve_targets(raw.get("target_modules"), args.num_layers),
        use_rslora=bool(raw.get("use_rslora")),
        base_model=raw.get("base_model_name_or_path"),
    )


def _read_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = adapter_dir / WEIGHTS_FILE
    if not path.is_file():
        raise LoraError(f"{WEIGHTS_FILE} not found in {adapter_dir} (only safetensors adapters are served)")
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error type, or OSError/ValueError: all mean unreadable
        raise LoraError(f"{WEIGHTS_FILE} is corrupt or not a safetensors file: {e}") from None


@dataclass
class LoraAdapter:
    """A loaded adapter, packed per layer and fused group as ``(a_t [in, R], b_t [R, out] * scale)``."""

    name: str
    path: Path
    config: LoraConfig
    layers: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]
    nbytes: int
    digest: str  # of the config and weights files: with the name, salts the adapter's KV block hashes


def load_adapter(
    adapter_dir: str | Path,
    args: ModelArgs,
    dtype: torch.dtype,
    device: torch.device,
    *,
    name: str | None = None,
    max_rank: int | None = None,
) -> LoraAdapter:
    """Read, check and pack a PEFT LoRA adapter for a base model of ``args``; :class:`LoraError` if it does not fit."""
    d = Path(adapter_dir)
    config = read_config(d, args, max_rank)
    tensors = _read_tensors(d)
    shapes = linear_shapes(args)
    r = config.rank
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _TENSOR_NAME.fullmatch(key)
        if m is None:
            raise LoraError(f"unexpected tensor {key!r}: only lora_A/lora_B of the decoder's linears are supported")
        layer, parent, module, which = int(m[1]), m[2], m[3], m[4]
        if module not in MODULES or MODULES[module][0] != parent:
            raise LoraError(f"tensor {key!r} names {parent}.{module}, which this base model does not have")
        if module not in config.targets:
            raise LoraError(f"tensor {key!r} is for {module}, which is not in target_modules")
        if layer >= args.num_layers:
            raise LoraError(f"tensor {key!r} is for layer {layer}; the base model has {args.num_layers} layers")
        out_f, in_f = shapes[module]
        want = (r, in_f) if which == "A" else (out_f, r)
        if tuple(t.shape) != want:
            raise LoraError(
                f"tensor {key!r} has shape {list(t.shape)}; rank {r} on this base model needs {list(want)}"
            )
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise LoraError(f"tensor {key!r} is not finite floating point")
        pairs.setdefault((layer, module), {})[which] = t
    if not pairs:
        raise LoraError(f"{WEIGHTS_FILE} holds no LoRA weights")
    for (layer, module), ab in pairs.items():
        if len(ab) != 2:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise LoraError(f"layer {layer} {module} has no {missing} weight")

    scale = config.scale
    layers: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
    nbytes = 0
    for layer in range(args.num_layers):
        packed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for group, members in GROUPS.items():
            present = [m for m in members if (layer, m) in pairs]
            if not present:
                continue
            in_f = shapes[members[0]][1]
            out_total = sum(shapes[m][0] for m in members)
            a_t = torch.empty((in_f, r * len(present)), dtype=torch.float32)
            b_t = torch.zeros((r * len(present), out_total), dtype=torch.float32)
            out_off = 0
            col = 0
            for m in members:
                out_f = shapes[m][0]
                if m in present:
                    ab = pairs[(layer, m)]
                    a_t[:, col : col + r] = ab["A"].float().T
                    b_t[col : col + r, out_off : out_off + out_f] = ab["B"].float().T * scale
                    col += r
                out_off += out_f
            a_t = a_t.to(device=device, dtype=dtype).contiguous()
            b_t = b_t.to(device=device, dtype=dtype).contiguous()
            nbytes += a_t.nbytes + b_t.nbytes
            packed[group] = (a_t, b_t)
        layers.append(packed)
    return LoraAdapter(name or d.name, d, config, layers, nbytes, _files_digest(d))


def _files_digest(adapter_dir: Path) -> str:
    h = hashlib.sha256()
    for f in (CONFIG_FILE, WEIGHTS_FILE):
        with open(adapter_dir / f, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()[:16]


Segment = tuple[list[dict[str, tuple[torch.Tensor, torch.Tensor]]], "slice | torch.Tensor"]


class LoraBatch:
    """One step's LoRA plan: per adapter present, its packed weights and the rows that use it."""

    __slots__ = ("segments",)

    def __init__(self, segments: list[Segment]) -> None:
        self.segments = segments

    def apply(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """``out[rows] += (x[rows] @ a_t) @ b_t`` for each adapter's rows; ``out`` is the base linear's [T, out]."""
        for layers, rows in self.segments:
            ab = layers[layer].get(group)
            if ab is None:
                continue
            a_t, b_t = ab
            if isinstance(rows, slice):
                out[rows].addmm_(x[rows].mm(a_t), b_t)
            else:
                out.index_add_(0, rows, x.index_select(0, rows).mm(a_t).mm(b_t))


def row_slots(runs: list[tuple[int, int]]) -> torch.Tensor:
    """Per-row slots of a flat batch from its sequences in row order: ``[(slot or -1, rows), ...]``."""
    if not runs:
        return torch.empty(0, dtype=torch.int64)
    slots, counts = zip(*runs, strict=True)
    return torch.repeat_interleave(torch.tensor(slots, dtype=torch.int64), torch.tensor(counts, dtype=torch.int64))


class LoraRegistry:
    """A worker's adapters: known by name, at most ``max_loras`` resident, LRU-evicted when unpinned.

    ``add`` validates an adapter (a :class:`LoraError` leaves the registry as it was) and makes it
    resident if a slot is free or can be freed. A request ``acquire``s its adapter (loading it
    again if it was evicted), which pins it until ``release``; only unpinned adapters are evicted.
    ``remove`` forgets an adapter; one still pinned is freed when its last request releases it.
    Not thread-safe: the engine's step loop owns it.
    """

    def __init__(
        self, args: ModelArgs, dtype: torch.dtype, device: torch.device, *, max_loras: int = 4, max_rank: int = 64
    ) -> None:
        if max_loras < 1:
            raise ValueError("max_loras must be at least 1")
        self.args, self.dtype, self.device = args, dtype, device
        self.max_loras, self.max_rank = max_loras, max_rank
        self._paths: dict[str, Path] = {}  # every adapter added and not removed
        self._digests: dict[str, str] = {}  # their digests (kept while evicted: KV hash roots)
        self._resident: OrderedDict[str, LoraAdapter] = OrderedDict()  # least recently used first
        self._slot_of: dict[str, int] = {}
        self._by_slot: list[LoraAdapter | None] = [None] * max_loras
        self._pins: dict[str, int] = {}
        self._removing: set[str] = set()  # removed while pinned: freed on the last release
        self.loads = 0  # adapters read from disk (add, and acquire after an eviction)
        self.evictions = 0

    # --- queries --------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(self._paths)

    def resident(self) -> list[str]:
        """Resident adapters, least recently used first."""
        return list(self._resident)

    def pins(self, name: str) -> int:
        return self._pins.get(name, 0)

    def digest(self, name: str) -> str:
        """The digest of a loaded adapter (resident or not); UnknownAdapterError if not loaded."""
        if name in self._removing or name not in self._digests:
            raise UnknownAdapterError(f"adapter {name!r} is not loaded")
        return self._digests[name]

    def slot(self, name: str) -> int | None:
        return self._slot_of.get(name)

    def resident_bytes(self) -> int:
        return sum(a.nbytes for a in self._resident.values())

    # --- load / unload --------------------------------------------------------------------------

    def add(self, name: str, path: str | Path) -> LoraAdapter:
        """Validate and load adapter ``name`` from ``path``; idempotent for the same path."""
        p = Path(path)
        if name in self._removing:
            raise AdapterBusyError(f"adapter {name!r} is being unloaded; retry when its requests finish")
        if name in self._paths:
            if self._paths[name].resolve() != p.resolve():
                raise LoraError(f"adapter {name!r} is already loaded from {self._paths[name]}; unload it first")
            if name in self._resident:
                return self._resident[name]
        adapter = self._load(name, p)  # raises LoraError before anything changes
        self._paths[name] = p
        self._digests[name] = adapter.digest
        if self._free_slot() is not None:
            self._make_resident(adapter)
        return adapter

    def remove(self, name: str) -> None:
        """Forget adapter ``name``; its memory goes now, or when its last running request releases it."""
        if name not in self._paths:
            raise UnknownAdapterError(f"adapter {name!r} is not loaded")
        del self._paths[name]
        del self._digests[name]
        if self._pins.get(name):
            self._removing.add(name)
        else:
            self._evict(name)

    # --- per request ----------------------------------------------------------------------------

    def acquire(self, name: str) -> int:
        """Pin adapter ``name`` for a request and return its slot, loading it first if it was evicted."""
        if name in self._removing or name not in self._paths:
            raise UnknownAdapterError(f"adapter {name!r} is not loaded")
        if name not in self._resident:
            if self._free_slot() is None:
                raise AdapterBusyError(
                    f"all {self.max_loras} resident LoRA slots are in use by running requests; retry later"
                )
            self._make_resident(self._load(name, self._paths[name]))
        self._resident.move_to_end(name)
        self._pins[name] = self._pins.get(name, 0) + 1
        return self._slot_of[name]

    def release(self, name: str) -> None:
        """Unpin one use of ``name`` (a request finished or was aborted)."""
        if not unpin(self._pins, name):
            return
        if name in self._removing:
            self._removing.discard(name)
            self._evict(name)

    def plan(self, slots: torch.Tensor) -> LoraBatch | None:
        """The step's :class:`LoraBatch` from per-row slots ([T] int64, -1: no adapter); None if no row has one."""
        if slots.numel() == 0:
            return None
        present = torch.unique(slots).tolist()  # sorted
        segments: list[Segment] = []
        for s in present:
            if s < 0:
                continue
            adapter = self._by_slot[s] if s < self.max_loras else None
            if adapter is None or not self._pins.get(adapter.name):
                raise ValueError(f"slot {s} holds no acquired adapter")
            rows = torch.nonzero(slots == s).flatten()
            first, last = int(rows[0]), int(rows[-1])
            if last - first + 1 == rows.numel():  # contiguous (the runner may sort rows so): a view, no gather
                segments.append((adapter.layers, slice(first, last + 1)))
            else:
                segments.append((adapter.layers, rows.to(self.device)))
        return LoraBatch(segments) if segments else None

    # --- internals ------------------------------------------------------------------------------

    def _load(self, name: str, path: Path) -> LoraAdapter:
        adapter = load_adapter(path, self.args, self.dtype, self.device, name=name, max_rank=self.max_rank)
        self.loads += 1
        return adapter

    def _free_slot(self) -> int | None:
        """A free slot, evicting the least recently used unpinned adapter if none is free."""
        for i, a in enumerate(self._by_slot):
            if a is None:
                return i
        for victim in self._resident:
            if not self._pins.get(victim):
                slot = self._slot_of[victim]
                self._evict(victim)
                self.evictions += 1
                return slot
        return None

    def _make_resident(self, adapter: LoraAdapter) -> None:
        slot = self._free_slot()
        assert slot is not None
        self._by_slot[slot] = adapter
        self._slot_of[adapter.name] = slot
        self._resident[adapter.name] = adapter

    def _evict(self, name: str) -> None:
        adapter = self._resident.pop(name, None)
        if adapter is not None:
            self._by_slot[self._slot_of.pop(name)] = None
