"""``baton router`` / ``python -m services.router``: a thin shell around :class:`Router`."""

from __future__ import annotations

from typing import Annotated

import typer

from shared.config import (
    DEFAULT_NATS_URL,
    DiscoveryTtl,
    DrainTimeout,
    JsReplicas,
    LogFormat,
    LogLevel,
    MetricsPort,
    NatsCreds,
    NatsUrl,
)
from shared.discovery import DEFAULT_TTL


def main(
    nats_url: NatsUrl = DEFAULT_NATS_URL,
    nats_creds: NatsCreds = None,
    js_replicas: JsReplicas = None,
    mode: Annotated[
        str, typer.Option("--mode", envvar="BATON_ROUTER_MODE",
                          help="Routing policy: kv, kv-approx (no KV events needed), round-robin or random.")
    ] = "round-robin",
    seed: Annotated[int | None, typer.Option(envvar="BATON_ROUTER_SEED", help="Seed for random choices.")] = None,
    overlap_weight: Annotated[float, typer.Option(
        envvar="BATON_ROUTER_OVERLAP_WEIGHT",
        help="kv: weight of blocks to prefill against blocks in use in a worker's cost.")] = 1.0,
    lower_tier_weight: Annotated[float, typer.Option(
        envvar="BATON_ROUTER_LOWER_TIER_WEIGHT",
        help="kv: cost of a prefix block found in a worker's host/disk tier, as a share of recomputing it.")] = 0.25,
    temperature: Annotated[float, typer.Option(
        envvar="BATON_ROUTER_TEMPERATURE", help="kv: 0 picks the cheapest worker; > 0 samples (softmax).")] = 0.0,
    prediction_ttl: Annotated[float, typer.Option(
        envvar="BATON_ROUTER_PREDICTION_TTL",
        help="kv: seconds a routed prompt counts as cached on its worker before events say so "
             "(0: 10 s for kv, 120 s for kv-approx).")] = 0.0,
    snapshot_interval: Annotated[float, typer.Option(
        envvar="BATON_ROUTER_SNAPSHOT_INTERVAL", help="kv: seconds between index snapshots (0: none).")] = 30.0,
    catchup_timeout: Annotated[float, typer.Option(
        envvar="BATON_ROUTER_CATCHUP_TIMEOUT",
        help="kv: at start, wait this long at most for the KV events replay before routing.")] = 20.0,
    discovery_ttl: DiscoveryTtl = DEFAULT_TTL,
    metrics_port: MetricsPort = 0,
    log_level: LogLevel = "info",
    log_format: LogFormat = "text",
    drain_timeout: DrainTimeout = 30.0,
) -> None:
    """Answer "which decode worker?" for the frontends."""
    from services.router.policy import make_policy
    from services.router.service import Router, RouterSettings
    from shared.preflight import check_port, run_checks
    from shared.runtime import run_service

    run_checks("router", [lambda: check_port("0.0.0.0", metrics_port, "metrics", "--metrics-port")])

    try:
        make_policy(mode)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--mode") from None
    settings = RouterSettings(nats_url=nats_url, mode=mode, discovery_ttl=discovery_ttl, metrics_port=metrics_port,
                              seed=seed, overlap_weight=overlap_weight, temperature=temperature,
                              lower_tier_weight=lower_tier_weight,
                              prediction_ttl=prediction_ttl, snapshot_interval=snapshot_interval,
                              catchup_timeout=catchup_timeout)
    run_service(Router(settings), "router", log_level, drain_timeout, log_format)


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command()(main)
