"""Real MCP servers for the tests: the PyPI ones run from this venv, the npm ones from .mcp-servers/.

`make test` installs them (pip: mcp-server-time, mcp-server-git; npm, with node: the filesystem,
memory and everything servers, pinned, into the git-ignored .mcp-servers/ folder).
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NPM_BIN = ROOT / ".mcp-servers" / "node_modules" / ".bin"


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port}")
