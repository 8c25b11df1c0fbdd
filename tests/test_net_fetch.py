"""The outbound fetcher (levante/net): every refused address class, every spelling, every redirect.

No test sends a packet to a non-loopback address. Non-loopback classes are checked against the
classifier directly, or with name resolution patched in-process and the network backend's
connect replaced, so a refusal must happen before any connection. A loopback canary server
counts the requests that reach it: a refused URL or redirect must leave its count at 0.
"""
from __future__ import annotations

import asyncio
import gzip
import http.server
import io
import ipaddress
import socket
import threading
import time

import httpcore
import pytest
from PIL import Image

from levante.errors import InvalidRequest
from levante.net import FetchPolicy, address_class, addresses, literal_address
from levante.net.fetch import MAX_REDIRECTS, REFUSED, FetchFailed, FetchRefused, fetch
from levante.net.policy import listens_on_loopback

PUBLIC = FetchPolicy()  # a server on a public address, no opt-ins
LOCAL = FetchPolicy.local()


class Canary(http.server.BaseHTTPRequestHandler):
    """`/secret` counts hits (what a refused fetch must never reach); `/to?url` redirects there
    (or anywhere); `/png`, `/gzip-bomb`, `/drip`, `/html`, `/big`, `/loop` test the caps."""

    def do_GET(self):  # noqa: N802
        server = self.server
        path, _, query = self.path.partition("?")
        server.hits[path] = server.hits.get(path, 0) + 1
        if path == "/to":
            self._send(302, b"", [("Location", query)])
        elif path == "/loop":
            self._send(302, b"", [("Location", "/loop")])
        elif path in ("/secret", "/png"):
            self._send(200, server.png, [("Content-Type", "image/png")])
        elif path == "/html":
            self._send(200, b"<html><body>hello</body></html>", [("Content-Type", "text/html; charset=utf-8")])
        elif path == "/gzip-bomb":  # 64 MB of zeros in ~64 KB
            self._send(200, server.bomb, [("Content-Type", "image/png"), ("Content-Encoding", "gzip")])
        elif path == "/big":  # no Content-Length: the cap must stop the stream itself
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            try:
                for _ in range(64):
                    self.wfile.write(b"\0" * 65536)
            except (BrokenPipeError, ConnectionResetError):
                pass
            self.close_connection = True
        elif path == "/drip":  # a byte every 0.2 s, forever: only the total time cap ends it
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(0.2)
            except (BrokenPipeError, ConnectionResetError):
                pass
            self.close_connection = True
        else:
            self._send(404, b"", [])

    def _send(self, status, body, headers):
        try:
            self.send_response(status)
            for key, value in headers:
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (3, 2), (1, 2, 3)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def canary():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Canary)
    server.daemon_threads = True
    server.hits, server.png, server.bomb = {}, _png(), gzip.compress(b"\0" * (64 << 20))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


@pytest.fixture
def hits(canary):
    canary.hits.clear()
    return canary.hits


def port_of(canary) -> int:
    return canary.server_address[1]


def loopback_spellings(port: int) -> list[str]:
    return [f"http://{host}:{port}/secret" for host in [
        "127.0.0.1", "127.0.0.1.", "127.1", "127.0.1", "2130706433", "0x7f000001", "0x7f.1", "0x7f.0.0.1",
        "017700000001", "0177.0.0.1", "0177.1", "[::1]", "[0:0:0:0:0:0:0:1]", "[::ffff:127.0.0.1]",
        "[::ffff:7f00:1]", "[0:0:0:0:0:ffff:7f00:1]", "localhost", "localhost.", "LOCALHOST", "127.42.42.42",
        "0", "0.0.0.0", "[::]",
    ]]


# -- the classifier ------------------------------------------------------------------------------------

@pytest.mark.parametrize("address, kind", [
    ("127.0.0.1", "loopback"), ("127.255.0.9", "loopback"), ("::1", "loopback"),
    ("10.0.0.1", "private"), ("172.16.0.1", "private"), ("172.31.255.254", "private"), ("192.168.1.1", "private"),
    ("fc00::1", "private"), ("fd12:3456::1", "private"),
    ("169.254.169.254", "link-local"), ("169.254.0.1", "link-local"), ("fe80::1", "link-local"),
    ("100.64.0.1", "shared"), ("100.127.255.254", "shared"),
    ("224.0.0.1", "multicast"), ("239.255.255.250", "multicast"), ("ff02::1", "multicast"),
    ("0.0.0.0", "unspecified"), ("0.1.2.3", "unspecified"), ("::", "unspecified"),
    ("::ffff:127.0.0.1", "ipv4-mapped"), ("::ffff:10.0.0.1", "ipv4-mapped"), ("::ffff:8.8.8.8", "ipv4-mapped"),
    ("::127.0.0.1", "ipv4-mapped"), ("64:ff9b::a00:1", "ipv4-mapped"), ("2002:a00:1::1", "ipv4-mapped"),
    ("192.0.2.1", "reserved"), ("198.18.0.1", "reserved"), ("240.0.0.1", "reserved"),
    ("255.255.255.255", "reserved"), ("2001:db8::1", "reserved"),
    ("8.8.8.8", "public"), ("93.184.216.34", "public"), ("172.32.0.1", "public"), ("100.128.0.1", "public"),
    ("2606:4700::1111", "public"),
])
def test_address_classes(address, kind):
    assert address_class(address) == kind
    assert PUBLIC.address_allowed(ipaddress.ip_address(address)) == (kind == "public")
    # A local server may reach private networks, never unspecified or multicast addresses.
    assert LOCAL.address_allowed(ipaddress.ip_address(address)) == (kind not in ("unspecified", "multicast"))


@pytest.mark.parametrize("host, address", [
    ("2130706433", "127.0.0.1"), ("0x7f000001", "127.0.0.1"), ("0x7f.1", "127.0.0.1"), ("127.1", "127.0.0.1"),
    ("0177.0.0.1", "127.0.0.1"), ("017700000001", "127.0.0.1"), ("127.0.0.1.", "127.0.0.1"),
    ("[::1]", "::1"), ("::ffff:127.0.0.1", "::ffff:7f00:1"), ("0", "0.0.0.0"), ("167772161", "10.0.0.1"),
    ("0xa9.0xfe.0xa9.0xfe", "169.254.169.254"), ("2852039166", "169.254.169.254"), ("0xA9FEA9FE", "169.254.169.254"),
    ("example.com", None), ("localhost", None), ("1.2.3.4.5", None), ("", None),
])
def test_literal_spellings(host, address):
    found = literal_address(host)
    assert (str(found) if found is not None else None) == address


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("localhost", True), ("::1", True), ("127.0.0.2", True),
    ("0.0.0.0", False), ("::", False), ("192.168.1.10", False), ("example.com", False),
])
def test_policy_follows_the_listening_address(host, loopback):
    assert listens_on_loopback(host) == loopback
    assert FetchPolicy.for_server(host).allow_private == loopback
    assert FetchPolicy.for_server(host, allow_private_network=True).allow_private


# -- refusals before any connection -----------------------------------------------------------------

@pytest.fixture
def no_connect(monkeypatch):
    """Every attempt to open a socket is recorded and fails (no packet leaves)."""
    attempts = []

    def connect(self, host, port, timeout=None, local_address=None, socket_options=None):
        attempts.append((host, port))
        raise httpcore.ConnectError("blocked by the test")

    monkeypatch.setattr(httpcore.SyncBackend, "connect_tcp", connect)
    return attempts


@pytest.fixture
def names(monkeypatch):
    """Name resolution answered in-process: host -> list of address strings (an exception to raise)."""
    table: dict[str, object] = {}
    lookups = []

    def resolve(host, port):
        lookups.append(host)
        answer = table.get(host)
        if answer is None or isinstance(answer, Exception):
            raise answer or socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [ipaddress.ip_address(a) for a in answer]

    monkeypatch.setattr(addresses, "resolve", resolve)
    table["lookups"] = lookups
    return table


@pytest.mark.parametrize("answer", [
    ["10.0.0.7"], ["172.20.1.1"], ["192.168.0.10"], ["169.254.169.254"], ["100.64.1.2"], ["fd00::5"],
    ["fe80::1"], ["::ffff:10.0.0.1"], ["224.0.0.251"], ["0.0.0.0"], ["127.0.0.1"], ["::1"],
    ["93.184.216.34", "10.0.0.7"],  # one bad address among good ones refuses the name
])
def test_names_resolving_to_refused_classes(names, no_connect, answer):
    names["internal.test"] = answer
    with pytest.raises(FetchRefused) as refused:
        fetch("http://internal.test/x.png", PUBLIC, max_bytes=1000, timeout=2)
    assert str(refused.value) == REFUSED
    assert no_connect == []


@pytest.mark.parametrize("host", ["10.0.0.1", "0xa.1", "167772161", "169.254.169.254", "2852039166",
                                  "[fd00::1]", "[::ffff:a9fe:a9fe]", "[fe80::1]", "100.64.0.1", "224.0.0.1"])
def test_address_literals_of_refused_classes(names, no_connect, host):
    with pytest.raises(FetchRefused, match=REFUSED):
        fetch(f"http://{host}/latest/meta-data/", PUBLIC, max_bytes=1000, timeout=2)
    assert no_connect == [] and names["lookups"] == []  # refused before resolution


def test_connects_to_the_address_it_checked(names, no_connect):
    """Resolved once; the connection goes to that address (no second lookup to rebind)."""
    names["public.test"] = ["93.184.216.34"]
    with pytest.raises(FetchFailed, match="unreachable"):
        fetch("http://public.test:8080/a.png", PUBLIC, max_bytes=1000, timeout=2)
    assert no_connect == [("93.184.216.34", 8080)]
    assert names["lookups"] == ["public.test"]


def test_the_refusal_says_nothing_about_the_target(names, no_connect):
    names["private.test"] = ["10.1.2.3"]
    names["gone.test"] = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    messages = set()
    for url in ["http://private.test/", "http://gone.test/", "http://10.1.2.3:22/", "http://[::1]:6379/",
                "file:///etc/passwd", "ftp://10.0.0.1/x"]:
        with pytest.raises(FetchRefused) as refused:
            fetch(url, PUBLIC, max_bytes=1000, timeout=2)
        messages.add(str(refused.value))
    assert messages == {REFUSED}
    assert no_connect == []


# -- the canary: loopback spellings and redirects -------------------------------------------------------

def refused(call) -> str:
    """The message of a refused fetch: the uniform refusal, or (for a spelling httpx's URL
    parser rejects, such as 0177.0.0.1) that the URL is not one; never anything else."""
    with pytest.raises((FetchRefused, FetchFailed)) as error:
        call()
    assert str(error.value) in (REFUSED, "not a valid URL"), error.value.__context__
    return str(error.value)


def test_every_loopback_spelling_is_refused(canary, hits):
    messages = [refused(lambda: fetch(url, PUBLIC, max_bytes=1000, timeout=2))
                for url in loopback_spellings(port_of(canary))]
    assert messages.count(REFUSED) >= len(messages) - 2
    assert hits == {}


def test_a_local_server_may_fetch_from_loopback(canary, hits):
    port = port_of(canary)
    assert fetch(f"http://127.0.0.1:{port}/png", LOCAL, max_bytes=1000, timeout=5).body == canary.png
    assert fetch(f"http://localhost:{port}/png", LOCAL, max_bytes=1000, timeout=5).body == canary.png
    assert hits == {"/png": 2}


class _FrontIsPublic(FetchPolicy):
    """The public policy, except that the name `front.test` counts as public: it stands for a
    public site (served by the canary) whose redirects are the attack."""

    def address_allowed(self, address, host=""):
        return host == "front.test" or super().address_allowed(address, host)


def test_redirects_to_loopback_are_refused_at_every_hop(canary, hits, names):
    port = port_of(canary)
    names["front.test"] = ["127.0.0.1"]
    names["rebound.test"] = ["127.0.0.1"]
    policy = _FrontIsPublic()
    assert fetch(f"http://front.test:{port}/png", policy, max_bytes=1000, timeout=5).body == canary.png
    targets = loopback_spellings(port) + [f"http://rebound.test:{port}/secret", f"file:///etc/passwd",
                                          f"http://front.test:{port}/to?http://127.0.0.1:{port}/secret"]
    for target in targets:
        refused(lambda: fetch(f"http://front.test:{port}/to?{target}", policy, max_bytes=1000, timeout=5))
    assert "/secret" not in hits
    assert hits["/to"] == len(targets) + 1


def test_redirect_hops_are_capped(canary, hits):
    with pytest.raises(FetchFailed, match="too many redirects"):
        fetch(f"http://127.0.0.1:{port_of(canary)}/loop", LOCAL, max_bytes=1000, timeout=5)
    assert hits["/loop"] == MAX_REDIRECTS + 1


def test_allowed_media_domains(canary, hits, names):
    """Only listed names (and their subdomains) are fetched, and those may resolve anywhere."""
    port = port_of(canary)
    names["media.test"] = ["127.0.0.1"]
    names["cdn.media.test"] = ["127.0.0.1"]
    policy = FetchPolicy.for_server("0.0.0.0", ["Media.Test."])
    assert fetch(f"http://media.test:{port}/png", policy, max_bytes=1000, timeout=5).body == canary.png
    assert fetch(f"http://cdn.media.test:{port}/png", policy, max_bytes=1000, timeout=5).body == canary.png
    for url in [f"http://other.test:{port}/secret", f"http://127.0.0.1:{port}/secret",
                f"http://media.test.evil.test:{port}/secret", f"http://xmedia.test:{port}/secret",
                f"http://media.test:{port}/to?http://127.0.0.1:{port}/secret"]:
        with pytest.raises(FetchRefused, match=REFUSED):
            fetch(url, policy, max_bytes=1000, timeout=5)
    assert "/secret" not in hits
    assert names["lookups"].count("other.test") == 0  # refused by name, before resolution


# -- caps -----------------------------------------------------------------------------------------------

def test_bytes_time_and_type_caps(canary, hits):
    base = f"http://127.0.0.1:{port_of(canary)}"
    with pytest.raises(FetchFailed, match="too large"):  # 64 MB once decompressed, 64 KB on the wire
        fetch(f"{base}/gzip-bomb", LOCAL, max_bytes=1 << 20, timeout=10)
    with pytest.raises(FetchFailed, match="too large"):  # no Content-Length to refuse up front
        fetch(f"{base}/big", LOCAL, max_bytes=100_000, timeout=10)
    with pytest.raises(FetchFailed, match="too large"):  # declared too large: refused before reading
        fetch(f"{base}/png", LOCAL, max_bytes=10, timeout=10)
    start = time.monotonic()
    with pytest.raises(FetchFailed, match="timed out"):  # each byte within the read timeout, the total not
        fetch(f"{base}/drip", LOCAL, max_bytes=1 << 20, timeout=1)
    assert time.monotonic() - start < 15  # ended by the cap, not by the server's 20 s of dripping
    with pytest.raises(FetchFailed, match="text/html"):
        fetch(f"{base}/html", LOCAL, max_bytes=1000, timeout=5, accept=("image/",))
    with pytest.raises(FetchFailed, match="HTTP 404"):
        fetch(f"{base}/missing", LOCAL, max_bytes=1000, timeout=5)


# -- the three callers ----------------------------------------------------------------------------------

def test_image_urls_go_through_the_fetcher(canary, hits):
    from levante.multimodal.images import load_image

    port = port_of(canary)
    assert load_image(f"http://127.0.0.1:{port}/png").size == (3, 2)
    for url in loopback_spellings(port):
        with pytest.raises(InvalidRequest, match="refused: not an address|not a valid URL"):
            load_image(url, fetch_policy=PUBLIC)
    assert hits == {"/png": 1}


def test_search_result_pages_go_through_the_fetcher(canary, hits):
    from levante.search import SearchResult, WebSearch

    port = port_of(canary)
    results = [{"title": "page", "url": url, "snippet": "a snippet"} for url in loopback_spellings(port)]
    search = WebSearch(lambda query, n: results, policy=PUBLIC, max_results=100)
    outcome = search.search("anything", top_k=100)
    assert all(source.text == "" for source in outcome.sources)  # snippets only
    assert hits == {}
    local = WebSearch(lambda query, n: [SearchResult("p", f"http://127.0.0.1:{port}/html")])
    assert local.search("anything").sources[0].text == "hello"


def test_mcp_server_urls_go_through_the_fetcher(canary, hits):
    from levante.mcp import McpConfig, McpToolManager

    port = port_of(canary)
    config = McpConfig.from_dict({"mcpServers": {
        "http": {"url": f"http://127.0.0.1:{port}/secret"},
        "sse": {"type": "sse", "url": f"http://localhost:{port}/secret"},
        "mapped": {"url": f"http://[::ffff:127.0.0.1]:{port}/secret"},
    }})

    async def main():
        manager = McpToolManager(config, startup_timeout_secs=20, policy=PUBLIC)
        await manager.start()
        try:
            return manager.failures
        finally:
            await manager.aclose()

    failures = asyncio.run(main())
    assert set(failures) == {"http", "sse", "mapped"}
    assert all("refused" in reason for reason in failures.values()), failures
    assert hits == {}
