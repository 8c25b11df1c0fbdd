"""Reasoning output through the server and the official `openai` client: `reasoning_content` apart
from `content` (streamed and not), tool calls after the thinking, a cut inside the thinking, Qwen3's
thinking switches and `reasoning_effort`, and the Responses API's reasoning item.

The model is a tiny random Qwen3 with real chat templates (tests/tiny_reasoning.py); what it writes
is fixed by a grammar (mistral.rs's `grammar` extension, its think tags as the tokens Qwen3 writes),
so each reply is known text and its split is checked against one written by hand.
"""
import json

import openai
import pytest

from levante import LLM
from levante.loader.chat_prompt import ChatRenderer
from levante.loader.chat_template import ChatTemplate
from levante.serve import responses
from levante.serve.chat import template_kwargs
from levante.serve.protocol import ChatCompletionRequest, Grammar
from live_server import live_server
from test_reasoning import script_grammar
from tiny_reasoning import QWEN3, QWQ

HI = [{"role": "user", "content": "Hi"}]
THINK = "<think>\nThe user says hi.\n</think>\n\nHello there!"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def start(folder):
    llm = LLM(str(folder), dtype="float32", max_model_len=1024)
    return llm, live_server(llm, "tiny")


@pytest.fixture(scope="module")
def qwen3(tiny_reasoning_model):
    llm, server = start(tiny_reasoning_model(QWEN3))
    with server as (base, state):
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0), llm


@pytest.fixture(scope="module")
def qwq(tiny_reasoning_model):
    llm, server = start(tiny_reasoning_model(QWQ))
    with server as (base, state):
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0), llm


def ask(server, reply: str | None = None, stream: bool = False, messages=HI, **kwargs):
    client, llm = server
    if reply is not None:
        kwargs["extra_body"] = {"grammar": {"type": "lark", "value": script_grammar(llm.tokenizer, reply)},
                                **kwargs.get("extra_body", {})}
    kwargs = {"temperature": 0, "max_tokens": 64, **kwargs}
    return client.chat.completions.create(model="tiny", messages=messages, stream=stream, **kwargs)


def streamed(server, reply: str, **kwargs) -> dict:
    """A streamed reply put together: reasoning, content, tool calls, finish reasons; every delta
    carries one kind of text only."""
    reasoning, content, calls, reasons = "", "", {}, []
    for chunk in ask(server, reply, stream=True, **kwargs):
        choice = chunk.choices[0]
        delta = choice.delta
        thought = getattr(delta, "reasoning_content", None)
        assert not (thought and delta.content), "a delta mixes reasoning and content"
        reasoning += thought or ""
        content += delta.content or ""
        for call in delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"name": "", "arguments": ""})
            entry["name"] += call.function.name or ""
            entry["arguments"] += call.function.arguments or ""
        if choice.finish_reason:
            reasons.append(choice.finish_reason)
    return {"reasoning": reasoning or None, "content": content, "calls": list(calls.values()), "finish": reasons}


def test_thinking_apart_from_the_answer(qwen3):
    message = ask(qwen3, THINK).choices[0].message
    assert message.reasoning_content == "The user says hi." and message.content == "Hello there!"
    assert streamed(qwen3, THINK) == {"reasoning": "The user says hi.", "content": "Hello there!", "calls": [],
                                      "finish": ["stop"]}


def test_a_reply_without_thinking(qwen3):
    response = ask(qwen3, "Hello there!")
    assert response.choices[0].message.content == "Hello there!"
    assert getattr(response.choices[0].message, "reasoning_content", None) is None
    assert streamed(qwen3, "Hello there!")["reasoning"] is None


def test_max_tokens_inside_the_thinking(qwen3):
    reply = "<think>\nThe user says hi, and I wonder what to answer.\n</think>\n\nHello there!"
    choice = ask(qwen3, reply, max_tokens=5).choices[0]
    assert choice.finish_reason == "length" and choice.message.content is None
    thought = choice.message.reasoning_content
    assert thought and "The user says hi, and I wonder what to answer.".startswith(thought)
    assert streamed(qwen3, reply, max_tokens=5) == {"reasoning": thought, "content": "", "calls": [],
                                                   "finish": ["length"]}


def test_tool_calls_after_the_thinking(qwen3):
    reply = ('<think>\nI need the weather.\n</think>\n\n'
             '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
    choice = ask(qwen3, reply, tools=[WEATHER], max_tokens=200).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.reasoning_content == "I need the weather."
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    stream = streamed(qwen3, reply, tools=[WEATHER], max_tokens=200)
    assert stream["reasoning"] == "I need the weather." and stream["content"] == ""
    assert [(c["name"], json.loads(c["arguments"])) for c in stream["calls"]] == [("get_weather", {"city": "Paris"})]
    assert stream["finish"] == ["tool_calls"]


def test_a_call_inside_the_thinking_is_no_call(qwen3):
    thought = 'Maybe <tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>?'
    reply = f"<think>\n{thought}\n</think>\n\nNo call needed."
    message = ask(qwen3, reply, tools=[WEATHER], max_tokens=200).choices[0].message
    assert (message.reasoning_content, message.content, message.tool_calls) == (thought, "No call needed.", None)
    assert streamed(qwen3, reply, tools=[WEATHER], max_tokens=200) == {
        "reasoning": thought, "content": "No call needed.", "calls": [], "finish": ["stop"]}


def test_thinking_switches_change_the_prompt(qwen3, tiny_reasoning_model):
    """enable_thinking: false and /no_think give the prompt Qwen3's template writes with thinking off."""
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(tiny_reasoning_model(QWEN3))

    def prompt_tokens(messages, **kwargs):
        return ask(qwen3, "Hello there!", messages=messages, **kwargs).usage.prompt_tokens

    def expected(messages, **kwargs):
        return len(reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False, **kwargs))

    no_think = [{"role": "user", "content": "Hi /no_think"}]
    thinking_off = expected(HI, enable_thinking=False)
    assert thinking_off > expected(HI) == prompt_tokens(HI)
    assert prompt_tokens(HI, extra_body={"chat_template_kwargs": {"enable_thinking": False}}) == thinking_off
    assert prompt_tokens(no_think) == expected(no_think, enable_thinking=False)
    assert prompt_tokens(no_think, extra_body={"chat_template_kwargs": {"enable_thinking": True}}) == \
        expected(no_think)
    message = ask(qwen3, "Hello there!", extra_body={"chat_template_kwargs": {"enable_thinking": False}}) \
        .choices[0].message
    assert message.content == "Hello there!" and getattr(message, "reasoning_content", None) is None


def test_reasoning_effort_is_taken(qwen3):
    assert ask(qwen3, THINK, reasoning_effort="high").choices[0].message.content == "Hello there!"
    with pytest.raises(openai.BadRequestError) as error:
        ask(qwen3, THINK, reasoning_effort="extreme")
    assert error.value.body["param"] == "reasoning_effort"


def test_reasoning_effort_reaches_a_template_that_reads_it(qwen3):
    renderer = ChatRenderer(qwen3[1].tokenizer)
    renderer.template = ChatTemplate("Reasoning: {{ reasoning_effort | default('unset') }}\n"
                                     "{% for m in messages %}{{ m.content }}{% endfor %}")
    hi = [{"role": "user", "content": "Hi"}]

    def rendered(**fields):
        body = ChatCompletionRequest(messages=hi, **fields)
        return renderer.text(hi, template_kwargs=template_kwargs(body))[0]

    assert rendered() == "Reasoning: unset\nHi"
    assert rendered(reasoning_effort="high") == "Reasoning: high\nHi"
    assert rendered(reasoning_effort="high", chat_template_kwargs={"reasoning_effort": "low"}) == "Reasoning: low\nHi"


def test_history_with_reasoning_content(qwen3):
    """An assistant turn given back with its `reasoning_content` reaches the template (Qwen3 renders it
    for the turns after the last user message, as in a tool-calling turn)."""
    messages = HI + [{"role": "assistant", "content": None, "reasoning_content": "Weather first.",
                      "tool_calls": [{"id": "call_1", "type": "function",
                                      "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                     {"role": "tool", "tool_call_id": "call_1", "content": "17 C"}]
    client, llm = qwen3
    rendered = llm.tokenizer.decode(llm.apply_chat_template(messages, tools=[WEATHER]))
    assert "<think>\nWeather first.\n</think>\n\n<tool_call>" in rendered
    assert ask(qwen3, "Done.", messages=messages, tools=[WEATHER]).choices[0].message.content == "Done."


def test_template_that_opens_the_thinking(qwq):
    reply = "The user greets me.\n</think>\n\nHi!"
    message = ask(qwq, reply).choices[0].message
    assert (message.reasoning_content, message.content) == ("The user greets me.", "Hi!")
    assert streamed(qwq, reply) == {"reasoning": "The user greets me.", "content": "Hi!", "calls": [],
                                    "finish": ["stop"]}
    cut = ask(qwq, "The user greets me, and I wonder.\n</think>\n\nHi!", max_tokens=4).choices[0]
    assert cut.finish_reason == "length" and cut.message.content is None
    assert cut.message.reasoning_content and "The user greets me, and I wonder.".startswith(cut.message.reasoning_content)


@pytest.fixture
def scripted_responses(monkeypatch, qwen3):
    """The Responses API with the model's reply fixed: the grammar goes into the chat request it becomes."""
    client, llm = qwen3
    to_chat = responses.to_chat_request

    def script(reply: str):
        def with_grammar(body):
            chat = to_chat(body)
            chat.grammar = Grammar(type="lark", value=script_grammar(llm.tokenizer, reply))
            return chat
        monkeypatch.setattr(responses, "to_chat_request", with_grammar)
        return client
    return script


def test_responses_reasoning_item_before_the_message(scripted_responses):
    client = scripted_responses(THINK)
    response = client.responses.create(model="tiny", input="Hi", max_output_tokens=64, temperature=0,
                                       reasoning={"effort": "low"})
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.output[0].content[0].text == "The user says hi." and response.output[0].summary == []
    assert response.output_text == "Hello there!" and response.status == "completed"

    events = list(client.responses.create(model="tiny", input="Hi", max_output_tokens=64, temperature=0,
                                          stream=True))
    added = [(e.output_index, e.item.type) for e in events if e.type == "response.output_item.added"]
    assert added == [(0, "reasoning"), (1, "message")]
    thought = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    answer = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert (thought, answer) == ("The user says hi.", "Hello there!")
    assert all(e.output_index == 0 for e in events if e.type.startswith("response.reasoning_text"))
    final = events[-1].response
    assert events[-1].type == "response.completed"
    assert [(i.type, i.id) for i in final.output] == [
        (e.item.type, e.item.id) for e in events if e.type == "response.output_item.done"]
    assert final.output[0].content[0].text == thought and final.output_text == answer
    numbers = [e.sequence_number for e in events]
    assert numbers == sorted(numbers) == list(range(len(events)))


def test_responses_cut_inside_the_thinking(scripted_responses):
    client = scripted_responses("<think>\nThe user says hi, and I wonder.\n</think>\n\nHello there!")
    response = client.responses.create(model="tiny", input="Hi", max_output_tokens=5, temperature=0)
    assert response.status == "incomplete" and [item.type for item in response.output] == ["reasoning"]
    assert "The user says hi, and I wonder.".startswith(response.output[0].content[0].text)
    events = list(client.responses.create(model="tiny", input="Hi", max_output_tokens=5, temperature=0,
                                          stream=True))
    assert events[-1].type == "response.incomplete"
    assert [i.type for i in events[-1].response.output] == ["reasoning"]
    assert events[-1].response.output[0].content[0].text == response.output[0].content[0].text


def test_responses_reasoning_in_the_input(qwen3):
    """A reply given back as input (its reasoning item included) is taken, the thinking going with the
    assistant turn that follows it."""
    body = responses.ResponsesRequest(input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text",
                                                                         "text": "Weather first."}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "17 C"}])
    messages = responses.to_messages(body)
    assert messages[1]["role"] == "assistant" and messages[1]["reasoning_content"] == "Weather first."
    assert all("reasoning_content" not in m for m in messages[:1] + messages[2:])
    turns = [{"role": "user", "content": "Hi"}, body.input[1],
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello."}]}]
    assert responses.to_messages(responses.ResponsesRequest(input=turns))[1] == {
        "role": "assistant", "content": "Hello.", "reasoning_content": "Weather first."}
    client, _ = qwen3
    tool = {"type": "function", **WEATHER["function"]}
    response = client.responses.create(model="tiny", input=body.input, tools=[tool], max_output_tokens=4,
                                       temperature=0)
    assert response.status in ("completed", "incomplete")
    with pytest.raises(openai.BadRequestError) as error:
        client.responses.create(model="tiny", input=[{"type": "reasoning", "id": "rs_1", "content": "thoughts"}],
                                max_output_tokens=4)
    assert "reasoning item" in error.value.body["message"]


def test_responses_reasoning_before_a_function_call(scripted_responses):
    """With tools, the reply is read whole: its reasoning item, then its function call (streamed: replayed in that order)."""
    client = scripted_responses('<think>\nI need the weather.\n</think>\n\n'
                                '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
    tool = {"type": "function", **WEATHER["function"]}
    response = client.responses.create(model="tiny", input="Weather in Paris?", tools=[tool], max_output_tokens=200,
                                       temperature=0)
    assert [item.type for item in response.output] == ["reasoning", "function_call"]
    assert response.output[0].content[0].text == "I need the weather."
    assert json.loads(response.output[1].arguments) == {"city": "Paris"}
    events = list(client.responses.create(model="tiny", input="Weather in Paris?", tools=[tool],
                                          max_output_tokens=200, temperature=0, stream=True))
    assert [e.item.type for e in events if e.type == "response.output_item.added"] == ["reasoning", "function_call"]
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == "I need the weather."
    final = events[-1].response
    assert events[-1].type == "response.completed" and [i.type for i in final.output] == ["reasoning", "function_call"]
