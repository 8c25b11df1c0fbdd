"""Saved conversations over HTTP, for the web chat: the same SQLite store as `levante chat`.

    GET    /v1/levante/conversations?q=TEXT&limit=N   list (newest first), or search titles and messages
    POST   /v1/levante/conversations                  create, or import: {title?, model?, messages}
    GET    /v1/levante/conversations/{id}             one, with its messages (the export format)
    PUT    /v1/levante/conversations/{id}             replace its messages (and model)
    PATCH  /v1/levante/conversations/{id}             rename: {title} ('' returns to the automatic title)
    DELETE /v1/levante/conversations/{id}

A conversation belongs to the API key that made it (its salted hash is stored, levante/conversations.py);
without --api-key, to the local user, as in `levante chat`. Another owner's conversation is a 404.
Routes are plain functions: FastAPI runs them in its thread pool, off the event loop.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, Path as PathParam, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from levante.conversations import MAX_TITLE, ConversationStore
from levante.errors import InvalidRequest
from levante.serve.protocol import ChatMessage, Strict

PREFIX = "/v1/levante/conversations"
ConversationId = Annotated[int, PathParam(ge=1, le=(1 << 63) - 1)]


class ConversationBody(Strict):
    """A conversation as the page sends it, and as GET exports it (whose id, object, created,
    updated and message count are accepted and ignored, so that an export imports as it is)."""
    title: str | None = Field(default=None, max_length=MAX_TITLE)
    model: str | None = Field(default=None, max_length=MAX_TITLE)
    messages: list[ChatMessage] = Field(default_factory=list)
    id: int | None = None
    object: str | None = None
    created: float | None = None
    updated: float | None = None
    message_count: int | None = None

    def message_dicts(self, max_messages: int) -> list[dict]:
        if len(self.messages) > max_messages:
            raise InvalidRequest(f"messages: at most {max_messages} in one conversation (--max-messages)")
        return [m.model_dump(exclude_none=True) for m in self.messages]


class RenameBody(Strict):
    title: str = Field(max_length=MAX_TITLE)


class ConversationFile:
    """The store, opened on first use (a server whose page is never used creates no file)."""

    def __init__(self, path: str | Path | None = None):
        self.path = path
        self._store: ConversationStore | None = None
        self._lock = threading.Lock()

    def for_request(self, request: Request) -> ConversationStore:
        with self._lock:
            if self._store is None:
                self._store = ConversationStore(self.path)
        return self._store.as_owner(self._store.owner_of(request.scope.get("levante.api_key")))

    def close(self) -> None:
        if self._store is not None:
            self._store.close()


def exported(store: ConversationStore, conversation_id: int) -> dict:
    info = store.info(conversation_id)
    return {"object": "levante.conversation", **info.to_json(), "messages": store.load(conversation_id)}


def register_conversations(app: FastAPI, conversations: ConversationFile, max_messages: int) -> None:
    @app.get(PREFIX)
    def list_conversations(request: Request, q: str | None = None, limit: int = 100):
        if not 1 <= limit <= 1000:
            raise InvalidRequest("limit: must be in [1, 1000]")
        rows = conversations.for_request(request).list(limit, q.strip() if q else None)
        return {"object": "list", "data": [{"object": "levante.conversation", **row.to_json()} for row in rows]}

    @app.post(PREFIX)
    def create_conversation(request: Request, body: ConversationBody):
        store = conversations.for_request(request)
        messages = body.message_dicts(max_messages)
        conversation_id = store.create(body.model or "", body.title or "")
        store.save(conversation_id, messages)
        return JSONResponse(exported(store, conversation_id), 201)

    @app.get(PREFIX + "/{conversation_id}")
    def get_conversation(request: Request, conversation_id: ConversationId):
        return exported(conversations.for_request(request), conversation_id)

    @app.put(PREFIX + "/{conversation_id}")
    def save_conversation(request: Request, conversation_id: ConversationId, body: ConversationBody):
        store = conversations.for_request(request)
        store.save(conversation_id, body.message_dicts(max_messages), body.model)
        if body.title is not None:
            store.rename(conversation_id, body.title)
        return {"object": "levante.conversation", **store.info(conversation_id).to_json()}

    @app.patch(PREFIX + "/{conversation_id}")
    def rename_conversation(request: Request, conversation_id: ConversationId, body: RenameBody):
        store = conversations.for_request(request)
        store.rename(conversation_id, body.title)
        return {"object": "levante.conversation", **store.info(conversation_id).to_json()}

    @app.delete(PREFIX + "/{conversation_id}")
    def delete_conversation(request: Request, conversation_id: ConversationId):
        store = conversations.for_request(request)
        store.info(conversation_id)  # 404 when it is not there (or not this key's)
        store.delete(conversation_id)
        return {"object": "levante.conversation.deleted", "id": conversation_id, "deleted": True}
