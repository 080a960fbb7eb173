"""The frontend actor: OpenAI HTTP API and the NATS request API in front of router and workers.

With ``router="embedded"`` it runs the router core (:mod:`shared.routing`) in process instead of
asking the router service.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import anyio
import uvicorn

from services.frontend.access import AccessControl, RateLimiter, load_api_keys
from services.frontend.access_log import AccessLog
from services.frontend.generation import Generation, GenerationSettings
from services.frontend.http_app import OpenAIApp
from services.frontend.http_protocol import protocol_with
from services.frontend.nats_api import NatsApi
from services.frontend.reasoning import ReasoningStream
from services.frontend.tool_parsers import tool_parser_for
from shared.builtin_model import DEFAULT_MODEL
from shared.bus import Bus
from shared.cli_options import DEFAULT_NATS_URL
from shared.discovery import DEFAULT_TTL, WorkerView
from shared.models import resolve_model
from shared.routing.core import RouterCore, RoutingSettings
from shared.runtime import settle_heap
from shared.subjects import API_GENERATE, API_QUEUE
from shared.tokenizer import Tokenizer

log = logging.getLogger("baton.frontend")

ROUTER_PLACES = ("service", "embedded")


@dataclass
class FrontendSettings:
    nats_url: str = DEFAULT_NATS_URL
    host: str = "0.0.0.0"
    port: int = 8000
    model: str = DEFAULT_MODEL
    served_model_name: str | None = None
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


class _Server(uvicorn.Server):
    # Signals belong to the service runtime (drain, then cancel), not to uvicorn.
    def capture_signals(self):  # type: ignore[override]
        import contextlib

        return contextlib.nullcontext()


class Frontend:
    def __init__(self, settings: FrontendSettings) -> None:
        self.settings = settings
        ref = resolve_model(settings.model, settings.served_model_name)
        self.model = ref.name
        self.tokenizer = Tokenizer(ref.path)
        # Checked here so a bad name fails at start: ValueError names the choices.
        self.tool_parser = tool_parser_for(settings.tool_call_parser, ref.path)
        self.reasoning_parser = settings.reasoning_parser or None
        if self.reasoning_parser is not None:
            ReasoningStream(self.reasoning_parser)
        cfg = json.loads((ref.path / "config.json").read_text())
        self.max_model_len = settings.max_model_len or int(cfg.get("max_position_embeddings", 4096))
        self.bus: Bus | None = None
        self.view: WorkerView | None = None
        self.server: _Server | None = None
        self.router: RouterCore | None = None
        if settings.router not in ROUTER_PLACES:
            raise ValueError(f"unknown router {settings.router!r}; choose one of {', '.join(ROUTER_PLACES)}")
        # Checked before anything starts: a keys file without keys is a ConfigError.
        keys = load_api_keys(settings.api_keys_file)
        limiter = RateLimiter(settings.rate_limit_rpm, settings.rate_limit_burst or None) \
            if settings.rate_limit_rpm > 0 else None
        address_limiter = RateLimiter(settings.address_rate_limit_rpm) if settings.address_rate_limit_rpm > 0 else None
        self.access = AccessControl(keys, limiter, address_limiter)
        if keys:
            log.info("API keys required on HTTP and NATS (%d configured)", len(keys))

    def ready(self) -> dict[str, Any] | None:
        if self.bus is None or self.view is None or not self.bus.connected:
            return None
        workers = self.view.workers("decode", self.model)
        if not workers or (self.router is not None and not self.router.started.is_set()):
            return None
        return {"status": "ready", "model": self.model, "decode_workers": len(workers),
                "prefill_workers": len(self.view.workers("prefill", self.model))}

    async def run(self) -> None:
        s = self.settings
        self.bus = await Bus.connect(s.nats_url, "baton-frontend")
        try:
            self.view = WorkerView(self.bus, s.discovery_ttl)
            if s.router == "embedded":
                # Same core as the router service, fed by the same KV events and discovery.
                self.router = RouterCore(s.routing, self.bus, self.view)
            generation = Generation(self.bus, self.tokenizer, self.model, s.generation, self.router)
            access = self.access if self.access.enabled else None
            app = OpenAIApp(generation, self.model, self.max_model_len, self.ready, s.max_body_bytes,
                            s.max_inflight, access, s.max_prompt_tokens, s.body_timeout, max_n=s.max_n,
                            tool_parser=self.tool_parser, reasoning_parser=self.reasoning_parser)
            nats_api = NatsApi(self.bus, generation, self.model, self.max_model_len, access, s.max_prompt_tokens)
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
                if self.router is not None:
                    tg.start_soon(self.router.run)

                async def on_api(msg: Any) -> None:
                    tg.start_soon(nats_api.handle, msg)

                await self.bus.subscribe(API_GENERATE, on_api, queue=API_QUEUE)
                settle_heap()  # what the frontend holds for life stays out of the collector's way
                await self.server.serve()
                if self.router is not None:
                    await self.router.close()
                tg.cancel_scope.cancel()  # the HTTP server stopped (drain): stop the rest
        finally:
            await self.bus.close()

    async def drain(self) -> None:
        if self.server is not None:
            self.server.should_exit = True  # stop accepting; uvicorn finishes in-flight requests
        await anyio.sleep_forever()
