"""Where the gRPC server may listen: loopback by default, anything else only when asked for.

A backend serves whoever can reach its port, so binding beyond this machine needs --allow-remote, logs
a warning, and — unless --insecure forces it — a bearer token (LOCALAI_GRPC_AUTH_TOKEN).
"""

from __future__ import annotations

import ipaddress
import logging
import socket

from gallery.errors import UsageError

log = logging.getLogger("runtime")


def split_address(address: str, flag: str = "--addr") -> tuple[str, int]:
    """HOST:PORT (or [IPv6]:PORT) into its parts. Raises UsageError naming the flag."""
    text = address.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"{flag} {address!r}: expected HOST:PORT, e.g. 127.0.0.1:50051")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether every address the host name stands for is a loopback address."""
    if host in ("", "*", "0.0.0.0", "::", "[::]"):
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    addresses = {str(info[4][0]) for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def check_bind(
    address: str,
    *,
    allow_remote: bool,
    insecure: bool,
    token: str | None,
    flag: str = "--addr",
    token_source: str = "LOCALAI_GRPC_AUTH_TOKEN",
) -> tuple[str, int]:
    """Enforce the binding policy; returns (host, port). Raises UsageError with what to do instead."""
    host, port = split_address(address, flag)
    if is_loopback(host):
        return host, port
    if not allow_remote:
        raise UsageError(
            f"{flag} {address}: not a loopback address; pass --allow-remote to serve other machines"
        )
    if not token and not insecure:
        raise UsageError(
            f"{flag} {address}: serving other machines without {token_source}; set a token, "
            "or pass --insecure to allow unauthenticated access"
        )
    log.warning(
        "listening on %s, reachable from other machines%s",
        address,
        "" if token else " WITHOUT authentication (--insecure)",
    )
    return host, port
