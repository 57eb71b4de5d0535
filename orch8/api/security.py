"""The secure default: a node without an API token listens on loopback only.

An unauthenticated workflow API on a public address lets anyone start, cancel and read
workflows, so start-up refuses it unless the operator says `--insecure` on purpose, and
then says so loudly in the log.
"""

from __future__ import annotations

import ipaddress
import logging

from orch8.errors import ConfigError

log = logging.getLogger("orch8.security")

LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


def bind_host(bind: str) -> str:
    """The host part of a hypercorn-style bind: `host:port`, `[v6]:port` or `unix:path`."""
    if bind.startswith("unix:") or bind.startswith("fd://"):
        return bind
    if bind.startswith("["):
        return bind[1:].partition("]")[0]
    host, separator, _port = bind.rpartition(":")
    return host if separator else bind


def is_loopback(bind: str) -> bool:
    """Whether only this machine can reach `bind` (a Unix socket counts as local)."""
    if bind.startswith("unix:"):
        return True
    host = bind_host(bind).lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name or wildcard we cannot prove is local


def check_bind(bind: str, token: str | None, insecure: bool) -> None:
    """Refuse a non-loopback bind without a token, unless `insecure`; warn when allowed."""
    if token or is_loopback(bind):
        return
    if not insecure:
        raise ConfigError(
            f"refusing to serve the API on {bind} without ORCH8_API_TOKEN: set a token, "
            "bind to 127.0.0.1, or pass --insecure to accept an unauthenticated API")
    log.warning("INSECURE: serving the API on %s with no ORCH8_API_TOKEN: anyone who can "
                "reach this address can start, cancel and read workflows", bind)
