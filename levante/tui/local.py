"""Local mode: levante's own OpenAI-compatible server, in-process on a free loopback port.

The chat app then talks to the local engine exactly as it talks to any remote server, so chat
templates, tool-call parsing and errors all take the server's one road. A random API key keeps
other local users off the port.
"""
from __future__ import annotations

import logging
import secrets
import socket
import threading
import time

import httpx

from levante.errors import ServiceUnavailable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """`with LocalServer(llm, name) as server:` serves `llm` at `server.base_url` (…/v1) with `server.api_key`."""

    def __init__(self, llm, name: str):
        from levante.serve.app import ServerState
        from levante.serve.server import build_server

        self.state = ServerState(name)
        self.api_key = secrets.token_urlsafe(24)
        self.port = free_port()
        self.server = build_server(self.state, "127.0.0.1", self.port, self.api_key, log_level="error")
        for logger_name in ("uvicorn", "uvicorn.error", "uvicorn.access"):  # the terminal belongs to the app
            logger = logging.getLogger(logger_name)
            logger.handlers = [logging.NullHandler()]
            logger.propagate = False
        self.llm = llm
        self.thread = threading.Thread(target=self.server.run, name="levante-chat-server", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float = 30.0) -> LocalServer:
        self.state.attach(self.llm)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ServiceUnavailable(f"the local server did not start on 127.0.0.1:{self.port}")
            time.sleep(0.02)
        httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=5).raise_for_status()
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.state.close()

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
