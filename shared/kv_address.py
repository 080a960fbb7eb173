"""Which address a worker's KV transport binds, and which it advertises to its peers.

They differ in containers: a decode worker binds 0.0.0.0 but its peers must dial a name they can
resolve. Compose sets ``BATON_KV_HOST`` to the worker's service name (``decode``); Helm to the
pod IP. A service name scaled to several replicas resolves to several addresses, one of them
ours: then the worker advertises its own address among them, so a prefill worker reaches *this*
replica and not a random one (``docker compose up --scale decode=3``).
"""

from __future__ import annotations

import ipaddress
import logging
import socket

log = logging.getLogger("baton.kv_address")

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def bind_host_for(advertised: str, bind: str = "") -> str:
    """The address to listen on: ``bind`` if given; loopback for a loopback advertisement (the
    default, a single machine: nothing else may connect); else every interface."""
    if bind:
        return bind
    return "127.0.0.1" if advertised in LOOPBACK_NAMES else "0.0.0.0"


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def _is_local(ip: str) -> bool:
    """Can we bind this address (it is one of this host's)?"""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((ip, 0))
            return True
        except OSError:
            return False


def advertised_host(name: str) -> str:
    """``name`` itself, unless it resolves to several addresses (a scaled service): then ours."""
    if _is_ip(name) or name in LOOPBACK_NAMES:
        return name
    try:
        addresses = sorted({info[4][0] for info in socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)})
    except OSError as e:
        log.warning("KV host %r does not resolve here (%s); advertising it as given", name, e)
        return name
    if len(addresses) <= 1:
        return name
    own = [ip for ip in addresses if _is_local(ip)]
    if own:
        log.info("KV host %r names %d replicas; advertising this one's address %s", name, len(addresses), own[0])
        return own[0]
    return name
