"""Which MCP tools a chat request is offered (serve/mcp_loop.py).

mistral.rs, llama.cpp and Ollama put every registered tool into every prompt. With a real setup
(nine servers, sixty tools: some 9,000 prompt tokens of JSON schemas) that costs prompt time and
loses a small model among tools it does not need. While the tools fit the budget (at most
`max_tools`, their definitions within TOOL_CONTEXT_SHARE of the context window) all are offered;
beyond it a request is offered, in this order:
  1. the tools of servers marked `always_offer` in the MCP config;
  2. every tool the conversation names: by its offered name (`sqlite_read_query`), by the server's
     own name for it when that has a `_` or `-` (`read_query`), or by a call made earlier in it;
  3. the others by cosine similarity of "server tool: description" to the recent messages (with
     serve/ranking.py's embedding model), best first, while they fit the budget and score at least
     RELEVANCE_FLOOR of the best score: a clear question gets its few tools, not a full budget.
The first two kinds are offered whatever the budget says. Without an embedding model the others
keep their registration order. The chosen tools go to the model in registration order, not by
score: each server's own order (its main tool usually first, which a small model tends to pick)
and, for requests that choose the same tools, the same prompt prefix. One request keeps one
selection for all its rounds.
"""
from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from levante.multimodal.messages import text_of
from levante.search.retrieval import Embed, unit_vectors

if TYPE_CHECKING:  # the MCP client is imported only by a server that has MCP servers
    from levante.mcp import McpTool

DEFAULT_MAX_TOOLS = 16
TOOL_CONTEXT_SHARE = 0.25  # of the context window, at most, for the tool definitions
RELEVANCE_FLOOR = 0.5  # a ranked tool scoring below this share of the best score is left out
RECENT_MESSAGES = 4  # the messages the tools are ranked against, newest first
DOCUMENT_CHARS = 512  # of a tool's "server tool: description" embedded (its first sentences say what it does)


class ToolSelector:
    def __init__(self, tools: list[McpTool], max_tools: int, max_tool_tokens: int,
                 count_tokens: Callable[[str], int], embedder: Callable[[], Embed | None] | None = None,
                 always_offer: frozenset[str] = frozenset()):
        """`max_tools` 0: no limit by count. `embedder()` gives the ranking model (loaded on first use)."""
        self.tools = list(tools)
        self.max_tools, self.max_tool_tokens = max_tools, max_tool_tokens
        self.tokens = {tool.name: count_tokens(json.dumps(tool.to_openai(), ensure_ascii=False))
                       for tool in self.tools}
        self.always = {tool.name for tool in self.tools if tool.server_id in always_offer}
        self.selects = ((max_tools > 0 and len(self.tools) > max_tools)
                        or sum(self.tokens.values()) > max_tool_tokens)
        self._embedder = embedder
        self._vectors: torch.Tensor | None = None
        self._embed: Embed | None = None
        self._lock = threading.Lock()
        self._mentions = {tool.name: _mention_pattern(tool) for tool in self.tools}

    def prepare(self) -> None:
        """Embed the tools now rather than in the first request that needs it. Blocking."""
        if self.selects:
            self._tool_vectors()

    def select(self, messages: list[dict]) -> list[McpTool]:
        """The tools to offer for a conversation (OpenAI chat messages as dicts), in registration order.
        Blocking: it may embed."""
        if not self.selects:
            return list(self.tools)
        named = self.named(messages)
        chosen = {t.name for t in self.tools if t.name in self.always or t.name in named}
        tokens = sum(self.tokens[name] for name in chosen)
        ranked = [(tool, score) for tool, score in self.ranked(messages) if tool.name not in chosen]
        floor = ranked[0][1] * RELEVANCE_FLOOR if ranked and ranked[0][1] > 0 else float("-inf")
        for tool, score in ranked:
            if (self.max_tools and len(chosen) >= self.max_tools) or score < floor:
                break
            if chosen and tokens + self.tokens[tool.name] > self.max_tool_tokens:
                continue
            chosen.add(tool.name)
            tokens += self.tokens[tool.name]
        return [tool for tool in self.tools if tool.name in chosen]

    def ranked(self, messages: list[dict]) -> list[tuple[McpTool, float]]:
        """Every tool with its similarity to the recent messages, best first; without a ranking model
        (or any text) all score 0 and keep their registration order. Blocking: it may embed."""
        query = _recent_text(messages)
        vectors = self._tool_vectors() if query else None
        if vectors is None:
            return [(tool, 0.0) for tool in self.tools]
        scores = (vectors @ unit_vectors(self._embed, [query], "query")[0]).tolist()
        return sorted(zip(self.tools, scores), key=lambda pair: -pair[1])

    def named(self, messages: list[dict]) -> set[str]:
        """Names of the tools that the user or system messages mention, or that earlier calls used."""
        text = "\n".join(text_of(m.get("content")) for m in messages if m.get("role") in ("user", "system"))
        named = {call["function"]["name"] for m in messages for call in m.get("tool_calls") or []
                 if isinstance(call, dict) and isinstance(call.get("function"), dict)}
        return {name for name, pattern in self._mentions.items() if name in named or pattern.search(text)}

    def _tool_vectors(self) -> torch.Tensor | None:
        with self._lock:
            if self._vectors is None and self._embedder is not None:
                self._embed = self._embedder()
                self._embedder = None  # resolved, model or not
                if self._embed is not None:
                    self._vectors = unit_vectors(self._embed, [_document(t) for t in self.tools], "document")
            return self._vectors


def _document(tool: McpTool) -> str:
    """What a tool is ranked by: "filesystem read text file: Read the complete contents of a file...". """
    words = re.sub(r"[_-]+", " ", f"{tool.server_id} {tool.tool_name}")
    return f"{words}: {tool.description}"[:DOCUMENT_CHARS]


def _mention_pattern(tool: McpTool) -> re.Pattern:
    names = [tool.name] + ([tool.tool_name] if re.search(r"[_-]", tool.tool_name) else [])
    alternatives = "|".join(re.escape(name) for name in names)
    return re.compile(rf"(?<![\w-])(?:{alternatives})(?![\w-])", re.IGNORECASE)


def _recent_text(messages: list[dict]) -> str:
    """The last few user and assistant texts, newest first (an embedding model truncates the oldest)."""
    texts = [text_of(m.get("content")).strip() for m in messages if m.get("role") in ("user", "assistant")]
    return "\n".join(reversed([text for text in texts if text][-RECENT_MESSAGES:]))


_building = threading.Lock()


def selector_for(state, route) -> ToolSelector:
    """The selector for the chat model of `route` (serve/router.py), built once per model on first need:
    the tool budget is a share of that model's context, counted in its tokens."""
    with _building:
        name = route.model.name
        if name not in state.tool_selectors:
            state.tool_selectors[name] = _build(state, route.llm.engine)
        return state.tool_selectors[name]


def _build(state, engine) -> ToolSelector:
    selector = ToolSelector(state.mcp.offered_tools(), state.mcp_max_tools,
                            int(engine.max_model_len * TOOL_CONTEXT_SHARE),
                            lambda text: len(engine.tokenizer.encode(text)), state.ranker.embedder,
                            state.mcp.always_offered_servers)
    state.metrics.mcp_tools_registered.set(len(selector.tools))
    return selector
