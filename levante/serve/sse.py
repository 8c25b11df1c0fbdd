"""The one server-sent-events writer: every streamed response ends properly.

Errors before the first event become the response's status (400, 404, 429, 500, 503); once the
stream has begun, an error becomes an error event. Either way the stream ends with `data: [DONE]`,
and a client that goes away closes the events, which aborts its requests (serve/pipeline.py).
"""
from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable

from fastapi.responses import StreamingResponse

from levante.serve.protocol import error_for

logger = logging.getLogger("levante")

DONE = "data: [DONE]\n\n"

# A payload is a dict (`data: {...}`) or (event name, dict) (`event: name` + `data: {...}`).
Payload = dict | tuple[str, dict]


def frame(payload: Payload) -> str:
    if isinstance(payload, tuple):
        name, data = payload
        return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def chat_error(error_json: dict) -> Payload:
    """The error event of the chat and completions APIs: OpenAI's error object as a data line."""
    return error_json


async def sse_response(payloads: AsyncIterator[Payload],
                       error_event: Callable[[dict], Payload] = chat_error) -> StreamingResponse:
    """Stream `payloads`; `error_event(error_json)` shapes a mid-stream error for the API at hand."""
    first = await anext(payloads, None)  # an error here is the response's status, by the app's handlers

    async def body():
        try:
            if first is not None:
                yield frame(first)
            async for payload in payloads:
                yield frame(payload)
        except Exception as error:  # noqa: BLE001 - every error ends the stream the same way
            status, error_json, _ = error_for(error)
            if status >= 500:
                logger.error("a streamed request failed: %s", error_json["error"]["message"])
            yield frame(error_event(error_json))
        finally:
            await payloads.aclose()  # a client gone mid-stream: abort its requests now, freeing their cache
        yield DONE

    return StreamingResponse(body(), media_type="text/event-stream")


async def formatted(events: AsyncIterator, formatter) -> AsyncIterator[Payload]:
    """Pipeline events -> the payloads `formatter.chunks(event)` makes of them, then `formatter.closing()`."""
    try:
        async for event in events:
            for payload in formatter.chunks(event):
                yield payload
    finally:
        await events.aclose()
    for payload in formatter.closing():
        yield payload
