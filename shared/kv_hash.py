"""Chained KV block hashes, shared by engines, router and KV transfer.

A block's hash covers its parent's hash and its own token ids, so equal hashes mean equal
prefixes (not merely equal blocks). Only full blocks are hashed: a partial last block is never
shared. 64-bit BLAKE2b rather than a polynomial hash: prefix caching trusts hash equality, and a
crafted collision would feed one tenant's KV to another's attention.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from hashlib import blake2b

import numpy as np

# Parent of the first block. A model/namespace salt can be mixed in by passing another root.
ROOT_HASH = 0x6261746F6E2D6B76  # "baton-kv"


def block_hashes(token_ids: Sequence[int] | np.ndarray, block_size: int, parent: int = ROOT_HASH) -> list[int]:
    """Hashes of every full block of ``token_ids``, each chained on the one before."""
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    n_full = len(token_ids) // block_size
    if n_full == 0:
        return []
    head = token_ids[: n_full * block_size]
    raw = head.astype(np.int64).tobytes() if isinstance(head, np.ndarray) else array("q", head).tobytes()
    stride = block_size * 8
    out: list[int] = []
    append = out.append
    frb, b2 = int.from_bytes, blake2b  # locals: this loop is on the routing hot path
    h = parent
    for i in range(0, n_full * stride, stride):
        h = frb(b2(h.to_bytes(8, "little") + raw[i : i + stride], digest_size=8).digest(), "little")
        append(h)
    return out


def extend_hashes(hashes: list[int], token_ids: Sequence[int], block_size: int, root: int = ROOT_HASH) -> list[int]:
    """Append the hashes of blocks that ``token_ids`` completes beyond those already in ``hashes``
    (``root``: the chain's root, :func:`adapter_root` for a LoRA request)."""
    done = len(hashes)
    n_full = len(token_ids) // block_size
    if n_full <= done:
        return hashes
    parent = hashes[-1] if hashes else root
    hashes.extend(block_hashes(token_ids[done * block_size : n_full * block_size], block_size, parent))
    return hashes


def adapter_root(adapter: str | None, digest: str = "") -> int:
    """The chain's root for a request served under LoRA adapter ``adapter`` (None: the bare model).

    Pass it as ``parent`` to :func:`block_hashes`: a prefix computed under one adapter then never
    matches blocks computed under another or under none. ``digest`` (``LoraAdapter.digest``) ties
    the root to the adapter's weights, so a name reloaded with other weights does not reuse stale
    blocks; whoever hashes for routing must use the same pair as the engine.
    """
    if adapter is None:
        return ROOT_HASH
    seed = ROOT_HASH.to_bytes(8, "little") + b"lora\x00" + adapter.encode() + b"\x00" + digest.encode()
    return int.from_bytes(blake2b(seed, digest_size=8).digest(), "little")
