"""What stands between the network and the routes: site, key and body checks, connection guards.

- `SiteGate` (ASGI), outermost on every listener: a Host the server does not answer to gets 421,
  a page of another origin 403, whatever the key (serve/sites.py says which); CORS is answered
  only for the origins of `--allowed-origins`.
- `ApiKeyGate` (ASGI): every path but /health (and /metrics with --open-metrics, and the files
  of the web page and /docs) needs `Authorization: Bearer KEY` (or Anthropic's `x-api-key: KEY`),
  compared in constant time,
  decided on the ASGI path. The admin routes (ADMIN_PATHS, serve/admin.py: loading and unloading
  adapters and models, sleep and wake) need a key: on a server without one they answer 403.
- `CheckedRoute`: request bodies parsed once, refused (400, naming the field) when nested
  deeper than --max-json-depth or holding text that is not Unicode (lone surrogates).
  The size limit itself is Starlette's `RequestBodyLimitMiddleware` (413, counted while read).
- `GuardedH11Protocol` (uvicorn): a connection has --header-timeout seconds to send its headers
  and --body-timeout for its body, and past --max-connections the oldest connection still
  sending headers is closed to make room, so half-open sockets (slowloris) cannot crowd out
  real clients. uvicorn alone times out neither, and its `limit_concurrency` answers 503 to
  everyone once the slow sockets fill it.
"""
from __future__ import annotations

import hmac
import json
import re
from collections.abc import Callable

import uvicorn
from fastapi import Request
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.middleware.cors import CORSMiddleware
from uvicorn.protocols.http.h11_impl import H11Protocol

from levante.serve.error_shapes import for_path
from levante.serve.limits import RequestLimits
from levante.serve.protocol import error_body
from levante.serve.sites import SitePolicy

OPEN_PATHS = ("/health",)
ADMIN_PATHS = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/models/load", "/models/unload", "/sleep",
               "/wake_up")
# A surrogate can only enter a str through a \uD800-\uDFFF escape or, as json.loads decodes bytes with
# 'surrogatepass', through its UTF-8-like bytes (ED A0..BF xx); bodies without either skip the search.
_SURROGATE_HINT = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")
_SURROGATE = re.compile("[\ud800-\udfff]")


class BadBody(HTTPException):
    """A request body refused before validation (400), naming the field when there is one."""

    def __init__(self, message: str, param: str | None = None, status_code: int = 400):
        super().__init__(status_code=status_code, detail=message)
        self.param = param


# -- sites ------------------------------------------------------------------------------------------

class SiteGate:
    """Every request's Host and Origin checked against `policy` before anything else reads it; with
    --allowed-origins, Starlette's CORS middleware answers those origins (no credentials, so
    never `*` with credentials)."""

    def __init__(self, app, policy: SitePolicy):
        self.policy = policy
        self.app = CORSMiddleware(app, allow_origins=list(policy.allowed_origins), allow_methods=["*"],
                                  allow_headers=["*"], allow_credentials=False, max_age=600) if policy.cors else app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] in ("http", "websocket"):
            refusal = self.refusal(scope)
            if refusal is not None:
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                else:
                    await _send_json(send, *refusal, scope["path"])
                return
        await self.app(scope, receive, send)

    def refusal(self, scope) -> tuple[int, dict] | None:
        """(status, error JSON) when the request's Host or Origin is not allowed, else None."""
        hosts = _header_values(scope, b"host")
        host = hosts[0] if hosts else None
        if len(set(hosts)) > 1 or not self.policy.host_allowed(host):
            shown = _shown(host or "")
            message = (f"this server does not answer to the name '{shown}' (a DNS-rebinding page?); it answers to "
                       f"{self.policy.described()}: start it with --allowed-hosts NAME to add a name")
            return 421, error_body(message, "invalid_request_error", code="misdirected_request")
        for origin in _header_values(scope, b"origin"):
            if not self.policy.origin_allowed(origin, host, scope.get("scheme", "http")):
                message = (f"requests from web pages at '{_shown(origin)}' are refused (not this server's own "
                           "origin): start it with --allowed-origins ORIGIN to let such a page call it")
                return 403, error_body(message, "permission_error", code="origin_not_allowed")
        return None


def _header_values(scope, name: bytes) -> list[str]:
    return [value.decode("latin-1") for key, value in scope["headers"] if key == name]


def _shown(text: str, limit: int = 100) -> str:
    """An untrusted header value as a message may quote it: printable, and not too long."""
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[:limit] + "..."


# -- API key ----------------------------------------------------------------------------------------

class ApiKeyGate:
    """Every path needs the key except `open_paths` and those under `open_prefixes` (the web page's
    own files, which hold no data: the page then asks for the key). A request that passed has the
    key in `scope["levante.api_key"]`: what it stores belongs to that key (serve/conversations.py)."""

    def __init__(self, app, api_key: str, open_paths: tuple[str, ...] = OPEN_PATHS,
                 open_prefixes: tuple[str, ...] = ()):
        self.app = app
        self.api_key = api_key
        self.expected = f"Bearer {api_key}".encode()
        self.key_bytes = api_key.encode()
        self.open_paths = frozenset(open_paths)
        self.open_prefixes = open_prefixes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] in ("http", "websocket") and not self.is_open(scope["path"]):
            if not self.has_key(scope["headers"]):
                await _send_json(send, 401, error_body("invalid or missing API key", "authentication_error",
                                                       code="invalid_api_key"), scope["path"])
                return
            scope["levante.api_key"] = self.api_key
        await self.app(scope, receive, send)

    def has_key(self, headers) -> bool:
        """`Authorization: Bearer KEY`, or Anthropic's `x-api-key: KEY`; both compared in constant time."""
        bearer = next((value for name, value in headers if name == b"authorization"), b"")
        api_key = next((value for name, value in headers if name == b"x-api-key"), b"")
        return hmac.compare_digest(bearer, self.expected) | hmac.compare_digest(api_key, self.key_bytes)

    def is_open(self, path: str) -> bool:
        return path in self.open_paths or path.startswith(self.open_prefixes)


class AdminClosed:
    """On a server without an API key: the admin routes answer 403, the others pass."""

    def __init__(self, app, admin_paths: tuple[str, ...] = ADMIN_PATHS):
        self.app = app
        self.admin_paths = frozenset(admin_paths)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] in self.admin_paths:
            message = f"{scope['path']} needs a server started with --api-key"
            await _send_json(send, 403, error_body(message, "permission_error", code=403), scope["path"])
            return
        await self.app(scope, receive, send)


async def _send_json(send, status: int, payload: dict, path: str) -> None:
    """An error answered before the app runs, in the shape of the API `path` belongs to."""
    body = json.dumps(for_path(path, status, payload)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """Starlette's body limit (counted while the body is read), with a body declared too large by its
    Content-Length refused at once, in OpenAI's JSON."""

    def __init__(self, app, max_bytes: int):
        self.app = RequestBodyLimitMiddleware(app, max_body_size=max_bytes)
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            declared = next((value for name, value in scope["headers"] if name == b"content-length"), b"")
            if declared.isdigit() and int(declared) > self.max_bytes:
                message = f"the request body is larger than the server takes ({self.max_bytes} bytes)"
                await _send_json(send, 413, error_body(message, code=413), scope["path"])
                return
        await self.app(scope, receive, send)


def guard(app, limits: RequestLimits, api_key: str | None, sites: SitePolicy, open_metrics: bool = False,
          open_pages: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())):
    """`app` behind the site gate (outermost, whatever the key), the body-size limit and, with a key,
    the key check (no body is read for a request without the key). `open_pages`: (paths, prefixes)
    of pages served without the key. Without a key, the admin routes are closed."""
    app = BodyLimit(app, limits.max_body_bytes)
    if api_key:
        paths, prefixes = open_pages
        app = ApiKeyGate(app, api_key, OPEN_PATHS + (("/metrics",) if open_metrics else ()) + paths, prefixes)
    else:
        app = AdminClosed(app)
    return SiteGate(app, sites)


# -- request bodies ---------------------------------------------------------------------------------

class CheckedRequest(Request):
    async def json(self):
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                value = json.loads(body)
            except RecursionError:
                raise BadBody("the request body is nested too deeply") from None
            except UnicodeDecodeError:
                raise BadBody("the request body is not valid UTF-8") from None
            limits: RequestLimits = self.app.state.limits
            check_json(value, limits.max_json_depth, body)
            self._json = value
        return self._json


class CheckedRoute(APIRoute):
    """Routes whose JSON bodies go through `CheckedRequest`."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def checked(request: Request):
            return await handler(CheckedRequest(request.scope, request.receive))

        return checked


def check_json(value, max_depth: int, raw: bytes | None = None) -> None:
    """BadBody if `value` nests deeper than `max_depth` or holds a lone surrogate (key or text).
    `raw`, the body it was parsed from, lets a body that cannot have either skip the walk."""
    deep = raw is None or raw.count(b"[") + raw.count(b"{") > max_depth
    surrogates = raw is None or _SURROGATE_HINT.search(raw) is not None
    if not (deep or surrogates):
        return
    stack = [(value, 0, ())]
    while stack:
        item, depth, path = stack.pop()
        if isinstance(item, (dict, list)):
            if depth >= max_depth:
                raise BadBody(f"the request body nests deeper than {max_depth} levels", _path(path))
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in pairs:
                if isinstance(key, str) and surrogates and _SURROGATE.search(key):
                    raise BadBody(f"{_path(path) or 'body'}: a key is not valid Unicode (lone surrogate)",
                                  _path(path))
                stack.append((child, depth + 1, (*path, key)))
        elif isinstance(item, str) and surrogates and _SURROGATE.search(item):
            where = _path(path)
            raise BadBody(f"{where or 'body'}: text is not valid Unicode (a lone surrogate such as \\ud800)", where)


def _path(path: tuple) -> str | None:
    text = ""
    for key in path:
        text += f"[{key}]" if isinstance(key, int) else (f".{key}" if text else str(key))
    return text or None


# -- connections ------------------------------------------------------------------------------------

class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus header and body timeouts and room-making past a connection cap."""

    limits: RequestLimits = RequestLimits()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.opened_at = self.loop.time()
        self.phase: str | None = None  # "headers" | "body" while the client owes us those; None otherwise
        self._timer = None
        self._expect("headers")
        if len(self.connections) > self.limits.max_connections:
            self._make_room()

    def data_received(self, data: bytes) -> None:
        if self.phase is None and (self.cycle is None or self.cycle.response_complete):
            self._expect("headers")  # the next request on a kept-alive connection
        super().data_received(data)
        if self.phase is not None and self.cycle is not None and not self.cycle.response_complete:
            self._expect("body" if self.cycle.more_body else None)

    def connection_lost(self, exc) -> None:
        self._expect(None)
        super().connection_lost(exc)

    def _expect(self, phase: str | None) -> None:
        if phase == self.phase and phase is not None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.phase = phase
        if phase is not None:
            seconds = self.limits.header_timeout if phase == "headers" else self.limits.body_timeout
            self._timer = self.loop.call_later(seconds, self._too_slow)

    def _too_slow(self) -> None:
        self._timer = None
        if not self.transport.is_closing():
            self.logger.info("closing a connection too slow to send its request's %s", self.phase)
            self.transport.close()

    def _make_room(self) -> None:
        waiting = [c for c in self.connections if getattr(c, "phase", None) == "headers"]
        victim = min(waiting, key=lambda c: c.opened_at) if waiting else self
        victim.transport.close()


def uvicorn_server(app, host: str, port: int, limits: RequestLimits, log_level: str = "info") -> uvicorn.Server:
    protocol = type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol,
                                         timeout_graceful_shutdown=5))
