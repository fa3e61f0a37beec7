"""Connections per client IP: one host cannot take all the sockets and greenlets.

Every open client connection costs a file descriptor, a greenlet and some buffers, and the
head and body deadlines bound how long a hostile one lasts, not how many there are. So
``server.maxConnectionsPerClient`` caps the connections one address may hold at once; one
over the cap is closed at once, with RST, before anything is read or a TLS handshake is made.
Closing is chosen over answering 503/429: an answer would mean reading the request first,
under the head deadline, which is the very resource the cap protects; a client that opens
hundreds of connections is not waiting for advice. Addresses in
``server.connectionLimitExempt`` (loopback by default: a local reverse proxy, the benchmarks)
are not counted; a proxy that funnels many clients through one address belongs there too.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from pipeline.config import ServerConfig

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def client_ip(address: object) -> str:
    """The peer's address as text; an IPv4-mapped IPv6 address as the IPv4 it is."""
    host = address[0] if isinstance(address, tuple) and address else str(address)
    if isinstance(host, str) and host.startswith("::ffff:"):
        return host[7:]
    return str(host)


class ConnectionLimiter:
    """Counts open connections per client address and admits up to the configured cap."""

    def __init__(self, settings: Callable[[], ServerConfig]) -> None:
        self.settings = settings
        self.open: dict[str, int] = {}
        self.refused = 0
        self._exempt_from: tuple[str, ...] | None = None
        self._exempt: tuple[Network, ...] = ()

    def exempt(self, ip: str, patterns: tuple[str, ...]) -> bool:
        if patterns != self._exempt_from:  # parsed once per config, not per connection
            self._exempt = tuple(ipaddress.ip_network(p, strict=False) for p in patterns)
            self._exempt_from = patterns
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False  # not an IP (a unix socket in a test): counted under its name
        return any(addr in net for net in self._exempt)

    def admit(self, ip: str) -> bool:
        """Count a new connection from ``ip``; False (not counted) when it is over the cap."""
        s = self.settings()
        cap = s.maxConnectionsPerClient
        held = self.open.get(ip, 0)
        if cap and held >= cap and not self.exempt(ip, s.connectionLimitExempt):
            self.refused += 1
            return False
        self.open[ip] = held + 1
        return True

    def release(self, ip: str) -> None:
        held = self.open.get(ip, 0) - 1
        if held > 0:
            self.open[ip] = held
        else:
            self.open.pop(ip, None)
