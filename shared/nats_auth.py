"""Who may do what on the bus: one NATS identity per role and its subject permissions, in one place.

Every role (the five services, an API client, and an operator's ``admin``) connects as its own NATS
user. The table below lists, per role, the subjects it may publish to and subscribe to, built from
the names in :mod:`shared.subjects`; anything not listed is refused by nats-server (the client sees
a "permissions violation" and the message goes nowhere). JetStream streams, KV and object buckets
are reached through ``$JS.API.*`` subjects named after the stream, so listing only the streams a
role uses keeps the others out of its reach; nobody but ``admin`` may delete a stream.

Replies: each service role gets its own inbox prefix (``_INBOX_<role>``), so a role can subscribe
to its own replies without being able to read anyone else's. Roles that answer requests may publish
to any inbox: a reply subject ends in a random token, so only who received the request can answer
it (and the operator's tools, using the standard prefix, can still ask a worker directly). API
clients keep NATS's standard ``_INBOX`` prefix, so any NATS client library works unchanged.

Passwords are random (32 bytes, URL-safe) and stored bcrypt-hashed in the server's config; each
role's password lives in its own credentials file (mode 0600)::

    # Baton NATS credentials (role decode). Keep private.
    user: decode
    password: ...
    inbox_prefix: _INBOX_decode

Services read it from ``--nats-creds`` / ``BATON_NATS_CREDS`` (a NATS ``.creds`` JWT file works too).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from shared import subjects

SERVICE_ROLES = ("frontend", "router", "decode", "prefill", "planner")
ROLES = (*SERVICE_ROLES, "client", "admin")
CLIENT_INBOX = "_INBOX"  # NATS's default, used by any client library


def inbox_prefix(role: str) -> str:
    """Where ``role`` receives replies: a prefix of its own, so no other role can read them."""
    return CLIENT_INBOX if role == "client" else f"_INBOX_{role}"


def _inbox(role: str) -> str:
    return f"{inbox_prefix(role)}.>"


def _replies() -> list[str]:
    """Where a role that answers requests may publish: any inbox. Reply subjects end in a random
    token, so only a role that received a request knows where to answer it; reading stays per role."""
    return [_inbox(r) for r in (*SERVICE_ROLES, "client")]


# --- JetStream building blocks ----------------------------------------------------------------
API = "$JS.API"


def _stream_owner(stream: str) -> list[str]:
    """Create it (idempotently: create, else update) and read its info. Never delete or purge.
    ``$JS.API.INFO`` (the account's limits) is read by nats-py before it creates a KV bucket."""
    return [f"{API}.INFO", f"{API}.STREAM.CREATE.{stream}", f"{API}.STREAM.UPDATE.{stream}", f"{API}.STREAM.INFO.{stream}"]


def _stream_reader(stream: str) -> list[str]:
    """Consume it: make/inspect/remove consumers, pull, ack, answer flow control, get messages."""
    return [
        f"{API}.STREAM.INFO.{stream}",
        f"{API}.CONSUMER.CREATE.{stream}", f"{API}.CONSUMER.CREATE.{stream}.>",
        f"{API}.CONSUMER.DURABLE.CREATE.{stream}.*",
        f"{API}.CONSUMER.INFO.{stream}.*", f"{API}.CONSUMER.DELETE.{stream}.*",
        f"{API}.CONSUMER.MSG.NEXT.{stream}.*",
        f"{API}.STREAM.MSG.GET.{stream}", f"{API}.DIRECT.GET.{stream}", f"{API}.DIRECT.GET.{stream}.>",
        f"$JS.ACK.{stream}.>", f"$JS.FC.{stream}.>",
    ]


def _consumer_watcher(stream: str, consumer: str) -> list[str]:
    """Only read one consumer's state (queue depth), e.g. for scaling decisions."""
    return [f"{API}.STREAM.INFO.{stream}", f"{API}.CONSUMER.INFO.{stream}.{consumer}"]


def _kv_stream(bucket: str) -> str:
    return f"KV_{bucket}"


def _kv_read(bucket: str) -> list[str]:
    return [*_stream_owner(_kv_stream(bucket)), *_stream_reader(_kv_stream(bucket))]


def _kv_write(bucket: str) -> list[str]:
    return [*_kv_read(bucket), f"$KV.{bucket}.>"]


def _object_reader(bucket: str) -> list[str]:
    """Read objects: nats-py's get() looks the chunks' stream up by subject (STREAM.NAMES, names only)."""
    return [*_stream_reader(f"OBJ_{bucket}"), f"{API}.STREAM.NAMES"]


def _object_store(bucket: str) -> list[str]:
    stream = f"OBJ_{bucket}"
    # Replacing an object purges its old chunks (a filtered purge of this bucket only).
    return [*_stream_owner(stream), *_object_reader(bucket), f"{API}.STREAM.PURGE.{stream}", f"$O.{bucket}.>"]


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]

    def to_nats(self) -> dict[str, dict[str, list[str]]]:
        return {"publish": {"allow": list(self.publish)}, "subscribe": {"allow": list(self.subscribe)}}


def _perms(publish: Iterable[str], subscribe: Iterable[str]) -> Permissions:
    return Permissions(tuple(dict.fromkeys(publish)), tuple(dict.fromkeys(subscribe)))


def _table() -> dict[str, Permissions]:
    s = subjects
    any_id = "*"  # worker ids are single tokens
    workers = _kv_read(s.WORKERS_BUCKET)  # discovery: everyone watches the fleet
    prefill_queue = [
        *_stream_owner(s.PREFILL_STREAM),
        f"{API}.CONSUMER.DURABLE.CREATE.{s.PREFILL_STREAM}.{s.PREFILL_CONSUMER}",
        f"{API}.CONSUMER.CREATE.{s.PREFILL_STREAM}.{s.PREFILL_CONSUMER}",
        f"{API}.CONSUMER.CREATE.{s.PREFILL_STREAM}.{s.PREFILL_CONSUMER}.>",
    ]  # ensure_prefill_queue: the stream and its one durable consumer
    # What keeps a router's index current: the KV-events stream, its snapshots, load reports, resyncs.
    routing_publish = [s.kv_resync(any_id), *_stream_owner(s.KV_EVENTS_STREAM), *_stream_reader(s.KV_EVENTS_STREAM),
                       *_object_store(s.ROUTER_SNAPSHOT_BUCKET)]
    return {
        # HTTP and NATS API in front; asks a router, streams from a decode worker, answers API clients.
        # It may also embed the router (--router embedded), so it may read what a router reads.
        "frontend": _perms(
            publish=[s.ROUTE, s.generate(any_id), s.cancel(any_id), s.status(any_id), s.lora(any_id), *_replies(),
                     *workers, *routing_publish, s.TRAFFIC, *_object_reader(s.MODEL_FILES_BUCKET)],
            subscribe=[s.API_GENERATE, s.API_LORA, s.LOAD_ALL, _inbox("frontend")],
        ),
        # Answers route requests; reads load reports and the KV-events stream; keeps index snapshots;
        # reports the traffic it placed to the planner.
        "router": _perms(
            publish=[*_replies(), *workers, *routing_publish, s.TRAFFIC],
            subscribe=[s.ROUTE, s.LOAD_ALL, _inbox("router")],
        ),
        # Serves generate/cancel/status/kv-fetch; publishes load and KV events; queues prefill jobs;
        # registers itself; reads the disaggregation switch.
        "decode": _perms(
            publish=[*_replies(), s.kv_events(any_id), s.load(any_id), s.kv_fetch(any_id),
                     s.PREFILL_JOBS, *prefill_queue, *_consumer_watcher(s.PREFILL_STREAM, s.PREFILL_CONSUMER),
                     *_kv_write(s.WORKERS_BUCKET), *_kv_read(s.CONFIG_BUCKET), *_object_store(s.MODEL_FILES_BUCKET)],
            subscribe=[s.generate(any_id), s.cancel(any_id), s.status(any_id), s.kv_resync(any_id),
                       s.kv_fetch(any_id), s.lora(any_id), _inbox("decode")],
        ),
        # Pulls prefill jobs and tells the waiting decode worker (its inbox) when the KV is there.
        "prefill": _perms(
            publish=[*_replies(), s.prefill_done(any_id), *prefill_queue, *_stream_reader(s.PREFILL_STREAM),
                     *_kv_write(s.WORKERS_BUCKET)],
            subscribe=[_inbox("prefill")],
        ),
        # Observes load, the routers' traffic reports and the prefill queue (no prompts: it does not
        # read generate requests); publishes its observations and decisions.
        "planner": _perms(
            publish=[s.PLANNER_OBSERVATIONS, s.PLANNER_DECISIONS, *prefill_queue,
                     *_consumer_watcher(s.PREFILL_STREAM, s.PREFILL_CONSUMER), *workers],
            subscribe=[s.LOAD_ALL, s.TRAFFIC, s.PREFILL_JOBS, _inbox("planner")],
        ),
        # The public request API only.
        "client": _perms(publish=[s.API_GENERATE, s.API_LORA], subscribe=[_inbox("client")]),
        # An operator's identity (debugging, the nats CLI, tests): everything. Given to no service.
        "admin": _perms(publish=[">"], subscribe=[">"]),
    }


PERMISSIONS: Mapping[str, Permissions] = _table()


# --- credentials --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str
    inbox_prefix: str = CLIENT_INBOX

    def connect_options(self) -> dict[str, str]:
        """Keyword arguments for ``nats.connect`` (e.g. ``NatsBatonClient(url, **creds.connect_options())``)."""
        return {"user": self.user, "password": self.password, "inbox_prefix": self.inbox_prefix}

    def render(self) -> str:
        return (f"# Baton NATS credentials (role {self.user}). Keep private.\n"
                f"user: {self.user}\npassword: {self.password}\ninbox_prefix: {self.inbox_prefix}\n")


class CredentialsError(ValueError):
    pass


def is_nats_jwt_creds(text: str) -> bool:
    return "BEGIN NATS USER JWT" in text


def parse_credentials(text: str, source: str = "credentials") -> Credentials:
    fields: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise CredentialsError(f"{source}: expected 'key: value' lines (user, password, inbox_prefix)")
        fields[key.strip()] = value.strip()
    if not fields.get("user") or not fields.get("password"):
        raise CredentialsError(f"{source}: needs both 'user:' and 'password:'")
    return Credentials(fields["user"], fields["password"], fields.get("inbox_prefix") or CLIENT_INBOX)


def read_credentials(path: str | Path) -> Credentials:
    p = Path(path)
    try:
        return parse_credentials(p.read_text(), str(p))
    except OSError as e:
        raise CredentialsError(f"cannot read NATS credentials file {p}: {e.strerror}") from None


def too_open(path: str | Path) -> bool:
    """True if group or others may read the file (as ssh refuses such keys, we warn)."""
    try:
        return bool(os.stat(path).st_mode & (stat.S_IRWXG | stat.S_IRWXO))
    except OSError:
        return False


def new_password() -> str:
    return secrets.token_urlsafe(32)


# bcrypt's cost protects guessable passwords; ours are 256-bit random secrets, which no cost
# factor changes. A high cost only makes every connection slow to verify: after a nats-server
# restart every client logs in again at once, and at cost 10 on a busy 2-core box that herd took
# seconds to clear (clients timing out and retrying, each retry another verification).
GENERATED_PASSWORD_BCRYPT_COST = 4  # bcrypt's minimum


def hash_password(password: str, rounds: int = GENERATED_PASSWORD_BCRYPT_COST) -> str:
    import bcrypt  # only the one writing a server config needs it

    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds)).decode()


def server_config(hashes: Mapping[str, str], roles: Iterable[str] = ROLES) -> str:
    """The ``authorization`` block of a nats-server config: one user per role, bcrypt password, permissions."""
    lines = ["# Generated by Baton (shared/nats_auth.py): one NATS user per role. Do not edit by hand.",
             "authorization {", "  users = ["]
    for role in roles:
        entry = {"user": role, "password": hashes[role], "permissions": PERMISSIONS[role].to_nats()}
        lines.append(f"    {json.dumps(entry)}")
    lines += ["  ]", "}", ""]
    return "\n".join(lines)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)  # also when the file already existed with wider bits


@dataclass(frozen=True)
class Identities:
    """What :func:`generate` wrote: the server config and one credentials file per role."""

    directory: Path
    server_config: Path
    creds: Mapping[str, Path]

    def credentials(self, role: str) -> Credentials:
        return read_credentials(self.creds[role])


def creds_path(directory: Path, role: str, per_role_dirs: bool = False) -> Path:
    """``<dir>/<role>.creds``, or ``<dir>/<role>/<role>.creds`` when each role gets its own directory."""
    return (directory / role if per_role_dirs else directory) / f"{role}.creds"


def generate(directory: str | Path, roles: Iterable[str] = ROLES, keep_existing: bool = True,
             per_role_dirs: bool = False) -> Identities:
    """Write ``nats-auth.conf`` and ``<role>.creds`` (0600) under ``directory`` (0700).

    With ``keep_existing``, a role whose credentials file is already there keeps its password (a
    restarted ``baton up`` leaves clients' files valid); delete the files to rotate.
    With ``per_role_dirs`` each file goes in its own ``<role>/`` directory (0700), so a deployment
    can mount one role's directory, and nothing else, into that role's container (compose).
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    roles = tuple(roles)
    creds: dict[str, Path] = {}
    hashes: dict[str, str] = {}
    for role in roles:
        path = creds_path(d, role, per_role_dirs)
        if per_role_dirs:
            path.parent.mkdir(exist_ok=True)
            os.chmod(path.parent, 0o700)
        current: Credentials | None = None
        if keep_existing and path.exists():
            try:
                current = read_credentials(path)
            except CredentialsError:
                current = None
        if current is None or current.user != role:
            current = Credentials(role, new_password(), inbox_prefix(role))
            _write_private(path, current.render())
        creds[role] = path
        hashes[role] = hash_password(current.password)
    conf = d / "nats-auth.conf"
    _write_private(conf, server_config(hashes, roles))
    return Identities(d, conf, creds)


def ensure_secret_file(path: Path) -> Path:
    """A random secret in ``path`` (0600), made once: e.g. Grafana's admin password for compose."""
    if not path.exists() or not path.read_text().strip():
        _write_private(path, new_password() + "\n")
    return path


ROUTE_USER = "route"


def cluster_config(directory: str | Path, routes: Sequence[str], name: str = "baton",
                   listen: str = "0.0.0.0:6222") -> Path:
    """Write ``<dir>/cluster.conf`` (0600): the auth config (``include nats-auth.conf``) plus a cluster
    block whose routes are authenticated. Each server requires the route password on its cluster
    listener and presents it on the routes it dials (``routes``: ``nats://host:port``, every member,
    its own included). The password is made once into ``<dir>/route-password`` (delete it to rotate,
    then restart every server); it is in these two private files only, never on a command line."""
    d = Path(directory)
    password = ensure_secret_file(d / "route-password").read_text().strip()
    if not re.fullmatch(r"[A-Za-z0-9._~-]+", password):  # it goes into route URLs as is
        raise ValueError(f"{d / 'route-password'}: use only letters, digits and -._~")
    dialled = []
    for url in routes:
        scheme, sep, address = url.strip().partition("://")
        if scheme != "nats" or not sep or not address or "@" in address or "/" in address:
            raise ValueError(f"a route is nats://host:port, without credentials: got {url!r}")
        dialled.append(json.dumps(f"nats://{ROUTE_USER}:{password}@{address}"))
    if not dialled:
        raise ValueError("no routes: a cluster needs its members' route URLs")
    conf = d / "cluster.conf"
    _write_private(conf, "\n".join([
        "# Generated by Baton (shared/nats_auth.py): the auth config plus the cluster with authenticated",
        "# routes. Keep private (it holds the route password). Do not edit by hand.",
        'include "nats-auth.conf"',
        "cluster {",
        f"  name: {json.dumps(name)}",
        f"  listen: {json.dumps(listen)}",
        f"  authorization {{ user: {ROUTE_USER}, password: {json.dumps(password)} }}",
        f"  routes: [{', '.join(dialled)}]",
        "}",
        ""]))
    return conf


def role_of(process_name: str) -> str:
    """``decode-0`` -> ``decode``: the role of one of ``baton up``'s processes."""
    return process_name.split("-", 1)[0]


def service_env(ids: Identities, role: str) -> dict[str, str]:
    """Environment giving a service process its role's credentials file (a path, never the secret).

    The planner also gets the workers' files, to hand them to the workers it starts (child_env).
    """
    env = {"BATON_NATS_CREDS": str(ids.creds[role])}
    if role == "planner":
        env |= {f"BATON_NATS_CREDS_{r.upper()}": str(ids.creds[r]) for r in ("decode", "prefill")}
    return env


def child_env(role: str, env: Mapping[str, str]) -> dict[str, str]:
    """``env`` for a worker process the planner starts: that role's credentials, not the planner's.

    ``baton up`` hands the planner ``BATON_NATS_CREDS_DECODE`` / ``BATON_NATS_CREDS_PREFILL`` (paths).
    """
    out = dict(env)
    role_creds = env.get(f"BATON_NATS_CREDS_{role.upper()}")
    if role_creds:
        out["BATON_NATS_CREDS"] = role_creds
    for r in ("DECODE", "PREFILL"):
        out.pop(f"BATON_NATS_CREDS_{r}", None)  # a worker needs no other role's file
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m shared.nats_auth init DIR`` writes identities; ``permissions`` prints the table as JSON."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["permissions"]:
        print(json.dumps({r: p.to_nats() for r, p in PERMISSIONS.items()}, indent=2))
        return 0
    if len(args) == 2 and args[0] == "init":
        ids = generate(args[1])
        print(f"wrote {ids.server_config} and {len(ids.creds)} credentials files under {ids.directory}")
        return 0
    print("usage: python -m shared.nats_auth init DIR | permissions", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
