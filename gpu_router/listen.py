"""The ``listen:`` address of the daemon's HTTP API: parsing and the loopback rule.

Pure functions, no I/O: config validation calls them, and so do the listener and ``gpu-router status``.
"""

from __future__ import annotations

import ipaddress

DEFAULT_PORT = 9464  # the example port in the docs; nothing listens unless listen: is set


def parse_listen(text: str) -> tuple[str, int]:
    """``"host:port"`` -> ``(host, port)``; ``[v6]:port`` for IPv6. Raises ValueError with a message.

    The host is required (an empty one would mean every interface, which must be written out as
    ``0.0.0.0`` so that nobody exposes the API by accident); the port is 1-65535.
    """
    s = text.strip()
    if not s:
        raise ValueError("empty address; write host:port, e.g. 127.0.0.1:9464")
    if s.startswith("["):
        end = s.find("]")
        if end < 0 or not s[end + 1 :].startswith(":"):
            raise ValueError(f"{text!r}: an IPv6 address is written [addr]:port")
        host, port_text = s[1:end], s[end + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = s.rpartition(":")
        if not sep:
            raise ValueError(f"{text!r}: missing port; write host:port, e.g. 127.0.0.1:{DEFAULT_PORT}")
        if ":" in host:
            raise ValueError(f"{text!r}: an IPv6 address is written [addr]:port")
    if not host:
        raise ValueError(f"{text!r}: missing host; write 127.0.0.1:PORT, or 0.0.0.0:PORT for every interface")
    if any(c.isspace() for c in host) or "/" in host:
        raise ValueError(f"{text!r}: {host!r} is not a host name or address")
    if not port_text.isdigit():
        raise ValueError(f"{text!r}: port {port_text!r} is not a number")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"{text!r}: port {port} is not in 1-65535")
    return host, port


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and addresses in 127.0.0.0/8 or ``::1``; a name is never assumed local."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen_problem(listen: str | None, api_token: str | None) -> str | None:
    """Why this ``listen``/``api_token`` pair must be refused, or None when it is fine.

    A non-loopback address without a token would let anyone on the network read the cluster's
    layout (and trigger reconciles), so config validation refuses it.
    """
    if listen is None:
        return None
    try:
        host, _ = parse_listen(listen)
    except ValueError as exc:
        return str(exc)
    if not is_loopback(host) and not api_token:
        return f"{host} is not a loopback address: set api_token too, or listen on 127.0.0.1"
    return None


def client_host(host: str) -> str:
    """The host a client on this machine connects to: a wildcard listener is reached on loopback."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def url_host(host: str) -> str:
    """``host`` as it goes in a URL for a local client (IPv6 in brackets)."""
    h = client_host(host)
    return f"[{h}]" if ":" in h else h
