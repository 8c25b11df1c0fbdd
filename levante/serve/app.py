"""The OpenAI-compatible HTTP face: a thin adapter over `EngineLoop`."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from levante.engine.loop import EngineLoop
from levante.engine.outputs import RequestOutput
from levante.engine.sampling_params import SamplingParams
from levante.errors import InvalidRequest, LevanteError
from levante.serve.protocol import ChatCompletionRequest, CompletionRequest, error_body


class ServerState:
    """What the routes share: the loaded model (once ready) and its name."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.llm = None  # levante.LLM, set when loading and warm-up are done
        self.loop: EngineLoop | None = None

    @property
    def ready(self) -> bool:
        return self.loop is not None

    def attach(self, llm) -> None:
        self.llm = llm
        self.loop = EngineLoop(llm.engine)


async def stream_outputs(state: ServerState, prompt, params: SamplingParams) -> AsyncIterator[RequestOutput]:
    """Yield the request's outputs; abort it (freeing its cache) if the caller goes away."""
    queue: asyncio.Queue = asyncio.Queue()
    event_loop = asyncio.get_running_loop()
    request_id = uuid.uuid4().hex
    state.loop.submit(request_id, prompt, params, lambda item: event_loop.call_soon_threadsafe(queue.put_nowait, item))
    finished = False
    try:
        while not finished:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            finished = item.finished
            yield item
    finally:
        if not finished:
            state.loop.abort(request_id)


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="levante", description="OpenAI-compatible LLM server")

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(error_body(f"{param or 'request'}: {first.get('msg', 'invalid')}", param=param), 400)

    @app.exception_handler(LevanteError)
    async def levante_error(_: Request, exc: LevanteError):
        return JSONResponse(error_body(str(exc)), 400)

    @app.get("/health")
    async def health():
        if not state.ready:
            return JSONResponse({"status": "loading"}, 503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": state.model_name, "object": "model", "created": 0, "owned_by": "levante"}]}

    def check(body) -> None:
        if not state.ready:
            raise InvalidRequest("the model is still loading")
        if body.model and body.model != state.model_name:
            raise InvalidRequest(f"model '{body.model}' is not served here; this server serves '{state.model_name}'")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        check(body)
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        prompt = state.llm.apply_chat_template(messages)
        return await respond(body, prompt, "chat.completion")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        check(body)
        return await respond(body, body.prompt, "text_completion")

    async def respond(body, prompt, kind: str):
        params = body.sampling_params()
        created, rid = int(time.time()), f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}"
        outputs = stream_outputs(state, prompt, params)
        if body.stream:
            first = await anext(outputs)  # surface request errors as a 400 before the stream starts
            return StreamingResponse(sse(kind, rid, created, first, outputs), media_type="text/event-stream")
        final = None
        async for final in outputs:
            pass
        return JSONResponse(full_response(kind, rid, created, state.model_name, final))

    async def sse(kind, rid, created, first, rest):
        sent = {}
        async def chunks(output: RequestOutput):
            for c in output.outputs:
                delta = c.text[len(sent.get(c.index, "")):]
                sent[c.index] = c.text
                if not delta and not c.finish_reason:
                    continue
                if kind == "chat.completion":
                    choice = {"index": c.index, "delta": {"content": delta}, "finish_reason": c.finish_reason}
                    if c.index not in started:
                        choice["delta"]["role"] = "assistant"
                        started.add(c.index)
                    obj = "chat.completion.chunk"
                else:
                    choice = {"index": c.index, "text": delta, "finish_reason": c.finish_reason}
                    obj = "text_completion"
                yield {"id": rid, "object": obj, "created": created, "model": state.model_name, "choices": [choice]}
        started: set[int] = set()
        async for chunk in chunks(first):
            yield f"data: {json.dumps(chunk)}\n\n"
        async for output in rest:
            async for chunk in chunks(output):
                yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return app


def usage(output: RequestOutput) -> dict:
    prompt = len(output.prompt_token_ids)
    completion = sum(len(c.token_ids) for c in output.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def full_response(kind: str, rid: str, created: int, model: str, output: RequestOutput) -> dict:
    if kind == "chat.completion":
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "finish_reason": c.finish_reason, "logprobs": None} for c in output.outputs]
    else:
        choices = [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
                   for c in output.outputs]
    return {"id": rid, "object": kind, "created": created, "model": model, "choices": choices,
            "usage": usage(output)}
