"""Which sites may use a server: the names it answers to (`Host`) and the web pages that may call
it (`Origin`). One policy for every listener (the OpenAI port, the MCP port); serve/http.py's
`SiteGate` enforces it on every route.

DNS rebinding: a page at `attacker.example` re-points its name to 127.0.0.1, and the browser then
sends the page's requests to the local server, with `Host: attacker.example`; the page can read
the answers, being of the same "origin" as far as the browser knows. The answer is a Host
allow-list: the bound address, `localhost` (and `*.localhost`, which browsers keep on loopback),
loopback literals, the names given with `--allowed-hosts` and, on a wildcard bind (0.0.0.0, ::),
any address literal, since only a name can be rebound. The port is not compared: a rebound
request carries the server's own port.

Cross-site requests: a page of another origin (`Origin: http://elsewhere:3000`) may not use the
server, whether it could read the answer or not (a POST with a simple content type reaches
routes without a preflight). A request with no Origin header comes from a client that is no web
page, or from a same-origin navigation, and passes, as Ollama and llama.cpp treat it. The same
origin (the page the server serves itself) and those given with `--allowed-origins` pass; only
for those does the server answer CORS (serve/http.py), never with credentials.
"""
from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from levante.net.addresses import literal_address

WILDCARD_BINDS = frozenset({"", "0.0.0.0", "::", "[::]"})
DEFAULT_PORTS = {"http": 80, "https": 443}


def split_host(host: str) -> tuple[str, int | None] | None:
    """(name or address, port) of a Host header value: lower-cased, brackets and one trailing dot
    dropped; None when it cannot be a host at all."""
    host = host.strip().lower()
    if host.startswith("["):
        name, bracket, rest = host[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:] if rest else None
    else:
        name, colon, port_text = host.rpartition(":")
        if not colon:
            name, port_text = host, None
        elif ":" in name:  # an IPv6 literal without brackets: no port in it
            name, port_text = host, None
    if port_text is not None and not (port_text.isdigit() and int(port_text) < 65536):
        return None
    name = name[:-1] if name.endswith(".") and not name.endswith("..") else name
    if not name or any(c in name for c in "/\\@?#% \t"):
        return None
    return name, int(port_text) if port_text else None


def normalize_origin(origin: str) -> str | None:
    """`scheme://host[:port]`, lower-cased, the scheme's default port left out; None when it is no
    origin a browser sends (`null` stays `null`)."""
    origin = origin.strip()
    if origin.lower() == "null":
        return "null"
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return None
    if not parts.scheme or not parts.hostname or parts.path not in ("", "/") or parts.query or parts.username:
        return None
    scheme, host = parts.scheme.lower(), parts.hostname.lower()
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}" + ("" if port in (None, DEFAULT_PORTS.get(scheme)) else f":{port}")


def _is_loopback_name(name: str) -> bool:
    """`localhost`, a name under it, or a loopback address in any spelling (::ffff:127.0.0.1 too)."""
    if name == "localhost" or name.endswith(".localhost"):
        return True
    address = literal_address(name)
    if address is None:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


@dataclass(frozen=True)
class SitePolicy:
    """`bound_host`: the address the server listens on (--host); `allowed_hosts`: more names it
    answers to ("*": any); `allowed_origins`: more pages that may call it ("*": any page)."""

    bound_host: str = "127.0.0.1"
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()

    def __post_init__(self):
        hosts = tuple(h.strip().lower().rstrip(".") for h in self.allowed_hosts if h.strip())
        origins = tuple(o.strip() for o in self.allowed_origins if o.strip())
        for origin in origins:
            if origin != "*" and normalize_origin(origin) is None:
                raise ValueError(f"--allowed-origins: '{origin}' is not an origin (scheme://host[:port])")
        for host in hosts:
            if host != "*" and split_host(host) is None:
                raise ValueError(f"--allowed-hosts: '{host}' is not a host name")
        object.__setattr__(self, "allowed_hosts", tuple((split_host(h) or (h,))[0] if h != "*" else h
                                                        for h in hosts))
        object.__setattr__(self, "allowed_origins", tuple(o if o == "*" else normalize_origin(o) for o in origins))

    @property
    def cors(self) -> bool:
        """Whether the server answers CORS: only when --allowed-origins names some."""
        return bool(self.allowed_origins)

    def host_allowed(self, host: str | None) -> bool:
        """Whether a request with this Host header is for this server (None: no header, HTTP/1.0)."""
        if host is None or "*" in self.allowed_hosts:
            return True
        parts = split_host(host)
        if parts is None:
            return False
        name = parts[0]
        if _is_loopback_name(name) or name in self.allowed_hosts:
            return True
        bound = self.bound_host.strip().lower().strip("[]")
        if bound in WILDCARD_BINDS:
            return literal_address(name) is not None
        address = literal_address(name)
        return name == bound or (address is not None and address == literal_address(bound))

    def origin_allowed(self, origin: str, host: str | None, scheme: str) -> bool:
        """Whether a page of `origin` may use this server, for a request that came with Host `host`
        over `scheme` (its own origin is that scheme and host)."""
        if "*" in self.allowed_origins:
            return True
        normalized = normalize_origin(origin)
        if normalized is None:
            return False
        if normalized in self.allowed_origins:
            return True
        return host is not None and normalized == normalize_origin(f"{scheme}://{host.strip()}")

    def described(self) -> str:
        """The names this server answers to, for a refusal's message."""
        names = ["localhost", "loopback addresses"]
        bound = self.bound_host.strip().lower()
        if bound in WILDCARD_BINDS:
            names.append("any address literal")
        elif not _is_loopback_name(bound.strip("[]")):
            names.append(bound)
        return ", ".join(names + list(self.allowed_hosts))
