"""The router keeps a view per model: blocks of another model with equal token ids never count."""

from __future__ import annotations

from shared.kv_hash import block_hashes
from shared.messages import KvEventBatch, KvStored, RouteDecision, RouteRequest, WorkerInfo
from shared.routing.core import RouterCore, RoutingSettings

BS = 16


class FakeView:
    """Discovery as RouterCore reads it: decode workers filtered by model."""

    def __init__(self, workers: list[WorkerInfo]) -> None:
        self._workers = workers

    def workers(self, role: str | None = None, model: str | None = None) -> list[WorkerInfo]:
        return [w for w in self._workers if (role is None or w.role == role) and (not model or w.model == model)]


def worker(worker_id: str, model: str) -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, role="decode", model=model, block_size=BS,
                      generate_subject=f"gen.{worker_id}", cancel_subject=f"cancel.{worker_id}")


def test_blocks_of_another_model_never_count_nor_become_a_peer_hint() -> None:
    prompt = [(i * 7) % 500 for i in range(20 * BS)]  # the same token ids for both models
    fleet = [worker("a0", "model-a"), worker("a1", "model-a"), worker("b0", "model-b")]
    core = RouterCore(RoutingSettings(mode="kv", seed=0), None, FakeView(fleet))  # type: ignore[arg-type]
    kv = core.kv
    assert kv is not None
    hashes = block_hashes(prompt, BS)
    # b0 (model B) holds the whole prompt on its device and in its host tier; a1 (model A) holds half.
    for tier in (1, 2):
        batch = KvEventBatch(worker_id="b0", seq=tier, tier=tier, stored=[KvStored(block_hashes=hashes)])
        kv.on_kv_events(batch, kv.index.apply(batch))
    kv.index.apply(KvEventBatch(worker_id="a1", seq=1, stored=[KvStored(block_hashes=hashes[:10])]))
    kv.index.apply(KvEventBatch(worker_id="a0", seq=1))

    reply, _ = core.decide(RouteRequest(request_id="r1", model="model-a", token_ids=prompt))
    assert isinstance(reply, RouteDecision)
    # Model A's best is a1 with its 10 blocks; b0's 20 are another model's and give no hint either.
    assert (reply.worker_id, reply.overlap_blocks) == ("a1", 10)
    assert reply.kv_source == "" and reply.kv_source_blocks == 0

    # Excluding a1 (it just failed) leaves a0, and the hint may name a1 (model A), never b0.
    reply, _ = core.decide(RouteRequest(request_id="r2", model="model-a", token_ids=prompt, exclude=["a1"]))
    assert isinstance(reply, RouteDecision) and reply.worker_id == "a0"
    assert reply.kv_source in ("", "a1")

    # Model B's request sees b0's blocks.
    reply, _ = core.decide(RouteRequest(request_id="r3", model="model-b", token_ids=prompt))
    assert isinstance(reply, RouteDecision) and (reply.worker_id, reply.overlap_blocks) == ("b0", 20)
