"""Network helpers shared by the servers (the web app, the API, the review page)."""

from __future__ import annotations

import ipaddress


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
