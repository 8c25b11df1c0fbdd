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
from levante.serve.pipeline import Output, Pipeline
from levante.serve.protocol import ChatCompletionRequest
from levante.serve.sse import formatted
from levante.serve.state import ServerState
from mcp_servers import time_server


def call(timezone: str) -> str:
    return f'<tool_call>\n{{"name": "time_get_current_time", "arguments": {{"timezone": "{timezone}"}}}}\n</tool_call>'


class ScriptedState(Pipeline):
    """A pipeline whose model answers each round with the next scripted reply (planning is the real one)."""

    def __init__(self, llm, manager, replies: list[str], max_rounds: int = 5):
        state = ServerState("scripted")
        state.llm, state.mcp, state.mcp_max_rounds = llm, manager, max_rounds
        super().__init__(state)
        self.replies = list(replies)
        self.prompts, self.params = [], []

    async def generate(self, prompt_ids, params):
        self.prompts.append(self.state.llm.tokenizer.decode(prompt_ids))
        self.params.append(params)
        text = self.replies.pop(0)
        yield Output(0, RequestOutput("r", None, list(prompt_ids),
                                      [CompletionOutput(0, text, [1] * 3, finish_reason="stop")], True))


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(str(tiny_model("qwen2")), dtype="float32", max_model_len=512, warmup=False)


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
        events = McpChat(pipeline, body).events()
        if not stream:
            collector = ChatCompletion("id", 0, "scripted")
            async for event in events:
                collector.add(event)
            return collector.response()
        chunks = ChatChunks("id", 0, "scripted", pipeline.state.llm.tokenizer, include_usage=False)
        return [chunk async for chunk in formatted(events, chunks)]

    return asyncio.run(main())


def test_calls_run_then_a_repeat_forces_the_answer(llm, manager):
    state = ScriptedState(llm, manager, [call("Asia/Tokyo"), call("Asia/Tokyo"), "It is 09:09 in Tokyo."])
    response = run(state)
    message = response["choices"][0]["message"]
    assert message["content"] == "It is 09:09 in Tokyo." and "tool_calls" not in message
    assert [c["name"] for c in message["mcp_calls"]] == ["time_get_current_time"]  # the repeat did not run
    result = json.loads(message["mcp_calls"][0]["content"])
    assert result["timezone"] == "Asia/Tokyo" and not message["mcp_calls"][0]["is_error"]
    # Round 2 saw the real tool result; the answer round asked for the answer and forced text.
    assert result["datetime"] in state.prompts[1]
    assert ANSWER_NUDGE in state.prompts[2] and ANSWER_NUDGE not in state.prompts[1]
    assert [p.structured is not None for p in state.params] == [False, False, True]
    assert response["usage"]["completion_tokens"] == 9 and response["choices"][0]["finish_reason"] == "stop"


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
    assert "mcp_calls" in deltas[1] and deltas[1]["mcp_calls"][0]["name"] == "time_get_current_time"
    assert "".join(d.get("content") or "" for d in deltas) == "It is late."
    assert not any("tool_calls" in d for d in deltas)
    assert [c["choices"][0]["finish_reason"] for c in chunks].count("stop") == 1
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_n_above_one_is_refused(llm, manager):
    from levante.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="^n: "):
        run(ScriptedState(llm, manager, []), n=2)
