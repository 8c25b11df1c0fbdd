"""The server-side tool loop: MCP tools offered to the model, its calls run, results fed back.

It runs when the server has MCP tools and a chat request brings no tools of its own (and asks for no
`tool_choice: "none"`, `response_format` or `grammar`). A request with its own `tools` is served as
before: the model's calls go back to the client (mistral.rs does the same).

Each round renders the conversation with the MCP tools, generates, and parses the reply; calls are
run against MCP (at once, up to `max_concurrent_calls`), appended to the conversation as an assistant
message with `tool_calls` and one `tool` message per result, and the model goes again, until it
answers. It is made to answer in an "answer round" when it has had `max_rounds` rounds of calls,
when it only repeats calls it already made, or when, after calls ran, it writes what looks like a
call the parser cannot take (small models do all three, and would otherwise loop or answer JSON).
An answer round offers no tools, adds one user turn (ANSWER_NUDGE, not part of any reply) and makes
the reply open with a letter or digit, so it is neither a call nor a bare JSON object.
`max_tokens` bounds each round.

What the client sees (OpenAI's schema has no place for calls the server ran, so levante adds one):
  non-streaming  the final message carries `content` and `mcp_calls`: [{id, name, server, arguments,
                 content, is_error}] in the order they ran; `usage` sums every round.
  streaming      content deltas as they come (a round's text is held back while it could still be a
                 call); after each executed call a chunk whose delta is {"mcp_calls": [that call]};
                 the finish_reason and usage chunks close the last round.
Standard `tool_calls` are never sent for calls the server ran: the client must not run them again.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from levante.errors import InvalidRequest, LevanteError
from levante.serve import openai_format as fmt
from levante.engine.structured import StructuredOutput
from levante.serve.chat import ChatPlan, plan_chat
from levante.serve.protocol import ChatCompletionRequest, error_body

DEFAULT_MAX_ROUNDS = 5
ANSWER_PATTERN = r"[\p{L}\p{N}][\s\S]*"  # an answer round's reply: text, not a call or a JSON object
CALL_OPENERS = ("{", "[", "<", "`")  # how a call the parser missed begins
ANSWER_NUDGE = "Answer my question above in plain text, using the tool results."  # the answer round's last turn


async def mcp_chat_completion(state, body: ChatCompletionRequest, search=None):
    """/v1/chat/completions through the loop: a chat.completion dict, or a StreamingResponse of chunks."""
    chat = McpChat(state, body)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if not body.stream:
        response = await chat.run(rid, created)
        return search.annotate(response) if search else response
    plan, stream, first = await chat.first_round()  # request errors become a 400 before the stream starts

    async def events():
        async for chunk in chat.events(rid, created, plan, stream, first):
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        if body.stream_options and body.stream_options.include_usage:
            yield f"data: {json.dumps(chat.usage_chunk(rid, created))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def offers_mcp_tools(state, body: ChatCompletionRequest) -> bool:
    manager = getattr(state, "mcp", None)
    return (manager is not None and not body.tools and body.tool_choice != "none" and body.response_format is None
            and body.grammar is None and bool(manager.openai_tools()))


class McpChat:
    """One chat request's trip through the loop."""

    def __init__(self, state, body: ChatCompletionRequest):
        if body.n != 1:
            raise InvalidRequest("n: the server's MCP tool loop serves one choice; use n=1, or send your own "
                                 "'tools' to run the calls yourself")
        self.state, self.body = state, body
        self.tools = state.mcp.openai_tools()
        self.max_rounds = getattr(state, "mcp_max_rounds", DEFAULT_MAX_ROUNDS)
        self.messages = [m.model_dump(exclude_none=True) for m in body.messages]
        self.calls: list[dict] = []  # what ran, in order, as the client sees it
        self.outputs: list = []  # the final RequestOutput of every round
        self.rounds = 0  # rounds whose calls ran
        self.answering = False  # the next round must answer in text

    def plan(self) -> ChatPlan:
        answer_round = self.answering or self.rounds >= self.max_rounds
        data = self.body.model_dump(exclude_none=True, by_alias=True)
        for key in ("tools", "tool_choice", "stream", "stream_options"):
            data.pop(key, None)
        data["messages"] = self.messages
        if not answer_round:
            data["tools"] = self.tools
        elif self.calls:
            data["messages"] = self.messages + [{"role": "user", "content": ANSWER_NUDGE}]
        plan = plan_chat(self.state.llm, ChatCompletionRequest.model_validate(data), self.state.load_image)
        if answer_round and self.calls:
            plan.params.structured = StructuredOutput("regex", ANSWER_PATTERN)
        return plan

    async def run(self, rid: str, created: int) -> dict:
        """The whole loop, then one chat.completion with `mcp_calls` on its message."""
        while True:
            plan = await asyncio.to_thread(self.plan)  # may fetch images
            final = None
            async for final in self.state.generate(plan.prompt, plan.params):
                pass
            step, calls = self._review(plan, final)
            if step == "done":
                break
            if step == "calls":
                await self._execute(calls)
        response = fmt.chat_response(plan, rid, created, self.state.model_name, final)
        choice = response["choices"][0]
        if choice["message"].pop("tool_calls", None):  # calls cut off by max_tokens: not run, not the client's
            choice["message"]["content"] = final.outputs[0].text
            choice["finish_reason"] = "length"
        choice["message"]["mcp_calls"] = self.calls
        response["usage"] = fmt.usage(self.outputs)
        return response

    async def first_round(self):
        """Start a streamed round: its plan, its stream and first output (request errors raise here)."""
        plan = await asyncio.to_thread(self.plan)  # may fetch images
        stream = self.state.generate(plan.prompt, plan.params)
        return plan, stream, await anext(stream)

    async def events(self, rid: str, created: int, plan: ChatPlan, stream, first) -> AsyncIterator[dict]:
        """chat.completion.chunk dicts for the whole loop; an error ends it with an error payload."""
        model, tokenizer = self.state.model_name, self.state.llm.tokenizer

        def chunk(delta: dict, finish_reason: str | None = None) -> dict:
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

        yield chunk({"role": "assistant", "content": ""})
        try:
            while True:
                writer = fmt.ChatStreamWriter(plan, rid, created, model, tokenizer)
                held, streaming, final = [], False, first
                try:
                    async for final in _outputs(first, stream):
                        for piece in writer.chunks(final):
                            choice = piece["choices"][0]
                            content = choice["delta"].get("content")
                            if choice["finish_reason"] is not None or not (content or choice["logprobs"]):
                                continue  # role, tool-call and finish chunks: the loop writes its own
                            if streaming:
                                yield piece
                                continue
                            held.append(piece)
                            text = "".join(p["choices"][0]["delta"].get("content") or "" for p in held).lstrip()
                            if text and not text.startswith(CALL_OPENERS):  # prose: it cannot be a call
                                streaming = True
                                for piece in held:
                                    yield piece
                                held = []
                finally:
                    await stream.aclose()  # a client gone mid-stream: abort the request, free its cache
                step, calls = self._review(plan, final)
                if step == "done":
                    for piece in held:
                        yield piece
                    reason = "length" if final.outputs[0].finish_reason == "length" else "stop"
                    yield chunk({}, reason)
                    return
                for call in await self._execute(calls) if step == "calls" else []:
                    yield chunk({"mcp_calls": [call]})
                plan, stream, first = await self.first_round()
        except LevanteError as e:
            yield error_body(str(e))

    def usage_chunk(self, rid: str, created: int) -> dict:
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.state.model_name,
                "choices": [], "usage": fmt.usage(self.outputs)}

    def _review(self, plan: ChatPlan, final) -> tuple[str, list]:
        """What follows a round: ("calls", calls) to run, ("answer", []) for an answer round, or ("done", [])."""
        self.outputs.append(final)
        completion = final.outputs[0]
        if plan.tool_parser is None:
            return "done", []  # an answer round
        content, calls = plan.tool_parser.parse(completion.text)
        if not calls or completion.finish_reason == "length":
            if self.calls and completion.text.lstrip().startswith(CALL_OPENERS):
                self.answering = True  # a call the parser could not take, or cut off: make it answer instead
                return "answer", []
            return "done", []
        made = {(c["name"], _canonical(c["arguments"])) for c in self.calls}
        if all((call.name, _canonical(call.arguments)) in made for call in calls):
            self.answering = True  # it repeats itself: what it asked for is in the conversation already
            return "answer", []
        self.messages.append({"role": "assistant", "content": content,
                              "tool_calls": [call.to_openai() for call in calls]})
        return "calls", calls

    async def _execute(self, calls) -> list[dict]:
        """Run one round's calls concurrently; append their results to the conversation."""
        self.rounds += 1
        results = await asyncio.gather(*(self._call(call) for call in calls))
        done = []
        for call, result in zip(calls, results):
            self.messages.append({"role": "tool", "tool_call_id": call.id, "content": result.content})
            record = {"id": call.id, "name": call.name, "server": self.state.mcp.server_of(call.name),
                      "arguments": call.arguments, "content": result.content, "is_error": result.is_error}
            self.calls.append(record)
            done.append(record)
        return done

    async def _call(self, call):
        from levante.mcp import ToolCallResult

        try:
            arguments = json.loads(call.arguments or "{}")
        except json.JSONDecodeError as e:
            return ToolCallResult(f"the arguments are not valid JSON: {e}", is_error=True)
        return await self.state.mcp.call_tool(call.name, arguments)


def _canonical(arguments: str) -> str:
    try:
        return json.dumps(json.loads(arguments or "{}"), sort_keys=True)
    except json.JSONDecodeError:
        return arguments


async def _outputs(first, rest) -> AsyncIterator:
    yield first
    async for output in rest:
        yield output
