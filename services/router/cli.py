"""``baton router`` / ``python -m services.router``: a thin shell around :class:`Router`."""

from __future__ import annotations

import typer

from shared.cli_options import (
    DEFAULT_NATS_URL,
    DiscoveryTtl,
    DrainTimeout,
    JsReplicas,
    LogFormat,
    LogLevel,
    MetricsPort,
    NatsCreds,
    NatsUrl,
    RouterCatchupTimeout,
    RouterLeaseTtl,
    RouterLoraLoadWeight,
    RouterLowerTierWeight,
    RouterMode,
    RouterOverlapWeight,
    RouterPredictionTtl,
    RouterSeed,
    RouterSessionTtl,
    RouterSnapshotInterval,
    RouterTemperature,
)
from shared.discovery import DEFAULT_TTL


def main(
    nats_url: NatsUrl = DEFAULT_NATS_URL,
    nats_creds: NatsCreds = None,
    js_replicas: JsReplicas = None,
    mode: RouterMode = "round-robin",
    seed: RouterSeed = None,
    overlap_weight: RouterOverlapWeight = 1.0,
    lower_tier_weight: RouterLowerTierWeight = 0.25,
    lora_load_weight: RouterLoraLoadWeight = 32.0,
    temperature: RouterTemperature = 0.0,
    prediction_ttl: RouterPredictionTtl = 0.0,
    snapshot_interval: RouterSnapshotInterval = 30.0,
    catchup_timeout: RouterCatchupTimeout = 20.0,
    session_ttl: RouterSessionTtl = 600.0,
    lease_ttl: RouterLeaseTtl = 1.0,
    discovery_ttl: DiscoveryTtl = DEFAULT_TTL,
    metrics_port: MetricsPort = 0,
    log_level: LogLevel = "info",
    log_format: LogFormat = "text",
    drain_timeout: DrainTimeout = 30.0,
) -> None:
    """Answer "which decode worker?" for the frontends."""
    from services.router.service import Router, RouterSettings
    from shared.preflight import check_port, run_checks
    from shared.routing.policy import make_policy
    from shared.runtime import run_service

    run_checks("router", [lambda: check_port("0.0.0.0", metrics_port, "metrics", "--metrics-port")])

    try:
        make_policy(mode)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--mode") from None
    settings = RouterSettings(nats_url=nats_url, mode=mode, discovery_ttl=discovery_ttl, metrics_port=metrics_port,
                              seed=seed, overlap_weight=overlap_weight, temperature=temperature,
                              lower_tier_weight=lower_tier_weight, lora_load_weight=lora_load_weight,
                              prediction_ttl=prediction_ttl, snapshot_interval=snapshot_interval,
                              catchup_timeout=catchup_timeout, session_ttl=session_ttl,
                              lease_ttl=lease_ttl)
    run_service(Router(settings), "router", log_level, drain_timeout, log_format)


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command()(main)
