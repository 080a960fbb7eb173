"""The frontend actor: OpenAI HTTP API and the NATS request API in front of router and workers.

With ``router="embedded"`` it runs the router core (:mod:`shared.routing`) in process instead of
asking the router service.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import uvicorn

from services.frontend.access import AccessControl, RateLimiter, load_tenants
from services.frontend.access_log import AccessLog
from services.frontend.admission import Admission, AdmissionSettings
from services.frontend.generation import Generation, GenerationSettings
from services.frontend.http_app import OpenAIApp
from services.frontend.http_protocol import protocol_with
from services.frontend.lora_admin import LoraAdmin
from services.frontend.models import ModelRegistry, ServedModel
from services.frontend.nats_api import NatsApi
from services.frontend.reasoning import ReasoningStream
from services.frontend.request import DEFAULT_PRIORITY_RANGE, RequestLimits
from services.frontend.tool_parsers import tool_parser_for
from shared.builtin_model import DEFAULT_MODEL
from shared.bus import Bus
from shared.cli_options import DEFAULT_NATS_URL
from shared.discovery import DEFAULT_TTL, WorkerView
from shared.messages import load_report_decoder
from shared.models import resolve_model
from shared.routing.core import RouterCore, RoutingSettings
from shared.routing.lease import RouteLeases
from shared.runtime import settle_heap
from shared.subjects import API_GENERATE, API_LORA, API_QUEUE, LOAD_ALL
from shared.tokenizer import Tokenizer

log = logging.getLogger("baton.frontend")

ROUTER_PLACES = ("service", "embedded")


@dataclass
class FrontendSettings:
    nats_url: str = DEFAULT_NATS_URL
    host: str = "0.0.0.0"
    port: int = 8000
    model: str | None = DEFAULT_MODEL  # preloaded and always served; None: only the fleet's models
    served_model_name: str | None = None
    model_aliases: dict[str, str] = field(default_factory=dict)  # public name -> served name
    max_model_len: int = 0  # 0: from the model's config
    max_body_bytes: int = 2 * 1024 * 1024
    max_inflight: int = 2048
    header_timeout: float = 30.0
    api_keys_file: str | None = None
    rate_limit_rpm: float = 0.0  # per API key (or client address without keys); 0: off
    rate_limit_burst: int = 0
    address_rate_limit_rpm: float = 0.0  # per client address, before authentication; 0: off
    body_timeout: float = 30.0  # seconds a client has to send a request's body
    max_prompt_tokens: int = 0
    max_n: int = 16  # cap on n / best_of per request (400 above it)
    discovery_ttl: float = DEFAULT_TTL
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    access_log: bool = False  # one log line per HTTP request (services/frontend/access_log.py)
    tool_call_parser: str = "auto"  # "auto": from the chat template; "none": no tool calls read from text
    reasoning_parser: str = ""  # "": off; think | qwen3 | deepseek_r1
    router: str = "service"  # "service": ask the router service; "embedded": run the router core here
    routing: RoutingSettings = field(default_factory=RoutingSettings)  # the embedded router's policy
    route_leases: bool = True  # router service: hold its round-robin/random decisions ahead (shared/routing/lease.py)
    lora_root: str | None = None  # LoRA adapters may be loaded at run time from under this directory; None: off
    lora_timeout: float = 30.0  # seconds each worker has to load or unload an adapter
    admission: AdmissionSettings = field(default_factory=AdmissionSettings)  # queue, fair shares, tokens a minute
    priority_range: tuple[int, int] = DEFAULT_PRIORITY_RANGE  # request priorities accepted (400 outside)


class _Server(uvicorn.Server):
    # Signals belong to the service runtime (drain, then cancel), not to uvicorn.
    def capture_signals(self):  # type: ignore[override]
        return contextlib.nullcontext()


class Frontend:
    def __init__(self, settings: FrontendSettings) -> None:
        self.settings = settings
        # One prompt at a time: rayon's pool would only hand each one to another thread and back.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.bus: Bus | None = None
        self.view: WorkerView | None = None
        self.server: _Server | None = None
        self.router: RouterCore | None = None
        self.leases: RouteLeases | None = None
        if settings.lora_root is not None and not Path(settings.lora_root).is_dir():
            raise ValueError(f"--lora-root {settings.lora_root!r} is not a directory")
        self.model: str | None = None
        self.model_dir: Path | None = None
        if settings.model:
            ref = resolve_model(settings.model, settings.served_model_name)
            self.model, self.model_dir = ref.name, ref.path
        elif settings.tool_call_parser not in ("", "none", "auto"):
            tool_parser_for(settings.tool_call_parser, "")  # a named parser: checked without a model
        self.reasoning_parser = settings.reasoning_parser or None
        if self.reasoning_parser is not None:
            ReasoningStream(self.reasoning_parser)
        self.preloaded: ServedModel | None = None
        if self.model_dir is not None:  # read now: a broken --model fails the start, not the first request
            self.preloaded = self._served_model(self.model or "", self.model_dir, 0)
            self.preloaded.created = int(time.time())
        self.registry = ModelRegistry(self._served_model, aliases=settings.model_aliases)
        if self.preloaded is not None:
            self.registry.preload(self.preloaded)
        if settings.router not in ROUTER_PLACES:
            raise ValueError(f"unknown router {settings.router!r}; choose one of {', '.join(ROUTER_PLACES)}")
        # Checked before anything starts: a keys file without keys is a ConfigError.
        keys = load_tenants(settings.api_keys_file)
        limiter = RateLimiter(settings.rate_limit_rpm, settings.rate_limit_burst or None) \
            if settings.rate_limit_rpm > 0 else None
        address_limiter = RateLimiter(settings.address_rate_limit_rpm) if settings.address_rate_limit_rpm > 0 else None
        self.access = AccessControl(keys, limiter, address_limiter)
        if keys:
            log.info("API keys required on HTTP and NATS (%d configured)", len(keys))
        lo, hi = settings.priority_range
        if lo > hi:
            raise ValueError(f"the priority range {lo}..{hi} is empty")
        self.admission = Admission(settings.admission, self._decode_worker_ids)

    def _decode_worker_ids(self) -> list[str]:
        return [w.worker_id for w in self.view.workers("decode", self.model)] if self.view is not None else []

    def _fleet_serves(self, model: str) -> bool:
        """This frontend's own view has a decode worker for ``model``."""
        return self.view is not None and bool(self.view.workers("decode", model))

    def _served_model(self, name: str, model_dir: Path, context_length: int) -> ServedModel:
        """A model's tokenizer, template, context length and request path (in a thread for fleet models)."""
        s = self.settings
        tokenizer = Tokenizer(model_dir)
        tool_parser = tool_parser_for(s.tool_call_parser, model_dir)
        if not context_length:
            cfg = json.loads((model_dir / "config.json").read_text()) if (model_dir / "config.json").exists() else {}
            context_length = int(cfg.get("max_position_embeddings", 4096))
        max_model_len = min(s.max_model_len, context_length) if s.max_model_len else context_length
        # The bus is connected before any fleet model loads; the preloaded model's Generation gets it in run().
        generation = Generation(self.bus, tokenizer, name, s.generation, self.router,  # type: ignore[arg-type]
                                self.leases, fleet_serves=self._fleet_serves)
        limits = RequestLimits(name, max_model_len, s.max_prompt_tokens, s.max_n, tool_parser, s.priority_range)
        return ServedModel(name=name, tokenizer=tokenizer, max_model_len=max_model_len, limits=limits,
                           generation=generation, tool_parser=tool_parser, root=str(model_dir))

    def ready(self) -> dict[str, Any] | None:
        if self.bus is None or self.view is None or not self.bus.connected:
            return None
        served = [m.name for m in self.registry.served()]
        workers = [w for name in served for w in self.view.workers("decode", name)]
        needed = self.view.workers("decode", self.model) if self.model else workers
        if not needed or (self.router is not None and not self.router.started.is_set()):
            return None
        return {"status": "ready", "model": self.model, "models": served, "decode_workers": len(workers),
                "prefill_workers": sum(len(self.view.workers("prefill", name)) for name in served)}

    async def run(self) -> None:
        s = self.settings
        self.bus = await Bus.connect(s.nats_url, "baton-frontend")
        stack = contextlib.ExitStack()
        try:
            self.view = WorkerView(self.bus, s.discovery_ttl)
            if s.router == "embedded":
                # Same core as the router service, fed by the same KV events and discovery.
                self.router = RouterCore(s.routing, self.bus, self.view)
            elif s.route_leases:
                self.leases = RouteLeases(self.bus, timeout=s.generation.route_timeout)
            if self.preloaded is not None:
                self.preloaded.generation.bus = self.bus
                self.preloaded.generation.router = self.router
                self.preloaded.generation.leases = self.leases
            self.registry.view, self.registry.bus = self.view, self.bus
            # Tokenizer files fetched from the object store: private to this process, gone at exit.
            files_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="baton-model-files-"))
            self.registry.files_dir = Path(files_dir)
            access = self.access if self.access.enabled else None
            lora_admin = LoraAdmin(self.bus, self.view, self.registry, s.lora_root, s.lora_timeout)
            app = OpenAIApp(None, None, 0, self.ready, s.max_body_bytes,
                            s.max_inflight, access, s.max_prompt_tokens, s.body_timeout, max_n=s.max_n,
                            reasoning_parser=self.reasoning_parser, models=self.registry,
                            admission=self.admission, priority_range=s.priority_range,
                            lora_admin=lora_admin)
            nats_api = NatsApi(self.bus, self.registry, access, self.admission, lora_admin)
            if s.access_log:
                app = AccessLog(app)
            config = uvicorn.Config(
                app, host=s.host, port=s.port, http=protocol_with(s.header_timeout), loop="none", lifespan="off",
                access_log=False, log_level="warning", timeout_keep_alive=30, backlog=4096,
                timeout_graceful_shutdown=30,
            )
            self.server = _Server(config)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.view.run)
                tg.start_soon(self.registry.run)
                if self.router is not None:
                    tg.start_soon(self.router.run)
                if self.leases is not None:
                    tg.start_soon(self.leases.run)

                async def on_api(msg: Any) -> None:
                    tg.start_soon(nats_api.handle, msg)

                async def on_lora(msg: Any) -> None:
                    tg.start_soon(nats_api.handle_lora, msg)

                await self.bus.subscribe(API_GENERATE, on_api, queue=API_QUEUE)
                await self.bus.subscribe(API_LORA, on_lora, queue=API_QUEUE)
                if s.admission.worker_waiting:  # the workers' load reports say when the fleet is full

                    async def on_load(msg: Any) -> None:
                        try:
                            self.admission.on_load(load_report_decoder.decode(msg.data))
                        except Exception as e:  # a malformed report is no reason to stop admitting
                            log.debug("bad load report: %r", e)

                    await self.bus.subscribe(LOAD_ALL, on_load)
                settle_heap()  # what the frontend holds for life stays out of the collector's way
                await self.server.serve()
                if self.router is not None:
                    await self.router.close()
                tg.cancel_scope.cancel()  # the HTTP server stopped (drain): stop the rest
        finally:
            stack.close()
            await self.bus.close()

    async def drain(self) -> None:
        if self.server is not None:
            self.server.should_exit = True  # stop accepting; uvicorn finishes in-flight requests
        await anyio.sleep_forever()
