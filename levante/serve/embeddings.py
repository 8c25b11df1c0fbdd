"""`/v1/embeddings`: OpenAI's embeddings API over the served embedding model.

Concurrent requests share forward passes: each request queues its token ids,
and one worker takes everything queued, embeds it in one call (in a thread, so
the event loop keeps serving) and hands each request its rows. While a forward
runs, new requests gather for the next one. A call that fails is re-run in halves, so
only a request that fails by itself gets the error; the texts queued and running are
bounded by admission (serve/pipeline.py: 429 past the batch size plus the waiting room).
"""
from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from typing import Literal

import torch
from fastapi import FastAPI
from pydantic import Field

from levante.serve.protocol import Strict


class EmbeddingRequest(Strict):
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None
    # levante extensions: a prompt of the model's (sentence-transformers `prompts`), or the prefix itself
    prompt_name: str | None = None
    prompt: str | None = None


class EmbeddingBatcher:
    """Merges the inputs of concurrent requests into shared calls of `run` (inputs -> one row each):
    `Embedder.embed` for an embedding model, `Scorer.score` for a reranker (serve/rerank.py)."""

    def __init__(self, run: Callable[[list], torch.Tensor]):
        self.run = run
        self._pending: list[tuple[list[list[int]], asyncio.Future]] = []
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._closed = False
        self.forward_calls = 0  # embedder calls made, for tests and metrics

    async def embed(self, inputs: list) -> torch.Tensor:
        """`run`'s rows for `inputs` (already validated), computed with whatever else is queued."""
        if self._worker is None or self._worker.done():
            self._wakeup = asyncio.Event()
            self._worker = asyncio.create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        self._pending.append((inputs, future))
        self._wakeup.set()
        return await future

    def close(self) -> None:
        """End the worker (from any thread): it holds the embedder, and so the model's weights."""
        worker, self._closed = self._worker, True
        if worker is not None and not worker.done():
            try:
                worker.get_loop().call_soon_threadsafe(self._wakeup.set)
            except RuntimeError:  # its event loop has closed: the worker with it
                pass

    async def _run(self) -> None:
        while not self._closed:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                taken, self._pending = self._pending, []
                await self._embed_together(taken)

    async def _embed_together(self, taken: list[tuple[list[list[int]], asyncio.Future]]) -> None:
        merged = [ids for inputs, _ in taken for ids in inputs]
        self.forward_calls += 1
        try:
            vectors = await asyncio.to_thread(self.run, merged)
        except Exception as e:  # noqa: BLE001 - only the requests that fail alone learn why
            if len(taken) > 1:  # halves, until the requests that fail by themselves are found
                half = len(taken) // 2
                await self._embed_together(taken[:half])
                await self._embed_together(taken[half:])
                return
            if not taken[0][1].done():
                taken[0][1].set_exception(e)
            return
        offset = 0
        for inputs, future in taken:
            if not future.done():  # a caller that went away has a cancelled future
                future.set_result(vectors[offset:offset + len(inputs)])
            offset += len(inputs)


class EmbeddingService:
    """The served embedding model: its name, its `LLM`, and the batcher in front of it."""

    def __init__(self, llm, name: str):
        self.llm, self.name = llm, name
        self.embedder = llm.embedder
        self.batcher = EmbeddingBatcher(self.embedder.embed)

    def close(self) -> None:
        self.batcher.close()

    def card(self) -> dict:
        return {"id": self.name, "object": "model", "created": 0, "owned_by": "levante",
                "type": "embedding", "dimensions": self.embedder.dimensions,
                "max_model_len": self.embedder.max_length}

    def inputs(self, body: EmbeddingRequest) -> list[list[int]]:
        """The request's texts as token ids, checked (400 before anything is queued)."""
        inputs = self.embedder.token_ids(body.input, body.prompt_name, body.prompt)
        self.embedder.validate(inputs)
        self.embedder.check_dimensions(body.dimensions)
        return inputs

    async def respond(self, body: EmbeddingRequest, inputs: list[list[int]]) -> dict:
        embedder = self.embedder
        vectors = embedder.truncate(await self.batcher.embed(inputs), body.dimensions)
        encode = _base64 if body.encoding_format == "base64" else torch.Tensor.tolist
        data = [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)]
        tokens = sum(len(ids) for ids in inputs)
        return {"object": "list", "data": data, "model": self.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _base64(vector: torch.Tensor) -> str:
    """Little-endian float32 bytes, base64: what the `openai` client decodes by default."""
    return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode("ascii")


def register_embeddings(app: FastAPI, state) -> None:
    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        """The embedding model `model` names (or the first one served), through the router."""
        async with state.pipeline.routed(body.model, ("embed",)) as route:
            service = route.model.embeddings
            inputs = service.inputs(body)
            async with state.pipeline.admitted(route, len(inputs)):
                return await service.respond(body, inputs)


