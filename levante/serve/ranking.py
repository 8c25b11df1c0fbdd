"""The embedding model a server ranks texts with: web-search passages against the query
(serve/web_search.py) and MCP tools against the conversation (serve/tool_selection.py).

It is the embedding model the server serves (`--embedding-model`, or the model itself when that is
one), else the packaged MiniLM (`all-minilm:l6-v2`), loaded the first time something needs ranking.
Without either, `embedder()` is None and callers keep their own order.
"""
from __future__ import annotations

import logging
import threading

from levante.errors import LevanteError
from levante.search import embed_with
from levante.search.retrieval import Embed

logger = logging.getLogger("levante")

FALLBACK_MODEL = "all-minilm:l6-v2"


class Ranker:
    def __init__(self, embedding_llm=None):
        """`embedding_llm`: the served embedding model (a levante `LLM`), or None for the fallback."""
        self._embed: Embed | None = embed_with(embedding_llm) if embedding_llm is not None else None
        self._resolved = embedding_llm is not None
        self._lock = threading.Lock()

    def embedder(self) -> Embed | None:
        """`embed(texts, kind)`, loading the fallback model on first use (blocking: call it off the event loop)."""
        with self._lock:
            if not self._resolved:
                self._resolved = True
                self._embed = _load_fallback()
            return self._embed


def _load_fallback() -> Embed | None:
    from levante import LLM

    try:
        return embed_with(LLM(FALLBACK_MODEL))
    except LevanteError as e:
        logger.warning("levante: no embedding model to rank with (%s): search passages and MCP tools keep "
                       "their order", e)
        return None
