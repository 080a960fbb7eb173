"""The public NATS request API on ``baton.v1.api.generate`` (and LoRA load/unload on ``baton.v1.api.lora``).

Any NATS client sends an ApiGenerateRequest (msgpack, or JSON if the payload starts with ``{``)
with a reply inbox and receives ApiChunk messages, in the same encoding, until one carries a
finish_reason; a failure is one ApiError. Same pipeline as HTTP, and the same access rules: the
API key rides in an ``Authorization: Bearer <key>`` NATS header, and rate limits and the
per-address brakes apply as on HTTP. A NATS message carries no client address, and everything
in it (reply subject included) is the sender's choice, so all NATS callers share one "address":
failed key checks over NATS brake the whole NATS API, never HTTP callers.

``baton.v1.api.lora`` takes a LoraLoad (``{"type": "lora_load", "lora_name", "lora_path"}``) or a
LoraUnload (``{"type": "lora_unload", "lora_name"}``), msgpack or JSON, and answers one LoraReply
(``code`` 200, or the HTTP endpoint's error status, and ``message``): the same checks and fan-out
as ``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter``.
"""

from __future__ import annotations

import logging
import uuid
from contextlib import aclosing

import msgspec
from nats.aio.msg import Msg

from services.frontend import metrics
from services.frontend.access import ANONYMOUS, AccessControl, Tenant
from services.frontend.admission import Admission, AdmissionSettings
from services.frontend.lora_admin import LoraAdmin
from services.frontend.models import ModelRegistry
from services.frontend.openai_api import RequestError
from services.frontend.request import RequestHints, from_nats
from shared import tracing
from shared.bus import Bus
from shared.messages import (
    ApiChunk,
    ApiError,
    LoraLoad,
    LoraReply,
    api_request_json_decoder,
    api_request_msgpack_decoder,
    lora_command_decoder,
    lora_command_json_decoder,
)

log = logging.getLogger("baton.frontend.nats_api")
_json = msgspec.json.Encoder()
NATS_CALLER = "nats"  # the one address of every NATS caller (see the module docstring)
_msgpack = msgspec.msgpack.Encoder()


class NatsApi:
    def __init__(self, bus: Bus, models: ModelRegistry, access: AccessControl | None = None,
                 admission: Admission | None = None, lora_admin: LoraAdmin | None = None) -> None:
        self.bus = bus
        self.access = access
        # The same models and limits as HTTP (n is not in the NATS request at all, so --max-n never bites).
        self.models = models
        self.admission = admission or Admission(AdmissionSettings())  # the HTTP API's, in a frontend
        self.lora_admin = lora_admin

    async def handle_lora(self, msg: Msg) -> None:
        """One LoRA load/unload (see the module docstring); one LoraReply back."""
        if not msg.reply:
            return
        as_json = msg.data[:1] in (b"{", b" ", b"\n")
        encode = _json.encode if as_json else _msgpack.encode
        reply = LoraReply()
        try:
            if self.access is not None:
                headers = msg.headers or {}
                self.access.admit(headers.get("Authorization") or headers.get("authorization"), NATS_CALLER)
            if self.lora_admin is None:
                raise RequestError(404, "this frontend serves no LoRA adapters")
            try:
                cmd = (lora_command_json_decoder if as_json else lora_command_decoder).decode(msg.data)
            except (msgspec.ValidationError, msgspec.DecodeError) as e:
                raise RequestError(400, f"invalid LoRA command: {e}") from None
            if isinstance(cmd, LoraLoad):
                result = await self.lora_admin.load(cmd.lora_name, cmd.lora_path)
            else:
                result = await self.lora_admin.unload(cmd.lora_name)
            reply.message, reply.digest = result["status"], result.get("digest", "")
        except RequestError as e:
            reply.code, reply.message = e.status, e.message
        except Exception as e:
            log.exception("NATS LoRA command failed")
            reply.code, reply.message = 500, f"internal error: {type(e).__name__}"
        await self.bus.publish(msg.reply, encode(reply))

    async def handle(self, msg: Msg) -> None:
        if not msg.reply:
            return  # nowhere to answer
        as_json = msg.data[:1] in (b"{", b" ", b"\n")
        encode = _json.encode if as_json else _msgpack.encode
        rid = f"nats-{uuid.uuid4().hex}"
        status = "ok"
        root = tracing.start(f"nats {msg.subject}", tracing.SpanKind.SERVER, tracing.context_from(msg.headers),
                             **{"baton.request_id": rid})
        headers = msg.headers or {}
        tenant = Tenant(ANONYMOUS)
        try:
            if self.access is not None:
                auth = headers.get("Authorization") or headers.get("authorization")
                tenant = self.access.tenant_of(self.access.admit(auth, NATS_CALLER))
            try:
                req = (api_request_json_decoder if as_json else api_request_msgpack_decoder).decode(msg.data)
            except (msgspec.ValidationError, msgspec.DecodeError) as e:
                raise RequestError(400, f"invalid request: {e}") from None
            if req.model:
                served, limits = self.models.limits_for(req.model)
            else:  # the NATS API lets a caller leave the model out: the default one
                served = self.models.default()
                limits = served.limits
            hints = RequestHints.from_headers(lambda name: headers.get(name) or headers.get(name.title()))
            request = await from_nats(req, served.tokenizer, limits, rid, hints)
            admitted = self.admission.admit(request, tenant)
            async with admitted, aclosing(served.generation.run(request, root)) as deltas:
                index = 0
                text_parts: list[str] = []
                tokens: list[int] = []
                async for d in deltas:
                    admitted.used(len(d.token_ids))
                    if request.stream:
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
        except RequestError as e:
            status = str(e.status)
            await self.bus.publish(msg.reply, encode(ApiError(code=e.status, message=e.message, request_id=rid)))
        except Exception as e:
            status = "500"
            log.exception("NATS API request %s failed", rid)
            await self.bus.publish(msg.reply, encode(ApiError(code=500, message=f"internal error: {type(e).__name__}",
                                                                 request_id=rid)))
        finally:
            tracing.end(root, error=None if status == "ok" else status)
            metrics.NATS_API_REQUESTS.labels(status).inc()
