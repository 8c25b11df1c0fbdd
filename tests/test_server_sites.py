"""No web page drives a local server: DNS rebinding and cross-site requests, sent to loopback.

A rebinding page's requests reach 127.0.0.1 with the page's own name in `Host` (and, for most,
in `Origin`); a cross-site page's carry its `Origin`. Every route of both listeners (the OpenAI
port, every route its app has, and the MCP port) refuses them, with or without --api-key, with
OpenAI's error JSON, while a stream beside them goes on; the user's conversations stay as they
were. The server's own page, clients without an Origin, and what --allowed-hosts and
--allowed-origins name, pass; CORS is answered only for the latter, never with credentials.
"""
from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import httpx
import pytest
from fastapi.routing import APIRoute
from starlette.routing import Mount

from levante import LLM
from levante.serve.app import create_app
from levante.serve.sites import SitePolicy
from levante.serve.state import ServerState
from levante.serve.webui import WebUI
from live_server import Bystander, live_server
from mcp_servers import levante_mcp_server
from tiny_embedding_models import build_qwen3_embedding

KEY = "sesame"
EVIL = "attacker.example"
TURN = [{"role": "user", "content": "My secret plans"}, {"role": "assistant", "content": "Noted."}]
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
BODIES = {
    "/v1/chat/completions": CHAT, "/v1/completions": {"model": "tiny", "prompt": "Hi", "max_tokens": 3},
    "/v1/responses": {"model": "tiny", "input": "Hi", "max_output_tokens": 3},
    "/v1/embeddings": {"model": "embed", "input": "Hi"}, "/tokenize": {"model": "tiny", "prompt": "Hi"},
    "/detokenize": {"model": "tiny", "tokens": [1]}, "/v1/levante/conversations": {"messages": TURN},
    "/v1/load_lora_adapter": {"lora_name": "x", "lora_path": "/nonexistent"},
    "/v1/unload_lora_adapter": {"lora_name": "x"}, "/models/load": {"model": "tiny"},
    "/models/unload": {"model": "embed"},
}
# A file under each mounted folder of the app.
MOUNTED = {"/ui": "/ui/app.js", "/ui/vendor": "/ui/vendor/marked.esm.js", "/docs/swagger": "/docs/swagger/swagger-ui.css",
           "/docs/static": "/docs/static/index.html"}


@pytest.fixture(scope="module")
def models(tiny_model, tmp_path_factory):
    chat = LLM(str(tiny_model("qwen2")), dtype="float32", max_model_len=4096, max_num_seqs=4)
    embed = LLM(str(build_qwen3_embedding(tmp_path_factory.mktemp("embed"))), dtype="float32")
    return chat, embed


def every_route(conversation: int) -> list[tuple[str, str]]:
    """(method, path) of every route the server's app has (so a new route cannot slip past), and a
    file under each of its mounts."""
    state = ServerState()
    state.webui = WebUI()
    routes = []
    for route in create_app(state).routes:
        if isinstance(route, APIRoute) or type(route).__name__ == "APIRoute":
            for method in sorted(route.methods - {"HEAD"}):
                routes.append((method, route.path.replace("{conversation_id}", str(conversation))))
        elif isinstance(route, Mount):
            routes.append(("GET", MOUNTED[route.path]))
        elif hasattr(route, "methods"):  # Starlette's own (/openapi.json)
            routes.extend((method, route.path) for method in sorted(route.methods - {"HEAD"}))
    assert {"/v1/chat/completions", "/v1/embeddings", "/metrics", "/docs", "/models/load",
            "/v1/load_lora_adapter", f"/v1/levante/conversations/{conversation}"} <= {p for _, p in routes}
    return routes


def send(base: str, method: str, path: str, headers: dict) -> httpx.Response:
    body = BODIES.get(path.rsplit("/", 1)[0] if path.rsplit("/", 1)[-1].isdigit() else path)
    if method in ("PUT", "PATCH"):
        body = {"messages": []} if method == "PUT" else {"title": "pwned"}
    return httpx.request(method, f"{base}{path}", json=body if method != "GET" else None, headers=headers, timeout=30)


ANTHROPIC_TYPES = {421: "invalid_request_error", 403: "permission_error"}


def refused(response: httpx.Response, status: int, code: str) -> bool:
    """Refused with `status`: in OpenAI's error JSON with `code`, or under /v1/messages in Anthropic's
    (which has no code: its error type says it)."""
    body = response.json()
    if body.get("type") == "error":
        return (response.status_code == status and body["error"]["type"] == ANTHROPIC_TYPES[status]
                and body["error"]["message"])
    return response.status_code == status and body["error"]["code"] == code and body["error"]["message"]


@pytest.mark.parametrize("key", [None, KEY])
def test_a_rebinding_page_reaches_no_route_and_no_conversation(models, tmp_path, key):
    chat, embed = models
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    store = tmp_path / "chats.sqlite3"
    with live_server(chat, "tiny", api_key=key, embedding_llm=embed, embedding_name="embed",
                     webui=WebUI(store_path=store)) as (base, _):
        port = base.rsplit(":", 1)[1]
        created = httpx.post(f"{base}/v1/levante/conversations", json={"messages": TURN}, headers=auth).json()
        saved = httpx.get(f"{base}/v1/levante/conversations/{created['id']}", headers=auth).json()
        routes = every_route(created["id"])
        rebound = {"Host": f"{EVIL}:{port}", "Origin": f"http://{EVIL}:{port}", **auth}
        cross_site = {"Origin": f"http://{EVIL}:{port}", **auth}
        with Bystander(base, "tiny", headers=auth) as bystander:
            attacked = time.monotonic()
            for method, path in routes:
                assert refused(send(base, method, path, rebound), 421, "misdirected_request"), (method, path)
                assert refused(send(base, method, path, {"Host": EVIL, **auth}), 421, "misdirected_request")
                assert refused(send(base, method, path, cross_site), 403, "origin_not_allowed"), (method, path)
            for origin in ("null", f"http://127.0.0.1:{int(port) + 1}", f"https://127.0.0.1:{port}", "garbage"):
                r = send(base, "DELETE", f"/v1/levante/conversations/{created['id']}", {"Origin": origin, **auth})
                assert refused(r, 403, "origin_not_allowed"), origin
        assert bystander.flowed_since(attacked)  # it went on after the attacks, to its end
        listed = httpx.get(f"{base}/v1/levante/conversations", headers=auth).json()["data"]
        assert [c["id"] for c in listed] == [created["id"]]
        assert httpx.get(f"{base}/v1/levante/conversations/{created['id']}", headers=auth).json() == saved
        own_page = {"Origin": base, **auth}  # the page the server serves itself
        assert httpx.post(f"{base}/v1/chat/completions", json=CHAT, headers=own_page).status_code == 200
        assert httpx.get(f"{base}/v1/levante/conversations", headers=own_page).status_code == 200
        for host in ("localhost", f"LOCALHOST:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "app.localhost"):
            assert httpx.get(f"{base}/v1/models", headers={"Host": host, **auth}).status_code == 200, host
        assert "access-control-allow-origin" not in httpx.get(f"{base}/v1/models", headers=own_page).headers


def test_the_mcp_port_refuses_rebinding_and_other_sites(models):
    from levante.mcp import McpConfig, McpToolManager

    with levante_mcp_server(models[0], api_key=None) as (base, url):
        port = url.split(":")[2].split("/")[0]
        initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                      "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                                 "clientInfo": {"name": "t", "version": "1"}}}
        headers = {"Accept": "application/json, text/event-stream"}
        with Bystander(base, "tiny") as bystander:
            attacked = time.monotonic()
            for method in ("GET", "POST", "DELETE"):
                body = initialize if method == "POST" else None
                r = httpx.request(method, url, json=body, headers={**headers, "Host": f"{EVIL}:{port}"})
                assert refused(r, 421, "misdirected_request"), method
                r = httpx.request(method, url, json=body, headers={**headers, "Origin": f"http://{EVIL}"})
                assert refused(r, 403, "origin_not_allowed"), method
        assert bystander.flowed_since(attacked)  # it went on after the attacks, to its end

        async def ask():
            server = {"name": "levante", "source": {"type": "Http", "url": url}}
            manager = McpToolManager(McpConfig.from_dict({"servers": [server]}))
            await manager.start()
            try:
                assert not manager.failures, manager.failures
                return await manager.call_tool("levante_chat", {"message": "Hi", "max_tokens": 3, "temperature": 0})
            finally:
                await manager.aclose()

        assert not asyncio.run(ask()).is_error  # an MCP client (no Origin, its own Host) is served


def test_allowed_hosts_and_origins_and_cors_only_when_asked(models):
    chat = models[0]
    page = "http://localhost:5173"
    sites = SitePolicy("127.0.0.1", allowed_hosts=("levante.lan",), allowed_origins=(page,))
    with live_server(chat, "tiny", api_key=KEY, sites=sites) as (base, _):
        port = base.rsplit(":", 1)[1]
        auth = {"Authorization": f"Bearer {KEY}"}
        assert httpx.get(f"{base}/v1/models", headers={"Host": f"levante.lan:{port}", **auth}).status_code == 200
        assert httpx.get(f"{base}/v1/models", headers={"Host": "levante.lan.evil", **auth}).status_code == 421
        preflight = httpx.options(f"{base}/v1/chat/completions", headers={
            "Origin": page, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == page
        assert "access-control-allow-credentials" not in preflight.headers
        r = httpx.post(f"{base}/v1/chat/completions", json=CHAT, headers={"Origin": page, **auth})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == page
        assert httpx.post(f"{base}/v1/chat/completions", json=CHAT, headers={"Origin": page}).status_code == 401
        other = httpx.options(f"{base}/v1/chat/completions", headers={
            "Origin": "http://localhost:5174", "Access-Control-Request-Method": "POST"})
        assert refused(other, 403, "origin_not_allowed") and "access-control-allow-origin" not in other.headers
    with live_server(chat, "tiny", api_key=KEY, sites=SitePolicy("127.0.0.1", allowed_origins=("*",))) as (base, _):
        preflight = httpx.options(f"{base}/v1/models", headers={"Origin": "https://anywhere.example",
                                                                "Access-Control-Request-Method": "GET"})
        assert preflight.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in preflight.headers  # never * with credentials
        assert httpx.get(f"{base}/v1/models", headers={"Origin": "https://anywhere.example"}).status_code == 401
        assert httpx.get(f"{base}/v1/models", headers={"Host": EVIL}).status_code == 421  # hosts still checked


@pytest.mark.parametrize("host, allowed", [
    ("127.0.0.1:8000", True), ("127.0.0.1", True), ("127.1.2.3:80", True), ("[::1]:8000", True),
    ("[::ffff:127.0.0.1]:8000", True), ("localhost:8000", True), ("LocalHost.", True), ("a.b.localhost", True),
    (None, True), ("attacker.example:8000", False), ("localhost.attacker.example", False),
    ("127.0.0.1.nip.io", False), ("evil.com@127.0.0.1", False), ("127.0.0.1/x", False), ("", False),
    ("[::1", False), ("127.0.0.1:99999", False), ("10.0.0.5:8000", False), ("0.0.0.0:8000", False),
])
def test_host_allow_list_on_loopback(host, allowed):
    assert SitePolicy("127.0.0.1").host_allowed(host) is allowed


def test_host_allow_list_on_other_binds():
    wildcard = SitePolicy("0.0.0.0")
    assert wildcard.host_allowed("192.168.1.5:8000") and wildcard.host_allowed("[fe80::1]:8000")
    assert not wildcard.host_allowed("my-machine.lan:8000")  # a name could be rebound: --allowed-hosts
    assert SitePolicy("0.0.0.0", allowed_hosts=("my-machine.lan",)).host_allowed("MY-MACHINE.lan:8000")
    named = SitePolicy("10.0.0.5")
    assert named.host_allowed("10.0.0.5:8000") and named.host_allowed("localhost")
    assert not named.host_allowed("10.0.0.6:8000")
    assert SitePolicy("127.0.0.1", allowed_hosts=("*",)).host_allowed("anything.example")


def test_origins():
    policy = SitePolicy("127.0.0.1", allowed_origins=("HTTP://Dev.Example:80", "https://app.example:8443"))
    assert policy.origin_allowed("http://127.0.0.1:8000", "127.0.0.1:8000", "http")  # its own page
    assert policy.origin_allowed("http://localhost", "localhost:80", "http")
    assert policy.origin_allowed("http://dev.example", "127.0.0.1:8000", "http")
    assert policy.origin_allowed("https://app.example:8443", "127.0.0.1:8000", "http")
    for origin in ("http://127.0.0.1:8001", "https://127.0.0.1:8000", "null", "http://dev.example:8080",
                   "http://dev.example/path", "http://user@127.0.0.1:8000", "http://127.0.0.1:8000.evil", ""):
        assert not policy.origin_allowed(origin, "127.0.0.1:8000", "http"), origin
    with pytest.raises(ValueError, match="--allowed-origins"):
        SitePolicy("127.0.0.1", allowed_origins=("localhost:3000",))
    with pytest.raises(ValueError, match="--allowed-hosts"):
        SitePolicy("127.0.0.1", allowed_hosts=("a/b",))


def test_bad_flags_are_one_line():
    result = subprocess.run([sys.executable, "-m", "levante", "serve", "--allowed-origins", "localhost:3000"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "levante: error: --allowed-origins: 'localhost:3000' is not an origin (scheme://host[:port])"]
