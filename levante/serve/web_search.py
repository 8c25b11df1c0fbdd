"""`web_search_options` on chat requests: search, then answer with the best passages in the prompt.

The passages (with numbered sources) are appended to the last user message,
which every chat template renders. A failed search still answers: the prompt
says the search failed, and the response's `web_search` field says so too.
"""
from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass

from levante.errors import InvalidRequest
from levante.net import FetchPolicy
from levante.search import SearchOutcome, WebSearch
from levante.serve.protocol import ChatCompletionRequest

logger = logging.getLogger("levante")

PASSAGES_PER_CONTEXT_SIZE = {"low": 3, "medium": 5, "high": 10}


@dataclass
class ChatSearch:
    body: ChatCompletionRequest  # the request with the search results in its last user message
    outcome: SearchOutcome

    def annotate(self, response: dict) -> dict:
        response["web_search"] = self.outcome.summary()
        return response


async def search_for_chat(state, body: ChatCompletionRequest) -> ChatSearch | None:
    """Run the request's web search (in a thread: it waits on the network); None when not asked for."""
    options = body.web_search_options
    if options is None:
        return None
    if state.web_search is None:
        raise InvalidRequest("web_search_options: web search is not enabled on this server "
                             "(start it with --search-url or LEVANTE_SEARCH_URL)")
    index = _last_user_message(body)
    query = _text_of(body.messages[index].content)
    if not query.strip():
        raise InvalidRequest("web_search_options: the last user message has no text to search for")
    top_k = PASSAGES_PER_CONTEXT_SIZE[options.search_context_size]
    outcome = await asyncio.to_thread(state.web_search.search, query, top_k)
    messages = list(body.messages)
    messages[index] = messages[index].model_copy(
        update={"content": _with_context(messages[index].content, outcome.prompt_text())})
    return ChatSearch(body.model_copy(update={"messages": messages}), outcome)


def _last_user_message(body: ChatCompletionRequest) -> int:
    for index in range(len(body.messages) - 1, -1, -1):
        if body.messages[index].role == "user":
            return index
    raise InvalidRequest("web_search_options: the conversation has no user message to search for")


def _text_of(content) -> str:
    if isinstance(content, str):
        return content
    return " ".join(part.get("text", "") for part in content or [] if part.get("type") == "text")


def _with_context(content, context: str):
    if isinstance(content, list):
        return [*content, {"type": "text", "text": "\n\n" + context}]
    return f"{content or ''}\n\n{context}"


def configure_web_search(state, url: str | None, policy: FetchPolicy = FetchPolicy.local()) -> None:
    """Enable web search on `state` when a SearxNG URL is given (flag or LEVANTE_SEARCH_URL).

    Passages are re-ranked by the server's ranking model (serve/ranking.py: the served embedding
    model, else the packaged MiniLM), or left in the backend's order without one.
    """
    url = url or os.environ.get("LEVANTE_SEARCH_URL")
    if not url:
        return
    state.web_search = WebSearch(url, state.ranker.embedder(), policy=policy.without_domain_list())
    logger.warning("levante: web search via %s", state.web_search.backend)
