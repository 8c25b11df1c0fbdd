"""Tool calling and structured output through the server, with the default model and the openai client."""
import json
import re

import jsonschema
import openai
import pytest

from live_server import live_server

pytestmark = pytest.mark.slow

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current local time in an IANA timezone",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]}}}


@pytest.fixture(scope="module")
def client(default_llm):
    with live_server(default_llm, "qwen2.5-coder:0.5b") as (base, _):
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=300)


def _ask(client, content, **kwargs):
    kwargs = {"temperature": 0, "max_tokens": 80, **kwargs}
    return client.chat.completions.create(model="qwen2.5-coder:0.5b",
                                          messages=[{"role": "user", "content": content}], **kwargs)


def _check_call(call, tool):
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == tool["function"]["name"]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_auto_tool_call(client):
    r = _ask(client, "What's the weather like in Paris right now?", tools=[WEATHER, TIME])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    _check_call(choice.message.tool_calls[0], WEATHER)
    assert "Paris" in json.loads(choice.message.tool_calls[0].function.arguments)["city"]


def test_tool_choice_none_answers_in_text(client):
    r = _ask(client, "What's the weather like in Paris right now?", tools=[WEATHER], tool_choice="none")
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content


def test_required_and_named_are_enforced(client):
    r = _ask(client, "Tell me a joke about cats.", tools=[WEATHER, TIME], tool_choice="required")
    calls = r.choices[0].message.tool_calls
    assert calls and r.choices[0].finish_reason == "tool_calls"
    for call in calls:
        _check_call(call, WEATHER if call.function.name == "get_weather" else TIME)
    named = _ask(client, "What's the weather like in Paris?", tools=[WEATHER, TIME],
                 tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = named.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_time"]
    _check_call(calls[0], TIME)


def test_parallel_calls(client):
    r = _ask(client, "Call get_weather for Paris and get_weather for Tokyo, two calls.", tools=[WEATHER],
             tool_choice="required", max_tokens=120)
    calls = r.choices[0].message.tool_calls
    assert calls and len({c.id for c in calls}) == len(calls)
    cities = [json.loads(c.function.arguments)["city"] for c in calls]
    assert any("Paris" in c for c in cities)


def test_streamed_tool_calls_follow_the_delta_schema(client):
    kwargs = dict(tools=[WEATHER], tool_choice="required")
    full = _ask(client, "Weather in Berlin in fahrenheit?", **kwargs).choices[0].message.tool_calls
    stream = _ask(client, "Weather in Berlin in fahrenheit?", stream=True, **kwargs)
    calls, reasons = {}, []
    for chunk in stream:
        choice = chunk.choices[0]
        reasons.append(choice.finish_reason)
        for delta in choice.delta.tool_calls or []:
            if delta.index not in calls:
                assert delta.id and delta.type == "function" and delta.function.name
                calls[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
            else:
                assert delta.id is None and delta.function.name is None
            calls[delta.index]["arguments"] += delta.function.arguments or ""
    assert "tool_calls" in reasons
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in full]


def test_tool_results_in_history(client):
    messages = [
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature_c": 17, "sky": "cloudy"}'},
    ]
    r = client.chat.completions.create(model="qwen2.5-coder:0.5b", messages=messages, tools=[WEATHER],
                                       temperature=0, max_tokens=60)
    assert "17" in r.choices[0].message.content


def test_json_schema_response_format(client):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                               "languages": {"type": "array", "items": {"type": "string"}, "maxItems": 4}},
              "required": ["name", "age", "languages"], "additionalProperties": False}
    r = _ask(client, "Describe a fictional programmer as JSON.",
             response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema,
                                                                     "strict": True}})
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    obj = _ask(client, "Give me a JSON object with a greeting.", response_format={"type": "json_object"})
    assert isinstance(json.loads(obj.choices[0].message.content), dict)


def test_mistralrs_grammar_extension(client):
    pattern = r"(yes|no), because [a-z ]{5,40}\."
    r = _ask(client, "Is Python dynamically typed?", extra_body={"grammar": {"type": "regex", "value": pattern}})
    assert re.fullmatch(pattern, r.choices[0].message.content)
    bad = None
    try:
        _ask(client, "x", extra_body={"grammar": {"type": "regex", "value": "(unclosed"}})
    except openai.BadRequestError as e:
        bad = e
    assert bad is not None and "regex" in bad.body["message"]


def test_responses_api_with_tools(client):
    tool = {"type": "function", **WEATHER["function"]}
    r = client.responses.create(model="qwen2.5-coder:0.5b", input="What's the weather in Paris?", tools=[tool],
                                tool_choice="required", temperature=0, max_output_tokens=80)
    calls = [item for item in r.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather"
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["function"]["parameters"])
    followup = client.responses.create(
        model="qwen2.5-coder:0.5b", tools=[tool], temperature=0, max_output_tokens=60,
        input=[{"role": "user", "content": "What's the weather in Paris?"},
               {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather",
                "arguments": calls[0].arguments},
               {"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"temperature_c": 17}'}])
    assert "17" in followup.output_text
