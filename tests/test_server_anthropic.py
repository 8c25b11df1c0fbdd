"""Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens) through the official `anthropic`
SDK against a live server: text, thinking, tool_use and tool_result blocks, stop reasons, the full
event stream, usage with prefix-cache reads, errors in Anthropic's shape, x-api-key, metrics.

The model is a tiny random Qwen3 with Qwen3's real chat template (tests/tiny_reasoning.py); what it
writes is fixed by a grammar (as tests/test_server_reasoning.py does), so each reply is known text.
"""
import json

import anthropic
import httpx
import pytest

from levante import LLM
from levante.serve import anthropic as messages_api
from levante.serve.protocol import Grammar
from live_server import live_server, metric
from test_reasoning import script_grammar
from tiny_reasoning import QWEN3

KEY = "sekrit"
HI = [{"role": "user", "content": "Hi"}]
THINK = "<think>\nThe user says hi.\n</think>\n\nHello there!"
WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture(scope="module")
def served(tiny_reasoning_model):
    llm = LLM(str(tiny_reasoning_model(QWEN3)), dtype="float32", max_model_len=1024, block_size=4)
    with live_server(llm, "tiny", api_key=KEY) as (base, state):
        yield base, llm


@pytest.fixture
def client(served, monkeypatch):
    """client(reply) -> an anthropic client whose next replies are `reply` (None: the model's own)."""
    base, llm = served
    to_chat = messages_api.to_chat_request

    def script(reply: str | None = None):
        def with_grammar(body):
            chat = to_chat(body)
            if reply is not None:
                chat.grammar = Grammar(type="lark", value=script_grammar(llm.tokenizer, reply))
            return chat
        monkeypatch.setattr(messages_api, "to_chat_request", with_grammar)
        return anthropic.Anthropic(base_url=base, api_key=KEY, max_retries=0)
    return script


def create(client, **kwargs):
    return client.messages.create(**{"model": "tiny", "max_tokens": 64, "messages": HI, **kwargs})


def test_text_and_thinking_blocks(client):
    message = create(client(THINK))
    assert message.type == "message" and message.role == "assistant" and message.model == "tiny"
    assert [block.type for block in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == "The user says hi." and message.content[1].text == "Hello there!"
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0

    plain = create(client("Hello there!"), system="You are terse.")
    assert [(b.type, b.text) for b in plain.content] == [("text", "Hello there!")]


def test_thinking_disabled_is_respected(client):
    scripted = client("Hello there!")
    on = scripted.messages.count_tokens(model="tiny", messages=HI, thinking={"type": "enabled", "budget_tokens": 1024})
    off = scripted.messages.count_tokens(model="tiny", messages=HI, thinking={"type": "disabled"})
    assert off.input_tokens > on.input_tokens  # Qwen3's template closes an empty think block itself
    message = create(client(THINK), thinking={"type": "disabled"})
    assert [block.type for block in message.content] == ["text"]


def test_stop_reasons(client):
    stopped = create(client("Hello there! How are you?"), stop_sequences=["How"])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "How"
    assert stopped.content[0].text == "Hello there! "
    cut = create(client("Hello there! How are you today, my friend?"), max_tokens=3)
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 3


def test_tool_use_then_tool_results(client):
    message = create(client(CALL), tools=[WEATHER], max_tokens=200)
    assert message.stop_reason == "tool_use"
    (call,) = message.content
    assert call.type == "tool_use" and call.name == "get_weather" and call.input == {"city": "Paris"}

    scripted = client("It is sunny in Paris.")
    for is_error, result in ((False, "18 C, sunny"), (True, "the weather service is down")):
        turns = HI + [{"role": "assistant", "content": [block.model_dump() for block in message.content]},
                      {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "is_error": is_error,
                                                    "content": [{"type": "text", "text": result}]}]}]
        answer = create(scripted, messages=turns, tools=[WEATHER])
        assert answer.content[0].text == "It is sunny in Paris." and answer.stop_reason == "end_turn"
        # the prompt carries the call and its result (an error one says so)
        chat = messages_api.to_messages(None, [messages_api.InputMessage(**turn) for turn in turns])
        assert chat[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
        assert chat[2] == {"role": "tool", "tool_call_id": call.id,
                           "content": ("Error: " if is_error else "") + result}


def test_tool_choice(client):
    cities = {**WEATHER, "input_schema": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}},
                                          "required": ["city"], "additionalProperties": False}}
    forced = create(client(), tools=[cities], tool_choice={"type": "tool", "name": "get_weather"}, max_tokens=300,
                    extra_body={"temperature": 0})  # the model's own call, under the tool's grammar
    assert [(b.type, b.name) for b in forced.content] == [("tool_use", "get_weather")]
    assert forced.stop_reason == "tool_use" and forced.content[0].input["city"] in ("Paris", "Oslo")
    chat = messages_api.to_chat_request(messages_api.MessagesRequest(
        model="tiny", max_tokens=8, messages=HI, tools=[WEATHER], tool_choice={"type": "any",
                                                                                "disable_parallel_tool_use": True}))
    assert chat.tool_choice == "required" and chat.parallel_tool_calls is False
    none = create(client("No tools."), tools=[WEATHER], tool_choice={"type": "none"})
    assert none.content[0].text == "No tools." and none.stop_reason == "end_turn"


def test_sampling_output_config_and_cache_control(client):
    scripted = client()  # the model's own reply, under the schema
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
              "additionalProperties": False}
    message = create(scripted, output_config={"format": {"type": "json_schema", "schema": schema}},
                     cache_control={"type": "ephemeral"}, extra_body={"temperature": 0, "top_k": 5, "top_p": 0.9})
    assert json.loads(message.content[0].text) in ({"answer": "yes"}, {"answer": "no"})
    chat = messages_api.to_chat_request(messages_api.MessagesRequest(
        model="tiny", max_tokens=8, messages=HI, temperature=0.5, top_k=5, output_config={"effort": "low"},
        thinking={"type": "adaptive"}))
    assert (chat.temperature, chat.top_k, chat.reasoning_effort, chat.chat_template_kwargs) == (0.5, 5, "low", None)


def _runs(kinds: list[str]) -> list[str]:
    """`kinds` with each run of one kind written once."""
    return [kind for i, kind in enumerate(kinds) if i == 0 or kinds[i - 1] != kind]


def test_the_event_stream(served, client):
    base, _ = served
    scripted = client(THINK)
    with httpx.stream("POST", f"{base}/v1/messages", headers={"x-api-key": KEY}, timeout=60,
                      json={"model": "tiny", "max_tokens": 64, "messages": HI, "stream": True}) as raw:
        names = [line.removeprefix("event: ") for line in raw.iter_lines() if line.startswith("event: ")]
    assert names[:2] == ["message_start", "ping"] and names[-2:] == ["message_delta", "message_stop"]
    with scripted.messages.create(model="tiny", max_tokens=64, messages=HI, stream=True) as stream:
        events = list(stream)  # the SDK passes over pings
    kinds = [event.type for event in events]
    # two runs: the same events, though text may arrive in more or fewer deltas (how the engine's
    # steps meet the stream's reads)
    assert _runs(kinds) == _runs([name for name in names if name != "ping"])
    starts = [event.content_block.type for event in events if event.type == "content_block_start"]
    assert starts == ["thinking", "text"] and kinds.count("content_block_stop") == 2
    thought = "".join(e.delta.thinking for e in events if e.type == "content_block_delta" and e.delta.type == "thinking_delta")
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta" and e.delta.type == "text_delta")
    assert (thought, text) == ("The user says hi.", "Hello there!")
    assert events[-2].delta.stop_reason == "end_turn" and events[-2].usage.output_tokens > 0

    whole = create(scripted)
    with scripted.messages.stream(model="tiny", max_tokens=64, messages=HI) as stream:
        final = stream.get_final_message()
    assert [b.model_dump() for b in final.content] == [b.model_dump() for b in whole.content]
    assert final.stop_reason == whole.stop_reason and final.usage.output_tokens == whole.usage.output_tokens


def test_streamed_tool_use(client):
    with client(CALL).messages.stream(model="tiny", max_tokens=200, messages=HI, tools=[WEATHER]) as stream:
        events = list(stream)
        final = stream.get_final_message()
    partial = "".join(e.delta.partial_json for e in events
                      if e.type == "content_block_delta" and e.delta.type == "input_json_delta")
    assert json.loads(partial) == {"city": "Paris"}
    assert final.stop_reason == "tool_use" and final.content[-1].type == "tool_use"
    assert final.content[-1].input == {"city": "Paris"} and final.content[-1].name == "get_weather"


def test_usage_reads_the_prefix_cache(client):
    scripted = client("Hello there!")
    long = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 8}]
    first = create(scripted, messages=long)
    second = create(scripted, messages=long)
    assert second.usage.cache_read_input_tokens > 0
    assert second.usage.input_tokens + second.usage.cache_read_input_tokens == \
        first.usage.input_tokens + first.usage.cache_read_input_tokens
    counted = scripted.messages.count_tokens(model="tiny", messages=long)
    assert counted.input_tokens == first.usage.input_tokens + first.usage.cache_read_input_tokens


def test_errors_in_anthropics_shape(served, client):
    base, _ = served
    scripted = client()
    with pytest.raises(anthropic.NotFoundError) as missing:
        create(scripted, model="claude-nonesuch")
    assert missing.value.body["type"] == "error" and missing.value.body["error"]["type"] == "not_found_error"
    assert "claude-nonesuch" in missing.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as bad:
        create(scripted, messages=[{"role": "user", "content": [{"type": "document", "source": {}}]}])
    assert bad.value.body["error"]["type"] == "invalid_request_error" and "document" in bad.value.body["error"]["message"]
    headers = {"x-api-key": KEY}
    no_max = httpx.post(f"{base}/v1/messages", json={"model": "tiny", "messages": HI}, headers=headers)
    assert no_max.status_code == 400
    assert no_max.json() == {"type": "error", "error": {"type": "invalid_request_error",
                                                        "message": "max_tokens: Field required"}}
    unknown = httpx.post(f"{base}/v1/messages", json={"model": "tiny", "max_tokens": 4, "messages": HI, "n": 2},
                         headers=headers)
    assert unknown.status_code == 400 and "n" in unknown.json()["error"]["message"]
    with pytest.raises(anthropic.AuthenticationError) as denied:
        create(anthropic.Anthropic(base_url=base, api_key="wrong", max_retries=0))
    assert denied.value.body["error"]["type"] == "authentication_error"
    # the OpenAI routes keep OpenAI's shape
    assert "type" not in httpx.get(f"{base}/v1/models", headers={"x-api-key": "wrong"}).json()


def test_bearer_key_metrics_and_the_docs(served, client):
    base, _ = served
    scripted = client("Hello there!")
    before = metric(base, "levante_requests_total", {"x-api-key": KEY}, model_name="tiny", finish_reason="stop") or 0
    reply = httpx.post(f"{base}/v1/messages", headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": "tiny", "max_tokens": 16, "messages": HI})
    assert reply.status_code == 200 and reply.json()["content"][0]["text"] == "Hello there!"
    assert metric(base, "levante_requests_total", {"x-api-key": KEY}, model_name="tiny", finish_reason="stop") == before + 1
    schema = httpx.get(f"{base}/openapi.json", headers={"x-api-key": KEY}).json()
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        description = schema["paths"][path]["post"]["description"]
        assert "curl" in description and "anthropic.Anthropic" in description or "client.messages" in description
    assert scripted.messages.count_tokens(model="tiny", messages=HI).input_tokens > 0


def test_image_blocks_become_image_parts(client):
    turns = [messages_api.InputMessage(role="user", content=[
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://example.invalid/cat.png"}},
        {"type": "text", "text": "What is it?", "cache_control": {"type": "ephemeral"}}])]
    (message,) = messages_api.to_messages([{"type": "text", "text": "Be brief."}], turns)[1:]
    assert message["content"] == [{"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                                  {"type": "image_url", "image_url": {"url": "https://example.invalid/cat.png"}},
                                  {"type": "text", "text": "What is it?"}]
    with pytest.raises(anthropic.BadRequestError, match="does not accept images"):  # the chat road's planner said so
        create(client("Hi"), messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}])


def test_a_failing_request_fails_alone(served, client):
    """A step that raises (an injected fault past the prompt) fails that request only: a 500 in Anthropic's
    shape, or an `error` event after the stream began, which the SDK raises; the server serves on."""
    _, llm = served
    reply = "Hello there! How are you today?"
    scripted = client(reply)
    prompt = scripted.messages.count_tokens(model="tiny", messages=HI).input_tokens
    model = llm.engine.model
    original = model.forward

    def forward(input_ids, positions, *args, **kwargs):
        if bool((positions >= prompt + 3).any()):
            raise RuntimeError("injected fault")
        return original(input_ids, positions, *args, **kwargs)

    model.forward = forward
    try:
        with pytest.raises(anthropic.InternalServerError) as failed:
            create(scripted)
        assert failed.value.body["error"] == {"type": "api_error", "message": failed.value.body["error"]["message"]}
        assert "injected fault" in failed.value.body["error"]["message"]
        with scripted.messages.stream(model="tiny", max_tokens=64, messages=HI) as stream:
            events = []
            with pytest.raises(anthropic.APIStatusError, match="injected fault") as broken:
                for event in stream:
                    events.append(event.type)
        assert events[0] == "message_start" and "content_block_delta" in events  # it had streamed first
        assert broken.value.body["type"] == "error" and broken.value.body["error"]["type"] == "api_error"
    finally:
        del model.forward
    assert create(scripted).content[0].text == reply
