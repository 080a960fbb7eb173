"""``baton planner`` / ``python -m services.planner``: a thin shell around :class:`Planner`."""

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
    MetricsPort,
    NatsCreds,
    NatsUrl,
)
from shared.discovery import DEFAULT_TTL

POLICIES = ("load", "sla", "none")
CONNECTORS = ("none", "local", "compose", "kubernetes")


def _opt(text: str, env: str | None = None, *names: str):
    return typer.Option(*names, envvar=f"BATON_PLANNER_{env}" if env else None, help=text)


def main(
    nats_url: NatsUrl = DEFAULT_NATS_URL,
    nats_creds: NatsCreds = None,
    js_replicas: JsReplicas = None,
    interval: Annotated[float, _opt("Seconds between observations (and decisions).", "INTERVAL")] = 2.0,
    policy: Annotated[str, _opt("load (thresholds), sla (TTFT/ITL targets) or none (observe only).",
                                "POLICY")] = "load",
    connector: Annotated[str, _opt("none, local (start/stop worker processes here), compose or kubernetes.",
                                   "CONNECTOR")] = "none",
    dry_run: Annotated[bool, _opt("Decide and report, never act.", "DRY_RUN")] = False,
    min_decode: Annotated[int, _opt('Fewest decode workers.', "MIN_DECODE", "--min-decode")] = 1,
    max_decode: Annotated[int, _opt('Most decode workers.', "MAX_DECODE", "--max-decode")] = 8,
    min_prefill: Annotated[int, _opt('Fewest prefill workers.', "MIN_PREFILL", "--min-prefill")] = 0,
    max_prefill: Annotated[int, _opt('Most prefill workers.', "MAX_PREFILL", "--max-prefill")] = 8,
    initial_decode: Annotated[int | None, _opt('Decode workers to start with (local; default: the minimum).', "INITIAL_DECODE", "--initial-decode")] = None,
    initial_prefill: Annotated[int | None, _opt('Prefill workers to start with (local; default: the minimum).', "INITIAL_PREFILL", "--initial-prefill")] = None,
    # damping
    up_intervals: Annotated[int, _opt('A larger fleet must be proposed this many intervals in a row.', "UP_INTERVALS")] = 2,
    down_intervals: Annotated[int, _opt('A smaller fleet must be proposed this many intervals in a row.', "DOWN_INTERVALS")] = 5,
    up_cooldown: Annotated[float, _opt('Seconds after a scale-up before the next one.', "UP_COOLDOWN")] = 10.0,
    down_cooldown: Annotated[float, _opt('Seconds after any change before a scale-down.', "DOWN_COOLDOWN")] = 30.0,
    startup_grace: Annotated[float, _opt('Seconds to wait for started workers to register before growing again.', "STARTUP_GRACE")] = 60.0,
    # load policy
    decode_queue_up: Annotated[float, _opt('load: waiting requests per decode worker to grow above.', "DECODE_QUEUE_UP")] = 2.0,
    decode_queue_down: Annotated[float, _opt('load: waiting requests per decode worker to shrink below.', "DECODE_QUEUE_DOWN")] = 0.2,
    kv_up: Annotated[float, _opt('load: mean KV use to grow above.', "KV_UP")] = 0.85,
    kv_down: Annotated[float, _opt('load: KV use (on one worker fewer) to shrink below.', "KV_DOWN")] = 0.5,
    prefill_queue_up: Annotated[float, _opt('load: queued prefill jobs per prefill worker to grow above.', "PREFILL_QUEUE_UP")] = 4.0,
    prefill_queue_down: Annotated[float, _opt('load: queued prefill jobs per worker to shrink below.', "PREFILL_QUEUE_DOWN")] = 0.5,
    # SLA policy
    profile: Annotated[str | None, _opt("sla: the worker profile JSON from `baton profile`.", "PROFILE")] = None,
    ttft_target_ms: Annotated[float, _opt('sla: time to first token to keep (ms).', "TTFT_TARGET_MS")] = 500.0,
    itl_target_ms: Annotated[float, _opt('sla: inter-token latency to keep (ms).', "ITL_TARGET_MS")] = 50.0,
    max_utilization: Annotated[float, _opt('sla: never plan a worker busier than this.', "MAX_UTILIZATION")] = 0.9,
    drain_window: Annotated[float, _opt('sla: add workers to clear the backlog within this many seconds.', "DRAIN_WINDOW")] = 10.0,
    # local connector: how to start workers
    engine: Annotated[str, _opt("local: the workers' engine.", "ENGINE", "--engine")] = "torch",
    model: Annotated[list[str] | None, _opt("The model(s) to plan for, repeatable: one pool of workers per model, "
                                            "each scaled on its own (local: the workers' model).",
                                            "MODEL", "--model")] = None,
    model_limits: Annotated[list[str] | None, _opt("name=min:max: decode workers of one model (repeatable; "
                                                   "default: --min-decode:--max-decode).",
                                                   "MODEL_LIMITS", "--model-limits")] = None,
    mocker_speedup: Annotated[float, _opt('local: mocker speedup.', "MOCKER_SPEEDUP", "--mocker-speedup")] = 1.0,
    num_blocks: Annotated[int, _opt('local: KV blocks per worker (0: engine default).', "NUM_BLOCKS", "--num-blocks")] = 0,
    max_num_seqs: Annotated[int, _opt('local: batch cap per worker (0: default).', "MAX_NUM_SEQS", "--max-num-seqs")] = 0,
    max_batched_tokens: Annotated[int, _opt('local: token budget per step (0: default).', "MAX_BATCHED_TOKENS", "--max-batched-tokens")] = 0,
    worker_log_dir: Annotated[str | None, _opt('local: one log file per worker here.', "WORKER_LOG_DIR", "--worker-log-dir")] = None,
    worker_args: Annotated[str, _opt('local: extra worker arguments (one string).', "WORKER_ARGS", "--worker-args")] = "",
    worker_stop_timeout: Annotated[float, _opt('local: SIGKILL a draining worker after this long.', "WORKER_STOP_TIMEOUT")] = 60.0,
    # compose / kubernetes
    compose_file: Annotated[str | None, _opt('compose: -f file.', "COMPOSE_FILE")] = None,
    compose_project: Annotated[str | None, _opt('compose: -p project.', "COMPOSE_PROJECT")] = None,
    k8s_namespace: Annotated[str | None, _opt("kubernetes: namespace (default: the pod's).", "K8S_NAMESPACE")] = None,
    k8s_api_server: Annotated[str | None, _opt('kubernetes: API server URL (default: in-cluster).', "K8S_API_SERVER")] = None,
    k8s_decode_deployment: Annotated[str, _opt('kubernetes: the decode Deployment.', "K8S_DECODE_DEPLOYMENT")] = "baton-decode",
    k8s_prefill_deployment: Annotated[str, _opt('kubernetes: the prefill Deployment.', "K8S_PREFILL_DEPLOYMENT")] = "baton-prefill",
    discovery_ttl: DiscoveryTtl = DEFAULT_TTL,
    metrics_port: MetricsPort = 0,
    log_level: LogLevel = "info",
    log_format: LogFormat = "text",
    drain_timeout: DrainTimeout = 0.0,
) -> None:
    """Watch the prefill queue, worker load and traffic; scale prefill and decode workers."""
    import shlex

    from services.planner.connectors import (
        ComposeSettings,
        DockerComposeConnector,
        KubernetesConnector,
        KubernetesSettings,
        LocalProcessConnector,
        LocalWorkerSettings,
        NullConnector,
    )
    from services.planner.policy import (
        Damping,
        HoldPolicy,
        LoadPolicy,
        LoadThresholds,
        SlaPolicy,
        SlaTargets,
        Stabilizer,
    )
    from services.planner.profile import WorkerProfile
    from services.planner.service import ModelPool, Planner, PlannerSettings, parse_model_limits
    from shared.preflight import check_engine, check_port, run_checks
    from shared.runtime import run_service

    checks = [lambda: check_port("0.0.0.0", metrics_port, "metrics", "--metrics-port")]
    if connector == "local":
        checks.append(lambda: check_engine(engine, in_subprocess=True))  # its workers will run this engine
    run_checks("planner", checks)

    if policy not in POLICIES:
        raise typer.BadParameter(f"choose one of {', '.join(POLICIES)}", param_hint="--policy")
    if connector not in CONNECTORS:
        raise typer.BadParameter(f"choose one of {', '.join(CONNECTORS)}", param_hint="--connector")
    if not (0 <= min_decode <= max_decode and 0 <= min_prefill <= max_prefill):
        raise typer.BadParameter("need 0 <= min <= max for each role")

    models = list(dict.fromkeys(m.strip() for item in (model or []) for m in item.split(",") if m.strip()))
    try:
        per_model = parse_model_limits(model_limits or [])
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--model-limits") from None
    unknown = sorted(set(per_model) - set(models))
    if unknown:
        raise typer.BadParameter(f"limits for {', '.join(unknown)}, which no --model names", param_hint="--model-limits")
    if len(models) > 1 and connector in ("compose", "kubernetes"):
        raise typer.BadParameter(f"the {connector} connector scales one Deployment per role; several models need "
                                 "the local or none connector (or one planner per model)", param_hint="--model")
    sla_profile = None
    if policy == "sla":
        if not profile:
            raise typer.BadParameter("the sla policy needs a worker profile (baton profile -o FILE)",
                                     param_hint="--profile")
        sla_profile = WorkerProfile.load(profile)

    def make_policy():  # one per model: policies keep state (EWMAs, forecasts)
        if sla_profile is not None:
            return SlaPolicy(sla_profile, SlaTargets(
                ttft_s=ttft_target_ms / 1e3, itl_s=itl_target_ms / 1e3, max_utilization=max_utilization,
                drain_window_s=drain_window))
        if policy == "load":
            return LoadPolicy(LoadThresholds(
                decode_queue_up=decode_queue_up, decode_queue_down=decode_queue_down, kv_up=kv_up, kv_down=kv_down,
                prefill_queue_up=prefill_queue_up, prefill_queue_down=prefill_queue_down))
        return HoldPolicy()

    def make_connector(for_model: str):
        if connector == "local":
            from shared.engines import EngineConfig
            from shared.engines.cpu_threads import shared_threads_env

            # One engine config for every worker of this model; "" / 0 options stay the workers' own defaults.
            given = {"engine": engine, "speedup": mocker_speedup, "num_blocks": num_blocks, "model": for_model,
                     "max_num_seqs": max_num_seqs, "max_batched_tokens": max_batched_tokens}
            fields = ("engine", "speedup", "num_blocks", *(f for f in ("model", "max_num_seqs", "max_batched_tokens")
                                                           if given[f]))
            # The most engine processes this planner runs on this host at once (every model's maximum
            # fleet) share its CPUs (shared/engines/cpu_threads.py).
            most = sum(hi for m in (models or [""]) for _, hi in settings.limits_for(m).values())
            return LocalProcessConnector(LocalWorkerSettings(
                nats_url=nats_url, engine=EngineConfig(**{f: given[f] for f in fields}), engine_fields=fields,
                discovery_ttl=discovery_ttl, log_level=log_level, log_dir=worker_log_dir,
                extra_args=shlex.split(worker_args), env=shared_threads_env(most, engine),
                stop_timeout=worker_stop_timeout))
        if connector == "compose":
            return DockerComposeConnector(ComposeSettings(file=compose_file, project=compose_project))
        if connector == "kubernetes":
            return KubernetesConnector(KubernetesSettings(
                deployments={"decode": k8s_decode_deployment, "prefill": k8s_prefill_deployment},
                namespace=k8s_namespace, api_server=k8s_api_server))
        return NullConnector()

    initial = None
    if initial_decode is not None or initial_prefill is not None:
        initial = {"decode": min_decode if initial_decode is None else initial_decode,
                   "prefill": min_prefill if initial_prefill is None else initial_prefill}
    settings = PlannerSettings(
        nats_url=nats_url, interval=interval, discovery_ttl=discovery_ttl, metrics_port=metrics_port,
        limits={"decode": (min_decode, max_decode), "prefill": (min_prefill, max_prefill)}, initial=initial,
        damping=Damping(up_intervals=up_intervals, down_intervals=down_intervals, up_cooldown=up_cooldown,
                        down_cooldown=down_cooldown, startup_grace=startup_grace),
        dry_run=dry_run, model_limits=per_model,
    )
    if len(models) <= 1:  # one model (or whatever the workers serve): one pool counting every worker
        planner = Planner(settings, make_policy(), make_connector(models[0] if models else ""))
    else:
        pools = []
        for m in models:
            limits = settings.limits_for(m)
            pools.append(ModelPool(m, make_policy(), make_connector(m), Stabilizer(limits, settings.damping),  # type: ignore[arg-type]
                                   limits))
        planner = Planner(settings, pools=pools)
    # Draining the planner drains its local workers too: by default, give them their stop timeout.
    run_service(planner, "planner", log_level, drain_timeout or worker_stop_timeout + 5, log_format)


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command()(main)
