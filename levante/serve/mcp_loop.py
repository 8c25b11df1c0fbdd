"""The server-side tool loop: MCP tools offered to the model, its calls run, results fed back.

It runs when the server has MCP tools and a chat request brings no tools of its own (and asks for no
`tool_choice: "none"`, `response_format` or `grammar`). A request with its own `tools` is served as
before: the model's calls go back to the client (mistral.rs does the same).

The request is offered the MCP tools that matter to it (serve/tool_selection.py: all of them while
they fit the budget). Each round renders the conversation with those tools, generates, and parses
the reply; calls are run against MCP (at once, up to `max_concurrent_calls`), appended to the
conversation as an assistant message with `tool_calls` and one `tool` message per result, and the
model goes again, until it answers. A call identical to one made before in the request (same tool,
same arguments) is not run again: its tool message says so and carries the first result. A
reasoning model's thinking is split off before a reply is read for calls; the thinking of a round
whose calls ran goes back to the model with them (`reasoning_content`), and only the last round's
thinking reaches the client.

It is made to answer in an "answer round" when it has had `max_rounds` rounds of calls, when a
round only repeats calls it already made, when, after calls ran, it writes what looks like a call
the parser cannot take, or when its reply is empty (small models do all four, and would otherwise
loop, answer JSON or answer nothing). An answer round offers no tools, adds one user turn
(ANSWER_NUDGE, not part of any reply) when calls ran, and makes the reply open with a letter or
digit (after its thinking, for a model that thinks), so it is neither a call nor a bare JSON object
nor empty. Should it still produce no text,
the reply says what the tools returned and that no answer was produced, with the finish reason
"tool_loop" (the model kept calling tools) or "no_answer" (it wrote nothing after the results):
a reply is never empty with "stop". `max_tokens` bounds each round.

The loop is a source of pipeline events (serve/pipeline.py): `ToolsOffered` first, a `Round` per
generation (marked as one whose calls the server runs), its `Output`s (held back, `shown=False`,
while the round's text could still be a call), `McpCalls` after each executed round, and a closing
`Finish`. The chat and responses adapters format them as they format any other request.

What the client sees (OpenAI's schema has no place for calls the server ran, so levante adds one):
  non-streaming  `mcp_tools_offered`: the names of the tools offered; the final message carries
                 `content` and `mcp_calls`: [{id, name, server, arguments, content, is_error}] in the
                 order they ran (a repeated call also has `repeat_of`: the id of the call whose result
                 it got); `usage` sums every round.
  streaming      the first chunk carries `mcp_tools_offered`; content deltas as they come (a round's
                 text is held back while it could still be a call); after each executed call a chunk
                 whose delta is {"mcp_calls": [that call]}; the finish_reason and usage chunks close
                 the last round.
Standard `tool_calls` are never sent for calls the server ran: the client must not run them again.
"""
from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator

from levante.engine.outputs import CompletionOutput, RequestOutput
from levante.engine.structured import StructuredOutput
from levante.errors import InvalidRequest
from levante.serve.chat import ChatPlan
from levante.serve.pipeline import Event, Finish, McpCalls, Output, Round, ToolsOffered
from levante.serve.protocol import ChatCompletionRequest
from levante.serve.tool_selection import selector_for

DEFAULT_MAX_ROUNDS = 5
ANSWER_PATTERN = r"[\p{L}\p{N}][\s\S]*"  # an answer round's reply: text, not a call, a JSON object or nothing
CALL_OPENERS = ("{", "[", "<", "`")  # how a call the parser missed begins
ANSWER_NUDGE = "Answer my question above in plain text, using the tool results."  # the answer round's last turn
REPEAT_NOTE = "You already made this call ({first}); it was not run again. Its result:\n"
RESULT_CHARS = 500  # of each tool result quoted in a reply that has no answer


def offers_mcp_tools(state, body: ChatCompletionRequest) -> bool:
    manager = getattr(state, "mcp", None)
    return (manager is not None and not body.tools and body.tool_choice != "none" and body.response_format is None
            and body.grammar is None and bool(manager.offered_tools()))


class McpChat:
    """One chat request's trip through the loop, over a `Pipeline`."""

    def __init__(self, pipeline, route, body: ChatCompletionRequest):
        if body.n != 1:
            raise InvalidRequest("n: the server's MCP tool loop serves one choice; use n=1, or send your own "
                                 "'tools' to run the calls yourself")
        self.pipeline, self.route, self.state, self.body = pipeline, route, pipeline.state, body
        self.tools: list[dict] = []  # offered to the model, chosen in `events`
        self.max_rounds = getattr(self.state, "mcp_max_rounds", DEFAULT_MAX_ROUNDS)
        self.messages = [m.model_dump(exclude_none=True) for m in body.messages]
        self.calls: list[dict] = []  # what ran, in order, as the client sees it
        self.first_runs: dict[tuple[str, str], dict] = {}  # (tool, canonical arguments) -> its first call
        self.rounds = 0  # rounds whose calls ran
        self.answering: str | None = None  # why the next round must answer in text: "tool_loop" or "no_answer"

    @property
    def answer_round(self) -> bool:
        return self.answering is not None or self.rounds >= self.max_rounds

    async def plan(self) -> ChatPlan:
        answer_round = self.answer_round
        data = self.body.model_dump(exclude_none=True, by_alias=True)
        for key in ("tools", "tool_choice", "stream", "stream_options"):
            data.pop(key, None)
        data["messages"] = self.messages
        if not answer_round:
            data["tools"] = self.tools
        elif self.calls:
            data["messages"] = self.messages + [{"role": "user", "content": ANSWER_NUDGE}]
        forced = answer_round and (self.calls or self.answering)
        structured = StructuredOutput("regex", self.answer_pattern()) if forced else None
        return await self.pipeline.plan_chat(self.route, ChatCompletionRequest.model_validate(data), structured)

    def answer_pattern(self) -> str:
        """ANSWER_PATTERN, after the thinking of a model that thinks (`<think>...</think>`)."""
        markers = self.route.llm.chat_renderer.reasoning_markers
        if markers is None:
            return ANSWER_PATTERN
        start, end = map(re.escape, markers)
        return rf"({start}[\s\S]*{end}\s*)?{ANSWER_PATTERN}"

    async def events(self) -> AsyncIterator[Event]:
        """The whole loop as events. A round's outputs are held back while its text could still be a
        call, and go out as soon as it reads as prose (or, held to the end, if the round answers)."""
        yield await self._offer_tools()
        while True:
            answer_round = self.answer_round
            plan = await self.plan()
            yield Round(plan, server_runs_tools=True)
            shown, final = False, None
            async for event in self.pipeline.generate(self.route, plan.prompt, plan.params):
                final = event.output
                if not shown:
                    text = plan.split_reasoning(final.outputs[0].text)[1].lstrip()  # the answer so far
                    shown = bool(text) and not text.startswith(CALL_OPENERS)  # prose: it cannot be a call
                yield Output(0, final, shown)
            step, calls = self._review(plan, final, answer_round)
            if step == "done":
                if not shown:
                    yield Output(0, final)
                yield Finish("length" if final.outputs[0].finish_reason == "length" else "stop")
                return
            if step == "empty":
                for event in self._no_answer(plan):
                    yield event
                return
            if step == "calls":
                yield McpCalls(await self._execute(calls))

    async def _offer_tools(self) -> ToolsOffered:
        chosen = await asyncio.to_thread(lambda: selector_for(self.state, self.route).select(self.messages))
        self.tools = [tool.to_openai() for tool in chosen]
        self.state.metrics.mcp_tools_offered.observe(len(chosen))
        return ToolsOffered([tool.name for tool in chosen])

    def _review(self, plan: ChatPlan, final, answer_round: bool) -> tuple[str, list]:
        """What follows a round: ("calls", calls) to run, ("answer", []) for an answer round, ("done", []),
        or ("empty", []) when even an answer round gave no text."""
        completion = final.outputs[0]
        reasoning, answer = plan.split_reasoning(completion.text)
        reply, calls = answer, []
        if plan.tool_parser is not None:
            content, calls = plan.tool_parser.parse(answer)
            if calls and completion.finish_reason != "length":
                message = {"role": "assistant", "content": content,
                           "tool_calls": [call.to_openai() for call in calls]}
                if reasoning is not None:  # Qwen3's template keeps the thinking of the turn's tool calls
                    message["reasoning_content"] = reasoning
                self.messages.append(message)
                return "calls", calls
            if self.calls and answer.lstrip().startswith(CALL_OPENERS):
                self.answering = "no_answer"  # a call the parser could not take, or cut off: make it answer
                return "answer", []
            reply = answer if calls else content  # calls cut off by max_tokens are shown as text
        if (reply or "").strip():
            return "done", []
        if answer_round:
            return "empty", []
        self.answering = "no_answer"
        return "answer", []

    async def _execute(self, calls) -> list[dict]:
        """Run one round's calls concurrently, each distinct call once; append their results to the
        conversation. A call made before in this request gets the first result back, and is told so."""
        self.rounds += 1
        fresh: dict[tuple[str, str], object] = {}
        for call in calls:
            if _key(call) not in self.first_runs:
                fresh.setdefault(_key(call), call)
        results = dict(zip(fresh, await asyncio.gather(*(self._call(call) for call in fresh.values()))))
        done = []
        for call in calls:
            key = _key(call)
            record = {"id": call.id, "name": call.name, "server": self.state.mcp.server_of(call.name),
                      "arguments": call.arguments}
            if fresh.get(key) is call:
                record.update(content=results[key].content, is_error=results[key].is_error)
                self.first_runs[key] = record
                told = record["content"]
            else:
                first = self.first_runs[key]
                record.update(content=first["content"], is_error=first["is_error"], repeat_of=first["id"])
                told = REPEAT_NOTE.format(first=first["id"]) + first["content"]
            outcome = "repeat" if "repeat_of" in record else "error" if record["is_error"] else "ok"
            self.state.metrics.mcp_tool_calls.labels(outcome).inc()
            self.messages.append({"role": "tool", "tool_call_id": call.id, "content": told})
            self.calls.append(record)
            done.append(record)
        if not fresh:
            self.answering = "tool_loop"  # it only repeats itself: what it asked for is in the conversation
        return done

    async def _call(self, call):
        from levante.mcp import ToolCallResult

        try:
            arguments = json.loads(call.arguments or "{}")
        except json.JSONDecodeError as e:
            return ToolCallResult(f"the arguments are not valid JSON: {e}", is_error=True)
        return await self.state.mcp.call_tool(call.name, arguments)

    def _no_answer(self, plan: ChatPlan) -> list[Event]:
        """The reply when not even an answer round gave text: what the tools returned, said plainly."""
        kept_calling = self.answering == "tool_loop" or self.rounds >= self.max_rounds
        reason = "tool_loop" if self.calls and kept_calling else "no_answer"
        if not self.calls:
            text = "No answer was produced: the model wrote nothing."
        else:
            doing = "kept calling tools" if reason == "tool_loop" else "wrote nothing"
            results = "\n".join(f"- {c['name']}({c['arguments']})" + (" [error]" if c["is_error"] else "")
                                + f": {_clip(c['content'])}" for c in self.calls if "repeat_of" not in c)
            text = f"No answer was produced: the model {doing} after the tools returned:\n{results}"
        note = RequestOutput("levante-no-answer", None, [], [CompletionOutput(0, text, [], finish_reason=reason)],
                             True)
        return [Round(ChatPlan([], plan.params), server_runs_tools=True), Output(0, note), Finish(reason)]


def _key(call) -> tuple[str, str]:
    """What makes two calls the same: the tool and its arguments as JSON values (key order aside)."""
    try:
        arguments = json.dumps(json.loads(call.arguments or "{}"), sort_keys=True)
    except json.JSONDecodeError:
        arguments = call.arguments
    return call.name, arguments


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= RESULT_CHARS else text[:RESULT_CHARS] + "..."
