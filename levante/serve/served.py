"""One model a server serves (`ServedModel`: its spec, status, LLM and what answers its routes) and
what a request runs on (`Route`). serve/router.py holds them and moves them between states.
"""
from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

from levante.engine.loop import EngineLoop
from levante.serve.embeddings import EmbeddingService
from levante.serve.model_specs import ModelSpec


def model_service(llm, name: str):
    """What answers the routes of a model that does not generate: the batcher in front of an embedding
    model or a reranker, the transcriber of a speech model; None for a chat model (its engine loop)."""
    # Imported here: the services' modules reach the pipeline, which imports this module.
    from levante.serve.rerank import ScoreService
    from levante.serve.transcription import TranscriptionService

    if llm.embedder is not None:
        return EmbeddingService(llm, name)
    if llm.scorer is not None:
        return ScoreService(llm, name)
    return TranscriptionService(llm, name) if llm.transcriber is not None else None


class ServedModel:
    """One model of the server: its spec and, while loaded, its LLM with its engine loop (a chat
    model) or its service (model_service)."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.status = "unloaded"  # unloaded | loading | loaded | failed | sleeping
        self.failure: str | None = None
        self.failed_at = 0.0
        self.llm = None
        self.loop: EngineLoop | None = None
        self.service = None  # model_service's
        self.loading: Future | None = None  # the load, wake or sleep under way on the loader thread
        self.sleep_level: int | None = None  # while sleeping: 1 (the LLM kept, its weights given back) or 2
        self.wake_seconds: float | None = None  # the last wake's
        self.users = 0  # requests holding it
        self.waiting = 0  # requests waiting for it to load
        self.in_flight = 0  # sequences admitted and not yet done (serve/pipeline.py)
        self.last_used = 0.0
        self.memory_bytes = 0  # as measured at its last load
        self.load_seconds: float | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def embeddings(self) -> EmbeddingService | None:
        return self.service if isinstance(self.service, EmbeddingService) else None

    @property
    def idle(self) -> bool:
        return self.status == "loaded" and not self.spec.pinned and not self.users and not self.waiting

    def health(self) -> dict:
        problem = self.loop.problem if self.loop is not None else None
        replicas = self.loop.health() if hasattr(self.loop, "health") else {}  # data parallel: replicas up
        if problem:
            return {"status": "unhealthy", "reason": problem, **replicas}
        return {"status": self.status, **({"reason": self.failure} if self.status == "failed" else {}), **replicas}

    def cards(self) -> list[dict]:
        """Its /v1/models entries: the model (with `status`), then its LoRA adapters."""
        card = {"id": self.name, "object": "model", "created": 0, "owned_by": "levante", "status": self.status}
        if self.service is not None:
            card.update(self.service.card(), status=self.status)
        elif self.spec.task != "generate":
            card["type"] = CARD_TYPES[self.spec.task]
        else:
            card["type"] = "chat"
            if self.llm is not None:
                card["max_model_len"] = self.llm.engine.max_model_len
                card["input_modalities"] = input_modalities(self.llm)
        adapters = [{"id": name, "object": "model", "created": 0, "owned_by": "levante", "parent": self.name,
                     "root": str(path), "status": self.status} for name, path in dict(self.spec.adapters).items()]
        return [card, *adapters]


CARD_TYPES = {"embed": "embedding", "score": "score", "transcribe": "transcription"}


def input_modalities(llm) -> list[str]:
    """What a chat model's messages may carry: text, and images (and audio) for models with a processor."""
    processor = llm.engine.processor
    if processor is None:
        return ["text"]
    return ["text", "image"] + (["audio"] if getattr(processor, "takes_audio", False) else [])


@dataclass
class Route:
    """What a request runs on: the name its responses report (the model or adapter it named), the
    model, and the LoRA adapter to apply (None: the base model)."""
    name: str
    model: ServedModel
    lora: str | None = None

    @property
    def llm(self):
        return self.model.llm

    @property
    def loop(self) -> EngineLoop:
        return self.model.loop
