"""Is a host name or address this machine? Decides whether NVML can describe a node's GPUs."""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import psutil

log = logging.getLogger(__name__)

DEFAULT_RESOLVE_TIMEOUT_S = 2.0
CACHE_TTL_S = 300.0  # addresses move (DHCP, new interfaces); do not trust an answer forever

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
T = TypeVar("T")

_cache_lock = threading.Lock()
_cache: dict[str, tuple[float, bool]] = {}


def clear_cache() -> None:
    """Forget cached answers (after a config reload, or in tests)."""
    with _cache_lock:
        _cache.clear()


def _parse_ip(text: str) -> IPAddress | None:
    try:
        addr = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone: fe80::1%eth0
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def local_addresses() -> set[IPAddress]:
    """Every IPv4/IPv6 address assigned to an interface of this machine."""
    found: set[IPAddress] = set()
    try:
        interfaces = psutil.net_if_addrs()
    except OSError as exc:
        log.debug("cannot list interface addresses: %s", exc)
        return found
    for addrs in interfaces.values():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                ip = _parse_ip(a.address)
                if ip is not None:
                    found.add(ip)
    return found


def _is_local_ip(ip: IPAddress, local: set[IPAddress]) -> bool:
    # 0.0.0.0 and :: reach this machine when connected to, like loopback.
    return ip.is_loopback or ip.is_unspecified or ip in local


def _run_bounded(func: Callable[[], T], timeout_s: float, what: str) -> T | None:
    """``func()`` in a daemon thread, or None if it raises OSError/UnicodeError or outlives ``timeout_s``.

    Name lookups have no timeout of their own; a slow one is abandoned rather than waited for.
    """
    result: list[T] = []

    def run() -> None:
        try:
            result.append(func())
        except (OSError, UnicodeError) as exc:
            log.debug("%s failed: %s", what, exc)

    worker = threading.Thread(target=run, name=what, daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        log.warning("%s took longer than %.1f s; giving up on it", what, timeout_s)
        return None
    return result[0] if result else None


def _resolve(host: str, timeout_s: float) -> list[IPAddress] | None:
    """Addresses of ``host``, or None on failure or after ``timeout_s``."""
    infos = _run_bounded(
        lambda: socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP), timeout_s, f"resolving {host}"
    )
    if infos is None:
        return None
    found = (_parse_ip(str(info[4][0])) for info in infos)
    return [ip for ip in found if ip is not None]


def _hostname() -> str:
    try:
        return socket.gethostname().lower().rstrip(".")
    except (OSError, UnicodeError) as exc:
        log.debug("cannot read this machine's host name: %s", exc)
        return ""


def _fqdn(timeout_s: float) -> str:
    # getfqdn() does a reverse lookup, which can hang like any other lookup.
    fqdn = _run_bounded(lambda: socket.getfqdn(), timeout_s, "looking up this machine's FQDN")
    return (fqdn or "").lower().rstrip(".")


def _decide(host: str, timeout_s: float) -> bool:
    ip = _parse_ip(host)
    if ip is not None:
        return _is_local_ip(ip, local_addresses())
    if host == "localhost" or host.endswith(".localhost") or host == _hostname():
        return True
    resolved = _resolve(host, timeout_s)
    if resolved:
        local = local_addresses()
        return any(_is_local_ip(a, local) for a in resolved)
    # This machine's FQDN normally resolves to one of its addresses; compare names only when DNS failed.
    return host == _fqdn(timeout_s)


def is_local_host(host: str, *, timeout_s: float = DEFAULT_RESOLVE_TIMEOUT_S) -> bool:
    """True when ``host`` (name or address, ``[v6]`` brackets allowed) is this machine.

    Loopback, ``localhost``, this machine's host name or FQDN, any address of a local interface, or a
    name that resolves to one. Never raises; blocks at most about twice ``timeout_s`` (a name lookup, then
    this machine's FQDN when that lookup failed). A name that cannot be resolved is remote. Answers are
    cached for :data:`CACHE_TTL_S`.
    """
    key = host.strip().strip("[]").lower().rstrip(".")
    if not key:
        return False
    now = time.monotonic()
    with _cache_lock:
        hit = _cache.get(key)
    if hit is not None and now - hit[0] < CACHE_TTL_S:
        return hit[1]
    answer = _decide(key, timeout_s)
    with _cache_lock:
        _cache[key] = (now, answer)
    return answer
