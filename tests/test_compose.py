"""compose.yaml and the Dockerfile, checked without a Docker engine.

A real Compose implementation validates the file (`docker compose config -q`, else the
`docker-compose` v1 from Debian's package); our own CLI checks that every service's command and
BATON_* variable exists, so a renamed option breaks this test rather than a deployment.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from shared import nats_auth

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "compose.yaml"
CLUSTER_ENV = ROOT / "deploy" / "compose" / "cluster.env"
DOCKERFILE = ROOT / "Dockerfile"
BATON_SERVICES = {"frontend", "router", "decode", "prefill", "planner"}
SCALABLE = {"decode", "prefill"}

# safe_load resolves the file's YAML anchors and merge keys (<<), as Compose does.
COMPOSE = yaml.safe_load(COMPOSE_FILE.read_text())
SERVICES: dict[str, dict] = COMPOSE["services"]
# One-shot setup jobs (restart "no"): NATS identities, Grafana's generated password.
SETUP = {"nats-auth", "grafana-secret"}
# Compose services that run Baton (everything but NATS and setup jobs), keyed by name.
BATON = {name: svc for name, svc in SERVICES.items()
         if name != "nats" and name not in SETUP and not svc.get("profiles")}


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker:
        # The docker CLI exists without the compose plugin on some machines: ask, don't assume.
        try:
            probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=20)
        except subprocess.TimeoutExpired:
            probe = None
        if probe is not None and probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


@functools.cache
def _help(command: str) -> str:
    # Wide, plain output so rich neither wraps option names nor adds colour codes.
    env = {**os.environ, "COLUMNS": "250", "NO_COLOR": "1", "TERM": "dumb"}
    r = subprocess.run(
        [sys.executable, "-m", "baton", command, "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    assert r.returncode == 0, f"`baton {command} --help` exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def _options(command: list[str]) -> dict[str, str | None]:
    """--flag value pairs of a command line (value None for a flag followed by another flag)."""
    opts: dict[str, str | None] = {}
    args = [str(a) for a in command[1:]]
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            name, _, value = arg.partition("=")
            if not value and i + 1 < len(args) and not args[i + 1].startswith("--"):
                value = args[i + 1]
            opts[name] = value or None
    return opts


def _environment(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):  # the "KEY=value" list form
        env = dict(item.partition("=")[::2] for item in env)
    return {str(k): str(v) for k, v in env.items()}


def test_compose_file_is_valid_for_compose():
    cmd = _compose_command()
    if cmd is None:
        msg = (
            "no Compose implementation: neither `docker compose` nor `docker-compose` is installed "
            "(apt-get install -y docker-compose)"
        )
        if _in_ci():
            pytest.fail(msg + "; CI must install it")
        pytest.skip(msg)
    r = subprocess.run(
        [*cmd, "-f", str(COMPOSE_FILE), "config", "-q"], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert r.returncode == 0, f"{' '.join(cmd)} config -q rejected compose.yaml:\n{r.stdout}\n{r.stderr}"


def test_compose_is_the_whole_deployment():
    commands = {svc["command"][0] for svc in BATON.values()}
    assert commands >= BATON_SERVICES, f"services missing from compose.yaml: {BATON_SERVICES - commands}"
    nats = SERVICES["nats"]
    assert nats["image"].startswith("nats:")
    assert "-js" in nats["command"] or "--jetstream" in nats["command"], "NATS needs JetStream"
    for name, svc in BATON.items():
        assert svc.get("build"), f"{name}: built from our Dockerfile"
        assert svc["depends_on"]["nats"]["condition"] == "service_healthy", name
    for name, svc in _rendered()["services"].items():
        if name in BATON:  # by default: the one server, JetStream replicas 1
            assert _environment(svc).get("BATON_NATS_URL") == "nats://nats:4222", name
            assert _environment(svc).get("BATON_JS_REPLICAS") == "1", name


@pytest.mark.parametrize("name", sorted(BATON))
def test_command_and_env_are_real_cli(name: str):
    svc = BATON[name]
    command = svc["command"]
    assert isinstance(command, list), f"{name}: command as an exec-form list (ENTRYPOINT baton)"
    assert command[0] in BATON_SERVICES, f"{name}: {command[0]!r} is not a Baton service"
    help_text = _help(command[0])
    known_options = set(re.findall(r"--[a-z][a-z0-9-]*", help_text))
    for opt in _options(command):
        assert opt in known_options, f"{name}: `baton {command[0]}` has no option {opt}"
    known_env = set(re.findall(r"BATON_[A-Z0-9_]+", help_text))
    for var in _environment(svc):
        if var.startswith("BATON_"):
            assert var in known_env, f"{name}: `baton {command[0]}` reads no {var}"


@pytest.mark.parametrize("name", sorted(set(SERVICES) - SETUP))
def test_restart_policy_and_healthcheck(name: str):
    svc = SERVICES[name]
    assert svc.get("restart") in ("unless-stopped", "always", "on-failure"), f"{name}: restart policy"
    hc = svc.get("healthcheck") or {}
    assert hc.get("test") and not hc.get("disable"), f"{name}: healthcheck"
    if name in BATON:
        assert svc.get("stop_grace_period"), f"{name}: time to drain on SIGTERM"


@pytest.mark.parametrize("name", sorted(BATON))
def test_healthcheck_probes_the_port_the_service_serves(name: str):
    svc = BATON[name]
    opts = _options(svc["command"])
    probe = " ".join(map(str, svc["healthcheck"]["test"]))
    m = re.search(r"127\.0\.0\.1:(\d+)/health", probe)
    assert m, f"{name}: healthcheck should GET /health: {probe}"
    served = opts.get("--port") if svc["command"][0] == "frontend" else opts.get("--metrics-port")
    assert served == m.group(1), f"{name}: healthcheck probes port {m.group(1)}, service serves {served}"
    if svc["command"][0] == "frontend":
        targets = [
            str(p).rsplit(":", 1)[-1] if not isinstance(p, dict) else str(p["target"])
            for p in svc.get("ports", [])
        ]
        assert served in targets, f"{name}: HTTP port {served} is not published"


@pytest.mark.parametrize("name", sorted(SCALABLE))
def test_workers_scale(name: str):
    svc = SERVICES[name]
    # Anything fixed per container would collide under `docker compose up --scale decode=3`.
    assert "container_name" not in svc, name
    assert not svc.get("ports"), f"{name}: no host ports on a scalable service"
    assert "--worker-id" not in _options(svc["command"]) and "BATON_WORKER_ID" not in _environment(svc), name


def _init_option(script: str, option: str) -> str:
    """The value of ``option`` in the nats-auth job's ``baton auth init`` command line."""
    words = script.split("&&")[0].split()
    assert words[:3] == ["baton", "auth", "init"] and option in words, script
    return words[words.index(option) + 1]


def _server_config(svc: dict) -> str:
    """The config file a NATS service loads (``-c``), its default filled in where Compose did not render."""
    command = [str(a) for a in svc["command"]]
    return re.sub(r"\$\{BATON_COMPOSE_NATS_CONFIG:-([^}]*)\}", r"\1", command[command.index("-c") + 1])


def _mounts(svc: dict) -> dict[str, tuple[str, bool]]:
    """Named-volume mounts of a service: volume -> (path in the container, read-only)."""
    out = {}
    for spec in svc.get("volumes", []):
        if isinstance(spec, dict):  # the long form, as `docker compose config` renders it
            if spec.get("type", "volume") == "volume":
                out[spec["source"]] = (spec["target"], bool(spec.get("read_only")))
            continue
        source, target, *mode = str(spec).split(":")
        if not source.startswith((".", "/")):
            out[source] = (target, mode == ["ro"])
    return out


def test_each_service_mounts_only_its_own_role_and_nats_is_not_root(tmp_path):
    """Issue 15: a service's container holds its own role's credentials and no other's, read-only;
    NATS runs as a non-root uid that owns its config and data. The init job's layout is checked by
    running the real `baton auth init --per-role-dirs` and mapping each volume onto what it wrote."""
    init = SERVICES["nats-auth"]
    script = init["entrypoint"][-1]
    assert "--per-role-dirs" in script
    r = subprocess.run([sys.executable, "-m", "baton", "auth", "init", str(tmp_path), "--per-role-dirs",
                        "--no-grafana", "--cluster-routes", _init_option(script, "--cluster-routes")],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    init_mounts = {path: volume for volume, (path, _) in _mounts(init).items()}
    top = init_mounts.pop("/etc/baton/nats-auth")
    init_mounts.pop("/data")
    creds_volumes: dict[str, str] = {}
    for name, svc in BATON.items():
        role = svc["command"][0]
        mounts = _mounts(svc)
        assert top not in mounts and "nats-data" not in mounts, (name, "server config / data mounted")
        assert len(mounts) == 1, (name, mounts)
        (volume, (target, read_only)), = mounts.items()
        assert read_only, name
        creds = Path(_environment(svc)["BATON_NATS_CREDS"])
        assert creds.parent == Path(target), name
        # The init job fills this volume from the same directory, and that directory holds this role only.
        assert init_mounts.get(target) == volume, (name, init_mounts)
        written = tmp_path / creds.relative_to("/etc/baton/nats-auth").parent
        assert sorted(p.name for p in written.iterdir()) == [f"{role}.creds"], name
        assert (written / f"{role}.creds").stat().st_mode & 0o077 == 0
        assert nats_auth.read_credentials(written / f"{role}.creds").user == role, name
        assert "$$r; done" in script and role in script.split("for r in", 1)[1], (name, "not chowned")
        creds_volumes[volume] = name
    assert len(creds_volumes) == len(BATON), "a credentials volume shared by two services"
    for name, svc in SERVICES.items():
        if name != "nats-auth":
            shared = set(_mounts(svc)) & set(creds_volumes)
            assert not shared or (name in BATON and len(shared) == 1), (name, shared)
    nats = SERVICES["nats"]
    uid = str(nats.get("user", "0")).split(":")[0]
    assert uid not in ("0", "root"), "NATS runs as root"
    assert f"chown {uid}:" in script and "/data" in script, "NATS's uid must own its config and data"
    assert _mounts(nats)[top] == ("/etc/baton/nats-auth", True)
    assert (tmp_path / "nats-auth.conf").is_file()
    # The cluster's config and route password: private, NATS's, in the volume only NATS mounts.
    owned = script.split(f"chown {uid}:", 1)[1].split("&&")[0]
    for name in ("nats-auth.conf", "cluster.conf", "route-password"):
        assert (tmp_path / name).stat().st_mode & 0o077 == 0, name
        assert f"/etc/baton/nats-auth/{name}" in owned, (name, "not NATS's")


def test_nats_auth_on_and_ports_on_this_host_only():
    """Issue 15: per-role NATS identities made once by `baton auth init`; NATS loads them; each service
    presents its own role's file; published ports bind 127.0.0.1; Grafana has no anonymous access."""
    init = SERVICES["nats-auth"]
    assert init["restart"] == "no" and "auth init /etc/baton/nats-auth" in " ".join(init["entrypoint"])
    nats = SERVICES["nats"]
    assert nats["depends_on"]["nats-auth"]["condition"] == "service_completed_successfully"
    assert _server_config(_rendered()["services"]["nats"]) == "/etc/baton/nats-auth/nats-auth.conf"
    assert not nats.get("ports"), "NATS is not published"
    for name, svc in BATON.items():
        role = svc["command"][0]
        assert _environment(svc)["BATON_NATS_CREDS"] == f"/etc/baton/nats-auth/{role}/{role}.creds", name
    for name, svc in SERVICES.items():
        for port in svc.get("ports", []):
            assert str(port).startswith(("127.0.0.1:", "${BATON_HTTP_BIND:-127.0.0.1}:")), (name, port)
    grafana = _environment(SERVICES["grafana"])
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert "GF_SECURITY_ADMIN_PASSWORD" not in grafana and grafana["GF_SECURITY_ADMIN_PASSWORD__FILE"]
    assert SERVICES["grafana"]["depends_on"]["grafana-secret"]["condition"] == "service_completed_successfully"


def test_dockerfile_entrypoint_is_baton():
    text = DOCKERFILE.read_text()
    entrypoints = re.findall(r"^ENTRYPOINT\s+(.+)$", text, re.M)
    assert entrypoints, "Dockerfile has no ENTRYPOINT"
    assert json.loads(entrypoints[-1]) == ["baton"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts.get("baton") == "baton.cli:app", "ENTRYPOINT relies on the `baton` console script"
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image runs as a non-root user"
    assert "baton model build" in text, "the built-in model is baked in, so containers need no network"


@functools.cache
def _rendered(env_file: Path | None = None, *profiles: str) -> dict:
    """compose.yaml as Compose renders it (`config`), else as YAML resolves it (anchors, merges;
    then without ``env_file``'s variables, so only for the defaults)."""
    cmd = _compose_command()
    if cmd is None:
        if _in_ci() or env_file is not None:
            pytest.fail("no Compose implementation (docker compose / docker-compose) to render compose.yaml")
        return COMPOSE
    args = [*cmd, "-f", str(COMPOSE_FILE)]
    if env_file is not None:
        args += ["--env-file", str(env_file)]
    for profile in profiles:
        args += ["--profile", profile]
    r = subprocess.run([*args, "config"], capture_output=True, text=True, cwd=ROOT, timeout=60,
                       env={k: v for k, v in os.environ.items() if not k.startswith(("BATON_", "COMPOSE_"))})
    assert r.returncode == 0, r.stderr
    return yaml.safe_load(r.stdout)


@pytest.mark.parametrize("name", sorted(SCALABLE))
def test_worker_advertises_a_kv_address_its_peers_resolve(name: str):
    """Disaggregation under compose: a prefill worker dials the KV address a decode worker
    advertises. It must be a compose service name (resolvable on the compose network), the
    worker's own, and the transport must then bind every interface, not loopback."""
    from shared.kv_address import bind_host_for

    services = _rendered()["services"]
    env = services[name].get("environment") or {}
    if isinstance(env, list):  # docker-compose v1 may render KEY=VALUE lists
        env = dict(item.split("=", 1) for item in env)
    advertised = env.get("BATON_KV_HOST")
    assert advertised, f"{name} sets no BATON_KV_HOST: peers would dial 127.0.0.1"
    assert advertised in services, f"{name} advertises {advertised!r}, not a compose service name"
    assert advertised == name, f"{name} advertises another service's name ({advertised!r})"
    assert bind_host_for(advertised, env.get("BATON_KV_BIND_HOST", "")) == "0.0.0.0"
    # and the option is real: the worker CLI reads BATON_KV_HOST / BATON_KV_BIND_HOST
    assert "BATON_KV_HOST" in _help(name) and "BATON_KV_BIND_HOST" in _help(name)


# --- the cluster profile: NATS as a 3-server JetStream cluster (issue 17) ------------------------

NATS_SERVERS = ("nats", "nats-2", "nats-3")


def _nats_options(svc: dict) -> dict[str, str | None]:
    return _options(["nats-server", *svc["command"]])


def test_nats_alone_by_default_and_the_other_two_only_in_the_cluster_profile():
    services = _rendered()["services"]
    alone = _nats_options(services["nats"])
    assert not {"--cluster", "--routes"} & set(alone), "one server: no routes (JetStream standalone)"
    assert _server_config(services["nats"]) == "/etc/baton/nats-auth/nats-auth.conf", "no cluster block"
    assert "-js" in services["nats"]["command"]
    for name in NATS_SERVERS[1:]:
        assert SERVICES[name]["profiles"] == ["cluster"], name
    for name, svc in SERVICES.items():
        if name in BATON:  # the services need only `nats` to start; they find the others through the URLs
            assert set(svc["depends_on"]) == {"nats"}, name


def test_cluster_profile_three_servers_and_every_service_on_all_three():
    env_file = dict(line.split("=", 1) for line in CLUSTER_ENV.read_text().splitlines()
                    if line and not line.startswith("#"))
    assert env_file["COMPOSE_PROFILES"] == "cluster"  # Compose v2 reads it from --env-file
    services = _rendered(CLUSTER_ENV, "cluster")["services"]
    routes = [f"nats://{n}:6222" for n in NATS_SERVERS]
    stores = set()
    for name in NATS_SERVERS:
        svc = services[name]
        opts = _nats_options(svc)
        assert "-js" in svc["command"], name
        assert opts["--server_name"] == name, name  # unique names
        # The cluster is in the config file (a cluster flag would override its route authorization).
        assert not {"--cluster", "--routes", "--cluster_name", "--cluster_listen"} & set(opts), name
        assert _server_config(svc) == "/etc/baton/nats-auth/cluster.conf", name
        assert svc["healthcheck"]["test"][-1] == "http://127.0.0.1:8222/healthz", name
        assert str(svc["user"]).split(":")[0] not in ("0", "root"), name
        assert not svc.get("ports"), name
        (store,) = [v for v, (target, _) in _mounts(svc).items() if target == svc["command"][svc["command"].index("-sd") + 1]]
        stores.add(store)
    assert len(stores) == 3, "each server its own JetStream store"
    # The init job owns every store for NATS's uid.
    init = SERVICES["nats-auth"]
    init_targets = {volume: target for volume, (target, _) in _mounts(init).items()}
    script = init["entrypoint"][-1]
    for store in stores:
        assert store in init_targets and init_targets[store] in script.split("chown 10100:10100", 1)[1].split("&&")[0]
    # cluster.conf: written by the init job (the real `baton auth init`, with the job's route list) to
    # every server's routes, one cluster, authenticated routes; and the rendered file holds no secret.
    assert _init_option(script, "--cluster-routes").split(",") == routes
    rendered = yaml.safe_dump(_rendered(CLUSTER_ENV, "cluster"))
    assert not re.search(r"nats://[^/\s]*@", rendered), "credentials in a rendered route URL"
    _check_cluster_config(routes)
    urls = ",".join(f"nats://{n}:4222" for n in NATS_SERVERS)
    for name in BATON:
        env = _environment(services[name])
        assert env["BATON_NATS_URL"] == urls, name
        assert env["BATON_JS_REPLICAS"] == "3", name


def _check_cluster_config(routes: list[str]) -> None:
    """What `baton auth init --cluster-routes` writes: the auth config included, the cluster block
    requiring the route password and presenting it on every route; nats-server accepts the file."""
    import tempfile

    from baton.nats_server import find_nats_server

    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-m", "baton", "auth", "init", tmp, "--no-grafana",
                            "--cluster-routes", ",".join(routes)], capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert r.returncode == 0, r.stderr
        password = (Path(tmp) / "route-password").read_text().strip()
        assert len(password) >= 32 and password not in r.stdout + r.stderr
        text = (Path(tmp) / "cluster.conf").read_text()
        assert 'include "nats-auth.conf"' in text and 'name: "baton"' in text and 'listen: "0.0.0.0:6222"' in text
        assert f'authorization {{ user: route, password: "{password}" }}' in text
        dialled = json.loads(re.search(r"routes: (\[.*\])", text).group(1))
        assert dialled == [u.replace("nats://", f"nats://route:{password}@") for u in routes]
        check = subprocess.run([find_nats_server(), "-t", "-c", str(Path(tmp) / "cluster.conf")],
                               capture_output=True, text=True, timeout=30)
        assert check.returncode == 0 and "valid" in check.stdout + check.stderr, check.stderr
        # Made once: a second run keeps the password (the servers' routes stay valid).
        r = subprocess.run([sys.executable, "-m", "baton", "auth", "init", tmp, "--no-grafana",
                            "--cluster-routes", ",".join(routes)], capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert r.returncode == 0 and (Path(tmp) / "route-password").read_text().strip() == password


def test_cluster_conf_routes_refuse_a_server_without_the_route_password(tmp_path):
    """cluster.conf as `baton auth init --cluster-routes` writes it, run as three real nats-servers on
    loopback (each its own copy, listening on its own route port): they route to each other; a fourth
    server with its own cluster.conf (another route password) is refused by all three, never joins."""
    import shutil as sh
    import urllib.request

    from baton.nats_server import find_nats_server, free_port
    from tests.procs import wait_until

    route_ports, client_ports, monitor_ports = ([free_port() for _ in range(4)] for _ in range(3))
    routes = [f"nats://127.0.0.1:{p}" for p in route_ports[:3]]
    nats_auth.generate(tmp_path / "auth")
    nats_auth.cluster_config(tmp_path / "auth", routes)  # the route password, made once
    procs = []
    try:
        for i in range(4):
            d = tmp_path / f"server-{i}"
            d.mkdir(mode=0o700)
            sh.copy(tmp_path / "auth" / "nats-auth.conf", d)
            if i < 3:  # a member: the cluster's password (as every server reads the one nats-auth volume)
                sh.copy(tmp_path / "auth" / "route-password", d)
            conf = nats_auth.cluster_config(d, routes, listen=f"127.0.0.1:{route_ports[i]}")
            procs.append(subprocess.Popen(
                [find_nats_server(), "-c", str(conf), "-a", "127.0.0.1", "-p", str(client_ports[i]),
                 "-m", str(monitor_ports[i]), "--server_name", f"nats-{i}"],
                stdout=open(d / "log", "wb"), stderr=subprocess.STDOUT))

        def peers(i: int) -> set[str] | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{monitor_ports[i]}/routez", timeout=1) as r:
                    return {route.get("remote_name") for route in json.loads(r.read())["routes"]}
            except OSError:
                return None

        def members_routed() -> bool:
            return all(peers(i) == {f"nats-{j}" for j in range(3) if j != i} for i in range(3))

        wait_until(members_routed, 20, 0.2, "the three servers routed to each other")
        wait_until(lambda: (tmp_path / "server-3" / "log").read_text(errors="replace").count(
            "Authorization Violation") >= 3, 15, 0.2, "all three refusing the fourth server's routes")
        assert members_routed() and peers(3) == set()
        password = (tmp_path / "auth" / "route-password").read_text().strip()
        assert not [i for i in range(4) if password in (tmp_path / f"server-{i}" / "log").read_text(errors="replace")]
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
