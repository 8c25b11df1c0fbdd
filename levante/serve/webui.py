"""The web chat at `/` and the API docs at `/docs`: files served offline, under a strict CSP.

    /                   the chat page (levante/web/static/index.html)
    /ui/...             its scripts and styles (levante/web/static)
    /ui/vendor/...      marked, DOMPurify, highlight.js: npm packages that `make web` copies into
                        levante/web/vendor (git-ignored); without them the page renders plain text
                        and says how to build them
    /docs               Swagger UI, its assets from the fastapi-offline package (no CDN)

The page is a client of the API like any other: it streams /v1/chat/completions and keeps its
conversations through /v1/levante/conversations (serve/conversations.py). Model output is
untrusted: the page renders it through marked (raw HTML escaped) and DOMPurify, and the CSP below
lets no inline script, no eval and no other origin run or load anything.
"""
from __future__ import annotations

import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from starlette.middleware.gzip import GZipMiddleware
from starlette.staticfiles import StaticFiles

from levante.serve.conversations import ConversationFile

WEB = Path(__file__).resolve().parent.parent / "web"
STATIC, VENDOR, DOCS = WEB / "static", WEB / "vendor", WEB / "docs"

BASE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
            "connect-src 'self'; font-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")
# The chat page also takes no HTML string into the DOM but through DOMPurify's Trusted Types policy.
CSP = BASE_CSP + "; require-trusted-types-for 'script'; trusted-types dompurify"
# Swagger UI writes style attributes and <style> elements of its own: styles only, scripts stay strict.
DOCS_CSP = BASE_CSP.replace("style-src 'self'", "style-src 'self' 'unsafe-inline'")
SECURITY_HEADERS = {"x-content-type-options": "nosniff", "referrer-policy": "no-referrer",
                    "x-frame-options": "DENY", "cross-origin-opener-policy": "same-origin"}


@dataclass
class WebUI:
    """What the page needs: where the vendored libraries lie, and the conversation store's file
    (None: the user's data folder, as `levante chat` uses)."""
    vendor: Path = VENDOR
    store_path: Path | None = None
    conversations: ConversationFile = field(init=False)

    def __post_init__(self):
        self.conversations = ConversationFile(self.store_path)


# Pages whose files need no key (they hold no data; the page asks for the key): (paths, prefixes).
DOCS_PAGES = (("/docs",), ("/docs/",))
OPEN_PAGES = (("/", "/docs"), ("/ui/", "/docs/"))


class Headers:
    """ASGI: add `headers` to every response of `app`."""

    def __init__(self, app, headers: dict[str, str]):
        self.app = app
        self.headers = [(k.encode(), v.encode()) for k, v in headers.items()]

    async def __call__(self, scope, receive, send) -> None:
        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.headers]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class Files(StaticFiles):
    """Starlette's static files, from a folder that may not exist (the vendor folder before `make web`):
    then every file is a 404, as a missing one is (Starlette's own check would answer 500)."""

    async def check_config(self) -> None:
        if self.directory is not None and Path(self.directory).is_dir():
            await super().check_config()


def _files(directory: Path, csp: str = CSP):
    """Static files, gzipped for clients that take it, with the security headers."""
    return Headers(GZipMiddleware(Files(directory=directory, check_dir=False), minimum_size=512),
                   {"content-security-policy": csp, "cache-control": "no-cache", **SECURITY_HEADERS})


def _page(path: Path, csp: str) -> FileResponse:
    return FileResponse(path, media_type="text/html; charset=utf-8",
                        headers={"content-security-policy": csp, "cache-control": "no-cache", **SECURITY_HEADERS})


def register_webui(app: FastAPI, webui: WebUI) -> None:
    @app.get("/", include_in_schema=False)
    async def index():
        return _page(STATIC / "index.html", CSP)

    app.mount("/ui/vendor", _files(webui.vendor))  # before /ui: the vendor folder lies elsewhere
    app.mount("/ui", _files(STATIC))


def register_docs(app: FastAPI) -> None:
    swagger = Path(str(importlib.resources.files("fastapi_offline") / "static"))

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return _page(DOCS / "index.html", DOCS_CSP)

    app.mount("/docs/swagger", _files(swagger, DOCS_CSP))
    app.mount("/docs/static", _files(DOCS, DOCS_CSP))
