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

The loop is a source of pipeline events (serve/pipeline.py): a `Round` per generation (marked as one
whose calls the server runs), its `Output`s (held back, `shown=False`, while the round's text could
still be a call), `McpCalls` after each executed round, and a closing `Finish`. The chat and responses
adapters format them as they format any other request.

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
from collections.abc import AsyncIterator

from levante.engine.structured import StructuredOutput
from levante.errors import InvalidRequest
from levante.serve.chat import ChatPlan
from levante.serve.pipeline import Event, Finish, McpCalls, Output, Round
from levante.serve.protocol import ChatCompletionRequest

DEFAULT_MAX_ROUNDS = 5
ANSWER_PATTERN = r"[\p{L}\p{N}][\s\S]*"  # an answer round's reply: text, not a call or a JSON object
CALL_OPENERS = ("{", "[", "<", "`")  # how a call the parser missed begins
ANSWER_NUDGE = "Answer my question above in plain text, using the tool results."  # the answer round's last turn


def offers_mcp_tools(state, body: ChatCompletionRequest) -> bool:
    manager = getattr(state, "mcp", None)
    return (manager is not None and not body.tools and body.tool_choice != "none" and body.response_format is None
            and body.grammar is None and bool(manager.openai_tools()))


class McpChat:
    """One chat request's trip through the loop, over a `Pipeline`."""

    def __init__(self, pipeline, body: ChatCompletionRequest):
        if body.n != 1:
            raise InvalidRequest("n: the server's MCP tool loop serves one choice; use n=1, or send your own "
                                 "'tools' to run the calls yourself")
        self.pipeline, self.state, self.body = pipeline, pipeline.state, body
        self.tools = self.state.mcp.openai_tools()
        self.max_rounds = getattr(self.state, "mcp_max_rounds", DEFAULT_MAX_ROUNDS)
        self.messages = [m.model_dump(exclude_none=True) for m in body.messages]
        self.calls: list[dict] = []  # what ran, in order, as the client sees it
        self.rounds = 0  # rounds whose calls ran
        self.answering = False  # the next round must answer in text

    async def plan(self) -> ChatPlan:
        answer_round = self.answering or self.rounds >= self.max_rounds
        data = self.body.model_dump(exclude_none=True, by_alias=True)
        for key in ("tools", "tool_choice", "stream", "stream_options"):
            data.pop(key, None)
        data["messages"] = self.messages
        if not answer_round:
            data["tools"] = self.tools
        elif self.calls:
            data["messages"] = self.messages + [{"role": "user", "content": ANSWER_NUDGE}]
        forced = StructuredOutput("regex", ANSWER_PATTERN) if answer_round and self.calls else None
        return await self.pipeline.plan_chat(ChatCompletionRequest.model_validate(data), forced)

    async def events(self) -> AsyncIterator[Event]:
        """The whole loop as events. A round's outputs are held back while its text could still be a
        call, and go out as soon as it reads as prose (or, held to the end, if the round answers)."""
        while True:
            plan = await self.plan()
            yield Round(plan, server_runs_tools=True)
            shown, final = False, None
            async for event in self.pipeline.generate(plan.prompt, plan.params):
                final = event.output
                if not shown:
                    text = final.outputs[0].text.lstrip()
                    shown = bool(text) and not text.startswith(CALL_OPENERS)  # prose: it cannot be a call
                yield Output(0, final, shown)
            step, calls = self._review(plan, final)
            if step == "done":
                if not shown:
                    yield Output(0, final)
                yield Finish("length" if final.outputs[0].finish_reason == "length" else "stop")
                return
            if step == "calls":
                yield McpCalls(await self._execute(calls))

    def _review(self, plan: ChatPlan, final) -> tuple[str, list]:
        """What follows a round: ("calls", calls) to run, ("answer", []) for an answer round, or ("done", [])."""
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
