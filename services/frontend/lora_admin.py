"""LoRA adapters behind the frontend: which exist, and loading or unloading them at run time.

A request names an adapter by the OpenAI ``model`` field (as vLLM does): the model registry
(:meth:`ModelRegistry.adapters`) maps it to (base model, adapter) from what the decode workers of
each served model advertise in discovery (``WorkerInfo.loras``: name and digest), so it follows
loads, unloads and workers coming and going without state of its own.

``POST /v1/load_lora_adapter`` {lora_name, lora_path} and ``POST /v1/unload_lora_adapter``
{lora_name} (vLLM's names and bodies), and the same on the NATS subject ``baton.v1.api.lora``, go
to every decode worker of the base model (request/reply per worker, each with a timeout). The
base model is the frontend's default one (``--model``, else the only one served); an unload goes
to every worker that has the adapter. A path
from the network is untrusted: it must resolve (symlinks followed) to a directory under the
configured adapter root (``--lora-root``); without a root, run-time loading is off. A bad adapter
is refused by the workers (400), and any worker that loaded it meanwhile unloads it again, so the
fleet stays consistent.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import anyio

from services.frontend.models import ModelRegistry
from services.frontend.openai_api import RequestError
from shared import subjects
from shared.bus import Bus, BusError, BusTimeout, NoResponders
from shared.discovery import WorkerView
from shared.messages import LoraCommand, LoraLoad, LoraReply, LoraUnload, lora_reply_decoder

log = logging.getLogger("baton.frontend.lora")

# An adapter name becomes the public model id: printable, no spaces, bounded.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/+-]{0,127}")
ADVERTISE_WAIT_S = 5.0  # after a load/unload, wait this long at most for discovery to show it


class LoraAdmin:
    def __init__(self, bus: Bus | None, view: WorkerView | None, registry: ModelRegistry, root: str | None,
                 timeout: float = 30.0) -> None:
        self.bus = bus
        self.view = view
        self.registry = registry  # the served models, and the adapters their workers advertise
        self.root = Path(root).resolve() if root else None
        self.timeout = timeout  # per worker: loading reads and checks the adapter's files

    def adapters(self) -> dict[str, tuple[str, str]]:
        """Adapters served now: name -> (base model, digest)."""
        return self.registry.adapters()

    # --- load / unload -------------------------------------------------------------------------

    def check_name(self, name: Any) -> str:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise RequestError(400, "lora_name must be 1-128 characters: letters, digits and ._:@/+- "
                               "(starting with a letter or digit)", param="lora_name")
        if name in {m.name for m in self.registry.served()} or name in self.registry.aliases:
            raise RequestError(400, f"lora_name {name!r} is a served model's name", param="lora_name")
        return name

    def resolve_path(self, raw: Any) -> str:
        """The adapter directory, if it lies under the adapter root; a RequestError otherwise."""
        if self.root is None:
            raise RequestError(403, "loading LoRA adapters at run time is off: start the frontend with --lora-root "
                               "(the directory adapters may be loaded from)", type="permission_error",
                               code="lora_loading_disabled")
        if not isinstance(raw, str) or not raw or "\x00" in raw:
            raise RequestError(400, "lora_path must be a directory under the adapter root", param="lora_path")
        path = (self.root / raw).resolve()  # an absolute raw replaces the root; checked below
        if path == self.root or not path.is_relative_to(self.root):
            raise RequestError(403, "lora_path must be a directory under the adapter root (--lora-root)",
                               type="permission_error", param="lora_path", code="lora_path_not_allowed")
        if not path.is_dir():
            raise RequestError(400, f"lora_path {raw!r} is not a directory under the adapter root", param="lora_path")
        return str(path)

    async def load(self, name: Any, raw_path: Any) -> dict[str, Any]:
        name = self.check_name(name)
        path = self.resolve_path(raw_path)
        base = self.registry.default().name
        known_before = name in self.adapters()
        replies = await self._fan_out(LoraLoad(lora_name=name, lora_path=path), self._workers_of(base))
        ok = [r for r in replies if r.code == 200]
        bad = [r for r in replies if r.code == 400]
        if bad or len(ok) < len(replies):
            if ok and not known_before:  # roll back: no worker keeps an adapter the fleet refused
                await self._fan_out(LoraUnload(lora_name=name), [r.worker_id for r in ok])
            first = (bad or [r for r in replies if r.code != 200])[0]
            status = 400 if bad else 503
            raise RequestError(status, f"adapter {name!r} not loaded: {first.message}" +
                               (f" (worker {first.worker_id})" if status != 400 else ""),
                               type="invalid_request_error" if status == 400 else "service_unavailable",
                               param="lora_path" if status == 400 else None)
        await self._until_advertised(name, present=True)
        log.info("LoRA adapter %r loaded on %d workers from %s", name, len(ok), path)
        return {"object": "lora_adapter", "id": name, "parent": base, "status": "loaded",
                "digest": ok[0].digest, "workers": len(ok)}

    async def unload(self, name: Any) -> dict[str, Any]:
        name = self.check_name(name)
        base = self.adapters().get(name, (None, ""))[0]
        if base is None:
            raise RequestError(404, f"the LoRA adapter {name!r} is not loaded", param="lora_name",
                               code="model_not_found")
        replies = await self._fan_out(LoraUnload(lora_name=name), self._workers_of(base))
        ok = [r for r in replies if r.code == 200]
        if not ok:
            if replies and all(r.code == 404 for r in replies):
                raise RequestError(404, f"the LoRA adapter {name!r} is not loaded", param="lora_name",
                                   code="model_not_found")
            first = next((r for r in replies if r.code != 404), None)
            raise RequestError(503, f"adapter {name!r} not unloaded: "
                               f"{first.message if first else 'no worker answered'}", type="service_unavailable")
        await self._until_advertised(name, present=False)
        log.info("LoRA adapter %r unloaded from %d workers", name, len(ok))
        return {"object": "lora_adapter", "id": name, "parent": base, "status": "unloaded", "workers": len(ok)}

    def _workers_of(self, base: str) -> list[str]:
        ids = [w.worker_id for w in self.view.workers("decode", base)] if self.view is not None else []
        if not ids:
            raise RequestError(503, f"no decode worker serves {base!r}", type="service_unavailable", code="no_worker")
        return ids

    async def _fan_out(self, cmd: LoraCommand, ids: list[str]) -> list[LoraReply]:
        """Send ``cmd`` to each of these decode workers at once."""
        if self.bus is None:
            raise RequestError(503, "not connected to the message bus", type="service_unavailable")
        replies: list[LoraReply] = []

        async def ask(worker_id: str) -> None:
            assert self.bus is not None
            try:
                msg = await self.bus.request(subjects.lora(worker_id), cmd, timeout=self.timeout)
                replies.append(lora_reply_decoder.decode(msg.data))
            except (NoResponders, BusTimeout):
                replies.append(LoraReply(code=504, message="no answer in time", worker_id=worker_id))
            except BusError as e:
                replies.append(LoraReply(code=503, message=f"bus error: {e}", worker_id=worker_id))

        async with anyio.create_task_group() as tg:
            for worker_id in ids:
                tg.start_soon(ask, worker_id)
        return replies

    async def _until_advertised(self, name: str, present: bool) -> None:
        """Wait (bounded) until discovery shows the change, so the next request sees the adapter
        (or its 404) at once; the workers re-put their info right after the change."""
        assert self.view is not None
        with anyio.move_on_after(ADVERTISE_WAIT_S):
            while (name in self.adapters()) != present:
                await self.view.wait_changed()
