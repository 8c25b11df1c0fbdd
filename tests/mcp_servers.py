"""Real MCP servers for the tests: the PyPI ones run from this venv, the npm ones from .mcp-servers/.

`make test` installs them, pinned: pip (the test extra): mcp-server-time, mcp-server-git,
mcp-server-fetch; npm, with node, into the git-ignored .mcp-servers/ folder: the filesystem, memory,
everything and sequential-thinking servers; and mcp-server-sqlite, archived and built for the 1.x
MCP SDK, into a virtual environment of its own (.mcp-servers/sqlite-venv), as a user would install it.
A second levante serves as one more (`levante serve --mcp-port`, over streamable HTTP).
"""
from __future__ import annotations

import http.server
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import pytest

from live_server import free_port, live_server

ROOT = Path(__file__).resolve().parent.parent
NPM_BIN = ROOT / ".mcp-servers" / "node_modules" / ".bin"
SQLITE_SERVER = ROOT / ".mcp-servers" / "sqlite-venv" / "bin" / "mcp-server-sqlite"


def npm_server(name: str) -> str:
    """The path of an npm-installed server's executable; skips without node, fails if `make` did not install it."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed: the npm MCP servers cannot run")
    path = NPM_BIN / name
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make test` (or `make mcp-servers`) to install the npm MCP servers")
    return str(path)


def time_server(pid_file: Path | None = None) -> dict:
    """mcp-server-time (PyPI); with `pid_file`, started through `sh` that writes its pid there first."""
    command = [sys.executable, "-m", "mcp_server_time", "--local-timezone", "UTC"]
    if pid_file is None:
        return {"command": command[0], "args": command[1:]}
    return {"command": "sh", "args": ["-c", f'echo $$ > "{pid_file}"; exec ' + " ".join(command)]}


def sqlite_server(database: Path) -> dict:
    """mcp-server-sqlite from its own virtual environment; fails if `make` did not create it."""
    if not SQLITE_SERVER.exists():
        pytest.fail(f"{SQLITE_SERVER} is missing: run `make test` (or `make mcp-servers`) to install it")
    return {"command": str(SQLITE_SERVER), "args": ["--db-path", str(database)]}


def fetch_server() -> dict:
    """mcp-server-fetch. It reaches nothing until called, then the URL's robots.txt and the URL (no
    proxy: a stdio server inherits only HOME, PATH and the like). Tests give it loopback URLs only,
    which it refuses without --allow-private-ips."""
    return {"command": sys.executable, "args": ["-m", "mcp_server_fetch", "--allow-private-ips"]}


def git_server(repo: Path) -> dict:
    return {"command": sys.executable, "args": ["-m", "mcp_server_git", "--repository", str(repo)]}


def make_git_repo(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "HOME": str(folder), "PATH": "/usr/bin:/bin"}
    subprocess.run(["git", "init", "-q", "-b", "main", str(folder)], check=True, env=env)
    (folder / "README.md").write_text("hello\n")
    subprocess.run(["git", "-C", str(folder), "add", "README.md"], check=True, env=env)
    subprocess.run(["git", "-C", str(folder), "commit", "-q", "-m", "first commit"], check=True, env=env)
    return folder


def wait_for_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port}")


@contextmanager
def loopback_site(pages: dict[str, str]):
    """An HTTP server on 127.0.0.1 serving `pages` (path -> HTML or text); yields (base URL, paths requested)."""
    requested: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requested.append(self.path)
            body = pages.get(self.path)
            self.send_response(200 if body is not None else 404)
            kind = "text/plain" if self.path.endswith(".txt") else "text/html"
            self.send_header("Content-Type", f"{kind}; charset=utf-8")
            self.end_headers()
            self.wfile.write((body or "not found").encode())

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requested
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def levante_mcp_server(llm, name: str = "tiny", api_key: str | None = None, sites=None):
    """levante's own MCP server, as `levante serve --mcp-port P` runs it (build_mcp_http_server in a thread
    beside the OpenAI API, on the same state and site policy), for `llm`; yields (OpenAI base URL, MCP URL)."""
    from levante.mcp.server import build_mcp_http_server

    with live_server(llm, name, api_key=api_key, sites=sites) as (base, state):
        port = free_port()
        server = build_mcp_http_server(state, "127.0.0.1", port, api_key=api_key, sites=sites)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        try:
            wait_for_port(port)
            yield base, f"http://127.0.0.1:{port}/mcp"
        finally:
            server.should_exit = True
            thread.join(10)


def assert_answers_from_the_tool(content: str, calls: list[dict]):
    """The reply states the Tokyo time that the time server returned (hh:mm, leading zero optional, ISO or not)."""
    tokyo = [c for c in calls if c["name"] == "time_get_current_time" and not c["is_error"]]
    assert tokyo, calls
    assert json.loads(tokyo[0]["arguments"])["timezone"] == "Asia/Tokyo"
    stamp = datetime.fromisoformat(json.loads(tokyo[0]["content"])["datetime"])
    assert re.search(rf"(?<!\d)0?{stamp.hour}:{stamp.minute:02d}(?!\d)", content), (content, stamp)
