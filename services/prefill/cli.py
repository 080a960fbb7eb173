"""``baton prefill`` / ``python -m services.prefill``: a thin shell around :class:`PrefillWorker`.

The worker and engine options every engine worker takes come from
:func:`shared.cli_options.worker_command`; only the prefill worker's own option is here.
"""

from __future__ import annotations

from typing import Annotated

import typer

from shared.cli_options import WorkerOptions, worker_command


@worker_command
def main(
    worker: WorkerOptions,
    max_concurrent_jobs: Annotated[
        int, typer.Option(envvar="BATON_MAX_CONCURRENT_JOBS", help="Prefill jobs computed at once.")
    ] = 8,
) -> None:
    """Run a prefill worker: pull prefill jobs from the JetStream work queue."""
    from services.prefill.worker import PrefillSettings, PrefillWorker

    settings = PrefillSettings(**worker.settings(), max_concurrent_jobs=max_concurrent_jobs)
    worker.run("prefill", lambda: PrefillWorker(settings))


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command()(main)
