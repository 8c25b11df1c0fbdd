"""The OpenAI-compatible HTTP face: routes, each a few lines of parse -> pipeline -> format.

Bodies are parsed by the schemas in protocol.py (through http.py's checks), carried by the
pipeline (pipeline.py) and formatted by openai_format.py and responses.py; streams go out through
sse.py. Errors of any kind leave as OpenAI's error JSON (Anthropic's under /v1/messages: serve/error_shapes.py)
with the status they carry.
"""
from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from levante.errors import InvalidRequest, LevanteError
from levante.serve import openai_format as fmt
from levante.serve.chat import render_chat
from levante.serve.conversations import register_conversations
from levante.serve.embeddings import register_embeddings
from levante.serve.error_shapes import for_path
from levante.serve.http import CheckedRoute
from levante.serve.admin import register_admin
from levante.serve.anthropic import register_anthropic
from levante.serve.rerank import register_rerank
from levante.serve.transcription import register_transcription
from levante.serve.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
                                    error_body, error_for, validation_error)
from levante.serve.responses import register_responses
from levante.serve.sse import ClientGone, collected, formatted, sse_response
from levante.serve.state import ServerState
from levante.serve.webui import register_docs, register_webui

__all__ = ["ServerState", "create_app", "chat_completion"]


async def chat_completion(state: ServerState, body: ChatCompletionRequest, request: Request | None = None) -> dict:
    """A whole chat.completion for `body`, aborted if `request`'s client goes away first (the MCP
    server's `chat` tool answers with this too, without a request)."""
    collector = fmt.ChatCompletion(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()))
    return await collected(request, state.pipeline.chat_events(body), collector)


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="levante", description="OpenAI-compatible LLM server", version="0.1.0",
                  docs_url=None, redoc_url=None)  # /docs is served offline (serve/webui.py)
    app.router.route_class = CheckedRoute
    app.state.limits = state.limits
    install_error_handlers(app)
    pipeline = state.pipeline
    register_docs(app)

    @app.get("/health")
    async def health():
        status, body = state.health()
        return JSONResponse(body, status)

    @app.get("/metrics")
    async def metrics():
        models = list(state.router.models.values())
        return Response(state.metrics.render(models), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        """Every model served (loaded or not: `status` says), each followed by its LoRA adapters."""
        return {"object": "list", "data": [card for m in list(state.router.models.values()) for card in m.cards()]}

    register_embeddings(app, state)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        async with pipeline.routed(body.model) as route:
            llm = route.llm
            if body.messages is not None:  # images expanded to their tokens, as the engine will run them
                messages = [m.model_dump(exclude_none=True) for m in body.messages]
                ids, _ = await asyncio.to_thread(render_chat, llm, messages, None, body.add_generation_prompt,
                                                 None, state.load_image)
            else:
                ids = await asyncio.to_thread(llm.tokenizer.encode, body.prompt,
                                              add_special_tokens=body.add_special_tokens)
            return {"tokens": ids, "count": len(ids), "max_model_len": llm.engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        async with pipeline.routed(body.model) as route:
            vocab = route.llm.engine.model_config.vocab_size
            if any(not 0 <= t < vocab for t in body.tokens):
                raise InvalidRequest(f"tokens: ids must be in [0, {vocab})")
            return {"prompt": route.llm.tokenizer.decode(body.tokens)}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        if not body.stream:
            return await chat_completion(state, body, request)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = fmt.ChatChunks(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), include_usage)
        return await sse_response(formatted(pipeline.chat_events(body), chunks))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if not body.stream:
            collector = fmt.Completion(body, rid, created)
            return await collected(request, pipeline.completion_events(body), collector)
        chunks = fmt.CompletionChunks(body, rid, created)
        return await sse_response(formatted(pipeline.completion_events(body), chunks))

    register_responses(app, state)
    register_anthropic(app, state)
    register_rerank(app, state)
    register_transcription(app, state)
    register_admin(app, state)
    if state.webui is not None:
        register_webui(app, state.webui)
        register_conversations(app, state.webui.conversations, state.limits.max_messages)
    return app


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ClientGone)
    async def client_gone(_: Request, exc: ClientGone):
        return Response(status_code=499)  # nobody reads it (nginx's "client closed request")

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        message, param = validation_error(exc.errors())
        return JSONResponse(for_path(request.url.path, 400, error_body(message, param=param)), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = str(exc.detail)
        if exc.status_code == 413:
            message = f"the request body is larger than the server takes ({app.state.limits.max_body_bytes} bytes)"
        body = error_body(message, "invalid_request_error", getattr(exc, "param", None), exc.status_code)
        return JSONResponse(for_path(request.url.path, exc.status_code, body), exc.status_code)

    async def error_response(request: Request, exc: Exception):
        status, body, headers = error_for(exc)
        return JSONResponse(for_path(request.url.path, status, body), status, headers=headers)

    app.add_exception_handler(LevanteError, error_response)  # each carries its status
    app.add_exception_handler(Exception, error_response)  # a bug: 500, saying what happened
