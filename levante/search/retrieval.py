"""Search, cut pages into passages, keep the passages closest to the query.

Re-ranking uses an embedding model passed in as `embed(texts, kind) -> tensor`,
`kind` being "query" or "document" (models with such prompts, like
Qwen3-Embedding or EmbeddingGemma, embed the two differently). Without one,
passages keep the backend's order.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from levante.net import FetchPolicy
from levante.search.backends import SearchBackend, SearchResult, as_backend, fetch_pages

logger = logging.getLogger("levante")

Embed = Callable[[list[str], str], torch.Tensor]


@dataclass
class Passage:
    text: str
    source: int  # index into SearchOutcome.sources
    score: float = 0.0


@dataclass
class SearchOutcome:
    query: str
    sources: list[SearchResult] = field(default_factory=list)
    passages: list[Passage] = field(default_factory=list)  # best first
    error: str | None = None

    def prompt_text(self) -> str:
        """What the model reads: the passages with numbered sources, or why there are none."""
        if self.error:
            return (f'(Web search for "{self.query}" failed: {self.error}. Answer from what you know, '
                    "and tell the user that the web search failed.)")
        if not self.passages:
            return f'(Web search for "{self.query}" found nothing. Answer from what you know, and say so.)'
        lines = [f'Web search results for "{self.query}". Use them to answer, citing sources as [n].']
        for passage in self.passages:
            source = self.sources[passage.source]
            lines.append(f"\n[{passage.source + 1}] {source.title} ({source.url})\n{passage.text}")
        return "\n".join(lines)

    def summary(self) -> dict:
        """For the response: what was searched, whether it worked, which sources the prompt cites."""
        cited = sorted({p.source for p in self.passages})
        return {"query": self.query, "status": "failed" if self.error else "ok", "error": self.error,
                "sources": [{"index": i + 1, "title": self.sources[i].title, "url": self.sources[i].url}
                            for i in cited]}


def split_passages(text: str, words_per_passage: int = 120, overlap: int = 30) -> list[str]:
    """Overlapping windows of words, so a fact cut at one edge is whole in the next window."""
    words = text.split()
    step = max(1, words_per_passage - overlap)
    return [" ".join(words[start:start + words_per_passage])
            for start in range(0, max(1, len(words) - overlap), step) if words[start:start + words_per_passage]]


def embed_with(llm) -> Embed:
    """An `Embed` over a levante embedding `LLM`, using its query/document prompts when it has them."""
    prompts = llm.embedder.pipeline.prompts

    def embed(texts: list[str], kind: str) -> torch.Tensor:
        return llm.embed(texts, prompt_name=kind if kind in prompts else None, as_tensor=True)

    return embed


def unit_vectors(embed: Embed, texts: list[str], kind: str) -> torch.Tensor:
    """`texts` embedded as unit rows (float32): their products are cosine similarities."""
    return F.normalize(embed(texts, kind).float(), dim=-1)


class WebSearch:
    def __init__(self, backend: str | SearchBackend, embed: Embed | None = None, max_results: int = 5,
                 fetch: bool = True, fetch_timeout: float = 5.0, words_per_passage: int = 120,
                 policy: FetchPolicy = FetchPolicy.local()):
        """`policy`: which addresses result pages may be fetched from (a server passes its own)."""
        self.backend = as_backend(backend)
        self.policy = policy
        self.embed = embed
        self.max_results, self.fetch, self.fetch_timeout = max_results, fetch, fetch_timeout
        self.words_per_passage = words_per_passage

    def search(self, query: str, top_k: int = 5) -> SearchOutcome:
        """Never raises for a failing backend: the outcome carries the error instead."""
        try:
            sources = self.backend(query, self.max_results)
        except Exception as e:
            logger.warning("web search failed: %s", e)
            return SearchOutcome(query, error=str(e) or type(e).__name__)
        if self.fetch:
            fetch_pages(sources, self.policy, self.fetch_timeout)
        passages = [Passage(text, i) for i, source in enumerate(sources)
                    for text in self._passages(source)]
        return SearchOutcome(query, sources, self._rank(query, passages)[:top_k])

    def _passages(self, source: SearchResult) -> list[str]:
        passages = split_passages(source.text, self.words_per_passage) if source.text else []
        return passages or ([f"{source.title}: {source.snippet}"] if source.snippet else [])

    def _rank(self, query: str, passages: list[Passage]) -> list[Passage]:
        if self.embed is None or not passages:
            return passages
        query_vector = unit_vectors(self.embed, [query], "query")
        passage_vectors = unit_vectors(self.embed, [p.text for p in passages], "document")
        for passage, score in zip(passages, (passage_vectors @ query_vector[0]).tolist()):
            passage.score = score
        return sorted(passages, key=lambda p: -p.score)
