"""`/v1/messages` and `/v1/messages/count_tokens`: Anthropic's Messages API, one more thin adapter
over the one request pipeline (serve/pipeline.py), as /v1/responses is.

    request   Anthropic's body -> a ChatCompletionRequest (`to_chat_request`): the system prompt,
              messages of text, image, tool_use, tool_result and thinking blocks, tools with their
              input_schema, tool_choice auto/any/tool/none, thinking enabled/disabled, stop_sequences
              and sampling. So validation, admission, fault isolation, the MCP tool loop, LoRA and
              model routing and the metrics are the chat road's.
    response  the chat events, read by the chat formatters (serve/openai_format.py), written as
              Anthropic's message (`to_message`) or as its event stream (`MessageEvents`):
              message_start, ping, content_block_start/delta/stop (text_delta, thinking_delta,
              input_json_delta), message_delta, message_stop.

Tool calls the server ran itself (the MCP loop) come back as `mcp_tool_use` and `mcp_tool_result`
blocks, the shape of Anthropic's MCP connector. `usage.cache_read_input_tokens` counts the prompt
tokens the prefix cache served. Errors take Anthropic's shape (serve/error_shapes.py) with the
statuses the OpenAI routes give.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from levante.errors import InvalidRequest
from levante.serve import openai_format as fmt
from levante.serve.error_shapes import anthropic_error
from levante.serve.pipeline import Event, Round, Routed
from levante.serve.protocol import ChatCompletionRequest, validation_error
from levante.serve.sse import collected, formatted, sse_response


class ToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Thinking(BaseModel):
    """`enabled` / `disabled` reach the chat template as `enable_thinking` (Qwen3's switch); `adaptive`
    leaves it to the template. A model that thinks anyway has its thinking left out of a reply that
    asked for none (or `display: omitted`). `budget_tokens` is taken; `max_tokens` bounds the thinking."""
    model_config = ConfigDict(extra="forbid")
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(default=None, ge=1)
    display: Literal["summarized", "omitted"] | None = None

    @property
    def shown(self) -> bool:
        return self.type != "disabled" and self.display != "omitted"


class OutputFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["json_schema"]
    json_schema: dict[str, Any] = Field(alias="schema")


class OutputConfig(BaseModel):
    """`effort` reaches the chat template as `reasoning_effort`; `format` constrains the reply to a JSON
    schema (structured output, as `response_format` does)."""
    model_config = ConfigDict(extra="forbid")
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: OutputFormat | None = None


class InputMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class CountTokensRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None
    cache_control: dict[str, Any] | None = None  # taken and ignored: the prefix cache needs no marks


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    stream: bool = False
    # Sampling: the SDK sends them through `extra_body` (its typed parameters dropped them), curl directly.
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    metadata: dict[str, Any] | None = None  # taken and ignored, as OpenAI's `metadata` is
    service_tier: str | None = None  # taken and ignored

    @property
    def shows_thinking(self) -> bool:
        return self.thinking is None or self.thinking.shown


# -- request -----------------------------------------------------------------------------------------

def to_chat_request(body: CountTokensRequest) -> ChatCompletionRequest:
    """The chat request that carries `body` down the pipeline (400 naming the field it cannot take)."""
    fields = dict(model=body.model, messages=to_messages(body.system, body.messages),
                  tools=_tools(body.tools), **_tool_choice(body.tool_choice, bool(body.tools)))
    if body.thinking is not None and body.thinking.type != "adaptive":
        fields["chat_template_kwargs"] = {"enable_thinking": body.thinking.type == "enabled"}
    if body.output_config is not None:
        fields["reasoning_effort"] = body.output_config.effort
        if body.output_config.format is not None:
            fields["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "output", "schema": body.output_config.format.json_schema}}
    if isinstance(body, MessagesRequest):
        fields.update(max_tokens=body.max_tokens, stop=body.stop_sequences, temperature=body.temperature,
                      top_p=body.top_p, top_k=body.top_k)
    try:
        return ChatCompletionRequest(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:
        raise InvalidRequest(validation_error(e.errors())[0]) from None


def to_messages(system, messages: list[InputMessage]) -> list[dict]:
    """Anthropic's conversation as chat messages: the system prompt first; an assistant turn's
    thinking as its `reasoning_content` and its tool_use blocks as `tool_calls`; each tool_result
    block a `tool` message, ahead of what else its user turn says."""
    out = [{"role": "system", "content": _system_text(system)}] if system else []
    for index, message in enumerate(messages):
        where = f"messages[{index}].content"
        if isinstance(message.content, str):
            out.append({"role": message.role, "content": message.content})
        elif message.role == "assistant":
            out.append(_assistant_turn(message.content, where))
        else:
            out += _user_turn(message.content, where)
    return out


def _system_text(system) -> str:
    if isinstance(system, str):
        return system
    return "\n\n".join(_text_block(block, f"system[{i}]") for i, block in enumerate(system))


def _text_block(block: dict, where: str) -> str:
    if block.get("type") != "text" or not isinstance(block.get("text"), str):
        raise InvalidRequest(f"{where}: expected a text block ({{\"type\": \"text\", \"text\": ...}})")
    return block["text"]


def _assistant_turn(blocks: list[dict], where: str) -> dict:
    texts, calls, thinking = [], [], None
    for i, block in enumerate(blocks):
        kind = block.get("type")
        if kind == "text":
            texts.append(_text_block(block, f"{where}[{i}]"))
        elif kind == "thinking":
            thinking = (thinking or "") + str(block.get("thinking") or "")
        elif kind in ("tool_use", "mcp_tool_use"):
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": block.get("name"), "arguments": json.dumps(block.get("input") or {})}})
        elif kind == "mcp_tool_result":
            continue  # the server's own call, given back: its use above stands for it
        elif kind != "redacted_thinking":
            raise InvalidRequest(f"{where}[{i}]: content block type '{kind}' is not supported in an assistant turn")
    message = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if calls:
        message["tool_calls"] = calls
    if thinking is not None:
        message["reasoning_content"] = thinking
    return message


def _user_turn(blocks: list[dict], where: str) -> list[dict]:
    results, parts = [], []
    for i, block in enumerate(blocks):
        kind = block.get("type")
        if kind == "tool_result":
            results.append({"role": "tool", "tool_call_id": block.get("tool_use_id"),
                            "content": _tool_result_text(block, f"{where}[{i}]")})
        elif kind == "text":
            parts.append({"type": "text", "text": _text_block(block, f"{where}[{i}]")})
        elif kind == "image":
            parts.append(_image_part(block.get("source"), f"{where}[{i}].source"))
        else:
            raise InvalidRequest(f"{where}[{i}]: content block type '{kind}' is not supported (text, image, "
                                 "tool_result)")
    if not parts:
        return results
    if all(part["type"] == "text" for part in parts):
        return results + [{"role": "user", "content": "".join(part["text"] for part in parts)}]
    return results + [{"role": "user", "content": parts}]


def _tool_result_text(block: dict, where: str) -> str:
    """A tool result as the model reads it; an error result says it is one."""
    content = block.get("content")
    if content is None or isinstance(content, str):
        text = content or ""
    elif isinstance(content, list):
        text = "\n".join(_text_block(part, f"{where}.content[{i}]") for i, part in enumerate(content))
    else:
        raise InvalidRequest(f"{where}.content: expected a string or a list of text blocks")
    return f"Error: {text}" if block.get("is_error") else text


def _image_part(source, where: str) -> dict:
    """An image block's source as a chat `image_url` part: base64 as a data URL, a URL as it is (fetched
    by the server's safe fetcher when the template is rendered)."""
    if not isinstance(source, dict):
        raise InvalidRequest(f"{where}: an image needs a source")
    if source.get("type") == "base64" and isinstance(source.get("data"), str):
        media_type = source.get("media_type") or "image/png"
        return {"type": "image_url", "image_url": {"url": f"data:{media_type};base64,{source['data']}"}}
    if source.get("type") == "url" and isinstance(source.get("url"), str):
        return {"type": "image_url", "image_url": {"url": source["url"]}}
    raise InvalidRequest(f"{where}: expected {{\"type\": \"base64\", \"media_type\", \"data\"}} or "
                         "{\"type\": \"url\", \"url\"} (levante has no Files API)")


def _tools(tools: list[dict] | None) -> list[dict] | None:
    if not tools:
        return None
    out = []
    for index, tool in enumerate(tools):
        if tool.get("type") not in (None, "custom"):
            raise InvalidRequest(f"tools[{index}]: tool type '{tool.get('type')}' is not supported (only client "
                                 "tools with an input_schema; the server's own tools come from --mcp-config)")
        if not isinstance(tool.get("name"), str) or not isinstance(tool.get("input_schema"), dict):
            raise InvalidRequest(f"tools[{index}]: a tool needs a 'name' and an 'input_schema' object")
        function = {"name": tool["name"], "parameters": tool["input_schema"]}
        if tool.get("description"):
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: ToolChoice | None, has_tools: bool) -> dict:
    if choice is None:
        return {}
    if choice.type == "tool" and not choice.name:
        raise InvalidRequest("tool_choice.name: required when tool_choice.type is 'tool'")
    if choice.type in ("any", "tool") and not has_tools:
        raise InvalidRequest(f"tool_choice: '{choice.type}' requires tools")
    fields = {"tool_choice": {"auto": "auto", "any": "required", "none": "none"}.get(choice.type)
              or {"type": "function", "function": {"name": choice.name}}}
    if choice.disable_parallel_tool_use:
        fields["parallel_tool_calls"] = False
    return fields


# -- response ----------------------------------------------------------------------------------------

def usage(openai_usage: dict) -> dict:
    """Anthropic counts cached prompt tokens apart: `input_tokens` are the ones computed."""
    cached = openai_usage["prompt_tokens_details"]["cached_tokens"]
    return {"input_tokens": openai_usage["prompt_tokens"] - cached, "output_tokens": openai_usage["completion_tokens"],
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}


def stop_reason(finish_reason: str | None, rounds: fmt.Rounds) -> tuple[str | None, str | None]:
    """(stop_reason, stop_sequence) for the chat finish reason of the reply."""
    if finish_reason is None:
        return None, None
    if finish_reason == "tool_calls":
        return "tool_use", None
    if finish_reason == "length":
        return "max_tokens", None
    last = rounds.latest.get(0)
    matched = last.outputs[0].stop_reason if last is not None and last.outputs else None
    return ("stop_sequence", matched) if isinstance(matched, str) else ("end_turn", None)


def tool_use_block(call: dict) -> dict:
    """A chat tool call (`{id, function: {name, arguments}}`) as a tool_use block."""
    try:
        arguments = json.loads(call["function"]["arguments"] or "{}")
    except json.JSONDecodeError:
        arguments = None
    if not isinstance(arguments, dict):  # the parser took it for a call: its arguments stay readable
        arguments = {"arguments": call["function"]["arguments"]}
    return {"type": "tool_use", "id": call["id"], "name": call["function"]["name"], "input": arguments}


def mcp_blocks(call: dict) -> list[dict]:
    """A call the server ran (serve/mcp_loop.py's record) as Anthropic's MCP connector writes it."""
    try:
        arguments = json.loads(call["arguments"] or "{}")
    except json.JSONDecodeError:
        arguments = {"arguments": call["arguments"]}
    return [{"type": "mcp_tool_use", "id": call["id"], "name": call["name"], "server_name": call["server"] or "",
             "input": arguments},
            {"type": "mcp_tool_result", "tool_use_id": call["id"], "is_error": bool(call["is_error"]),
             "content": [{"type": "text", "text": call["content"]}]}]


class MessageCollector(fmt.ChatCompletion):
    """Chat events -> one Anthropic message (the chat.completion, rewritten by `to_message`)."""

    def __init__(self, rid: str, shows_thinking: bool):
        super().__init__(rid, int(time.time()))
        self.shows_thinking = shows_thinking

    def response(self) -> dict:
        return to_message(super().response(), self.rounds, self.rid, self.shows_thinking)


def to_message(completion: dict, rounds: fmt.Rounds, rid: str, shows_thinking: bool) -> dict:
    """A chat.completion (serve/openai_format.py's `ChatCompletion`) as Anthropic's message."""
    choice = completion["choices"][0]
    message = choice["message"]
    content = [block for call in message.get("mcp_calls") or [] for block in mcp_blocks(call)]
    if message.get("reasoning_content") and shows_thinking:
        content.append({"type": "thinking", "thinking": message["reasoning_content"], "signature": ""})
    if message.get("content"):
        content.append({"type": "text", "text": message["content"]})
    content += [tool_use_block(call) for call in message.get("tool_calls") or []]
    reason, sequence = stop_reason(choice["finish_reason"], rounds)
    return {"id": rid, "type": "message", "role": "assistant", "model": completion["model"], "content": content,
            "stop_reason": reason, "stop_sequence": sequence, "usage": usage(completion["usage"])}


class MessageEvents:
    """Chat events -> Anthropic's event stream. The chat chunk writer (serve/openai_format.py) splits
    the reply into thinking, text and tool-call deltas; each kind becomes a content block, opened
    when its first delta comes and closed when another kind begins."""

    def __init__(self, rid: str, shows_thinking: bool):
        self.rid, self.shows_thinking = rid, shows_thinking
        self.chat = fmt.ChatChunks(rid, int(time.time()), include_usage=False)
        self.started = False
        self.blocks = 0  # content blocks opened so far
        self.open: str | None = None  # the kind of the block open now
        self.finish: str | None = None

    @staticmethod
    def event(kind: str, **fields) -> tuple[str, dict]:
        return kind, {"type": kind, **fields}

    def error(self, error_json: dict) -> tuple[str, dict]:
        error = error_json["error"]
        status = error["code"] if isinstance(error.get("code"), int) else 500
        return "error", anthropic_error(status, error["message"])

    def chunks(self, event: Event) -> list[tuple[str, dict]]:
        out = []
        if not self.started and not isinstance(event, Routed):  # errors until then keep their status
            out += self._start(event)
        for chunk in self.chat.chunks(event):
            out += self._from_chunk(chunk["choices"][0])
        return out

    def _start(self, event: Event) -> list[tuple[str, dict]]:
        self.started = True
        prompt = len(event.plan.prompt_ids) if isinstance(event, Round) else 0
        message = {"id": self.rid, "type": "message", "role": "assistant", "model": self.chat.model, "content": [],
                   "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": prompt, "output_tokens": 0, "cache_creation_input_tokens": 0,
                             "cache_read_input_tokens": 0}}
        return [self.event("message_start", message=message), self.event("ping")]

    def _from_chunk(self, choice: dict) -> list[tuple[str, dict]]:
        delta, out = choice["delta"], []
        if delta.get("reasoning_content") and self.shows_thinking:
            out += self._text("thinking", {"type": "thinking_delta", "thinking": delta["reasoning_content"]})
        if delta.get("content"):
            out += self._text("text", {"type": "text_delta", "text": delta["content"]})
        for call in delta.get("tool_calls") or []:
            function = call.get("function") or {}
            if call.get("id"):
                out += self._open("tool_use", {"type": "tool_use", "id": call["id"], "name": function.get("name"),
                                               "input": {}})
            if function.get("arguments"):
                out.append(self._delta({"type": "input_json_delta", "partial_json": function["arguments"]}))
        for call in delta.get("mcp_calls") or []:
            for block in mcp_blocks(call):
                out += self._open(block["type"], block) + self._close()
        if choice.get("finish_reason"):
            self.finish = choice["finish_reason"]
        return out

    def _text(self, kind: str, delta: dict) -> list[tuple[str, dict]]:
        out = []
        if self.open != kind:
            empty = {"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking" else \
                {"type": "text", "text": ""}
            out += self._open(kind, empty)
        return out + [self._delta(delta)]

    def _open(self, kind: str, block: dict) -> list[tuple[str, dict]]:
        out = self._close()
        self.open = kind
        self.blocks += 1
        return out + [self.event("content_block_start", index=self.blocks - 1, content_block=block)]

    def _delta(self, delta: dict) -> tuple[str, dict]:
        return self.event("content_block_delta", index=self.blocks - 1, delta=delta)

    def _close(self) -> list[tuple[str, dict]]:
        if self.open is None:
            return []
        self.open = None
        return [self.event("content_block_stop", index=self.blocks - 1)]

    def closing(self) -> list[tuple[str, dict]]:
        out = [] if self.started else self._start(None)
        reason, sequence = stop_reason(self.finish, self.chat.rounds)
        return out + self._close() + [
            self.event("message_delta", delta={"stop_reason": reason, "stop_sequence": sequence},
                       usage=usage(fmt.usage(self.chat.rounds.all()))),
            self.event("message_stop")]


# -- routes ------------------------------------------------------------------------------------------

MESSAGES_DOC = """Anthropic's Messages API (`anthropic` SDK: `base_url` is the server's root, without /v1).

```
curl http://127.0.0.1:8000/v1/messages -H "x-api-key: $KEY" -H "content-type: application/json" \\
  -d '{"model": "qwen2.5-coder:0.5b", "max_tokens": 64, "messages": [{"role": "user", "content": "Hi"}]}'
```
```python
import anthropic
client = anthropic.Anthropic(base_url="http://127.0.0.1:8000", api_key="KEY")
message = client.messages.create(model="qwen2.5-coder:0.5b", max_tokens=64,
                                 messages=[{"role": "user", "content": "Hi"}])
print(message.content[0].text, message.usage)
with client.messages.stream(model="qwen2.5-coder:0.5b", max_tokens=64,
                            messages=[{"role": "user", "content": "Hi"}]) as stream:
    for text in stream.text_stream:
        print(text, end="")
```
System prompts, text and image blocks (base64 or URL), tools with `input_schema` and `tool_choice`
(auto, any, tool, none), tool_use / tool_result blocks, thinking blocks (`thinking: {"type":
"disabled"}` turns thinking off), `stop_sequences`, `temperature`, `top_p`, `top_k`; `stream: true`
sends Anthropic's events. `usage.cache_read_input_tokens` counts prompt tokens from the prefix cache.
"""

COUNT_TOKENS_DOC = """The prompt tokens a Messages request would run (template, tools and images included).

```
curl http://127.0.0.1:8000/v1/messages/count_tokens -H "x-api-key: $KEY" -H "content-type: application/json" \\
  -d '{"model": "qwen2.5-coder:0.5b", "messages": [{"role": "user", "content": "Hi"}]}'
```
```python
client.messages.count_tokens(model="qwen2.5-coder:0.5b", messages=[{"role": "user", "content": "Hi"}])
```
"""


def register_anthropic(app: FastAPI, state) -> None:
    @app.post("/v1/messages", description=MESSAGES_DOC)
    async def messages(body: MessagesRequest, request: Request):
        rid = f"msg_{uuid.uuid4().hex}"
        events = state.pipeline.chat_events(to_chat_request(body))
        if body.stream:
            stream = MessageEvents(rid, body.shows_thinking)
            return await sse_response(formatted(events, stream), stream.error, done=False)
        return await collected(request, events, MessageCollector(rid, body.shows_thinking))

    @app.post("/v1/messages/count_tokens", description=COUNT_TOKENS_DOC)
    async def count_tokens(body: CountTokensRequest):
        return {"input_tokens": await state.pipeline.count_chat_tokens(to_chat_request(body))}
