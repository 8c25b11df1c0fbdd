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
                limits=None, open_metrics: bool = False, webui=None, sites=None):
    """Yields (base_url, state) with `llm` (and an embedding model) attached and warm; stops the server afterwards.
    `limits`: a levante.serve.limits.RequestLimits (default: the server's defaults); `webui`: a
    levante.serve.webui.WebUI to serve the chat page (default: none); `sites`: a
    levante.serve.sites.SitePolicy (default: the loopback address's)."""
    state = ServerState(name, limits)
    state.webui = webui
    with serving(state, api_key, open_metrics, sites) as base:
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
def serving(state: ServerState, api_key: str | None = None, open_metrics: bool = False, sites=None):
    """Yields the base URL of `state` served on a loopback port (answering /health 503 until the caller
    makes it ready); stops the server and its models afterwards."""
    port = free_port()
    server = build_server(state, "127.0.0.1", port, api_key, log_level="warning", open_metrics=open_metrics,
                          sites=sites)
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


class Bystander:
    """A streamed chat that runs beside a test's attacks, from the start of a `with` block: `flowed_since(t)`
    says whether tokens came after time t (time.monotonic()); on leaving, it must end as asked (every
    token, finish_reason 'length'), proving the attacks neither stalled nor broke the requests beside it."""

    def __init__(self, base: str, model: str, max_tokens: int = 300, headers: dict | None = None):
        self.base, self.max_tokens = base, max_tokens
        self.body = {"model": model, "messages": [{"role": "user", "content": "Go on."}], "max_tokens": max_tokens,
                     "ignore_eos": True, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        self.headers = headers or {}
        self.chunks: list[float] = []  # arrival times
        self.finish_reason = self.usage = self.error = None
        self._thread = threading.Thread(target=self._stream, daemon=True)

    def __enter__(self) -> "Bystander":
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self.chunks:  # streaming before the attacks begin
            if self.error or time.monotonic() > deadline:
                raise RuntimeError(f"the bystander stream did not start: {self.error}")
            time.sleep(0.01)
        return self

    def __exit__(self, kind, *rest) -> None:
        self._thread.join(timeout=300)
        if kind is None:
            assert self.error is None, self.error
            assert self.finish_reason == "length" and self.usage["completion_tokens"] == self.max_tokens, \
                (self.finish_reason, self.usage)

    def flowed_since(self, moment: float) -> bool:
        return any(arrival > moment for arrival in self.chunks)

    def _stream(self) -> None:
        import json

        try:
            with httpx.stream("POST", f"{self.base}/v1/chat/completions", json=self.body, headers=self.headers,
                              timeout=300) as response:
                if response.status_code != 200:
                    self.error = f"HTTP {response.status_code}: {response.read()[:300]!r}"
                    return
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[len("data: "):])
                    self.chunks.append(time.monotonic())
                    if chunk.get("usage"):
                        self.usage = chunk["usage"]
                    for choice in chunk.get("choices", []):
                        self.finish_reason = choice.get("finish_reason") or self.finish_reason
        except Exception as e:  # noqa: BLE001 - reported by __exit__
            self.error = f"{type(e).__name__}: {e}"
