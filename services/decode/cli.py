"""``baton decode`` / ``python -m services.decode``: a thin shell around :class:`DecodeWorker`.

The worker and engine options every engine worker takes come from
:func:`shared.cli_options.worker_command`; only the decode worker's own options are here.
"""

from __future__ import annotations

from typing import Annotated

import typer

from shared.cli_options import WorkerOptions, worker_command


@worker_command
def main(
    worker: WorkerOptions,
    max_inflight: Annotated[
        int, typer.Option(envvar="BATON_MAX_INFLIGHT", help="Requests held at once; beyond it, 503 at once.")
    ] = 1024,
    disagg: Annotated[
        bool, typer.Option("--disagg/--no-disagg", envvar="BATON_DISAGG",
                           help="Hand long prompts to prefill workers when that pays (see the next options).")
    ] = True,
    remote_prefill_min_tokens: Annotated[
        int, typer.Option(envvar="BATON_REMOTE_PREFILL_MIN_TOKENS",
                          help="Uncached prompt tokens from which prefill goes remote (run time: KV baton_config/disagg).")
    ] = 256,
    max_prefill_queue: Annotated[
        int, typer.Option(envvar="BATON_MAX_PREFILL_QUEUE", help="Prefill locally while this many jobs wait.")
    ] = 32,
    prefill_timeout: Annotated[
        float, typer.Option(envvar="BATON_PREFILL_TIMEOUT", help="Seconds before a remote prefill falls back to local.")
    ] = 30.0,
    stream_interval_ms: Annotated[
        float, typer.Option(envvar="BATON_STREAM_INTERVAL_MS", min=0.0,
                            help="Least spacing of the reply messages that carry only middle tokens: steps faster "
                                 "than this share one message (first and last tokens go at once; 0: every step).")
    ] = 1.0,
    replicas: Annotated[
        int, typer.Option("--replicas", envvar="BATON_DECODE_REPLICAS", min=1,
                          help="Simulated workers in this process, each a full worker on the bus (--engine mocker "
                               "only; ids --worker-id or decode-<hex> plus -000, -001, ...). For fleet-scale tests.")
    ] = 1,
) -> None:
    """Run a decode worker: generate requests in, token chunks out."""
    from services.decode.disagg import DisaggSettings
    from services.decode.worker import DecodeSettings, DecodeWorker
    from shared.preflight import fail

    if replicas > 1 and worker.engine.engine != "mocker":  # before the preflight: a real engine need not import
        fail("decode", f"--replicas > 1 needs --engine mocker (got {worker.engine.engine!r})")
    settings = DecodeSettings(
        **worker.settings(), max_inflight=max_inflight, stream_interval=stream_interval_ms / 1e3,
        disagg=DisaggSettings(enabled=disagg, min_tokens=remote_prefill_min_tokens, max_queue=max_prefill_queue,
                              prefill_timeout=prefill_timeout),
    )
    if replicas > 1:
        from services.decode.fleet import DecodeFleet

        worker.run("decode", lambda: DecodeFleet(settings, replicas))
        return
    worker.run("decode", lambda: DecodeWorker(settings))


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command()(main)
