"""The one outbound fetcher: image URLs, web-search result pages and (as an httpx2 client) MCP servers.

- Each hop's URL is checked first (scheme, host, allow-list); a host that spells an address is
  refused before any resolution.
- The connection itself goes through a guarded network backend under httpx: the host is
  resolved once, every address it resolves to is checked, and the connection is made to a
  checked address (never to the name again: no DNS rebinding between check and connect).
  TLS still verifies the certificate against the URL's host name.
- Redirects are followed by hand, at most `MAX_REDIRECTS` hops, each one checked as above.
- The body is read raw and decompressed here (identity and gzip only), with the byte cap
  applied both to what arrives and to what it decompresses to; the total time is capped too.
- Every refusal (and a name that does not resolve) answers one message, `REFUSED`, which says
  nothing about the target; failures of a permitted public target say what failed.
"""
from __future__ import annotations

import functools
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import httpcore
import httpx

from levante.errors import LevanteError
from levante.net import addresses
from levante.net.policy import FetchPolicy

MAX_REDIRECTS = 3
USER_AGENT = "levante"
REFUSED = "refused: not an address this server fetches from, or a name that does not resolve"
_resolver = ThreadPoolExecutor(max_workers=4, thread_name_prefix="levante-resolve")


class FetchRefused(LevanteError):
    """The policy forbids the destination (or its name does not resolve): always `REFUSED`."""

    def __init__(self, message: str = REFUSED):
        super().__init__(message)


class FetchFailed(LevanteError):
    """A permitted destination could not be fetched: timed out, too large, HTTP error..."""


@dataclass(frozen=True)
class Fetched:
    body: bytes
    content_type: str  # lower case, without parameters; "" when the server sent none
    charset: str | None
    url: str  # after redirects


def checked_addresses(policy: FetchPolicy, host: str, port: int, timeout: float | None) -> list[str]:
    """The addresses `host` resolves to, all permitted by `policy`, or `FetchRefused`."""
    if not policy.host_allowed(host):
        raise FetchRefused()
    literal = addresses.literal_address(host)
    if literal is not None:
        found = [literal]
    else:
        try:
            found = _resolver.submit(addresses.resolve, host, port).result(timeout)
        except (OSError, UnicodeError, ValueError, FutureTimeout):
            raise FetchRefused() from None
    if not found or not all(policy.address_allowed(address, host) for address in found):
        raise FetchRefused()
    return [str(address) for address in found]


class _GuardedBackend(httpcore.NetworkBackend):
    """httpcore's network backend, connecting only to checked addresses."""

    def __init__(self, policy: FetchPolicy, inner=None):
        self.policy, self.inner = policy, inner or httpcore.SyncBackend()

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        error: Exception = FetchRefused()
        for address in checked_addresses(self.policy, host, port, timeout):
            try:
                return self.inner.connect_tcp(address, port, timeout=timeout, local_address=local_address,
                                              socket_options=socket_options)
            except httpcore.ConnectError as e:
                error = e
        raise error

    def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise FetchRefused()

    def sleep(self, seconds):
        self.inner.sleep(seconds)


class _AsyncGuardedBackend:
    """The same guard for an async httpcore (httpcore or httpcore2: the interface is one)."""

    def __init__(self, policy: FetchPolicy, inner):
        self.policy, self.inner = policy, inner

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        import anyio

        found = await anyio.to_thread.run_sync(checked_addresses, self.policy, host, port, timeout)
        error: Exception = FetchRefused()
        for address in found:
            try:
                return await self.inner.connect_tcp(address, port, timeout=timeout, local_address=local_address,
                                                    socket_options=socket_options)
            except Exception as e:  # the inner backend's ConnectError
                error = e
        raise error

    async def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise FetchRefused()

    async def sleep(self, seconds):
        await self.inner.sleep(seconds)


@functools.cache
def _ssl_context():
    """Certificate verification on, CAs from certifi (as httpx); built once: loading them takes ~50 ms."""
    return httpx.create_ssl_context(trust_env=False)


def _guarded_transport(policy: FetchPolicy) -> httpx.HTTPTransport:
    transport = httpx.HTTPTransport(verify=_ssl_context(), trust_env=False)
    # httpx builds its pool without a way to pass a network backend: give it one that has ours.
    transport._pool = httpcore.ConnectionPool(ssl_context=_ssl_context(), network_backend=_GuardedBackend(policy))
    return transport


def guarded_async_client(policy: FetchPolicy, headers: dict | None = None, timeout=None, auth=None):
    """An `httpx2.AsyncClient` (the MCP SDK's HTTP client) whose every connection is guarded;
    also usable as the SDK's `httpx_client_factory`. No proxies from the environment."""
    import httpcore2
    import httpx2

    transport = httpx2.AsyncHTTPTransport(trust_env=False)
    transport._pool = httpcore2.AsyncConnectionPool(ssl_context=httpx2.create_ssl_context(trust_env=False),
                                                    network_backend=_AsyncGuardedBackend(policy,
                                                                                         httpcore2.AnyIOBackend()))
    kwargs = {"headers": headers} if headers is not None else {}
    return httpx2.AsyncClient(transport=transport, trust_env=False, auth=auth, max_redirects=MAX_REDIRECTS,
                              timeout=timeout if timeout is not None else httpx2.Timeout(30.0, read=300.0), **kwargs)


def fetch(url: str, policy: FetchPolicy, *, max_bytes: int, timeout: float,
          accept: tuple[str, ...] = ()) -> Fetched:
    """GET `url` under `policy`: `FetchRefused` (uniform), `FetchFailed`, or the body.
    `accept`: content-type prefixes taken (a response without a content type passes)."""
    deadline = time.monotonic() + timeout
    with httpx.Client(transport=_guarded_transport(policy), trust_env=False, follow_redirects=False,
                      timeout=httpx.Timeout(timeout)) as client:
        target = _checked_url(url, policy)
        for _ in range(MAX_REDIRECTS + 1):
            try:
                with client.stream("GET", target, headers={"User-Agent": USER_AGENT,
                                                           "Accept-Encoding": "gzip"}) as response:
                    if response.is_redirect:
                        target = _checked_url(response.headers["location"], policy, base=target)
                        continue
                    return _body(response, max_bytes, deadline, accept, timeout)
            except httpx.TimeoutException:
                raise FetchFailed(f"timed out after {timeout:g} s") from None
            except httpx.RemoteProtocolError as e:  # httpx parses a redirect's Location itself
                raise FetchFailed("not a valid URL" if "location header" in str(e) else "unreachable "
                                  "(the server broke the HTTP protocol)") from None
            except httpx.HTTPError:
                raise FetchFailed("unreachable (the connection failed)") from None
    raise FetchFailed(f"too many redirects (more than {MAX_REDIRECTS})")


def _checked_url(url: str, policy: FetchPolicy, base: httpx.URL | None = None) -> httpx.URL:
    try:
        target = base.join(url) if base is not None else httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        raise FetchFailed("not a valid URL") from None
    if target.scheme not in ("http", "https") or not target.host:
        raise FetchRefused()  # a redirect to file:, ftp:, ... is refused like any other
    if not policy.host_allowed(target.host):
        raise FetchRefused()
    return target


def _body(response: httpx.Response, max_bytes: int, deadline: float, accept: tuple[str, ...],
          timeout: float) -> Fetched:
    if response.status_code >= 400:
        raise FetchFailed(f"the server answered HTTP {response.status_code}")
    content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if accept and content_type and not content_type.startswith(accept):
        raise FetchFailed(f"the server sent '{content_type[:60]}', not {' or '.join(accept)}")
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise FetchFailed(f"too large ({declared} bytes; the limit is {max_bytes})")
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", "", "gzip", "x-gzip"):
        raise FetchFailed(f"unsupported content encoding '{encoding[:30]}'")
    decoder = zlib.decompressobj(16 + zlib.MAX_WBITS) if "gzip" in encoding else None
    chunks, size, received = [], 0, 0
    try:
        for raw in response.iter_raw():
            received += len(raw)
            if time.monotonic() > deadline:
                raise FetchFailed(f"timed out after {timeout:g} s")
            for chunk in _decoded(decoder, raw, max_bytes - size + 1):
                size += len(chunk)
                if size > max_bytes or received > max_bytes:
                    raise FetchFailed(f"too large (over {max_bytes} bytes; the limit is {max_bytes})")
                chunks.append(chunk)
    except zlib.error:
        raise FetchFailed("the server sent corrupt gzip data") from None
    return Fetched(b"".join(chunks), content_type, response.charset_encoding, str(response.url))


def _decoded(decoder, raw: bytes, room: int):
    """`raw` decompressed, never more than `room` bytes at a time (a gzip bomb stops at the cap)."""
    if decoder is None:
        yield raw
        return
    data = raw
    while data:
        out = decoder.decompress(data, room)
        yield out
        data = decoder.unconsumed_tail
        if len(out) >= room:
            return  # over the cap: the caller stops
