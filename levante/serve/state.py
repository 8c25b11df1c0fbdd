"""What a server serves: its models (through the router), limits, metrics and tools.

One `ServerState` is shared by every face of one server (the OpenAI routes, the MCP server
port) and by its `Pipeline` (serve/pipeline.py), which carries their requests.
"""
from __future__ import annotations

import dataclasses

from levante.multimodal.images import load_image
from levante.serve.limits import RequestLimits
from levante.serve.mcp_loop import DEFAULT_MAX_ROUNDS
from levante.serve.metrics import Metrics, cpu_kernels
from levante.serve.model_specs import ModelSpec
from levante.serve.pipeline import Pipeline
from levante.serve.router import ModelRouter
from levante.serve.ranking import Ranker
from levante.serve.tool_selection import DEFAULT_MAX_TOOLS


class ServerState:
    def __init__(self, model_name: str | None = None, limits: RequestLimits | None = None,
                 router: ModelRouter | None = None):
        self.model_name = model_name  # the name `attach` serves a model under
        self.limits = limits or RequestLimits()
        self.metrics = Metrics()
        self.router = router or ModelRouter()
        self.router.on_change = self.metrics.model_changed
        self.web_search = None  # levante.search.WebSearch, when web search is enabled
        self.mcp = None  # levante.mcp.McpToolManager, when MCP servers are configured (see serve/mcp_loop.py)
        self.mcp_max_rounds = DEFAULT_MAX_ROUNDS
        self.mcp_max_tools = DEFAULT_MAX_TOOLS  # per request, beyond which the most relevant are chosen; 0: no cap
        self.tool_selectors = {}  # chat model name -> serve/tool_selection.py's ToolSelector, built on first need
        self.ranker = Ranker()  # ranks search passages and MCP tools: the served embedding model, else MiniLM
        self.load_image = load_image  # image sources -> images; `levante serve` may confine local paths
        self.ready = False  # the models loaded at start are (/health says so)
        self.load_failure: str | None = None  # why loading at start failed, if it did (the server then stops)
        self.webui = None  # serve/webui.py's WebUI: the chat page at / and its conversation routes; None: off
        self.pipeline = Pipeline(self)

    def attach(self, llm, embedding_llm=None, embedding_name: str | None = None) -> None:
        """Serve models loaded already (the Python API, tests, `levante chat`): `llm` under `model_name`,
        and an embedding model beside it. Attached models stay loaded."""
        for model, name in ((llm, self.model_name), (embedding_llm, embedding_name)):
            if model is not None:
                args = dataclasses.replace(model.args, lora={})  # the adapters: what the engine holds
                spec = ModelSpec(name or model.model_name, args, task=model.task, pinned=True)
                self.router.add(spec, model)
        self.ready = True

    def health(self) -> tuple[int, dict]:
        """/health: 200 once the models loaded at start are, while every loaded model's engine loop is
        alive and making progress; each model's status beside (a model that failed to load later, or
        was unloaded, leaves the others healthy)."""
        if self.load_failure:
            return 503, {"status": "failed", "reason": self.load_failure}
        if not self.ready:
            return 503, {"status": "loading"}
        models = {m.name: m.health() for m in self.router.models.values()}
        healthy = all(model["status"] != "unhealthy" for model in models.values())
        return (200 if healthy else 503), {"status": "ok" if healthy else "unhealthy", "models": models,
                                           "cpu_kernels": cpu_kernels()}

    def close(self) -> None:
        """Stop the engine loops (the server has stopped)."""
        self.router.close()
