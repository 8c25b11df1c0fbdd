"""Address classes of outbound destinations, and hosts read the way the resolver reads them.

A URL's host may spell an address many ways: `2130706433`, `0x7f.1`, `127.1`, `0177.0.0.1`
(all 127.0.0.1 to the C resolver), `[::ffff:127.0.0.1]`, `127.0.0.1.`. `literal_address` reads
them as `inet_aton` and `getaddrinfo` do, and the fetcher checks every address that name
resolution returns anyway, so a spelling this module does not know still meets the check.
"""
from __future__ import annotations

import ipaddress
import socket

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

PUBLIC = "public"
# Classes no fetch ever reaches: not a host anyone serves pages from, and 0.0.0.0 reaches this machine.
NEVER = frozenset({"unspecified", "multicast"})

_NETWORKS: list[tuple[str, list[str]]] = [
    ("unspecified", ["0.0.0.0/8", "::/128"]),
    ("loopback", ["127.0.0.0/8", "::1/128"]),
    ("private", ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"]),
    ("link-local", ["169.254.0.0/16", "fe80::/10"]),
    ("shared", ["100.64.0.0/10"]),  # carrier-grade NAT
    ("multicast", ["224.0.0.0/4", "ff00::/8"]),
    # IPv6 addresses that carry an IPv4 one: mapped, IPv4-compatible, NAT64, 6to4, Teredo.
    ("ipv4-mapped", ["::ffff:0:0/96", "::/96", "64:ff9b::/96", "64:ff9b:1::/48", "2002::/16", "2001::/32"]),
]
_CLASSES = [(name, [ipaddress.ip_network(net) for net in nets]) for name, nets in _NETWORKS]


def address_class(address: IPAddress | str) -> str:
    """"public", or the class that makes `address` no public destination: unspecified, loopback,
    private, link-local, shared (CGNAT), multicast, ipv4-mapped, or reserved (any other
    non-global range: documentation, benchmarking, 240/4, broadcast...)."""
    address = ipaddress.ip_address(address) if isinstance(address, str) else address
    for name, networks in _CLASSES:
        if any(address in network for network in networks if network.version == address.version):
            return name
    return PUBLIC if address.is_global else "reserved"


def literal_address(host: str) -> IPAddress | None:
    """The address `host` spells when it is an address literal (in any spelling the resolver
    accepts, brackets and one trailing dot allowed), else None (a name to resolve)."""
    host = host.strip().strip("[]")
    if host.endswith(".") and not host.endswith(".."):
        host = host[:-1]
    if not host:
        return None
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])  # an IPv6 zone index does not change the class
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))  # 2130706433, 0x7f.1, 127.1, 0177.0.0.1
    except (OSError, ValueError, UnicodeError):
        return None


def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to (once: the fetcher connects to one of these, never
    resolving again). Tests patch this to answer for names without touching the network."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: dict[IPAddress, None] = {}
    for _family, _type, _proto, _name, sockaddr in infos:
        seen[ipaddress.ip_address(sockaddr[0].split("%", 1)[0])] = None
    return list(seen)
