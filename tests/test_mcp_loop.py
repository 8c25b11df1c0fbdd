"""The MCP loop's control flow, fast: a scripted model (replies fixed per round) and the real time server.

What the model says is scripted here; what is under test is the loop around it: which calls run
against MCP, when it stops, what the answer round looks like, and the shapes the client gets.
The full loop with a real model is tests/test_server_mcp.py (slow).
"""
import asyncio
import json

import pytest

from levante import LLM
from levante.engine.outputs import CompletionOutput, RequestOutput
from levante.mcp import McpConfig, McpToolManager
from levante.serve.mcp_loop import ANSWER_NUDGE, McpChat
from levante.serve.openai_format import ChatChunks, ChatCompletion
from levante.serve.model_specs import ModelSpec
from levante.serve.pipeline import Output, Pipeline, Routed
from levante.serve.router import Route, ServedModel
from levante.serve.protocol import ChatCompletionRequest
from levante.serve.sse import formatted
from levante.serve.state import ServerState
from levante.serve.tool_selection import ToolSelector
from mcp_servers import time_server
from tiny_models import build


def call(timezone: str) -> str:
    return f'<tool_call>\n{{"name": "time_get_current_time", "arguments": {{"timezone": "{timezone}"}}}}\n</tool_call>'


class CountingManager:
    """The real manager, recording which calls actually ran."""

    def __init__(self, manager):
        self.manager, self.ran = manager, []

    def __getattr__(self, name):
        return getattr(self.manager, name)

    async def call_tool(self, name, arguments):
        self.ran.append((name, arguments))
        return await self.manager.call_tool(name, arguments)


class ScriptedState(Pipeline):
    """A pipeline whose model answers each round with the next scripted reply (planning is the real one)."""

    def __init__(self, llm, manager, replies: list[str], max_rounds: int = 5):
        state = ServerState("scripted")
        state.mcp, state.mcp_max_rounds = CountingManager(manager), max_rounds
        # every tool offered (the tiny tokenizer spells them out byte by byte: they would not fit a budget)
        state.tool_selectors["scripted"] = ToolSelector(manager.offered_tools(), max_tools=0,
                                                        max_tool_tokens=1 << 30, count_tokens=len)
        super().__init__(state)
        self.model = ServedModel(ModelSpec("scripted", llm.args))
        self.model.llm = llm
        self.replies = list(replies)
        self.prompts, self.params = [], []

    async def generate(self, route, prompt_ids, params):
        self.prompts.append(route.llm.tokenizer.decode(prompt_ids))
        self.params.append(params)
        text = self.replies.pop(0)
        yield Output(0, RequestOutput("r", None, list(prompt_ids),
                                      [CompletionOutput(0, text, [1] * 3, finish_reason="stop")], True))


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    folder = build("qwen2", tmp_path_factory.mktemp("tiny-qwen2-2k"), max_positions=2048)
    return LLM(str(folder), dtype="float32", max_model_len=2048, warmup=False)


@pytest.fixture(scope="module")
def manager():
    manager = McpToolManager(McpConfig.from_dict({"mcpServers": {"time": time_server()}}))
    asyncio.run(manager.start())
    yield manager
    manager.close()


def run(pipeline, stream=False, **request):
    body = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "Time in Tokyo?"}],
                                                 **request})

    async def main():
        llm = pipeline.model.llm
        events = McpChat(pipeline, Route("scripted", pipeline.model), body).events()
        if not stream:
            collector = ChatCompletion("id", 0)
            collector.add(Routed("scripted", llm.tokenizer))
            async for event in events:
                collector.add(event)
            return collector.response()
        chunks = ChatChunks("id", 0, include_usage=False)
        chunks.chunks(Routed("scripted", llm.tokenizer))
        return [chunk async for chunk in formatted(events, chunks)]

    return asyncio.run(main())


def test_calls_run_then_a_repeat_is_answered_from_the_first_result(llm, manager):
    state = ScriptedState(llm, manager, [call("Asia/Tokyo"), call("Asia/Tokyo"), "It is 09:09 in Tokyo."])
    response = run(state)
    message = response["choices"][0]["message"]
    assert message["content"] == "It is 09:09 in Tokyo." and "tool_calls" not in message
    assert response["mcp_tools_offered"] == ["time_get_current_time", "time_convert_time"]
    first, repeat = message["mcp_calls"]
    assert state.state.mcp.ran == [("time_get_current_time", {"timezone": "Asia/Tokyo"})]  # run once
    assert repeat["repeat_of"] == first["id"] and repeat["content"] == first["content"] and "repeat_of" not in first
    result = json.loads(first["content"])
    assert result["timezone"] == "Asia/Tokyo" and not first["is_error"]
    # Round 2 saw the real tool result; the answer round was told of the repeat, asked for the answer, forced text.
    assert result["datetime"] in state.prompts[1]
    assert "it was not run again" in state.prompts[2] and state.prompts[2].count(result["datetime"]) == 2
    assert ANSWER_NUDGE in state.prompts[2] and ANSWER_NUDGE not in state.prompts[1]
    assert [p.structured is not None for p in state.params] == [False, False, True]
    assert response["usage"]["completion_tokens"] == 9 and response["choices"][0]["finish_reason"] == "stop"
    calls = state.state.metrics.mcp_tool_calls
    assert calls.labels("ok")._value.get() == 1 and calls.labels("repeat")._value.get() == 1


def test_identical_calls_in_one_round_run_once(llm, manager):
    tokyo, madrid = call("Asia/Tokyo"), call("Europe/Madrid")
    state = ScriptedState(llm, manager, [f"{tokyo}\n{tokyo}\n{madrid}", f"{madrid}\n{call('America/Lima')}",
                                         "Three cities."])
    message = run(state)["choices"][0]["message"]
    assert [args["timezone"] for _, args in state.state.mcp.ran] == ["Asia/Tokyo", "Europe/Madrid", "America/Lima"]
    records = message["mcp_calls"]
    assert [r.get("repeat_of") for r in records] == [None, records[0]["id"], None, records[2]["id"], None]
    assert message["content"] == "Three cities."  # a round with a new call is not made to answer
    assert [p.structured is not None for p in state.params] == [False, False, False]


def test_rounds_are_bounded(llm, manager):
    zones = ["Asia/Tokyo", "Europe/Madrid", "America/Lima"]
    state = ScriptedState(llm, manager, [call(z) for z in zones] + ["Done."], max_rounds=2)
    message = run(state)["choices"][0]["message"]
    assert [json.loads(c["arguments"])["timezone"] for c in message["mcp_calls"]] == zones[:2]
    assert message["content"] == call("America/Lima")  # the answer round offers no tools: this is text
    assert state.replies == ["Done."]


def test_an_unparsed_call_after_results_forces_the_answer(llm, manager):
    state = ScriptedState(llm, manager, [call("UTC"), '{"name": "time_convert_time", "arguments": {', "Noon."])
    message = run(state)["choices"][0]["message"]
    assert message["content"] == "Noon." and len(message["mcp_calls"]) == 1


def test_tool_errors_go_back_to_the_model(llm, manager):
    state = ScriptedState(llm, manager, [call("Mars/Base"), "No such place."])
    message = run(state)["choices"][0]["message"]
    assert message["mcp_calls"][0]["is_error"] and "Mars/Base" in state.prompts[1]
    assert message["content"] == "No such place."


def test_streamed_shape(llm, manager):
    state = ScriptedState(llm, manager, [call("Asia/Tokyo"), "It is late."])
    chunks = run(state, stream=True)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert chunks[0]["mcp_tools_offered"] == ["time_get_current_time", "time_convert_time"]
    assert "mcp_calls" in deltas[1] and deltas[1]["mcp_calls"][0]["name"] == "time_get_current_time"
    assert "".join(d.get("content") or "" for d in deltas) == "It is late."
    assert not any("tool_calls" in d for d in deltas)
    assert [c["choices"][0]["finish_reason"] for c in chunks].count("stop") == 1
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_a_model_that_thinks(tiny_reasoning_model, manager):
    """Qwen3 (its real template): the thinking is split off before the reply is read for calls, the
    thinking of a tool turn goes back to the model with it, and the answer keeps its own."""
    thinker = LLM(str(tiny_reasoning_model()), dtype="float32", max_model_len=2048, warmup=False)
    replies = ["<think>\nI should ask the clock.\n</think>\n\n" + call("Asia/Tokyo"),
               "<think>\nIt answered.\n</think>\n\nIt is late in Tokyo."]
    state = ScriptedState(thinker, manager, list(replies))
    message = run(state)["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == ("It answered.", "It is late in Tokyo.")
    assert [c["name"] for c in message["mcp_calls"]] == ["time_get_current_time"]
    assert "<think>\nI should ask the clock.\n</think>\n\n<tool_call>" in state.prompts[1]
    chunks = run(ScriptedState(thinker, manager, list(replies)), stream=True)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == "It answered."
    assert "".join(d.get("content") or "" for d in deltas) == "It is late in Tokyo."


def test_n_above_one_is_refused(llm, manager):
    from levante.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="^n: "):
        run(ScriptedState(llm, manager, []), n=2)


def test_nothing_after_results_gets_an_answer_round_then_says_what_the_tools_returned(llm, manager):
    state = ScriptedState(llm, manager, [call("Asia/Tokyo"), "", " "])
    response = run(state)
    choice = response["choices"][0]
    stamp = json.loads(choice["message"]["mcp_calls"][0]["content"])["datetime"]
    assert ANSWER_NUDGE in state.prompts[2] and state.params[2].structured is not None  # the answer round
    assert choice["finish_reason"] == "no_answer"
    content = choice["message"]["content"]
    assert content.startswith("No answer was produced: the model wrote nothing after the tools returned:")
    assert "time_get_current_time" in content and stamp in content

    chunks = run(ScriptedState(llm, manager, [call("Asia/Tokyo"), "", ""]), stream=True)
    reasons = [c["choices"][0]["finish_reason"] for c in chunks]
    assert reasons[-1] == "no_answer" and reasons.count(None) == len(reasons) - 1
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert streamed.startswith("No answer was produced") and "time_get_current_time" in streamed


def test_calls_to_the_round_limit_then_nothing_says_so(llm, manager):
    state = ScriptedState(llm, manager, [call("Asia/Tokyo"), call("Europe/Madrid"), ""], max_rounds=2)
    choice = run(state)["choices"][0]
    assert choice["finish_reason"] == "tool_loop"
    assert choice["message"]["content"].startswith("No answer was produced: the model kept calling tools")
    assert "Asia/Tokyo" in choice["message"]["content"] and "Europe/Madrid" in choice["message"]["content"]


def test_an_empty_first_reply_gets_an_answer_round(llm, manager):
    state = ScriptedState(llm, manager, ["", "Hello."])
    choice = run(state)["choices"][0]
    assert choice["message"]["content"] == "Hello." and choice["finish_reason"] == "stop"
    assert state.params[1].structured is not None and ANSWER_NUDGE not in state.prompts[1]  # no calls: no nudge

    choice = run(ScriptedState(llm, manager, ["", ""]))["choices"][0]
    assert choice["message"]["content"] == "No answer was produced: the model wrote nothing."
    assert choice["finish_reason"] == "no_answer" and choice["message"]["mcp_calls"] == []
