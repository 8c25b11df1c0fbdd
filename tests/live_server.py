"""A real uvicorn server on a loopback port, in a thread, for client tests."""
from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import httpx

from levante.serve.app import ServerState
from levante.serve.server import build_server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(llm, name: str = "test-model", api_key: str | None = None, embedding_llm=None,
                embedding_name: str | None = None, web_search=None, mcp=None, mcp_max_rounds: int | None = None,
                limits=None, open_metrics: bool = False, webui=None):
    """Yields (base_url, state) with `llm` (and an embedding model) attached and warm; stops the server afterwards.
    `limits`: a levante.serve.limits.RequestLimits (default: the server's defaults); `webui`: a
    levante.serve.webui.WebUI to serve the chat page (default: none)."""
    state = ServerState(name, limits)
    state.webui = webui
    port = free_port()
    server = build_server(state, "127.0.0.1", port, api_key, log_level="warning", open_metrics=open_metrics)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{base}/health").status_code == 503:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.05)
    state.web_search = web_search
    state.mcp = mcp  # a started levante.mcp.McpToolManager, or None
    if mcp_max_rounds is not None:
        state.mcp_max_rounds = mcp_max_rounds
    engine = getattr(llm, "engine", None)
    if engine is not None:  # as `levante serve` does at load: not inside the first constrained request,
        engine.grammars.ll_tokenizer  # where it counts against --grammar-timeout (seconds, on a busy machine)
    state.attach(llm, embedding_llm, embedding_name)
    try:
        yield base, state
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        if state.loop is not None:
            state.loop.stop()
