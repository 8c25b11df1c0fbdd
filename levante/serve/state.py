"""What a server serves: its models (once loaded), their engine loop, limits, metrics and tools.

One `ServerState` is shared by every face of one server (the OpenAI routes, the MCP server
port) and by its `Pipeline` (serve/pipeline.py), which carries their requests.
"""
from __future__ import annotations

from levante.engine.loop import EngineLoop
from levante.errors import InvalidRequest, ModelNotFound, ServiceUnavailable
from levante.multimodal.images import load_image
from levante.serve.embeddings import EmbeddingService
from levante.serve.limits import RequestLimits
from levante.serve.mcp_loop import DEFAULT_MAX_ROUNDS
from levante.serve.metrics import Metrics
from levante.serve.pipeline import Pipeline
from levante.serve.ranking import Ranker
from levante.serve.tool_selection import DEFAULT_MAX_TOOLS


class ServerState:
    def __init__(self, model_name: str, limits: RequestLimits | None = None):
        self.model_name = model_name
        self.limits = limits or RequestLimits()
        self.llm = None  # levante.LLM, set when loading and warm-up are done; None when serving embeddings only
        self.loop: EngineLoop | None = None
        self.embeddings: EmbeddingService | None = None  # the embedding model, if one is served
        self.web_search = None  # levante.search.WebSearch, when web search is enabled
        self.mcp = None  # levante.mcp.McpToolManager, when MCP servers are configured (see serve/mcp_loop.py)
        self.mcp_max_rounds = DEFAULT_MAX_ROUNDS
        self.mcp_max_tools = DEFAULT_MAX_TOOLS  # per request, beyond which the most relevant are chosen; 0: no cap
        self.tool_selector = None  # serve/tool_selection.py's ToolSelector, built on first need
        self.ranker = Ranker()  # ranks search passages and MCP tools: the served embedding model, else MiniLM
        self.metrics = Metrics()
        self.load_image = load_image  # image sources -> images; `levante serve` may confine local paths
        self.load_failure: str | None = None  # why loading failed, if it did (the server is then stopping)
        self.webui = None  # serve/webui.py's WebUI: the chat page at / and its conversation routes; None: off
        self.pipeline = Pipeline(self)

    @property
    def ready(self) -> bool:
        return self.loop is not None or self.embeddings is not None

    def attach(self, llm, embedding_llm=None, embedding_name: str | None = None) -> None:
        """Serve `llm` and/or an embedding model; an embedding `llm` alone serves embeddings only."""
        if llm is not None and llm.is_embedding_model:
            llm, embedding_llm, embedding_name = None, llm, self.model_name
        self.llm = llm
        self.loop = EngineLoop(llm.engine) if llm is not None else None
        if embedding_llm is not None:  # last: `ready` turns true here when only embeddings are served
            self.embeddings = EmbeddingService(embedding_llm, embedding_name or embedding_llm.model_name)

    def health(self) -> tuple[int, dict]:
        """/health: 200 only while the model is loaded and its engine loop alive and making progress."""
        if self.load_failure:
            return 503, {"status": "failed", "reason": self.load_failure}
        if not self.ready:
            return 503, {"status": "loading"}
        problem = self.loop.problem if self.loop is not None else None
        if problem:
            return 503, {"status": "unhealthy", "reason": problem}
        return 200, {"status": "ok"}

    def check(self, model: str | None) -> None:
        if not self.ready:
            raise ServiceUnavailable("the model is still loading; retry when /health answers 200")
        embedding_name = self.embeddings.name if self.embeddings else None
        if self.llm is None or (model and model == embedding_name and model != self.model_name):
            raise InvalidRequest(f"'{model or embedding_name}' is an embedding model: it serves /v1/embeddings "
                                 "only (start the server with a chat model to generate)")
        if model and model != self.model_name:
            raise ModelNotFound(f"model '{model}' is not served here; this server serves '{self.model_name}'")
