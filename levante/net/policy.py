"""Which destinations an outbound fetch may reach.

A server that listens only on loopback serves its own machine: its callers could reach the
private network themselves, so private destinations are allowed. A server on any other address
serves strangers: only public addresses, unless the operator opts in, with an allow-list of
media domains (`--allowed-media-domains`: image URLs must name one of them, and those names may
resolve anywhere) or for every private network (`--allow-private-network`). Unspecified and
multicast addresses are never fetched from. Library use (`levante.LLM`, `levante run`) is local.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from levante.net.addresses import NEVER, PUBLIC, IPAddress, address_class, literal_address

LOOPBACK_NAMES = ("localhost", "localhost.")


@dataclass(frozen=True)
class FetchPolicy:
    allow_private: bool = False
    # When set, URLs must name one of these hosts (or a subdomain of one); they may resolve anywhere.
    allowed_domains: frozenset[str] | None = None

    @classmethod
    def local(cls) -> FetchPolicy:
        return cls(allow_private=True)

    @classmethod
    def for_server(cls, host: str, allowed_domains: Iterable[str] | None = None,
                   allow_private_network: bool = False) -> FetchPolicy:
        """The policy of a server listening on `host` (see the module docstring)."""
        domains = frozenset(normalize_host(d) for d in allowed_domains) if allowed_domains else None
        return cls(allow_private=allow_private_network or listens_on_loopback(host), allowed_domains=domains)

    def without_domain_list(self) -> FetchPolicy:
        """The same policy for fetches that are no media (search pages, MCP servers)."""
        return FetchPolicy(self.allow_private)

    def host_allowed(self, host: str) -> bool:
        """Whether a URL may name `host` at all (before any resolution)."""
        if self.allowed_domains is None:
            literal = literal_address(host)
            return literal is None or self.address_allowed(literal)
        return self._listed(host)

    def address_allowed(self, address: IPAddress, host: str = "") -> bool:
        """Whether a connection to `address` (resolved from `host`) may be made."""
        kind = address_class(address)
        if kind in NEVER:
            return False
        return kind == PUBLIC or self.allow_private or (self.allowed_domains is not None and self._listed(host))

    def _listed(self, host: str) -> bool:
        name = normalize_host(host)
        return any(name == domain or name.endswith("." + domain) for domain in self.allowed_domains or ())


def normalize_host(host: str) -> str:
    """Lower case, no brackets, no trailing dot, IDNA (what a URL parser hands the resolver)."""
    name = host.strip().strip("[]").lower().rstrip(".")
    try:
        return name.encode("idna").decode("ascii")
    except UnicodeError:
        return name


def listens_on_loopback(host: str) -> bool:
    """Whether a server bound to `host` is reachable from this machine only."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    address = literal_address(host)
    return address is not None and address_class(address) == "loopback"
