"""A real uvicorn server on a loopback port, in a thread, for client tests."""
from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import httpx

from levante.serve.app import ServerState
from levante.serve.server import build_server


def metric(base: str, name: str, headers: dict | None = None, **labels) -> float | None:
    """The value of the /metrics sample `name` whose labels include `labels` (None if there is none)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base}/metrics", headers=headers or {}).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return sample.value
    return None


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
    with serving(state, api_key, open_metrics) as base:
        state.web_search = web_search
        state.mcp = mcp  # a started levante.mcp.McpToolManager, or None
        if mcp_max_rounds is not None:
            state.mcp_max_rounds = mcp_max_rounds
        engine = getattr(llm, "engine", None)
        if engine is not None:  # not inside the first constrained request, where it counts against
            engine.grammars.ll_tokenizer  # --grammar-timeout (seconds, on a busy machine)
        state.attach(llm, embedding_llm, embedding_name)
        yield base, state


@contextmanager
def serving(state: ServerState, api_key: str | None = None, open_metrics: bool = False):
    """Yields the base URL of `state` served on a loopback port (answering /health 503 until the caller
    makes it ready); stops the server and its models afterwards."""
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
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        state.close()
