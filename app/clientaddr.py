"""Who the client is, and whether it may be trusted as local.

Loopback trust (the admin API and model management without keys answer local clients) must
not be granted to a request that came through a reverse proxy on the same box: the proxy's
connection is from 127.0.0.1, the client is anyone. So a request carrying ``X-Forwarded-For``,
``Forwarded`` or ``X-Real-IP`` is never local, unless its peer is listed in
``server.trustedProxies``; then the client is the address the proxies forwarded (the rightmost
one that is not itself a trusted proxy, as a chain of proxies appends), and that address is
what logs, limits and loopback trust see.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

PROXY_HEADERS = ("HTTP_X_FORWARDED_FOR", "HTTP_FORWARDED", "HTTP_X_REAL_IP")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Client:
    address: str  # the client: the peer, or what trusted proxies forwarded
    peer: str  # the TCP peer
    loopback: bool  # may be trusted as a local client


def parse_ip(text: str) -> IPAddress | None:
    """An address from a header or the peer (zone, brackets and a port stripped), or None."""
    text = text.strip().strip('"')
    if text.startswith("["):  # "[2001:db8::1]:4711"
        text = text[1:].split("]", 1)[0]
    elif text.count(":") == 1:  # "192.0.2.1:80"
        text = text.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_loopback(text: str) -> bool:
    ip = parse_ip(text)
    return ip is not None and ip.is_loopback


def forwarded_chain(environ: dict[str, Any]) -> list[str]:
    """The forwarded addresses, client first: X-Forwarded-For, else Forwarded ``for=``, else
    X-Real-IP."""
    xff = environ.get("HTTP_X_FORWARDED_FOR")
    if xff is not None:
        return [part.strip() for part in xff.split(",")]
    fwd = environ.get("HTTP_FORWARDED")
    if fwd is not None:
        chain = []
        for element in fwd.split(","):
            for pair in element.split(";"):
                name, _, value = pair.partition("=")
                if name.strip().lower() == "for":
                    chain.append(value)
        return chain or [""]
    return [environ.get("HTTP_X_REAL_IP", "")]


class ProxyTrust:
    """``server.trustedProxies``, parsed once per config."""

    def __init__(self, networks: tuple[str, ...]) -> None:
        self.networks = tuple(ipaddress.ip_network(n, strict=False) for n in networks)

    def trusts(self, ip: IPAddress | None) -> bool:
        return ip is not None and any(ip in net for net in self.networks)

    def resolve(self, environ: dict[str, Any]) -> Client:
        peer = environ.get("REMOTE_ADDR") or ""
        if not any(h in environ for h in PROXY_HEADERS):
            return Client(peer, peer, is_loopback(peer))
        if not self.trusts(parse_ip(peer)):
            return Client(peer, peer, False)  # a proxy header from anyone: never local
        chain = forwarded_chain(environ)
        client = chain[0]
        for hop in reversed(chain):
            ip = parse_ip(hop)
            if not self.trusts(ip):
                client = hop
                break
        ip = parse_ip(client)
        return Client(str(ip) if ip is not None else client.strip()[:64] or "unknown", peer,
                      ip is not None and ip.is_loopback)
