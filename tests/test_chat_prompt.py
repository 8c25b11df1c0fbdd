"""One chat renderer for every face (loader/chat_prompt.py): OpenAI-style messages, with tool calls in
history whose arguments come as JSON text, render byte for byte as transformers' `apply_chat_template`
renders the same conversation (arguments as objects, as its docs ask), and `LLM.chat` gives the very
ids the server's `/tokenize` and chat completions give."""
from __future__ import annotations

import json
import shutil

import httpx
import pytest
from tokenizer_refs import ours, transformers_tokenizer

from levante.loader.chat_prompt import ChatRenderer, decode_tool_arguments

QWEN = "qwen2.5-coder:0.5b"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
                   "required": ["city"]}}}
# As an OpenAI client sends it: arguments are JSON text, content parts are lists.
HISTORY = [
    {"role": "system", "content": [{"type": "text", "text": "You are "}, {"type": "text", "text": "terse."}]},
    {"role": "user", "content": "Weather in Paris and Tokyo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "東京", "unit": "celsius"}'}},
    ]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    {"role": "tool", "tool_call_id": "call_2", "content": '{"temp": 18}'},
]


def as_transformers_documents_it(messages: list[dict]) -> list[dict]:
    """The same conversation in transformers' shape: arguments as objects, text as strings."""
    out = []
    for message in messages:
        message = {key: value for key, value in message.items() if value is not None}
        if isinstance(message.get("content"), list):
            message["content"] = "".join(part["text"] for part in message["content"])
        if "tool_calls" in message:
            message["tool_calls"] = [{**call, "function": {**call["function"],
                                                           "arguments": json.loads(call["function"]["arguments"])}}
                                     for call in message["tool_calls"]]
        out.append(message)
    return out


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_tool_history_renders_like_transformers(add_generation_prompt):
    renderer = ChatRenderer(ours(QWEN))
    text, images = renderer.text(HISTORY, [WEATHER], add_generation_prompt)
    reference = transformers_tokenizer(QWEN).apply_chat_template(
        as_transformers_documents_it(HISTORY), tools=[WEATHER], add_generation_prompt=add_generation_prompt,
        tokenize=False)
    assert text == reference and images == []
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "東京", "unit": "celsius"}}\n</tool_call>' in text
    assert renderer.render(HISTORY, [WEATHER], add_generation_prompt) == \
        transformers_tokenizer(QWEN)(reference, add_special_tokens=False)["input_ids"]


def test_tool_arguments_are_decoded_on_copies():
    prepared = decode_tool_arguments(HISTORY)
    assert prepared[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert HISTORY[2]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'  # the caller's stay
    not_json = [{"role": "assistant", "tool_calls": [
        {"id": "x", "type": "function", "function": {"name": "f", "arguments": "not json"}}]}]
    assert decode_tool_arguments(not_json)[0]["tool_calls"][0]["function"]["arguments"] == "not json"


def test_parsed_calls_go_back_into_history():
    from levante.serve.tool_parsers import ToolParser

    reply = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
    _, calls = ToolParser("qwen", [WEATHER]).parse(reply)
    assistant = {"role": "assistant", "content": None, "tool_calls": [call.to_openai() for call in calls]}
    text, _ = ChatRenderer(ours(QWEN)).text([HISTORY[1], assistant], [WEATHER], add_generation_prompt=False)
    assert text.endswith('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
                         '\n</tool_call><|im_end|>\n')


@pytest.fixture(scope="module")
def qwen_templated_llm(tiny_model, tmp_path_factory):
    """A tiny random Qwen2 whose tokenizer carries Qwen2.5's real chat template."""
    from levante import LLM

    folder = tmp_path_factory.mktemp("tiny-qwen2-template")
    shutil.copytree(tiny_model("qwen2"), folder, dirs_exist_ok=True)
    (folder / "chat_template.jinja").write_text(ours(QWEN).chat_template)
    config = json.loads((folder / "config.json").read_text())  # the byte-level tokenizer spells tools long
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 2048}))
    return LLM(str(folder), dtype="float32", num_kv_blocks=64, warmup=False), folder


def test_llm_chat_and_the_server_render_alike(qwen_templated_llm):
    from live_server import live_server
    from transformers import AutoTokenizer

    llm, folder = qwen_templated_llm
    reference = AutoTokenizer.from_pretrained(folder).apply_chat_template(
        as_transformers_documents_it(HISTORY), tools=[WEATHER], add_generation_prompt=True, tokenize=False)
    expected = AutoTokenizer.from_pretrained(folder)(reference, add_special_tokens=False)["input_ids"]
    assert llm.apply_chat_template(HISTORY, tools=[WEATHER]) == expected
    assert llm.chat_prompt(HISTORY, tools=[WEATHER]) == expected
    with live_server(llm, "tiny") as (base, _):
        tokenized = httpx.post(f"{base}/tokenize", json={"model": "tiny", "messages": HISTORY}).json()
        no_tools = llm.apply_chat_template(HISTORY)
        assert tokenized["tokens"] == no_tools
        import openai

        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        usage = client.chat.completions.create(model="tiny", messages=HISTORY, tools=[WEATHER], max_tokens=1).usage
    assert usage.prompt_tokens == len(expected)
    from levante import SamplingParams

    assert llm.chat(HISTORY, SamplingParams(max_tokens=1), tools=[WEATHER])[0].prompt_token_ids == expected
