"""LoRA adapters over HTTP: `model` picks the adapter, vLLM's load/unload routes, with the `openai` client."""
import threading

import httpx
import openai
import pytest

from levante import LLM, SamplingParams
from live_server import live_server
from tiny_lora import ATTENTION, MLP, build_adapter

KEY = "secret"
PROMPT = [5, 17, 42, 99, 7, 3, 250, 31, 8, 64, 12]


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    base = tiny_model("llama")
    root = tmp_path_factory.mktemp("server-lora")
    return base, {"attn": build_adapter(base, root / "attn", seed=1, r=4, lora_alpha=8, target_modules=ATTENTION),
                  "mlp": build_adapter(base, root / "mlp", seed=2, r=4, lora_alpha=4, target_modules=MLP)}


@pytest.fixture(scope="module")
def served(adapters):
    base, folders = adapters
    llm = LLM(str(base), dtype="float32", num_kv_blocks=64, lora={"attn": str(folders["attn"])})
    llm.load_lora("mlp", str(folders["mlp"]))
    greedy = dict(temperature=0, max_tokens=12, ignore_eos=True)
    expected = {name: llm.generate(PROMPT, SamplingParams(**greedy, lora=lora))[0].outputs[0].text
                for name, lora in [("tiny", None), ("attn", "attn"), ("mlp", "mlp")]}
    llm.unload_lora("mlp")  # loaded again over HTTP below
    with live_server(llm, "tiny", api_key=KEY) as (base_url, state):
        yield base_url, state, expected, folders


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served[0]}/v1", api_key=KEY, max_retries=0)


def _complete(client, model):
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text


def test_model_field_picks_the_adapter(served, client):
    _, _, expected, _ = served
    assert {m.id for m in client.models.list()} == {"tiny", "attn"}
    assert _complete(client, "tiny") == expected["tiny"]
    assert _complete(client, "attn") == expected["attn"]
    assert expected["attn"] != expected["tiny"]


def test_responses_name_the_adapter(client):
    """As vLLM does: the `model` of a response is the adapter the request named, streamed or not."""
    messages = [{"role": "user", "content": "hi"}]
    assert client.completions.create(model="attn", prompt=PROMPT, max_tokens=2).model == "attn"
    assert client.chat.completions.create(model="attn", messages=messages, max_tokens=2).model == "attn"
    chunks = list(client.chat.completions.create(model="attn", messages=messages, max_tokens=2, stream=True))
    assert chunks and {chunk.model for chunk in chunks} == {"attn"}
    assert client.responses.create(model="attn", input="hi", max_output_tokens=2).model == "attn"
    assert client.chat.completions.create(model="tiny", messages=messages, max_tokens=2).model == "tiny"


def test_concurrent_requests_on_base_and_adapter(served, client):
    _, _, expected, _ = served
    names = ["tiny", "attn"] * 3
    results = [None] * len(names)

    def run(i):
        results[i] = _complete(client, names[i])
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(names))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected[n] for n in names]


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError, match="serves 'tiny, attn'"):
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    with pytest.raises(openai.NotFoundError, match="serves 'tiny, attn'"):
        client.responses.create(model="nope", input="hi", max_output_tokens=2)


def test_load_and_unload_over_http(served, client):
    base_url, _, expected, folders = served
    auth = {"authorization": f"Bearer {KEY}"}
    load = f"{base_url}/v1/load_lora_adapter"
    body = {"lora_name": "mlp", "lora_path": str(folders["mlp"])}
    assert httpx.post(load, json=body).status_code == 401  # the API key is required
    answer = httpx.post(load, json=body, headers=auth)
    assert answer.status_code == 200 and "mlp" in answer.text
    assert _complete(client, "mlp") == expected["mlp"]
    assert {m.id for m in client.models.list()} == {"tiny", "attn", "mlp"}
    again = httpx.post(load, json=body, headers=auth)
    assert again.status_code == 400 and "already loaded" in again.json()["error"]["message"]
    bad = httpx.post(load, json={"lora_name": "bad", "lora_path": str(folders["mlp"] / "nowhere")}, headers=auth)
    assert bad.status_code == 400 and "not a folder" in bad.json()["error"]["message"]
    unload = f"{base_url}/v1/unload_lora_adapter"
    assert httpx.post(unload, json={"lora_name": "mlp"}, headers=auth).status_code == 200
    assert httpx.post(unload, json={"lora_name": "mlp"}, headers=auth).status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="mlp", prompt="hi", max_tokens=2)


def test_run_time_loading_needs_an_api_key(adapters):
    base, folders = adapters
    llm = LLM(str(base), dtype="float32", num_kv_blocks=16)
    with live_server(llm, "tiny") as (base_url, _):
        answer = httpx.post(f"{base_url}/v1/load_lora_adapter",
                            json={"lora_name": "attn", "lora_path": str(folders["attn"])})
    assert answer.status_code == 403 and "--api-key" in answer.json()["error"]["message"]


def test_messages_api_picks_the_adapter(served, client):
    """/v1/messages routes `model` as the chat road does: the adapter's reply is the chat completion's."""
    import anthropic

    sdk = anthropic.Anthropic(base_url=served[0], api_key=KEY, max_retries=0)
    messages = [{"role": "user", "content": "hi"}]
    replies = {}
    for name in ("tiny", "attn"):
        chat = client.chat.completions.create(model=name, messages=messages, max_tokens=8, temperature=0)
        message = sdk.messages.create(model=name, max_tokens=8, messages=messages, extra_body={"temperature": 0})
        assert message.model == name
        replies[name] = "".join(block.text for block in message.content)
        assert replies[name] == (chat.choices[0].message.content or "")
    assert replies["tiny"] != replies["attn"]
