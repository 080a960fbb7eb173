"""``baton frontend`` / ``python -m services.frontend``: a thin shell around :class:`Frontend`."""

from __future__ import annotations

from typing import Annotated

import typer

from shared.cli_options import (
    DEFAULT_NATS_URL,
    DiscoveryTtl,
    DrainTimeout,
    JsReplicas,
    LogFormat,
    LogLevel,
    NatsCreds,
    NatsUrl,
    RouterCatchupTimeout,
    RouterLoraLoadWeight,
    RouterLowerTierWeight,
    RouterMode,
    RouterOverlapWeight,
    RouterPredictionTtl,
    RouterSeed,
    RouterSessionTtl,
    RouterSnapshotInterval,
    RouterTemperature,
    ServedModelName,
)
from shared.discovery import DEFAULT_TTL


def main(
    nats_url: NatsUrl = DEFAULT_NATS_URL,
    nats_creds: NatsCreds = None,
    js_replicas: JsReplicas = None,
    host: Annotated[str, typer.Option(envvar="BATON_HOST", help="HTTP bind address.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(envvar="BATON_PORT", help="HTTP port.")] = 8000,
    model: Annotated[
        str | None,
        typer.Option("--model", envvar="BATON_MODEL",
                     help="A model to load at start and always serve (built-in name or model directory). "
                          "Optional: the frontend also serves every model its workers register."),
    ] = None,
    served_model_name: ServedModelName = None,
    model_alias: Annotated[
        list[str] | None,
        typer.Option("--model-alias", envvar="BATON_MODEL_ALIASES",
                     help="public=served: requests for 'public' go to the served model 'served' (repeatable; "
                          "the env var takes a comma-separated list)."),
    ] = None,
    max_model_len: Annotated[
        int, typer.Option(envvar="BATON_MAX_MODEL_LEN", help="Context length limit (0: the model's own).")
    ] = 0,
    max_body_bytes: Annotated[
        int, typer.Option(envvar="BATON_MAX_BODY_BYTES", help="Largest request body accepted (413 beyond).")
    ] = 2 * 1024 * 1024,
    max_inflight: Annotated[
        int, typer.Option(envvar="BATON_MAX_INFLIGHT", help="Requests served at once; beyond it, 503 at once.")
    ] = 2048,
    header_timeout: Annotated[
        float, typer.Option(envvar="BATON_HEADER_TIMEOUT", help="Seconds a client has to send a request's headers.")
    ] = 30.0,
    api_keys_file: Annotated[
        str | None,
        typer.Option(envvar="BATON_API_KEYS_FILE",
                     help="Require 'Authorization: Bearer <key>' with a key from this file (one a line); "
                          "BATON_API_KEYS may also list keys, comma-separated."),
    ] = None,
    rate_limit_rpm: Annotated[
        float, typer.Option(envvar="BATON_RATE_LIMIT_RPM", help="Requests a minute per API key (or client); 0: off.")
    ] = 0.0,
    rate_limit_burst: Annotated[
        int, typer.Option(envvar="BATON_RATE_LIMIT_BURST", help="Burst size of the rate limit (0: rpm/6).")
    ] = 0,
    address_rate_limit_rpm: Annotated[
        float, typer.Option(envvar="BATON_ADDRESS_RATE_LIMIT_RPM",
                            help="Requests a minute per client address, checked before the API key; 0: off.")
    ] = 0.0,
    body_timeout: Annotated[
        float, typer.Option(envvar="BATON_BODY_TIMEOUT", help="Seconds a client has to send a request's body (408).")
    ] = 30.0,
    max_prompt_tokens: Annotated[
        int, typer.Option(envvar="BATON_MAX_PROMPT_TOKENS", help="Longest prompt accepted, in tokens (0: context).")
    ] = 0,
    max_n: Annotated[
        int, typer.Option(envvar="BATON_MAX_N", help="Most choices (n, best_of) one request may ask for.")
    ] = 16,
    max_migrations: Annotated[
        int, typer.Option(envvar="BATON_MAX_MIGRATIONS", help="Worker failures one request may survive.")
    ] = 3,
    route_timeout: Annotated[
        float, typer.Option(envvar="BATON_ROUTE_TIMEOUT", help="Seconds to wait for the router (per attempt, 3 attempts).")
    ] = 2.0,
    first_token_timeout: Annotated[
        float, typer.Option(envvar="BATON_FIRST_TOKEN_TIMEOUT",
                            help="Streamed requests: seconds to wait for a worker's first token.")
    ] = 300.0,
    request_timeout: Annotated[
        float, typer.Option(envvar="BATON_REQUEST_TIMEOUT",
                            help="Non-streamed requests: total seconds a generation may take (the worker is "
                                 "probed for liveness every second meanwhile).")
    ] = 1800.0,
    discovery_ttl: DiscoveryTtl = DEFAULT_TTL,
    log_level: LogLevel = "info",
    log_format: LogFormat = "text",
    access_log: Annotated[
        bool, typer.Option("--access-log/--no-access-log", envvar="BATON_ACCESS_LOG",
                           help="Log one line per HTTP request (method, path, status, duration, request id).")
    ] = False,
    drain_timeout: DrainTimeout = 30.0,
    tool_call_parser: Annotated[
        str, typer.Option(envvar="BATON_TOOL_CALL_PARSER",
                          help="How tool calls are read from model text (tool_choice auto): hermes, llama3_json, "
                               "mistral, none, or auto (detected from the chat template).")
    ] = "auto",
    reasoning_parser: Annotated[
        str, typer.Option(envvar="BATON_REASONING_PARSER",
                          help="Split <think>...</think> into reasoning_content: think (qwen3), deepseek_r1; "
                               "empty: off.")
    ] = "",
    router: Annotated[
        str, typer.Option(envvar="BATON_FRONTEND_ROUTER",
                          help="service: ask the router service (baton.v1.route); embedded: run the same router "
                               "in this process (no route hop; the --router-* options set its policy).")
    ] = "service",
    route_leases: Annotated[
        bool, typer.Option("--route-leases/--no-route-leases", envvar="BATON_ROUTE_LEASES",
                           help="With the router service under round-robin or random: hold its decisions "
                                "ahead, so requests skip the route hop (a KV-aware router is asked per request).")
    ] = True,
    router_mode: RouterMode = "round-robin",
    router_seed: RouterSeed = None,
    router_overlap_weight: RouterOverlapWeight = 1.0,
    router_lower_tier_weight: RouterLowerTierWeight = 0.25,
    router_lora_load_weight: RouterLoraLoadWeight = 32.0,
    router_temperature: RouterTemperature = 0.0,
    router_prediction_ttl: RouterPredictionTtl = 0.0,
    router_snapshot_interval: RouterSnapshotInterval = 30.0,
    router_catchup_timeout: RouterCatchupTimeout = 20.0,
    lora_root: Annotated[
        str | None, typer.Option(envvar="BATON_LORA_ROOT",
                                 help="Directory LoRA adapters may be loaded from at run time "
                                      "(POST /v1/load_lora_adapter, NATS baton.v1.api.lora); paths outside it "
                                      "are refused. Unset: run-time loading is off.")
    ] = None,
    lora_timeout: Annotated[
        float, typer.Option(envvar="BATON_LORA_TIMEOUT", help="Seconds each worker has to load or unload an adapter.")
    ] = 30.0,
    router_session_ttl: RouterSessionTtl = 600.0,
    priority_min: Annotated[
        int, typer.Option(envvar="BATON_PRIORITY_MIN", help="Lowest request priority accepted (400 below).")
    ] = -100,
    priority_max: Annotated[
        int, typer.Option(envvar="BATON_PRIORITY_MAX", help="Highest request priority accepted (400 above).")
    ] = 100,
    admission_max_running: Annotated[
        int, typer.Option(envvar="BATON_ADMISSION_MAX_RUNNING",
                          help="Requests this frontend has at the workers at once; more wait in the admission "
                               "queue (by priority, then fair share per API key). 0: no cap.")
    ] = 0,
    admission_reserved: Annotated[
        int, typer.Option(envvar="BATON_ADMISSION_RESERVED",
                          help="Of --admission-max-running, slots only requests with priority < 0 may take.")
    ] = 0,
    admission_queue_timeout: Annotated[
        float, typer.Option(envvar="BATON_ADMISSION_QUEUE_TIMEOUT",
                            help="Longest wait in the admission queue; then 503 with Retry-After.")
    ] = 30.0,
    admission_max_queued: Annotated[
        int, typer.Option(envvar="BATON_ADMISSION_MAX_QUEUED",
                          help="Requests waiting for admission at once; beyond, 503 with Retry-After at once.")
    ] = 1024,
    admission_worker_waiting: Annotated[
        int, typer.Option(envvar="BATON_ADMISSION_WORKER_WAITING",
                          help="The fleet counts as full (requests queue here) while every decode worker's load "
                               "report shows at least this many requests waiting in its engine. 0: off.")
    ] = 0,
    tenant_tpm: Annotated[
        int, typer.Option(envvar="BATON_TENANT_TPM",
                          help="Tokens a minute (prompt + completion) per API key, unless its line in the keys "
                               "file sets tpm=; callers without a key share one budget. 0: no limit.")
    ] = 0,
) -> None:
    """Serve the OpenAI-compatible HTTP API and the NATS request API."""
    from services.frontend.access import ConfigError
    from services.frontend.admission import AdmissionSettings
    from services.frontend.generation import GenerationSettings
    from services.frontend.models import parse_aliases
    from services.frontend.service import ROUTER_PLACES, Frontend, FrontendSettings
    from shared.preflight import check_model, check_port, run_checks
    from shared.routing.core import RoutingSettings
    from shared.routing.policy import make_policy
    from shared.runtime import run_service

    checks = [lambda: check_port(host, port, "HTTP", "--port")]
    if model:
        checks.insert(0, lambda: check_model(model))
    run_checks("frontend", checks)
    try:
        aliases = parse_aliases(model_alias or [])
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--model-alias") from None
    if router not in ROUTER_PLACES:
        raise typer.BadParameter(f"{router!r}: choose one of {', '.join(ROUTER_PLACES)}", param_hint="--router")
    try:
        make_policy(router_mode)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--router-mode") from None

    settings = FrontendSettings(
        nats_url=nats_url, host=host, port=port, model=model, served_model_name=served_model_name,
        model_aliases=aliases,
        max_model_len=max_model_len, max_body_bytes=max_body_bytes, max_inflight=max_inflight,
        header_timeout=header_timeout, discovery_ttl=discovery_ttl, api_keys_file=api_keys_file,
        rate_limit_rpm=rate_limit_rpm, rate_limit_burst=rate_limit_burst, max_prompt_tokens=max_prompt_tokens, max_n=max_n,
        address_rate_limit_rpm=address_rate_limit_rpm, body_timeout=body_timeout, access_log=access_log,
        tool_call_parser=tool_call_parser, reasoning_parser=reasoning_parser, router=router,
        route_leases=route_leases, lora_root=lora_root, lora_timeout=lora_timeout,
        routing=RoutingSettings(mode=router_mode, discovery_ttl=discovery_ttl, seed=router_seed,
                                overlap_weight=router_overlap_weight, lower_tier_weight=router_lower_tier_weight,
                                lora_load_weight=router_lora_load_weight,
                                temperature=router_temperature, prediction_ttl=router_prediction_ttl,
                                snapshot_interval=router_snapshot_interval, catchup_timeout=router_catchup_timeout,
                                session_ttl=router_session_ttl),
        admission=AdmissionSettings(max_running=admission_max_running, reserved=admission_reserved,
                                    queue_timeout=admission_queue_timeout, max_queued=admission_max_queued,
                                    worker_waiting=admission_worker_waiting, tenant_tpm=tenant_tpm),
        priority_range=(priority_min, priority_max),
        generation=GenerationSettings(route_timeout=route_timeout, first_token_timeout=first_token_timeout,
                                      request_timeout=request_timeout,
                                      max_migrations=max_migrations),
    )
    try:
        frontend = Frontend(settings)
    except (ConfigError, ValueError) as e:
        typer.echo(f"frontend: error: {e}", err=True)
        raise typer.Exit(2) from None
    run_service(frontend, "frontend", log_level, drain_timeout, log_format)


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command()(main)
