"""`/v1/rerank` (and `/rerank`) and `/v1/score`: how relevant documents are to a query.

    /v1/rerank  {model, query, documents, top_n, return_documents} -> {id, model, results: [{index,
                relevance_score, document: {text}}], usage}, best first: Cohere's and Jina's shape, as
                vLLM and llama.cpp serve it
    /v1/score   {model, text_1, text_2} -> {data: [{index, object: "score", score}], usage}: vLLM's;
                text_1 one text scored against every text_2, or the two lists pairwise

A reranker scores each (query, document) pair (engine/scorer.py); an embedding model scores by the
cosine similarity of the two texts' vectors. Either way the work goes through the model's batcher
(serve/embeddings.py's EmbeddingBatcher: concurrent requests share forward passes), admitted as
generation is (429 past the batch size plus the waiting room), and bounded by --max-documents per
request and by the model's length per text or pair (longer ones are cut, as sentence-transformers
cuts them).
"""
from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from fastapi import FastAPI
from pydantic import Field

from levante.errors import InvalidRequest
from levante.layers.pooling import cosine_similarity
from levante.serve.embeddings import EmbeddingBatcher
from levante.serve.protocol import Strict

TASKS = ("score", "embed")  # the models that answer these routes: rerankers, then embedding models


class RerankRequest(Strict):
    model: str | None = None
    query: str
    documents: list[str | dict[str, Any]] = Field(min_length=1)  # Cohere's: texts, or {"text": ...}
    top_n: int | None = Field(default=None, ge=1)
    return_documents: bool = True

    def texts(self) -> list[str]:
        texts = []
        for index, document in enumerate(self.documents):
            text = document if isinstance(document, str) else document.get("text")
            if not isinstance(text, str):
                raise InvalidRequest(f"documents[{index}]: expected a string or {{\"text\": string}}")
            texts.append(text)
        return texts


class ScoreRequest(Strict):
    model: str | None = None
    text_1: str | list[str]
    text_2: str | list[str]

    def pairs(self) -> tuple[list[str], list[str]]:
        """(queries, documents), one of each per score."""
        ones = [self.text_1] if isinstance(self.text_1, str) else list(self.text_1)
        twos = [self.text_2] if isinstance(self.text_2, str) else list(self.text_2)
        if not ones or not twos:
            raise InvalidRequest(f"{'text_1' if not ones else 'text_2'}: give at least one text")
        if len(ones) == 1:
            return ones * len(twos), twos
        if len(ones) != len(twos):
            raise InvalidRequest(f"text_1: one text, or as many as text_2 ({len(twos)}) to score them pairwise")
        return ones, twos


class ScoreService:
    """A served reranker: its name, its scorer, and the batcher in front of it."""

    def __init__(self, llm, name: str):
        self.llm, self.name, self.scorer = llm, name, llm.scorer
        self.batcher = EmbeddingBatcher(self.scorer.score)

    def close(self) -> None:
        self.batcher.close()

    def card(self) -> dict:
        return {"id": self.name, "object": "model", "created": 0, "owned_by": "levante", "type": "score",
                "max_model_len": self.scorer.max_length}


async def relevance(pipeline, route, queries: list[str], documents: list[str]) -> tuple[list[float], int]:
    """(a score per (queries[i], documents[i]), the tokens read), on the route's reranker or embedding model."""
    if len(documents) > pipeline.state.limits.max_documents:
        raise InvalidRequest(f"documents: at most {pipeline.state.limits.max_documents} in one request "
                             "(--max-documents)")
    service = route.model.service
    if isinstance(service, ScoreService):
        pairs = await asyncio.to_thread(service.scorer.pairs, queries, documents)
        async with pipeline.admitted(route, len(pairs)):
            scores = await service.batcher.embed(pairs)
        return scores.tolist(), sum(len(pair.ids) for pair in pairs)
    texts = list(dict.fromkeys(queries + documents))  # each distinct text embedded once
    ids = await asyncio.to_thread(service.embedder.token_ids, texts)
    service.embedder.validate(ids)
    async with pipeline.admitted(route, len(ids)):
        vectors = await service.batcher.embed(ids)
    row = {text: index for index, text in enumerate(texts)}
    scores = cosine_similarity(vectors[[row[t] for t in queries]], vectors[[row[t] for t in documents]])
    return scores.tolist(), sum(len(one) for one in ids)


def _usage(tokens: int) -> dict:
    return {"prompt_tokens": tokens, "total_tokens": tokens}


RERANK_DOC = """Rerank documents by relevance to a query (Cohere's and Jina's shape, as vLLM and llama.cpp serve
it): a reranker (`--rerank-model`: a cross-encoder, or a decoder LLM such as Qwen3-Reranker) scores
each pair; an embedding model scores by cosine similarity.

```
curl http://127.0.0.1:8000/v1/rerank -H "Authorization: Bearer $KEY" -H "content-type: application/json" \\
  -d '{"model": "reranker", "query": "What is RoPE?", "documents": ["Rotary embeddings...", "Paris is..."], "top_n": 1}'
```
```python
from openai import OpenAI
client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
ranked = client.post("/rerank", cast_to=object, body={"model": "reranker", "query": "What is RoPE?",
                                                      "documents": ["Rotary embeddings...", "Paris is..."]})
print(ranked["results"][0]["index"], ranked["results"][0]["relevance_score"])
```
"""

SCORE_DOC = """Score text pairs (vLLM's API): `text_1` one text against every `text_2`, or pairwise.

```
curl http://127.0.0.1:8000/v1/score -H "Authorization: Bearer $KEY" -H "content-type: application/json" \\
  -d '{"model": "reranker", "text_1": "What is RoPE?", "text_2": ["Rotary embeddings...", "Paris is..."]}'
```
```python
scores = client.post("/score", cast_to=object, body={"model": "reranker", "text_1": "What is RoPE?",
                                                     "text_2": ["Rotary embeddings...", "Paris is..."]})
```
"""


def register_rerank(app: FastAPI, state) -> None:
    async def rerank(body: RerankRequest):
        documents = body.texts()
        async with state.pipeline.routed(body.model, TASKS) as route:
            scores, tokens = await relevance(state.pipeline, route, [body.query] * len(documents), documents)
        order = sorted(range(len(scores)), key=lambda i: -scores[i])[:body.top_n]
        results = [{"index": i, "relevance_score": scores[i],
                    **({"document": {"text": documents[i]}} if body.return_documents else {})} for i in order]
        return {"id": f"rerank-{uuid.uuid4().hex}", "model": route.name, "results": results, "usage": _usage(tokens)}

    for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
        app.post(path, description=RERANK_DOC, include_in_schema=path == "/v1/rerank")(rerank)

    async def score(body: ScoreRequest):
        queries, documents = body.pairs()
        async with state.pipeline.routed(body.model, TASKS) as route:
            scores, tokens = await relevance(state.pipeline, route, queries, documents)
        data = [{"index": i, "object": "score", "score": value} for i, value in enumerate(scores)]
        return {"id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                "model": route.name, "data": data, "usage": {**_usage(tokens), "completion_tokens": 0}}

    for path in ("/v1/score", "/score"):
        app.post(path, description=SCORE_DOC, include_in_schema=path == "/v1/score")(score)
