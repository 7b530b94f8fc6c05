"""Network helpers shared by the servers (the web app, the API, the review page)."""

from __future__ import annotations

import errno
import ipaddress
import socket

from skingpt4.errors import InputError


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps a server on this machine (a host name other than localhost may be anywhere)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, missing: str | None, risk: str) -> str | None:
    """The one warning every server prints when it listens beyond this machine with no password.

    `missing` names the protection that was not set (None: it is set, or the server has none to set), `risk` says
    what anyone who can reach it may then do. None on loopback, or when the protection is set.
    """
    if is_loopback(host) or missing == "":
        return None
    without = f" without {missing}" if missing else ""
    return f"warning: listening on {host}, beyond this machine,{without}: anyone who can reach it can {risk}"


def check_port(host: str, port: int) -> None:
    """Refuse a port that is taken, in one line, before a server loads its model (minutes for 13B): bound and let go
    at once, as the server will bind it (with SO_REUSEADDR, so a port in TIME_WAIT is not called busy)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise InputError(f"--host {host}: not an address or a name this machine can resolve") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                reason = "is in use" if exc.errno == errno.EADDRINUSE else "needs privileges"
                raise InputError(f"port {port} on {host} {reason}; choose another with --port") from None
            raise InputError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
