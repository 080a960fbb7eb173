"""``baton router`` / ``python -m services.router``: a thin shell around :class:`Router`."""

from __future__ import annotations

from typing import Annotated

import typer

from shared.config import DEFAULT_NATS_URL, DiscoveryTtl, LogLevel, MetricsPort, NatsUrl
from shared.discovery import DEFAULT_TTL


def main(
    nats_url: NatsUrl = DEFAULT_NATS_URL,
    mode: Annotated[
        str, typer.Option("--mode", envvar="BATON_ROUTER_MODE", help="Routing policy: round-robin or random.")
    ] = "round-robin",
    seed: Annotated[int | None, typer.Option(envvar="BATON_ROUTER_SEED", help="Seed for the random policy.")] = None,
    discovery_ttl: DiscoveryTtl = DEFAULT_TTL,
    metrics_port: MetricsPort = 0,
    log_level: LogLevel = "info",
) -> None:
    """Answer "which decode worker?" for the frontends."""
    from services.router.policy import make_policy
    from services.router.service import Router, RouterSettings
    from shared.runtime import run_service

    try:
        make_policy(mode)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--mode") from None
    settings = RouterSettings(nats_url=nats_url, mode=mode, discovery_ttl=discovery_ttl, metrics_port=metrics_port,
                              seed=seed)
    run_service(Router(settings), "router", log_level)


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command()(main)
