"""Pipeline events to the client: the one server-sent-events writer, and whole (non-streamed) responses.

Streamed: errors before the first event become the response's status (400, 404, 429, 500, 503);
once the stream has begun, an error becomes an error event. Either way an OpenAI stream ends with
`data: [DONE]`, and a client that goes away closes the events, which aborts its requests
(serve/pipeline.py). Whole: `collected` reads the events while it watches the connection; a client
that goes away before the answer is ready aborts its requests the same way, rather than leaving
them to run to max_tokens.
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse

from levante.errors import LevanteError, RequestFailed
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


async def sse_response(payloads: AsyncIterator[Payload], error_event: Callable[[dict], Payload] = chat_error,
                       done: bool = True) -> StreamingResponse:
    """Stream `payloads`; `error_event(error_json)` shapes a mid-stream error for the API at hand;
    `done`: end with `data: [DONE]` (OpenAI's APIs; Anthropic's ends with its message_stop event)."""
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
        if done:
            yield DONE

    return StreamingResponse(body(), media_type="text/event-stream")


def request_error(error: Exception) -> Exception:
    """The error a request ends with: levante's own as it is; anything else (a bug, say in a parser reading
    the model's output) logged with its traceback and turned into RequestFailed, so that the app answers
    it as any pipeline error (a 500 that says what happened) rather than as an unhandled exception."""
    if isinstance(error, (LevanteError, ClientGone)):
        return error
    logger.error("a request failed on a bug", exc_info=error)
    return RequestFailed(f"internal error: {type(error).__name__}: {error}")


async def formatted(events: AsyncIterator, formatter) -> AsyncIterator[Payload]:
    """Pipeline events -> the payloads `formatter.chunks(event)` makes of them, then `formatter.closing()`."""
    try:
        try:
            async for event in events:
                for payload in formatter.chunks(event):
                    yield payload
        finally:
            await events.aclose()
        for payload in formatter.closing():
            yield payload
    except Exception as error:  # noqa: BLE001 - see request_error
        raise request_error(error) from error


class ClientGone(Exception):
    """The client of a non-streamed request closed its connection before the answer was ready."""


async def collected(request: Request | None, events: AsyncIterator, collector) -> dict:
    """`collector.response()` after `collector.add(event)` for each of `events`; ClientGone (its requests
    aborted, their cache freed) if the client disconnects first. `request` None: no connection to
    watch (the MCP server's chat tool)."""
    try:
        return (await _collect(request, events, collector)).response()
    except Exception as error:  # noqa: BLE001 - see request_error
        raise request_error(error) from error


async def _collect(request: Request | None, events: AsyncIterator, collector):
    async def read():
        try:
            async for event in events:
                collector.add(event)
        finally:
            await events.aclose()  # cancelled: aborts the requests still running (serve/pipeline.py)
        return collector

    if request is None:
        return await read()
    reading, watching = asyncio.ensure_future(read()), asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((reading, watching), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
    if not reading.done():
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)
        raise ClientGone()
    return reading.result()


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body is read by then: what follows is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
