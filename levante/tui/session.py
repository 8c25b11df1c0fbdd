"""The conversation behind `levante chat`: an OpenAI-compatible chat client and the client-side tool loop.

`ChatSession.send(content)` streams one turn as events: text as it arrives, every tool call the
model makes (run with the tool provider, its result sent back as a `tool` message), then the end
of the turn. The provider is any object with `openai_tools() -> list[dict]` and
`async call_tool(name, arguments: dict)` returning something with `.content` and `.is_error`
(`levante.mcp.McpToolManager` is one). Rounds of tool calls are bounded: after `max_tool_rounds`,
or once the model only repeats calls it already made this turn, the next request says
`tool_choice: "none"` so that the model answers from the results it has.

If the consumer stops listening (the task is cancelled: Ctrl+C), the partial answer is kept in
`messages` and the HTTP stream is closed, which makes a levante server abort the request.
"""
from __future__ import annotations

import asyncio
import base64
import json
import mimetypes
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import openai

from levante.errors import InvalidRequest


class ToolProvider(Protocol):
    def openai_tools(self) -> list[dict]: ...

    async def call_tool(self, name: str, arguments: dict) -> Any: ...


@dataclass
class TextDelta:
    text: str


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as the model wrote it


@dataclass
class ToolResult:
    id: str
    name: str
    content: str
    is_error: bool


@dataclass
class TurnEnd:
    finish_reason: str | None
    completion_tokens: int | None = None
    seconds: float = 0.0


@dataclass
class TurnError:
    message: str


Event = TextDelta | ToolCall | ToolResult | TurnEnd | TurnError


@dataclass
class Settings:
    temperature: float | None = 0.7
    top_p: float | None = 0.9
    max_tokens: int | None = 512
    seed: int | None = None
    extra: dict = field(default_factory=dict)  # beyond OpenAI's fields (levante/vLLM: top_k, min_tokens, ...)

    def request_options(self) -> dict:
        options = {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens,
                   "seed": self.seed}
        options = {k: v for k, v in options.items() if v is not None}
        return {**options, "extra_body": self.extra} if self.extra else options


@dataclass
class ChatSession:
    client: openai.AsyncOpenAI
    model: str
    tools: ToolProvider | None = None
    settings: Settings = field(default_factory=Settings)
    messages: list[dict] = field(default_factory=list)  # OpenAI chat messages, the system prompt first if any
    max_tool_rounds: int = 8

    # --- the conversation ------------------------------------------------------------------------

    @property
    def system(self) -> str | None:
        if self.messages and self.messages[0].get("role") == "system":
            return self.messages[0]["content"]
        return None

    def set_system(self, prompt: str | None) -> None:
        if self.system is not None:
            self.messages.pop(0)
        if prompt:
            self.messages.insert(0, {"role": "system", "content": prompt})

    def clear(self) -> None:
        """Forget the turns, keep the system prompt."""
        system = self.system
        self.messages = []
        self.set_system(system)

    # --- one turn ----------------------------------------------------------------------------------

    async def send(self, content: str | list[dict]) -> AsyncIterator[Event]:
        """Add a user message and stream the answer, running tool calls until the model answers in text.

        A turn that ends in an error (`TurnError`) is taken back out of `messages`."""
        start = len(self.messages)
        self.messages.append({"role": "user", "content": content})
        tools = self.tools.openai_tools() if self.tools is not None else []
        seen: set[tuple[str, str]] = set()
        answer_now = False
        for round_ in range(self.max_tool_rounds + 1):
            # the last round, or a round after the model only repeated calls it had made: answer in text
            last = round_ == self.max_tool_rounds or answer_now
            calls: list[dict] = []
            async for event in self._complete(tools, calls, "none" if last and tools else None):
                if isinstance(event, TurnError):  # the turn is not kept: the next one must not repeat the error
                    del self.messages[start:]
                yield event
            if not calls:
                return
            if last:
                break
            keys = {(c["function"]["name"], _canonical(c["function"]["arguments"])) for c in calls}
            answer_now, seen = keys <= seen, seen | keys
            answered = 0
            try:
                for call in calls:
                    yield ToolCall(call["id"], call["function"]["name"], call["function"]["arguments"])
                    result = await self._run_tool(call)
                    self.messages.append({"role": "tool", "tool_call_id": call["id"], "content": result.content})
                    answered += 1
                    yield result
            finally:  # stopped mid-call: every call still gets its answer, so the history stays valid
                for call in calls[answered:]:
                    self.messages.append({"role": "tool", "tool_call_id": call["id"],
                                          "content": "error: stopped by the user"})
        self.messages[-1].pop("tool_calls", None)  # calls left unanswered would break the next request
        yield TurnError(f"stopped: the model still called tools after {round_} rounds of tool calls")

    async def _complete(self, tools: list[dict], calls: list[dict], tool_choice: str | None = None,
                        ) -> AsyncIterator[Event]:
        """One streamed request; appends the assistant message (also when cancelled) and fills `calls`."""
        text: list[str] = []
        partial: dict[int, dict] = {}
        finish, tokens, start, done = None, None, time.monotonic(), False
        try:
            stream = await self.client.chat.completions.create(
                model=self.model, messages=self.messages, stream=True, stream_options={"include_usage": True},
                **({"tools": tools} if tools else {}), **({"tool_choice": tool_choice} if tool_choice else {}),
                **self.settings.request_options())
            async with stream:
                async for chunk in stream:
                    if chunk.usage is not None:
                        tokens = chunk.usage.completion_tokens
                    if not chunk.choices:
                        continue
                    choice = chunk.choices[0]
                    delta = choice.delta
                    if delta.content:
                        text.append(delta.content)
                        yield TextDelta(delta.content)
                    for call in delta.tool_calls or []:
                        slot = partial.setdefault(call.index, {"id": "", "type": "function",
                                                               "function": {"name": "", "arguments": ""}})
                        if call.id:
                            slot["id"] = call.id
                        if call.function is not None:
                            slot["function"]["name"] += call.function.name or ""
                            slot["function"]["arguments"] += call.function.arguments or ""
                    if choice.finish_reason:
                        finish = choice.finish_reason
            done = True
        except openai.APIStatusError as e:
            yield TurnError(api_error_message(e))
        except openai.APITimeoutError:
            yield TurnError("the server did not answer in time")
        except openai.APIConnectionError as e:
            yield TurnError(f"cannot reach {self.client.base_url}: {e.__cause__ or e}")
        except openai.APIError as e:  # e.g. an error event in the middle of the stream
            yield TurnError(str(e.message if hasattr(e, "message") else e))
        finally:
            message: dict = {"role": "assistant", "content": "".join(text)}
            if done and partial:
                calls.extend(partial[i] for i in sorted(partial))
                for n, call in enumerate(calls):
                    call["id"] = call["id"] or f"call_{len(self.messages)}_{n}"
                message["tool_calls"] = calls
            if message["content"] or message.get("tool_calls"):
                self.messages.append(message)
        if done:
            yield TurnEnd(finish, tokens, time.monotonic() - start)

    async def _run_tool(self, call: dict) -> ToolResult:
        name, raw = call["function"]["name"], call["function"]["arguments"] or "{}"
        try:
            arguments = json.loads(raw)
        except ValueError as e:
            return ToolResult(call["id"], name, f"error: the arguments are not valid JSON ({e}): {raw}", True)
        if not isinstance(arguments, dict):
            return ToolResult(call["id"], name, f"error: the arguments must be a JSON object, got: {raw}", True)
        if self.tools is None:
            return ToolResult(call["id"], name, f"error: no tools are available (asked for '{name}')", True)
        try:
            result = await self.tools.call_tool(name, arguments)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a tool's failure is the model's to read, not a crash
            return ToolResult(call["id"], name, f"error: {type(e).__name__}: {e}", True)
        return ToolResult(call["id"], name, str(result.content), bool(result.is_error))


def _canonical(arguments: str) -> str:
    try:
        return json.dumps(json.loads(arguments), sort_keys=True)
    except ValueError:
        return arguments


def api_error_message(error: openai.APIStatusError) -> str:
    """The server's own message (OpenAI's error JSON), with the status code."""
    body = error.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return f"{inner['message']} (HTTP {error.status_code})"
    return f"{error.message} (HTTP {error.status_code})"


def image_part(path: str | Path) -> dict:
    """An OpenAI `image_url` content part: a local file as a data URL; http(s) and data URLs as they are."""
    if str(path).startswith(("http://", "https://", "data:")):
        return {"type": "image_url", "image_url": {"url": str(path)}}
    path = Path(path).expanduser()
    if not path.is_file():
        raise InvalidRequest(f"no image at {path}")
    mime = mimetypes.guess_type(path.name)[0]
    if not mime or not mime.startswith("image/"):
        raise InvalidRequest(f"{path} does not look like an image (png, jpeg, gif, webp, ...)")
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}}


def user_content(text: str, images: list[dict]) -> str | list[dict]:
    """Plain text, or text and image parts when images are attached."""
    if not images:
        return text
    return [{"type": "text", "text": text}, *images]
