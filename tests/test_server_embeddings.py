"""/v1/embeddings with the `openai` client on a live server: alone, and next to a chat model."""
import asyncio
import base64
import time

import httpx
import numpy as np
import openai
import pytest
import torch

from levante import LLM
from live_server import live_server
from tiny_embedding_models import build_embedding_gemma


@pytest.fixture(scope="module")
def both(tiny_model, minilm):
    """A chat model ('tiny') and an embedding model ('minilm') on one server."""
    chat = LLM(str(tiny_model("qwen2")), dtype="float32", max_model_len=256)
    with live_server(chat, "tiny", embedding_llm=minilm, embedding_name="minilm") as (base, state):
        yield base, state, openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def test_openai_client_embeddings(both, minilm):
    _, _, client = both
    texts = ["The cat sat on the mat.", "Quantum computers use qubits."]
    expected = torch.tensor(minilm.embed(texts))
    default = client.embeddings.create(model="minilm", input=texts)  # the client asks for base64 and decodes it
    floats = client.embeddings.create(model="minilm", input=texts, encoding_format="float")
    for response in (default, floats):
        assert [d.index for d in response.data] == [0, 1]
        assert torch.allclose(torch.tensor([d.embedding for d in response.data]), expected, atol=1e-6)
    ids = minilm.embedder.token_ids(texts)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == sum(map(len, ids))
    by_ids = client.embeddings.create(model="minilm", input=ids, encoding_format="float")
    assert torch.allclose(torch.tensor([d.embedding for d in by_ids.data]), expected, atol=1e-6)
    one = client.embeddings.create(model="minilm", input=ids[1], encoding_format="float")
    assert torch.allclose(torch.tensor(one.data[0].embedding), expected[1], atol=1e-6)


def test_raw_base64_and_models(both):
    base, _, _ = both
    body = httpx.post(f"{base}/v1/embeddings", json={"model": "minilm", "input": "hi",
                                                     "encoding_format": "base64"}).json()
    vector = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    assert vector.shape == (384,) and abs(np.linalg.norm(vector) - 1) < 1e-5
    cards = httpx.get(f"{base}/v1/models").json()["data"]
    assert [c["id"] for c in cards] == ["tiny", "minilm"] and cards[1]["dimensions"] == 384


def test_routing_and_errors(both):
    base, _, client = both
    with pytest.raises(openai.BadRequestError, match="chat model"):
        client.embeddings.create(model="tiny", input="x")
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="x")
    with pytest.raises(openai.BadRequestError, match="Matryoshka"):
        client.embeddings.create(model="minilm", input="x", dimensions=128)
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        client.chat.completions.create(model="minilm", messages=[{"role": "user", "content": "hi"}])
    for bad in ([], [[]], [1.5], {"a": 1}):
        assert httpx.post(f"{base}/v1/embeddings", json={"model": "minilm", "input": bad}).status_code == 400
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert chat.choices[0].message.content is not None


def test_concurrent_requests_share_forward_passes(both, minilm):
    base, state, _ = both
    batcher = state.router.models["minilm"].embeddings.batcher
    real_embed = batcher.run

    class SlowEmbedder:  # holds each forward long enough for the other requests to queue up
        def embed(self, inputs):
            time.sleep(0.3)
            return real_embed(inputs)

    texts = [f"sentence number {i} about topic {i % 3}" for i in range(8)]

    async def fire():
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            replies = await asyncio.gather(*[
                http.post("/v1/embeddings", json={"model": "minilm", "input": t, "encoding_format": "float"})
                for t in texts])
        return [r.json()["data"][0]["embedding"] for r in replies]

    batcher.run, before = SlowEmbedder().embed, batcher.forward_calls
    try:
        vectors = asyncio.run(fire())
    finally:
        batcher.run = real_embed
    assert batcher.forward_calls - before <= 3  # 8 requests, at most 3 forwards
    assert torch.allclose(torch.tensor(vectors), torch.tensor(minilm.embed(texts)), atol=1e-5)


def test_a_failing_text_fails_only_its_request(both, minilm):
    """Fault injection: a forward that fails on one request's text; the requests merged with it in the
    same call still get their vectors, and only that request gets the error."""
    base, state, _ = both
    batcher = state.router.models["minilm"].embeddings.batcher
    real_embed = batcher.run
    poison = minilm.embedder.token_ids(["poisoned text"])[0]

    class FailingEmbedder:
        def embed(self, inputs):
            time.sleep(0.2)  # the others queue up behind the first forward, to share the next one
            if poison in inputs:
                raise RuntimeError("injected fault")
            return real_embed(inputs)

    texts = [f"sentence {i}" for i in range(5)] + ["poisoned text"] + [f"another {i}" for i in range(4)]

    async def fire():
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            return await asyncio.gather(*[
                http.post("/v1/embeddings", json={"model": "minilm", "input": t, "encoding_format": "float"})
                for t in texts])

    batcher.run = FailingEmbedder().embed
    try:
        replies = asyncio.run(fire())
    finally:
        batcher.run = real_embed
    assert [r.status_code for r in replies] == [500 if t == "poisoned text" else 200 for t in texts]
    good = [t for t in texts if t != "poisoned text"]
    vectors = [r.json()["data"][0]["embedding"] for r in replies if r.status_code == 200]
    assert torch.allclose(torch.tensor(vectors), torch.tensor(minilm.embed(good)), atol=1e-5)


def test_embeddings_are_admitted_within_bounds(both):
    """Texts queued or embedding count toward the batch size plus the waiting room: past it, 429."""
    base, state, client = both
    served = state.router.models["minilm"]
    capacity = served.llm.embedder.max_batch_size + state.limits.max_waiting_requests
    served.in_flight += capacity - 1  # as if that many texts were queued already
    try:
        with pytest.raises(openai.RateLimitError, match="busy"):
            client.embeddings.create(model="minilm", input=["one", "two"])
        assert len(client.embeddings.create(model="minilm", input="one").data) == 1
    finally:
        served.in_flight -= capacity - 1
    assert served.in_flight == 0


def test_embedding_only_server(tmp_path_factory):
    """`-m <embedding model>` alone: embeddings (with dimensions and prompts) work, chat routes answer 400."""
    llm = LLM(str(build_embedding_gemma(tmp_path_factory.mktemp("emb") / "gemma")), dtype="float32")
    with live_server(llm, "gemma-embed") as (base, state):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        assert httpx.get(f"{base}/health").status_code == 200
        assert [c.id for c in client.models.list()] == ["gemma-embed"]
        short = client.embeddings.create(model="gemma-embed", input=["a query"], dimensions=16,
                                         extra_body={"prompt_name": "query"})
        expected = llm.embed(["a query"], dimensions=16, prompt_name="query")
        assert np.allclose(short.data[0].embedding, expected[0], atol=1e-6) and len(expected[0]) == 16
        with pytest.raises(openai.BadRequestError, match="unknown prompt name"):
            client.embeddings.create(model="gemma-embed", input="x", extra_body={"prompt_name": "nope"})
        with pytest.raises(openai.BadRequestError, match="embedding model"):
            client.chat.completions.create(model="gemma-embed", messages=[{"role": "user", "content": "hi"}])
        assert httpx.post(f"{base}/v1/completions", json={"prompt": "hi"}).status_code == 400
