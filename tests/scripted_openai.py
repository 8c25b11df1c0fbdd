"""A scripted OpenAI-compatible chat endpoint on a real loopback HTTP server, for UI-behaviour tests.

It does not generate: each request to /v1/chat/completions streams the next script in the queue,
in OpenAI's exact chunk format (text deltas, tool-call deltas, usage). What the client sent is
recorded in `requests`, so a test checks what the app sent back (history, tool results, images).
A script step may be a `threading.Event` to wait for (the stream then holds, as a slow model
would); a client that goes away mid-stream is recorded in `disconnects`.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from contextlib import contextmanager

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from live_server import free_port


def text(content: str) -> dict:
    return {"content": content}


def tool_call(index: int, call_id: str, name: str, arguments: str) -> dict:
    """One tool call streamed in two deltas (name, then arguments in two pieces), as OpenAI does."""
    half = len(arguments) // 2
    return {"tool_calls": [
        [{"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}],
        [{"index": index, "function": {"arguments": arguments[:half]}}],
        [{"index": index, "function": {"arguments": arguments[half:]}}]]}


class ScriptedEndpoint:
    def __init__(self, model: str = "scripted"):
        self.model = model
        self.scripts: list[list] = []
        self.requests: list[dict] = []
        self.disconnects = 0
        self.error: tuple[int, str] | None = None  # answer every request with this (status, message)

    def app(self) -> Starlette:
        async def chat(request: Request):
            body = await request.json()
            self.requests.append(body)
            if self.error:
                status, message = self.error
                return JSONResponse({"error": {"message": message, "type": "invalid_request_error",
                                               "param": None, "code": None}}, status)
            script = self.scripts.pop(0)
            return StreamingResponse(self._stream(script), media_type="text/event-stream")

        async def models(request: Request):
            return JSONResponse({"object": "list", "data": [{"id": self.model, "object": "model", "created": 0,
                                                             "owned_by": "scripted", "max_model_len": 1234}]})

        return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                                 Route("/v1/models", models)])

    async def _stream(self, script: list):
        finished = False
        try:
            finish = "stop"
            for step in script:
                if isinstance(step, threading.Event):
                    while not step.is_set():
                        await asyncio.sleep(0.02)
                    continue
                if "tool_calls" in step:
                    finish = "tool_calls"
                    for piece in step["tool_calls"]:
                        yield self._chunk({"tool_calls": piece})
                else:
                    yield self._chunk(step)
            yield self._chunk({}, finish)
            usage = {"prompt_tokens": 1, "completion_tokens": len(script), "total_tokens": 1 + len(script)}
            yield f"data: {json.dumps({**self._base(), 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
            finished = True
        finally:
            if not finished:
                self.disconnects += 1

    def _base(self) -> dict:
        return {"id": "chatcmpl-scripted", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.model}

    def _chunk(self, delta: dict, finish: str | None = None) -> str:
        choice = {"index": 0, "delta": {"role": "assistant", **delta}, "finish_reason": finish}
        return f"data: {json.dumps({**self._base(), 'choices': [choice]})}\n\n"


@contextmanager
def scripted_endpoint(model: str = "scripted"):
    """Yields (base_url ending in /v1, endpoint)."""
    endpoint = ScriptedEndpoint(model)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(endpoint.app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("scripted endpoint did not start")
        time.sleep(0.02)
    httpx.get(f"http://127.0.0.1:{port}/v1/models").raise_for_status()
    try:
        yield f"http://127.0.0.1:{port}/v1", endpoint
    finally:
        server.should_exit = True
        thread.join(timeout=10)
