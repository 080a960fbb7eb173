"""Two models behind one frontend, end to end: nats-server, router, one decode worker per model and
a frontend started without ``--model``, all real processes.

The frontend learns both models from discovery, lists them (and an alias) in /v1/models, sends
each request to its model's worker (the greedy tokens equal what that worker gives when asked
directly), answers OpenAI's 404 for a model nobody serves on HTTP and NATS, and drops a model
whose only worker died within the discovery TTL (then 404 for it).
"""

from __future__ import annotations

import json
import time

import anyio
import httpx
import msgspec
import nats
import pytest

from shared import subjects
from shared.builtin_model import ensure_builtin
from shared.messages import (
    ApiChunk,
    ApiError,
    GenerateRequest,
    SamplingParams,
    TokenChunk,
    generate_reply_decoder,
)
from tests.conftest import e2e_engine
from tests.procs import Stack, wait_until

pytestmark = pytest.mark.timeout(240)

TTL = 2.0
MODEL_A, MODEL_B = "baton-tiny", "baton-tiny-b"  # two built-in base models: other weights and shapes, one tokenizer
PROMPT = [5, 17, 301, 44, 9, 1200, 73, 8]
MAX_NEW = 8


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory):
    ensure_builtin(MODEL_B)
    s = Stack(tmp_path_factory.mktemp("multi"), e2e_engine(), decode_workers=2, discovery_ttl=TTL,
              decode_models=[MODEL_A, MODEL_B], decode_ids=["decode-a", "decode-b"], frontend_model=None)
    s.frontend_extra = ["--model-alias", f"b-alias={MODEL_B}"]
    try:
        s.start()
        # Both models loaded by the frontend (ready needs only one).
        wait_until(lambda: len(s.health().get("models", [])) == 2, 60, what="both models served")
        yield s
    except Exception:
        print(s.logs())
        raise
    finally:
        s.stop()


def model_ids(stack: Stack) -> dict[str, dict]:
    r = httpx.get(f"{stack.url}/v1/models", timeout=5)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    return {m["id"]: m for m in body["data"]}


async def direct(nc: nats.NATS, worker_id: str, model: str) -> list[int]:
    """Greedy tokens from one worker, asked directly (no frontend, no router)."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    req = GenerateRequest(request_id=f"direct-{worker_id}", token_ids=PROMPT, model=model,
                          sampling=SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True))
    await nc.publish(subjects.generate(worker_id), msgspec.msgpack.encode(req), reply=inbox)
    tokens: list[int] = []
    with anyio.fail_after(60):
        while True:
            reply = generate_reply_decoder.decode((await sub.next_msg(timeout=60)).data)
            assert isinstance(reply, TokenChunk), reply
            tokens += reply.token_ids
            if reply.usage is not None:
                break
    await sub.unsubscribe()
    return tokens


async def via_nats_api(nc: nats.NATS, model: str) -> ApiChunk | ApiError:
    req = {"model": model, "token_ids": PROMPT, "max_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True,
           "stream": False}
    msg = await nc.request(subjects.API_GENERATE, json.dumps(req).encode(), timeout=60)
    return msgspec.json.decode(msg.data, type=ApiChunk | ApiError)


def completion(stack: Stack, model: str) -> httpx.Response:
    return httpx.post(f"{stack.url}/v1/completions", timeout=60, json={
        "model": model, "prompt": PROMPT, "max_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True})


def test_two_models_listed_routed_and_unknown_is_404(two_models: Stack) -> None:
    stack = two_models
    listed = model_ids(stack)
    assert set(listed) == {MODEL_A, MODEL_B, "b-alias"}
    assert listed[MODEL_A]["max_model_len"] == 4096 and listed[MODEL_B]["max_model_len"] == 4096
    assert listed["b-alias"]["root"] == MODEL_B
    # OpenAI's retrieve-model: the same entry, or the 404.
    r = httpx.get(f"{stack.url}/v1/models/{MODEL_B}", timeout=5)
    assert r.status_code == 200 and r.json() == listed[MODEL_B]
    r = httpx.get(f"{stack.url}/v1/models/no-such-model", timeout=5)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"

    async def main() -> dict[str, tuple[list[int], ApiChunk | ApiError]]:
        nc = await nats.connect(stack.nats.url)
        try:
            out = {}
            for worker_id, model in (("decode-a", MODEL_A), ("decode-b", MODEL_B)):
                out[model] = (await direct(nc, worker_id, model), await via_nats_api(nc, model))
            out["unknown"] = ([], await via_nats_api(nc, "no-such-model"))
            return out
        finally:
            await nc.close()

    results = anyio.run(main)
    for model in (MODEL_A, MODEL_B):
        alone, api = results[model]
        assert isinstance(api, ApiChunk), api
        assert api.token_ids == alone, model  # routed to its own model's worker
    assert results[MODEL_A][0] != results[MODEL_B][0]  # two really different models
    unknown = results["unknown"][1]
    assert isinstance(unknown, ApiError) and unknown.code == 404 and "no-such-model" in unknown.message

    # HTTP: each model's text is what its worker's tokens decode to; the alias serves model B.
    texts = {}
    for model in (MODEL_A, MODEL_B, "b-alias"):
        r = completion(stack, model)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == (MODEL_B if model == "b-alias" else model)
        texts[model] = body["choices"][0]["text"]
    assert texts["b-alias"] == texts[MODEL_B]
    assert texts[MODEL_A] == results[MODEL_A][1].text and texts[MODEL_B] == results[MODEL_B][1].text

    r = completion(stack, "no-such-model")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found" and r.json()["error"]["param"] == "model"


def test_model_whose_last_worker_died_leaves_within_the_ttl(two_models: Stack) -> None:
    stack = two_models
    assert MODEL_B in model_ids(stack)
    stack.kill(stack.decoders[1])  # SIGKILL: no goodbye, the discovery key must age out
    t0 = time.monotonic()
    # WorkerView drops an entry at its expiry marker (TTL) or, failing that, after 1.5 TTL unrefreshed.
    wait_until(lambda: MODEL_B not in model_ids(stack), 2 * TTL + 2, what=f"{MODEL_B} leaves /v1/models")
    gone_after = time.monotonic() - t0
    print(f"{MODEL_B} left /v1/models {gone_after:.2f}s after its only worker was SIGKILLed (TTL {TTL:g}s)")
    assert gone_after <= 2 * TTL + 2
    assert set(model_ids(stack)) == {MODEL_A}  # the alias goes with its model
    for model in (MODEL_B, "b-alias"):
        r = completion(stack, model)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    # Model A is untouched.
    assert completion(stack, MODEL_A).status_code == 200
    assert not stack.nats.violations()
