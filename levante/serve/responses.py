"""`/v1/responses`: OpenAI's Responses API, translated to and from a chat completion."""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from levante.errors import InvalidRequest
from levante.serve.openai_format import ChatCompletion
from levante.serve.pipeline import Event, Output, Round, Routed
from levante.serve.protocol import ChatCompletionRequest, ReasoningEffort, validation_error
from levante.serve.sse import collected, formatted, sse_response


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ReasoningOptions(BaseModel):
    """OpenAI's `reasoning`: `effort` reaches the chat template as `reasoning_effort`; the thinking comes
    back whole as a reasoning item's `reasoning_text` (no summaries are written, so `summary` asks for nothing)."""
    model_config = ConfigDict(extra="forbid")
    effort: ReasoningEffort | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
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
    reasoning: ReasoningOptions | None = None


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


def _reasoning_text(item: dict) -> str:
    """A reasoning item's thinking: its `reasoning_text` parts, else its summary."""
    parts = item.get("content") or item.get("summary") or []
    if not isinstance(parts, list):
        raise InvalidRequest("input: a reasoning item's content must be a list of parts")
    return "".join(part.get("text") or "" for part in parts if isinstance(part, dict))


def to_messages(body: ResponsesRequest) -> list[dict]:
    """The conversation as chat messages. A reasoning item (a reply given back) becomes the
    `reasoning_content` of the assistant message that follows it, which templates such as Qwen3's render."""
    messages = [{"role": "system", "content": body.instructions}] if body.instructions else []
    if isinstance(body.input, str):
        return messages + [{"role": "user", "content": body.input}]
    reasoning = None  # the thinking of the assistant turn that follows
    for item in body.input:
        kind = item.get("type", "message")
        if kind == "reasoning":
            reasoning = _reasoning_text(item)
            continue
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
        if reasoning is not None and messages[-1]["role"] == "assistant":
            messages[-1]["reasoning_content"] = reasoning
        reasoning = None
    return messages


def to_chat_request(body: ResponsesRequest) -> ChatCompletionRequest:
    tool_choice = body.tool_choice
    if isinstance(tool_choice, dict):
        tool_choice = {"type": "function", "function": {"name": tool_choice.get("name")}}
    fmt = (body.text or {}).get("format")
    if fmt is not None and not isinstance(fmt, dict):
        raise InvalidRequest("text.format: must be an object such as {\"type\": \"json_schema\", ...}")
    response_format = None
    if fmt and fmt.get("type") == "json_schema":
        response_format = {"type": "json_schema", "json_schema": {"name": fmt.get("name", "response"),
                                                                  "schema": fmt.get("schema"),
                                                                  "strict": fmt.get("strict")}}
    elif fmt:
        response_format = {"type": fmt.get("type")}
    fields = dict(
        model=body.model, messages=to_messages(body), max_completion_tokens=body.max_output_tokens,
        temperature=body.temperature, reasoning_effort=body.reasoning.effort if body.reasoning else None,
        top_p=body.top_p, seed=body.seed, response_format=response_format, parallel_tool_calls=body.parallel_tool_calls,
        tools=[{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
               for t in body.tools] if body.tools else None,
        tool_choice=tool_choice,
    )
    try:
        return ChatCompletionRequest(**fields)
    except ValidationError as e:
        raise InvalidRequest(validation_error(e.errors())[0]) from None


def _reasoning_item(text: str, item_id: str | None = None) -> dict:
    return {"type": "reasoning", "id": item_id or f"rs_{uuid.uuid4().hex}", "status": "completed", "summary": [],
            "content": [{"type": "reasoning_text", "text": text}]}


def _message_item(text: str, item_id: str | None = None) -> dict:
    return {"type": "message", "id": item_id or f"msg_{uuid.uuid4().hex}", "status": "completed",
            "role": "assistant", "content": [{"type": "output_text", "text": text, "annotations": []}]}


def _output_items(reasoning: str | None, text: str | None, calls: list[dict]) -> list[dict]:
    """The reply's items: its thinking, its message, its function calls, in that order."""
    items = [_reasoning_item(reasoning)] if reasoning else []
    if text:
        items.append(_message_item(text))
    for call in calls:
        items.append({"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call["id"],
                      "name": call["function"]["name"], "arguments": call["function"]["arguments"],
                      "status": "completed"})
    return items


def _mcp_items(state, calls: list[dict]) -> list[dict]:
    items = []
    for call in calls:
        tool = state.mcp.tool(call["name"]) if state.mcp is not None else None
        items.append({"type": "mcp_call", "id": f"mcp_{uuid.uuid4().hex}", "status": "completed",
                      "server_label": call["server"] or "", "name": tool.tool_name if tool else call["name"],
                      "arguments": call["arguments"], "output": None if call["is_error"] else call["content"],
                      "error": call["content"] if call["is_error"] else None})
    return items


def _response(rid: str, created: int, model: str, status: str, output: list[dict], usage: dict | None,
              body: ResponsesRequest) -> dict:
    return {"id": rid, "object": "response", "created_at": created, "status": status, "model": model,
            "output": output, "usage": usage, "error": None, "incomplete_details": None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "parallel_tool_calls": body.parallel_tool_calls, "temperature": body.temperature,
            "top_p": body.top_p, "tool_choice": body.tool_choice or "auto",
            "tools": [t.model_dump(exclude_none=True) for t in body.tools or []], "metadata": body.metadata or {}}


def _usage(usage: dict) -> dict:
    """The chat usage (serve/openai_format.py's `usage`) in the Responses API's names."""
    return {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
            "total_tokens": usage["total_tokens"],
            "input_tokens_details": {"cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]},
            "output_tokens_details": {"reasoning_tokens": 0}}


def to_response(state, completion: dict, body: ResponsesRequest, rid: str, created: int) -> dict:
    """A chat.completion (serve/openai_format.py's `ChatCompletion`) as a Response: an `mcp_call` item per
    call the server ran, then the reasoning, the message, and the function calls for the client to run."""
    choice = completion["choices"][0]
    message = choice["message"]
    items = _mcp_items(state, message.get("mcp_calls") or []) + _output_items(
        message.get("reasoning_content"), message["content"], message.get("tool_calls") or [])
    status = "incomplete" if choice["finish_reason"] == "length" else "completed"
    response = _response(rid, created, completion["model"], status, items, _usage(completion["usage"]), body)
    if status == "incomplete":
        response["incomplete_details"] = {"reason": "max_output_tokens"}
    if "mcp_tools_offered" in completion:
        response["mcp_tools_offered"] = completion["mcp_tools_offered"]
    return response


# How each kind of text item streams: its content part's type, and its delta and done events.
_TEXT_ITEMS = {
    "message": ("output_text", "response.output_text.delta", "response.output_text.done"),
    "reasoning": ("reasoning_text", "response.reasoning_text.delta", "response.reasoning_text.done"),
}


class ResponseEvents:
    """Chat events -> the Responses API's stream. A plain round's thinking and text go out as they come
    (a reasoning item, then the message); the rest (tool calls, MCP calls, the final items) is
    replayed once the reply is complete."""

    def __init__(self, state, body: ResponsesRequest, rid: str, created: int):
        self.state, self.body, self.rid, self.created = state, body, rid, created
        self.collector = ChatCompletion(rid, created)
        self.counter = iter(range(1 << 30))
        self.started = False
        self.rounds = 0
        self.live: list[dict] | None = None  # the items streamed as they came; None when nothing streams live
        self.reasoning = None  # the live round's streaming reasoning parser
        self.sent = 0  # characters of the live round's text read so far

    def event(self, kind: str, **fields) -> tuple[str, dict]:
        return kind, {"type": kind, "sequence_number": next(self.counter), **fields}

    def error(self, error_json: dict) -> tuple[str, dict]:
        return self.event("error", **error_json["error"])

    def chunks(self, event: Event) -> list[tuple[str, dict]]:
        self.collector.add(event)
        out = []
        if not self.started and not isinstance(event, Routed):  # errors until planned keep their status
            self.started = True
            shell = _response(self.rid, self.created, self.collector.model, "in_progress", [], None, self.body)
            out += [self.event("response.created", response=shell), self.event("response.in_progress", response=shell)]
        if isinstance(event, Round):
            self.rounds += 1
            plain = event.plan.tool_parser is None and not event.server_runs_tools
            if self.rounds == 1 and plain:
                self.live = []
                self.reasoning = event.plan.reasoning.stream() if event.plan.reasoning is not None else None
        elif isinstance(event, Output) and self.live is not None:
            out += self._live(event.output.outputs[0])
        return out

    def _live(self, completion) -> list[tuple[str, dict]]:
        """Deltas for the new text of the live round: thinking into the reasoning item, the answer into the message."""
        text, finished = completion.text[self.sent:], completion.finish_reason is not None
        self.sent = len(completion.text)
        if self.reasoning is None:
            pieces = [("message", text)]
        else:
            deltas = self.reasoning.finish(text) if finished else self.reasoning.feed(text)
            pieces = [("reasoning", d.reasoning) if d.reasoning is not None else ("message", d.content) for d in deltas]
        out = []
        for kind, piece in pieces:
            if not piece:
                continue
            if not self.live or self.live[-1]["type"] != kind:
                out += self._open(len(self.live), kind)
            item = self.live[-1]
            out.append(self.event(_TEXT_ITEMS[kind][1], item_id=item["id"], output_index=len(self.live) - 1,
                                  content_index=0, delta=piece, **({"logprobs": []} if kind == "message" else {})))
        return out

    def _open(self, index: int, kind: str) -> list[tuple[str, dict]]:
        item = (_message_item if kind == "message" else _reasoning_item)("")
        self.live.append(item)
        part = item["content"][0]
        return [self.event("response.output_item.added", output_index=index,
                           item={**item, "status": "in_progress", "content": []}),
                self.event("response.content_part.added", item_id=item["id"], output_index=index,
                           content_index=0, part=part)]

    def closing(self) -> list[tuple[str, dict]]:
        response = to_response(self.state, self.collector.response(), self.body, self.rid, self.created)
        if self.live is not None and not response["output"]:
            response["output"] = [_message_item("")]  # a streamed reply always has its message
        out = []
        for index, item in enumerate(response["output"]):
            live = self.live[index] if self.live and index < len(self.live) else None
            live = live if live is not None and live["type"] == item["type"] else None
            if live is not None:
                item["id"] = live["id"]
            out += self._replay(index, item, streamed=live is not None)
        kind = "response.completed" if response["status"] == "completed" else "response.incomplete"
        return out + [self.event(kind, response=response)]

    def _replay(self, index: int, item: dict, streamed: bool = False) -> list[tuple[str, dict]]:
        """The events of a finished item; for one `streamed` live, only those that close it."""
        event, out = self.event, []
        if item["type"] in _TEXT_ITEMS:
            part = item["content"][0]
            _, delta_event, done_event = _TEXT_ITEMS[item["type"]]
            logprobs = {"logprobs": []} if item["type"] == "message" else {}
            if not streamed:
                out += [event("response.output_item.added", output_index=index,
                              item={**item, "status": "in_progress", "content": []}),
                        event("response.content_part.added", item_id=item["id"], output_index=index,
                              content_index=0, part={**part, "text": ""}),
                        event(delta_event, item_id=item["id"], output_index=index, content_index=0,
                              delta=part["text"], **logprobs)]
            out += [event(done_event, item_id=item["id"], output_index=index, content_index=0, text=part["text"],
                          **logprobs),
                    event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                          part=part)]
        elif item["type"] == "function_call":
            out += [event("response.output_item.added", output_index=index,
                          item={**item, "arguments": "", "status": "in_progress"}),
                    event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                          delta=item["arguments"]),
                    event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                          name=item["name"], arguments=item["arguments"])]
        else:  # an mcp_call the server ran
            out.append(event("response.output_item.added", output_index=index, item={**item, "status": "in_progress"}))
        return out + [event("response.output_item.done", output_index=index, item=item)]


def register_responses(app: FastAPI, state) -> None:
    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, request: Request):
        chat_body = to_chat_request(body)
        rid, created = f"resp_{uuid.uuid4().hex}", int(time.time())
        events = state.pipeline.chat_events(chat_body)
        if body.stream:
            stream = ResponseEvents(state, body, rid, created)
            return await sse_response(formatted(events, stream), stream.error)
        return to_response(state, await collected(request, events, ChatCompletion(rid, created)), body, rid, created)
