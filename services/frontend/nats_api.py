"""The public NATS request API on ``baton.v1.api.generate``.

Any NATS client sends an ApiGenerateRequest (msgpack, or JSON if the payload starts with ``{``)
with a reply inbox and receives ApiChunk messages, in the same encoding, until one carries a
finish_reason; a failure is one ApiError. Same pipeline as HTTP, and the same access rules: the
API key rides in an ``Authorization: Bearer <key>`` NATS header, and rate limits and the
per-address brakes apply as on HTTP. A NATS message carries no client address, and everything
in it (reply subject included) is the sender's choice, so all NATS callers share one "address":
failed key checks over NATS brake the whole NATS API, never HTTP callers.
"""

from __future__ import annotations

import logging
import uuid
from contextlib import aclosing

import msgspec
from nats.aio.msg import Msg

from services.frontend import metrics
from services.frontend.access import AccessControl
from services.frontend.generation import Generation
from services.frontend.http_app import TEMPLATE_ERRORS, encode_chat, encode_text
from services.frontend.openai_api import ApiError, CompletionRequest, sampling_from
from shared import tracing
from shared.bus import Bus
from shared.messages import (
    ApiChunk,
    ApiGenerateRequest,
    api_request_json_decoder,
    api_request_msgpack_decoder,
)
from shared.messages import ApiError as ApiErrorMsg

log = logging.getLogger("baton.frontend.nats_api")
_json = msgspec.json.Encoder()
NATS_CALLER = "nats"  # the one address of every NATS caller (see the module docstring)
_msgpack = msgspec.msgpack.Encoder()


class NatsApi:
    def __init__(self, bus: Bus, generation: Generation, model: str, max_model_len: int,
                 access: AccessControl | None = None) -> None:
        self.bus = bus
        self.access = access
        self.generation = generation
        self.model = model
        self.max_model_len = max_model_len

    async def handle(self, msg: Msg) -> None:
        if not msg.reply:
            return  # nowhere to answer
        as_json = msg.data[:1] in (b"{", b" ", b"\n")
        encode = _json.encode if as_json else _msgpack.encode
        rid = f"nats-{uuid.uuid4().hex}"
        status = "ok"
        root = tracing.start(f"nats {msg.subject}", tracing.SpanKind.SERVER, tracing.context_from(msg.headers),
                             **{"baton.request_id": rid})
        try:
            if self.access is not None:
                headers = msg.headers or {}
                auth = headers.get("Authorization") or headers.get("authorization")
                self.access.admit(auth, NATS_CALLER)
            try:
                req = (api_request_json_decoder if as_json else api_request_msgpack_decoder).decode(msg.data)
            except (msgspec.ValidationError, msgspec.DecodeError) as e:
                raise ApiError(400, f"invalid request: {e}") from None
            token_ids, sampling, stops = await self._prepare(req)
            async with aclosing(self.generation.run(rid, token_ids, sampling, stops, req.stream, root)) as deltas:
                index = 0
                text_parts: list[str] = []
                tokens: list[int] = []
                async for d in deltas:
                    if req.stream:
                        await self.bus.publish(msg.reply, encode(ApiChunk(
                            request_id=rid, index=index, text=d.text, token_ids=d.token_ids,
                            finish_reason=d.finish_reason, usage=d.usage,  # type: ignore[arg-type]
                        )))
                        index += len(d.token_ids)
                    else:
                        text_parts.append(d.text)
                        tokens.extend(d.token_ids)
                        if d.finish_reason is not None:
                            await self.bus.publish(msg.reply, encode(ApiChunk(
                                request_id=rid, index=0, text="".join(text_parts), token_ids=tokens,
                                finish_reason=d.finish_reason, usage=d.usage,  # type: ignore[arg-type]
                            )))
        except ApiError as e:
            status = str(e.status)
            await self.bus.publish(msg.reply, encode(ApiErrorMsg(code=e.status, message=e.message, request_id=rid)))
        except Exception as e:
            status = "500"
            log.exception("NATS API request %s failed", rid)
            await self.bus.publish(msg.reply, encode(ApiErrorMsg(code=500, message=f"internal error: {type(e).__name__}",
                                                                 request_id=rid)))
        finally:
            tracing.end(root, error=None if status == "ok" else status)
            metrics.NATS_API_REQUESTS.labels(status).inc()

    async def _prepare(self, req: ApiGenerateRequest) -> tuple[list[int], object, list[str]]:
        if req.model and req.model != self.model:
            raise ApiError(404, f"the model {req.model!r} does not exist; this endpoint serves {self.model!r}")
        given = [x is not None for x in (req.prompt, req.messages, req.token_ids)]
        if sum(given) != 1:
            raise ApiError(400, "give exactly one of prompt, messages, token_ids")
        tok = self.generation.tokenizer
        if req.prompt is not None:
            token_ids = await encode_text(tok, req.prompt)
        elif req.messages is not None:
            if not req.messages:
                raise ApiError(400, "messages must not be empty")
            try:
                token_ids = await encode_chat(tok, [{"role": m.role, "content": m.content} for m in req.messages])
            except TEMPLATE_ERRORS as e:
                raise ApiError(400, f"the chat template refused these messages: {e}") from None
        else:
            token_ids = list(req.token_ids or [])
            if any(t < 0 or t >= tok.vocab_size for t in token_ids):
                raise ApiError(400, f"token ids must be in [0, {tok.vocab_size})")
        if not token_ids:
            raise ApiError(400, "the prompt is empty")
        common = CompletionRequest(
            model=self.model, prompt="", max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
            seed=req.seed, top_k=req.top_k, stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
        )
        sampling = sampling_from(common, req.max_tokens, len(token_ids), self.max_model_len)
        if len(req.stop) > 4:
            raise ApiError(400, "at most 4 stop sequences are allowed")
        return token_ids, sampling, [s for s in req.stop if s]
