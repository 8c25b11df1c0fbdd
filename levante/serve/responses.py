"""`/v1/responses`: OpenAI's Responses API, translated to and from a chat completion."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from levante.errors import InvalidRequest, LevanteError
from levante.serve.chat import plan_chat
from levante.serve.mcp_loop import McpChat, offers_mcp_tools
from levante.serve.protocol import ChatCompletionRequest, error_body


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stream: bool = False
    text: dict[str, Any] | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    seed: int | None = None
    truncation: Literal["disabled"] | None = None


def _content(content) -> str | list[dict]:
    """A message's content for the chat template: one string when it is all text, else chat content
    parts (`input_image` becomes an `image_url` part, which plan_chat loads as chat does)."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise InvalidRequest("input: a message's content must be a string or a list of content parts")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text"):
            parts.append({"type": "text", "text": part.get("text") or ""})
        elif kind == "input_image":
            parts.append(_image_part(part))
        else:
            raise InvalidRequest(f"input: content part type '{kind}' is not supported")
    if all(part["type"] == "text" for part in parts):
        return "".join(part["text"] for part in parts)
    return parts


def _image_part(part: dict) -> dict:
    """OpenAI's `{"type": "input_image", "image_url": ..., "detail": ...}` as a chat `image_url` part.
    `image_url` is a data URL, an http(s) or file:// URL, or a local path; `file_id` needs a Files API."""
    url = part.get("image_url")
    if isinstance(url, dict):  # the chat completions shape, sent here by mistake: take it
        url = url.get("url")
    if not url:
        if part.get("file_id"):
            raise InvalidRequest("input: input_image 'file_id' is not supported (levante has no Files API); "
                                 "give 'image_url' (a data URL, an http(s) URL or a file path)")
        raise InvalidRequest("input: input_image needs an 'image_url'")
    if not isinstance(url, str):
        raise InvalidRequest("input: input_image 'image_url' must be a string")
    image_url = {"url": url}
    if part.get("detail"):
        image_url["detail"] = part["detail"]
    return {"type": "image_url", "image_url": image_url}


def to_messages(body: ResponsesRequest) -> list[dict]:
    messages = [{"role": "system", "content": body.instructions}] if body.instructions else []
    if isinstance(body.input, str):
        return messages + [{"role": "user", "content": body.input}]
    for item in body.input:
        kind = item.get("type", "message")
        if kind == "message":
            messages.append({"role": item.get("role", "user"), "content": _content(item.get("content"))})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")}}
            if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls"):
                messages[-1]["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": output if isinstance(output, str) else json.dumps(output)})
        else:
            raise InvalidRequest(f"input: item type '{kind}' is not supported")
    return messages


def to_chat_request(body: ResponsesRequest) -> ChatCompletionRequest:
    tool_choice = body.tool_choice
    if isinstance(tool_choice, dict):
        tool_choice = {"type": "function", "function": {"name": tool_choice.get("name")}}
    fmt = (body.text or {}).get("format")
    response_format = None
    if fmt and fmt.get("type") == "json_schema":
        response_format = {"type": "json_schema", "json_schema": {"name": fmt.get("name", "response"),
                                                                  "schema": fmt.get("schema"),
                                                                  "strict": fmt.get("strict")}}
    elif fmt:
        response_format = {"type": fmt.get("type")}
    return ChatCompletionRequest(
        messages=to_messages(body), max_completion_tokens=body.max_output_tokens, temperature=body.temperature,
        top_p=body.top_p, seed=body.seed, response_format=response_format, parallel_tool_calls=body.parallel_tool_calls,
        tools=[{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
               for t in body.tools] if body.tools else None,
        tool_choice=tool_choice,
    )


def _output_items(text: str | None, calls: list) -> list[dict]:
    items = []
    if text:
        items.append({"type": "message", "id": f"msg_{uuid.uuid4().hex}", "status": "completed",
                      "role": "assistant",
                      "content": [{"type": "output_text", "text": text, "annotations": []}]})
    for call in calls:
        items.append({"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call.id,
                      "name": call.name, "arguments": call.arguments, "status": "completed"})
    return items


def _response(rid: str, created: int, model: str, status: str, output: list[dict], usage: dict | None,
              body: ResponsesRequest) -> dict:
    return {"id": rid, "object": "response", "created_at": created, "status": status, "model": model,
            "output": output, "usage": usage, "error": None, "incomplete_details": None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "parallel_tool_calls": body.parallel_tool_calls, "temperature": body.temperature,
            "top_p": body.top_p, "tool_choice": body.tool_choice or "auto",
            "tools": [t.model_dump(exclude_none=True) for t in body.tools or []], "metadata": body.metadata or {}}


def _usage(output) -> dict:
    prompt = len(output.prompt_token_ids)
    completion = sum(len(c.token_ids) for c in output.outputs)
    return {"input_tokens": prompt, "output_tokens": completion, "total_tokens": prompt + completion,
            "input_tokens_details": {"cached_tokens": output.num_cached_tokens},
            "output_tokens_details": {"reasoning_tokens": 0}}


def register_responses(app: FastAPI, state) -> None:
    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest):
        state.check(body.model)
        chat_body = to_chat_request(body)
        if offers_mcp_tools(state, chat_body):
            return await mcp_response(state, body, chat_body)
        plan = await asyncio.to_thread(plan_chat, state.llm, chat_body, state.load_image)  # may fetch images
        rid, created = f"resp_{uuid.uuid4().hex}", int(time.time())
        stream = state.generate(plan.prompt, plan.params)
        if body.stream:
            first = await anext(stream)
            return StreamingResponse(events(plan, body, rid, created, first, stream), media_type="text/event-stream")
        final = None
        async for final in stream:
            pass
        return _finish(plan, body, rid, created, final)

    def _finish(plan, body, rid, created, final) -> dict:
        completion = final.outputs[0]
        text, calls = completion.text, []
        if plan.tool_parser is not None:
            text, calls = plan.tool_parser.parse(completion.text)
        status = "incomplete" if completion.finish_reason == "length" else "completed"
        response = _response(rid, created, state.model_name, status, _output_items(text, calls), _usage(final), body)
        if status == "incomplete":
            response["incomplete_details"] = {"reason": "max_output_tokens"}
        return response

    async def events(plan, body, rid, created, first, rest):
        counter = iter(range(1 << 30))

        def event(kind: str, **fields) -> str:
            payload = {"type": kind, "sequence_number": next(counter), **fields}
            return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"

        shell = _response(rid, created, state.model_name, "in_progress", [], None, body)
        yield event("response.created", response=shell)
        yield event("response.in_progress", response=shell)
        streaming_text = plan.tool_parser is None
        item_id, sent, final = f"msg_{uuid.uuid4().hex}", 0, first
        if streaming_text:
            item = {"type": "message", "id": item_id, "status": "in_progress", "role": "assistant", "content": []}
            yield event("response.output_item.added", output_index=0, item=item)
            yield event("response.content_part.added", item_id=item_id, output_index=0, content_index=0,
                        part={"type": "output_text", "text": "", "annotations": []})
        try:
            output = first
            while True:
                final = output
                text = output.outputs[0].text
                if streaming_text and len(text) > sent:
                    yield event("response.output_text.delta", item_id=item_id, output_index=0, content_index=0,
                                delta=text[sent:], logprobs=[])
                    sent = len(text)
                if output.finished:
                    break
                output = await anext(rest)
        except LevanteError as e:
            yield event("error", **error_body(str(e))["error"])
            return
        finally:
            await rest.aclose()
        response = _finish(plan, body, rid, created, final)
        for index, item in enumerate(response["output"]):
            if item["type"] == "message":
                part = item["content"][0]
                if streaming_text:
                    item["id"] = item_id
                else:
                    yield event("response.output_item.added", output_index=index,
                                item={**item, "status": "in_progress", "content": []})
                    yield event("response.content_part.added", item_id=item["id"], output_index=index,
                                content_index=0, part={**part, "text": ""})
                    yield event("response.output_text.delta", item_id=item["id"], output_index=index,
                                content_index=0, delta=part["text"], logprobs=[])
                yield event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                            text=part["text"], logprobs=[])
                yield event("response.content_part.done", item_id=item["id"], output_index=index,
                            content_index=0, part=part)
            else:
                yield event("response.output_item.added", output_index=index,
                            item={**item, "arguments": "", "status": "in_progress"})
                yield event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                            delta=item["arguments"])
                yield event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                            name=item["name"], arguments=item["arguments"])
            yield event("response.output_item.done", output_index=index, item=item)
        if streaming_text and not response["output"]:
            empty = {"type": "message", "id": item_id, "status": "completed", "role": "assistant",
                     "content": [{"type": "output_text", "text": "", "annotations": []}]}
            yield event("response.output_text.done", item_id=item_id, output_index=0, content_index=0, text="",
                        logprobs=[])
            yield event("response.content_part.done", item_id=item_id, output_index=0, content_index=0,
                        part=empty["content"][0])
            yield event("response.output_item.done", output_index=0, item=empty)
            response["output"] = [empty]
        kind = "response.completed" if response["status"] == "completed" else "response.incomplete"
        yield event(kind, response=response)


async def mcp_response(state, body: ResponsesRequest, chat_body: ChatCompletionRequest):
    """The MCP tool loop (serve/mcp_loop.py) as a Response: an `mcp_call` item per call it ran, then the answer.

    Streamed, the finished items are replayed as events once the loop is done (no token-by-token text).
    """
    rid, created = f"resp_{uuid.uuid4().hex}", int(time.time())
    completion = await McpChat(state, chat_body.model_copy(update={"stream": False})).run(rid, created)
    choice, usage = completion["choices"][0], completion["usage"]
    items = []
    for call in choice["message"]["mcp_calls"]:
        tool = state.mcp.tool(call["name"])
        items.append({"type": "mcp_call", "id": f"mcp_{uuid.uuid4().hex}", "status": "completed",
                      "server_label": call["server"] or "", "name": tool.tool_name if tool else call["name"],
                      "arguments": call["arguments"], "output": None if call["is_error"] else call["content"],
                      "error": call["content"] if call["is_error"] else None})
    items += _output_items(choice["message"]["content"], [])
    status = "incomplete" if choice["finish_reason"] == "length" else "completed"
    response = _response(rid, created, state.model_name, status, items, {
        "input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
        "total_tokens": usage["total_tokens"], "input_tokens_details": {"cached_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0}}, body)
    if status == "incomplete":
        response["incomplete_details"] = {"reason": "max_output_tokens"}
    if not body.stream:
        return response
    return StreamingResponse(_replay(response, body, rid, created, state.model_name),
                             media_type="text/event-stream")


def _replay(response: dict, body: ResponsesRequest, rid: str, created: int, model: str):
    counter = iter(range(1 << 30))

    def event(kind: str, **fields) -> str:
        payload = {"type": kind, "sequence_number": next(counter), **fields}
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"

    shell = _response(rid, created, model, "in_progress", [], None, body)
    yield event("response.created", response=shell)
    yield event("response.in_progress", response=shell)
    for index, item in enumerate(response["output"]):
        if item["type"] == "message":
            part = item["content"][0]
            yield event("response.output_item.added", output_index=index,
                        item={**item, "status": "in_progress", "content": []})
            yield event("response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                        part={**part, "text": ""})
            yield event("response.output_text.delta", item_id=item["id"], output_index=index, content_index=0,
                        delta=part["text"], logprobs=[])
            yield event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                        text=part["text"], logprobs=[])
            yield event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                        part=part)
        else:
            yield event("response.output_item.added", output_index=index, item={**item, "status": "in_progress"})
        yield event("response.output_item.done", output_index=index, item=item)
    kind = "response.completed" if response["status"] == "completed" else "response.incomplete"
    yield event(kind, response=response)
