"""The ``baton`` command: ``baton up``, ``baton model``, and one subcommand per service."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from services.decode.cli import main as decode_main
from services.frontend.cli import main as frontend_main
from services.planner.cli import main as planner_main
from services.planner.profile import main as profile_main
from services.prefill.cli import main as prefill_main
from services.router.cli import main as router_main

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True, help="Baton: distributed LLM inference serving.")
app.command("frontend")(frontend_main)
app.command("router")(router_main)
app.command("decode")(decode_main)
app.command("prefill")(prefill_main)
app.command("planner")(planner_main)
app.command("profile")(profile_main)

model_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True, help="Built-in models.")
app.add_typer(model_app, name="model")
auth_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                       help="NATS identities (one per role) for a NATS server you run yourself (compose).")
app.add_typer(auth_app, name="auth")


@auth_app.command("init")
def auth_init(
    directory: Annotated[Path, typer.Argument(help="Where to write nats-auth.conf and <role>.creds (0600).")],
    grafana: Annotated[bool, typer.Option(help="Also write grafana-admin-password (compose observability).")] = True,
    per_role_dirs: Annotated[bool, typer.Option(
        "--per-role-dirs", help="Write each role's file as <role>/<role>.creds, so each container can mount "
        "only its own role's directory.")] = False,
    cluster_routes: Annotated[str, typer.Option(
        help="Also write cluster.conf for a NATS cluster: nats-auth.conf plus a cluster block whose routes "
        "authenticate with a route password made once (route-password). Every member's route URL, "
        "comma-separated (nats://host:6222,...).")] = "",
) -> None:
    """Write a nats-server authorization config and one credentials file per role; existing files are kept
    (delete a role's file and re-run to rotate it, then restart NATS and that role)."""
    from shared import nats_auth

    ids = nats_auth.generate(directory, per_role_dirs=per_role_dirs)
    if grafana:
        nats_auth.ensure_secret_file(directory / "grafana-admin-password")
    files = ", ".join(str(p.relative_to(ids.directory)) for p in ids.creds.values())
    if cluster_routes:
        try:
            nats_auth.cluster_config(directory, cluster_routes.split(","))
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--cluster-routes") from None
        files += ", cluster.conf, route-password"
    print(f"wrote {ids.server_config} and {files} under {ids.directory}")


@app.command()
def up(
    nats_url: Annotated[
        str | None, typer.Option(envvar="BATON_NATS_URL", help="Use this NATS server (several of a cluster "
                                 "comma-separated) instead of an embedded one.")
    ] = None,
    nats_port: Annotated[int, typer.Option(help="Port of the embedded nats-server (the first, with --nats-cluster).")] = 4222,
    nats_cluster: Annotated[int, typer.Option(
        min=1, max=7, help="Embedded NATS servers, clustered on loopback (3: survives losing one).")] = 1,
    js_replicas: Annotated[int | None, typer.Option(
        min=1, max=5, envvar="BATON_JS_REPLICAS",
        help="Replicas of every JetStream stream and bucket (default 1; min(3, --nats-cluster) with a cluster).")] = None,
    data_dir: Annotated[
        str | None, typer.Option(help="JetStream store of the embedded server (default: a temporary directory).")
    ] = None,
    host: Annotated[str, typer.Option(envvar="BATON_HOST", help="HTTP bind address.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(envvar="BATON_PORT", help="HTTP port.")] = 8000,
    model: Annotated[
        list[str] | None, typer.Option(envvar="BATON_MODEL",
                                       help="Built-in model (baton-tiny, baton-small, baton-tiny-b) or a HF model "
                                            "directory; repeat it to serve several models behind one frontend "
                                            "(workers for each).")
    ] = None,
    engine: Annotated[str, typer.Option(envvar="BATON_ENGINE", help="torch, mocker or vllm.")] = "torch",
    decode_workers: Annotated[int, typer.Option(min=1, help="Decode worker processes.")] = 1,
    prefill_workers: Annotated[int, typer.Option(min=0, help="Prefill worker processes.")] = 1,
    routers: Annotated[int, typer.Option(min=1, help="Router replicas.")] = 1,
    router_mode: Annotated[str, typer.Option(envvar="BATON_ROUTER_MODE", help="kv, kv-approx, round-robin or random.")] = "round-robin",
    router: Annotated[str, typer.Option(
        envvar="BATON_FRONTEND_ROUTER",
        help="service: a router service (--routers replicas); embedded: the router runs inside the frontend "
             "(no route hop, no router service).")] = "service",
    mocker_speedup: Annotated[float, typer.Option(help="Mocker engine: divide simulated costs by this.")] = 1.0,
    num_blocks: Annotated[int, typer.Option(help="KV pool size per worker in blocks (0: engine default).")] = 0,
    discovery_ttl: Annotated[float, typer.Option(help="Seconds after which a silent worker is gone.")] = 6.0,
    log_dir: Annotated[str | None, typer.Option(help="Write each service's log to a file here.")] = None,
    log_level: Annotated[str, typer.Option(envvar="BATON_LOG_LEVEL", help="Log level of the services.")] = "info",
    log_format: Annotated[str, typer.Option(envvar="BATON_LOG_FORMAT",
                                            help="Services' log format: text, or json (one object a line).")] = "text",
    access_log: Annotated[bool, typer.Option(envvar="BATON_ACCESS_LOG",
                                             help="The frontend logs one line per HTTP request.")] = False,
    drain_timeout: Annotated[float, typer.Option(envvar="BATON_DRAIN_TIMEOUT",
                                                 help="On Ctrl-C, seconds each service may finish in-flight work.")] = 30.0,
    nats_connect_timeout: Annotated[float, typer.Option(
        envvar="BATON_NATS_CONNECT_TIMEOUT", help="With --nats-url: seconds it may take to answer.")] = 10.0,
    ready_timeout: Annotated[float, typer.Option(help="Seconds to wait for /health to be ready.")] = 180.0,
    planner_connector: Annotated[str, typer.Option(
        help="local: the planner starts/stops the workers; none: a fixed fleet, the planner only observes.")] = "local",
    planner_policy: Annotated[str, typer.Option(help="Planner policy: load, sla or none.")] = "load",
    planner_interval: Annotated[float, typer.Option(help="Seconds between planner decisions.")] = 2.0,
    planner_dry_run: Annotated[bool, typer.Option(help="The planner decides and reports, never acts.")] = False,
    min_decode_workers: Annotated[int | None, typer.Option(help="Planner: fewest decode workers.")] = None,
    max_decode_workers: Annotated[int | None, typer.Option(
        help="Planner: most decode workers (default --decode-workers: no autoscaling).")] = None,
    min_prefill_workers: Annotated[int | None, typer.Option(help="Planner: fewest prefill workers.")] = None,
    max_prefill_workers: Annotated[int | None, typer.Option(help="Planner: most prefill workers.")] = None,
    planner_args: Annotated[str, typer.Option(
        help="More planner options, one string (e.g. '--profile p.json --ttft-target-ms 300').")] = "",
    insecure_no_auth: Annotated[bool, typer.Option(
        "--insecure-no-auth", help="Development only: the embedded NATS server without authentication "
                                   "(anyone who reaches it may read prompts and impersonate workers).")] = False,
) -> None:
    """Start the whole stack on this machine: embedded NATS plus the five services."""
    import shlex

    from baton.up import UpSettings, run_up
    from shared.telemetry import LOG_FORMATS

    if router not in ("service", "embedded"):
        raise typer.BadParameter("choose one of service, embedded", param_hint="--router")
    if log_format not in LOG_FORMATS:
        raise typer.BadParameter(f"choose one of {', '.join(LOG_FORMATS)}", param_hint="--log-format")

    models = list(dict.fromkeys(m.strip() for item in (model or ["baton-tiny"]) for m in item.split(",") if m.strip()))
    run_up(UpSettings(
        nats_url=nats_url, nats_port=nats_port, nats_cluster=nats_cluster, js_replicas=js_replicas, data_dir=data_dir,
        host=host, port=port, model=models[0], more_models=models[1:], engine=engine, decode_workers=decode_workers,
        prefill_workers=prefill_workers, routers=routers, router_mode=router_mode, router=router,
        mocker_speedup=mocker_speedup, num_blocks=num_blocks, discovery_ttl=discovery_ttl, log_dir=log_dir,
        log_level=log_level, log_format=log_format, access_log=access_log, drain_timeout=drain_timeout,
        nats_connect_timeout=nats_connect_timeout, ready_timeout=ready_timeout, planner_connector=planner_connector,
        planner_policy=planner_policy, planner_interval=planner_interval, planner_dry_run=planner_dry_run,
        min_decode_workers=min_decode_workers, max_decode_workers=max_decode_workers,
        min_prefill_workers=min_prefill_workers, max_prefill_workers=max_prefill_workers,
        planner_args=shlex.split(planner_args), insecure_no_auth=insecure_no_auth,
    ))


@model_app.command("build")
def model_build(
    name: Annotated[str, typer.Argument(help="baton-tiny, baton-small or baton-tiny-b.")] = "baton-tiny",
    out: Annotated[str | None, typer.Option(help="Write here instead of the cache directory.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar (there is none off a terminal).")] = False,
) -> None:
    """Build a built-in model offline (seeded weights, locally trained tokenizer); prints its directory."""
    from pathlib import Path

    from shared.builtin_model import BUILTIN_MODELS, build, build_steps, ensure_builtin
    from shared.progress import progress

    if name not in BUILTIN_MODELS:
        raise typer.BadParameter(f"choose one of {', '.join(BUILTIN_MODELS)}", param_hint="NAME")
    with progress(f"building {name}", build_steps(name), quiet=quiet) as bar:
        path = build(name, Path(out), bar.step) if out else ensure_builtin(name, bar.step)
    typer.echo(str(path))


@model_app.command("build-lora")
def model_build_lora(
    name: Annotated[str, typer.Option(help="Adapter name (also its directory's name).")],
    base: Annotated[str, typer.Option(help="The built-in base model it adapts.")] = "baton-tiny",
    rank: Annotated[int, typer.Option(min=1, help="LoRA rank r.")] = 8,
    alpha: Annotated[float | None, typer.Option(help="lora_alpha (default 2 * rank).")] = None,
    targets: Annotated[str, typer.Option(help="Comma-separated target modules (q_proj,k_proj,v_proj,o_proj,"
                                               "gate_proj,up_proj,down_proj).")] = "q_proj,v_proj",
    seed: Annotated[int | None, typer.Option(help="Weights' seed (default: derived from base and name).")] = None,
    rslora: Annotated[bool, typer.Option("--rslora", help="Scale by alpha/sqrt(r) (use_rslora).")] = False,
    out: Annotated[str | None, typer.Option(help="Write here instead of <cache>/loras/<name>.")] = None,
) -> None:
    """Build a seeded LoRA adapter for a built-in model offline, in PEFT's format; prints its directory."""
    from pathlib import Path

    from shared.builtin_model import BUILTIN_MODELS, build_lora, lora_path

    if base not in BUILTIN_MODELS:
        raise typer.BadParameter(f"choose one of {', '.join(BUILTIN_MODELS)}", param_hint="--base")
    if not name or "/" in name or name.startswith("."):
        raise typer.BadParameter("a plain name: no '/', not starting with '.'", param_hint="--name")
    target_list = [t.strip() for t in targets.split(",") if t.strip()]
    path = Path(out) if out else lora_path(name)
    try:
        build_lora(base, path, rank=rank, alpha=alpha, targets=target_list, seed=seed, use_rslora=rslora)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--targets") from e
    typer.echo(str(path))


@model_app.command("list")
def model_list() -> None:
    """List the built-in models and where they are cached."""
    from shared.builtin_model import BUILTIN_MODELS, builtin_path

    for name, spec in BUILTIN_MODELS.items():
        path = builtin_path(name)
        state = "built" if (path / "baton_builtin.json").exists() else "not built"
        typer.echo(f"{name}\t{spec.num_layers} layers, hidden {spec.hidden_size}\t{state}\t{path}")


if __name__ == "__main__":
    app()
