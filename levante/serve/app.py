"""The OpenAI-compatible HTTP face: routes over `EngineLoop`, nothing more.

Requests are validated by the schemas in protocol.py, rendered to token ids
(chat template), submitted to the engine loop, and its outputs are turned back
into OpenAI's JSON (openai_format.py), streamed as server-sent events or not.
A client that disconnects has its request aborted, which frees its KV blocks.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from levante.engine.loop import EngineLoop
from levante.engine.outputs import RequestOutput
from levante.engine.sampling_params import SamplingParams
from levante.errors import InvalidRequest, LevanteError, ModelNotFound, ServiceUnavailable
from levante.multimodal.images import load_image
from levante.serve import openai_format as fmt
from levante.serve.chat import ChatPlan, plan_chat, render_chat
from levante.serve.embeddings import EmbeddingService, register_embeddings
from levante.serve.mcp_loop import DEFAULT_MAX_ROUNDS, mcp_chat_completion, offers_mcp_tools
from levante.serve.metrics import Metrics
from levante.serve.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                    TokenizeRequest, error_body)
from levante.serve.responses import register_responses
from levante.serve.web_search import search_for_chat


class ServerState:
    """What the routes share: the loaded models (once warm), their names, metrics, web search."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.llm = None  # levante.LLM, set when loading and warm-up are done; None when serving embeddings only
        self.loop: EngineLoop | None = None
        self.embeddings: EmbeddingService | None = None  # the embedding model, if one is served
        self.web_search = None  # levante.search.WebSearch, when web search is enabled
        self.mcp = None  # levante.mcp.McpToolManager, when MCP servers are configured (see serve/mcp_loop.py)
        self.mcp_max_rounds = DEFAULT_MAX_ROUNDS
        self.metrics = Metrics()
        self.load_image = load_image  # image sources -> images; `levante serve` may confine local paths

    @property
    def ready(self) -> bool:
        return self.loop is not None or self.embeddings is not None

    def attach(self, llm, embedding_llm=None, embedding_name: str | None = None) -> None:
        """Serve `llm` and/or an embedding model; an embedding `llm` alone serves embeddings only."""
        if llm is not None and llm.is_embedding_model:
            llm, embedding_llm, embedding_name = None, llm, self.model_name
        self.llm = llm
        self.loop = EngineLoop(llm.engine) if llm is not None else None
        if embedding_llm is not None:  # last: `ready` turns true here when only embeddings are served
            self.embeddings = EmbeddingService(embedding_llm, embedding_name or embedding_llm.model_name)

    def check(self, model: str | None) -> None:
        if not self.ready:
            raise ServiceUnavailable("the model is still loading; retry when /health answers 200")
        embedding_name = self.embeddings.name if self.embeddings else None
        if self.llm is None or (model and model == embedding_name and model != self.model_name):
            raise InvalidRequest(f"'{model or embedding_name}' is an embedding model: it serves /v1/embeddings "
                                 "only (start the server with a chat model to generate)")
        if model and model != self.model_name:
            raise ModelNotFound(f"model '{model}' is not served here; this server serves '{self.model_name}'")

    async def generate(self, prompt, params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """The request's outputs as they come; aborted (cache freed) if the caller stops listening."""
        queue: asyncio.Queue = asyncio.Queue()
        event_loop = asyncio.get_running_loop()
        request_id = uuid.uuid4().hex
        self.loop.submit(request_id, prompt, params,
                         lambda item: event_loop.call_soon_threadsafe(queue.put_nowait, item))
        finished, started, last = False, time.monotonic(), None
        emitted = 0
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                now = time.monotonic()
                self._observe(item, now - (last or started), first=last is None, emitted=emitted)
                emitted = sum(len(c.token_ids) for c in item.outputs)
                last = now
                yield item
        finally:
            if not finished:
                self.loop.abort(request_id)
                self.metrics.requests.labels("abort").inc()

    def _observe(self, output: RequestOutput, seconds: float, first: bool, emitted: int) -> None:
        m = self.metrics
        (m.ttft if first else m.itl).observe(seconds)
        if first:
            m.prompt_tokens.inc(len(output.prompt_token_ids))
        m.generation_tokens.inc(sum(len(c.token_ids) for c in output.outputs) - emitted)
        if output.finished:
            for c in output.outputs:
                m.requests.labels(c.finish_reason or "unknown").inc()


async def merge(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """Interleave several async iterators, yielding (which, item) as items arrive."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index, stream):
        try:
            async for item in stream:
                await queue.put((index, item))
        except BaseException as e:  # handed to the consumer
            await queue.put((index, e))
        finally:
            await queue.put((index, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            await stream.aclose()


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="levante", description="OpenAI-compatible LLM server", version="0.1.0")
    install_error_handlers(app)

    @app.get("/health")
    async def health():
        if not state.ready:
            return JSONResponse({"status": "loading"}, 503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        engine = state.llm.engine if state.llm else None
        return Response(state.metrics.render(engine), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        cards = []
        if state.llm or not state.embeddings:
            card = {"id": state.model_name, "object": "model", "created": 0, "owned_by": "levante"}
            if state.llm:
                card["max_model_len"] = state.llm.engine.max_model_len
            cards.append(card)
        if state.embeddings:
            cards.append(state.embeddings.card())
        return {"object": "list", "data": cards}

    register_embeddings(app, state)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        state.check(body.model)
        if body.messages is not None:  # images expanded to their tokens, as the engine will run them
            messages = [m.model_dump(exclude_none=True) for m in body.messages]
            ids, _ = await asyncio.to_thread(render_chat, state.llm, messages, None, body.add_generation_prompt,
                                             None, state.load_image)
        else:
            ids = state.llm.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": state.llm.engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        state.check(body.model)
        vocab = state.llm.engine.model_config.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise InvalidRequest(f"tokens: ids must be in [0, {vocab})")
        return {"prompt": state.llm.tokenizer.decode(body.tokens)}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        state.check(body.model)
        search = await search_for_chat(state, body)  # None unless web_search_options asks for it
        if offers_mcp_tools(state, body):
            return await mcp_chat_completion(state, search.body if search else body, search)
        plan = await asyncio.to_thread(plan_chat, state.llm, search.body if search else body,
                                       state.load_image)  # may fetch images
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        stream = state.generate(plan.prompt, plan.params)
        if body.stream:
            first = await anext(stream)  # request errors become a 400 before the stream starts
            return StreamingResponse(chat_events(plan, body, rid, created, first, stream),
                                     media_type="text/event-stream")
        final = None
        async for final in stream:
            pass
        response = fmt.chat_response(plan, rid, created, state.model_name, final)
        return search.annotate(response) if search else response

    async def chat_events(plan: ChatPlan, body, rid, created, first, rest):
        writer = fmt.ChatStreamWriter(plan, rid, created, state.model_name, state.llm.tokenizer)
        output = first
        try:
            for chunk in writer.chunks(first):
                yield sse(chunk)
            async for output in rest:
                for chunk in writer.chunks(output):
                    yield sse(chunk)
        except LevanteError as e:
            yield sse(error_body(str(e)))
        finally:
            await rest.aclose()  # a client gone mid-stream: abort the request now, freeing its cache
        if body.stream_options and body.stream_options.include_usage:
            yield sse(writer.usage_chunk(output))
        yield sse("[DONE]")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        state.check(body.model)
        engine = state.llm.engine
        prompts = body.prompts()
        params = body.sampling_params(engine.model_config.vocab_size, body.max_tokens, logprobs=body.logprobs,
                                      prompt_logprobs=body.logprobs if body.echo and body.logprobs is not None
                                      else None)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        streams = [state.generate(p, params) for p in prompts]
        merged = merge(streams)
        if body.stream:
            first = await anext(merged)
            return StreamingResponse(completion_events(body, rid, created, first, merged),
                                     media_type="text/event-stream")
        finals: dict[int, RequestOutput] = {}
        async for index, output in merged:
            finals[index] = output
        return fmt.completion_response(body, rid, created, state.model_name,
                                       [finals[i] for i in range(len(prompts))], state.llm.tokenizer)

    async def completion_events(body, rid, created, first, rest):
        writer = fmt.CompletionStreamWriter(body, rid, created, state.model_name, state.llm.tokenizer)
        latest: dict[int, RequestOutput] = {}
        try:
            for index, output in [first]:
                latest[index] = output
                for chunk in writer.chunks(index, output):
                    yield sse(chunk)
            async for index, output in rest:
                latest[index] = output
                for chunk in writer.chunks(index, output):
                    yield sse(chunk)
        except LevanteError as e:
            yield sse(error_body(str(e)))
        finally:
            await rest.aclose()
        if body.stream_options and body.stream_options.include_usage:
            yield sse(writer.usage_chunk(list(latest.values())))
        yield sse("[DONE]")

    register_responses(app, state)
    return app


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        location = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(location) or None
        message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        if first.get("type") == "extra_forbidden":
            message = f"unsupported parameter '{param}'"
        elif first.get("type") == "json_invalid":
            message, param = "the request body is not valid JSON", None
        elif param and not message.startswith(param.split(".")[0]):
            message = f"{param}: {message}"
        return JSONResponse(error_body(message, param=param), 400)

    @app.exception_handler(LevanteError)
    async def levante_error(_: Request, exc: LevanteError):
        status = getattr(exc, "status", 400)
        kind = {404: "not_found_error", 503: "service_unavailable"}.get(status, "invalid_request_error")
        return JSONResponse(error_body(str(exc), kind, code=status), status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error", code=exc.status_code),
                            exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception):
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error", code=500),
                            500)
