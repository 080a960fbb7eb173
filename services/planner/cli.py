"""``baton planner`` / ``python -m services.planner``: a thin shell around :class:`Planner`."""

from __future__ import annotations

from typing import Annotated

import typer

from shared.config import DEFAULT_NATS_URL, DiscoveryTtl, LogLevel, MetricsPort, NatsUrl
from shared.discovery import DEFAULT_TTL


def main(
    nats_url: NatsUrl = DEFAULT_NATS_URL,
    interval: Annotated[
        float, typer.Option(envvar="BATON_PLANNER_INTERVAL", help="Seconds between observations.")
    ] = 2.0,
    discovery_ttl: DiscoveryTtl = DEFAULT_TTL,
    metrics_port: MetricsPort = 0,
    log_level: LogLevel = "info",
) -> None:
    """Watch the prefill queue and worker load; publish observations."""
    from services.planner.service import Planner, PlannerSettings
    from shared.runtime import run_service

    settings = PlannerSettings(nats_url=nats_url, interval=interval, discovery_ttl=discovery_ttl,
                               metrics_port=metrics_port)
    run_service(Planner(settings), "planner", log_level)


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command()(main)
