"""Web search for chat requests: a backend finds pages, an embedding model picks the passages.

    backend (SearxNG JSON API, or any callable) -> results -> page text (fetched)
    -> passages (word windows) -> re-ranked by embedding similarity to the query
    -> the best few, with their sources, for the prompt
"""
from levante.search.backends import SearchFailed, SearchResult, SearxngBackend, as_backend
from levante.search.retrieval import Passage, SearchOutcome, WebSearch, embed_with

__all__ = ["Passage", "SearchFailed", "SearchOutcome", "SearchResult", "SearxngBackend", "WebSearch",
           "as_backend", "embed_with"]
