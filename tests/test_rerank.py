"""Reranking and scoring: cross-encoders equal to sentence-transformers' CrossEncoder.predict, a
Qwen3-Reranker-style LLM reranker equal to transformers, embedding models by cosine similarity; and
/v1/rerank, /rerank and /v1/score on a live server (the `openai` client's generic post), batched,
admitted and bounded."""
import asyncio
import time

import httpx
import openai
import pytest
import torch

from levante import LLM
from levante.serve.limits import RequestLimits
from live_server import live_server
from tiny_rerankers import build_cross_encoder, build_llm_reranker, llm_reranker_scores

QUERY = "what do rotary embeddings rotate?"
DOCUMENTS = ["Rotary position embeddings rotate queries and keys.", "def add(a, b): return a + b",
             "The quick brown fox jumps over the lazy dog.", "Bonjour, ça va?", "",
             "keys " * 300]  # longer than the model: cut, as CrossEncoder cuts it


@pytest.fixture(scope="module", params=["bert", "xlm-roberta"])
def cross_encoder(request, tmp_path_factory):
    return build_cross_encoder(tmp_path_factory.mktemp(request.param) / "ce", request.param)


@pytest.fixture(scope="module")
def llm_reranker(tmp_path_factory):
    return build_llm_reranker(tmp_path_factory.mktemp("qwen3-reranker"))


def test_cross_encoders_equal_crossencoder_predict(cross_encoder):
    from sentence_transformers import CrossEncoder

    reference = CrossEncoder(str(cross_encoder), device="cpu").predict([(QUERY, d) for d in DOCUMENTS])
    llm = LLM(str(cross_encoder), dtype="float32")
    assert llm.task == "score" and llm.engine is None
    scores = llm.score(QUERY, DOCUMENTS)
    assert torch.allclose(torch.tensor(scores), torch.from_numpy(reference).float(), atol=1e-5)
    assert 0 < min(scores) and max(scores) < 1  # the default activation: a sigmoid
    pairwise = llm.score(["a", "b"], ["c", "d"])
    expected = CrossEncoder(str(cross_encoder), device="cpu").predict([("a", "c"), ("b", "d")])
    assert torch.allclose(torch.tensor(pairwise), torch.from_numpy(expected).float(), atol=1e-5)


def test_llm_reranker_equals_transformers(llm_reranker):
    llm = LLM(str(llm_reranker), task="score", dtype="float32")
    scores = llm.score(QUERY, DOCUMENTS[:4])
    assert torch.allclose(torch.tensor(scores), torch.tensor(llm_reranker_scores(llm_reranker, QUERY, DOCUMENTS[:4])),
                          atol=1e-5)
    with pytest.raises(Exception, match="yes"):  # a decoder without the two tokens cannot rerank this way
        from tiny_models import build
        LLM(str(build("qwen3", llm_reranker.parent / "plain")), task="score", dtype="float32")


def test_embedding_models_score_by_cosine(minilm):
    from sentence_transformers import SentenceTransformer, util

    reference = SentenceTransformer(str(minilm.embedder.source.path), device="cpu")
    vectors = reference.encode([QUERY] + DOCUMENTS[:4], convert_to_tensor=True)
    expected = util.cos_sim(vectors[:1], vectors[1:])[0]
    assert torch.allclose(torch.tensor(minilm.score(QUERY, DOCUMENTS[:4])), expected, atol=1e-5)


@pytest.fixture(scope="module")
def served(tmp_path_factory, minilm, tiny_model):
    """A server with a tiny chat model, MiniLM and a BERT cross-encoder (as --rerank-model)."""
    from levante.engine.args import EngineArgs
    from levante.serve.model_specs import ModelSpec

    folder = build_cross_encoder(tmp_path_factory.mktemp("served") / "ce", "bert")
    reranker = LLM(str(folder), dtype="float32")
    chat = LLM(str(tiny_model("qwen2")), dtype="float32", max_model_len=256, num_kv_blocks=64, warmup=False)
    limits = RequestLimits(max_documents=8)
    with live_server(chat, "tiny", embedding_llm=minilm, embedding_name="minilm", limits=limits) as (base, state):
        state.router.add(ModelSpec("reranker", EngineArgs(model=str(folder)), task="score", pinned=True), reranker)
        yield base, state, reranker


def _post(base, path, body):
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    return client.post(path, cast_to=object, body=body)


def test_rerank_routes(served):
    base, _, reranker = served
    expected = reranker.score(QUERY, DOCUMENTS)
    ranked = _post(base, "/rerank", {"model": "reranker", "query": QUERY, "documents": DOCUMENTS, "top_n": 3})
    order = sorted(range(len(expected)), key=lambda i: -expected[i])[:3]
    assert [r["index"] for r in ranked["results"]] == order
    for result in ranked["results"]:
        assert abs(result["relevance_score"] - expected[result["index"]]) < 1e-5
        assert result["document"] == {"text": DOCUMENTS[result["index"]]}
    assert ranked["model"] == "reranker" and ranked["usage"]["total_tokens"] > 0
    bare = httpx.post(f"{base}/rerank", json={"model": "reranker", "query": QUERY, "return_documents": False,
                                              "documents": [{"text": d} for d in DOCUMENTS[:2]]}).json()
    assert len(bare["results"]) == 2 and all("document" not in r for r in bare["results"])

    scored = _post(base, "/score", {"model": "reranker", "text_1": QUERY, "text_2": DOCUMENTS})
    assert [d["index"] for d in scored["data"]] == list(range(len(DOCUMENTS)))
    assert torch.allclose(torch.tensor([d["score"] for d in scored["data"]]), torch.tensor(expected), atol=1e-5)
    pairwise = _post(base, "/score", {"model": "reranker", "text_1": ["a", "b"], "text_2": ["c", "d"]})
    assert torch.allclose(torch.tensor([d["score"] for d in pairwise["data"]]),
                          torch.tensor(reranker.score(["a", "b"], ["c", "d"])), atol=1e-5)


def test_rerank_with_an_embedding_model(served, minilm):
    base, _, _ = served
    ranked = _post(base, "/rerank", {"model": "minilm", "query": QUERY, "documents": DOCUMENTS[:4]})
    expected = minilm.score(QUERY, DOCUMENTS[:4])
    for result in ranked["results"]:
        assert abs(result["relevance_score"] - expected[result["index"]]) < 1e-5
    assert [r["relevance_score"] for r in ranked["results"]] == sorted(expected, reverse=True)


def test_rerank_refusals(served):
    base, state, _ = served

    def status(path, body):
        return httpx.post(f"{base}{path}", json=body).status_code

    assert status("/v1/rerank", {"model": "reranker", "query": QUERY, "documents": ["x"] * 9}) == 400  # --max-documents
    assert status("/v1/rerank", {"model": "reranker", "query": QUERY, "documents": []}) == 400
    assert status("/v1/rerank", {"model": "tiny", "query": QUERY, "documents": ["x"]}) == 400  # a chat model
    assert status("/v1/rerank", {"model": "reranker", "query": QUERY, "documents": [{"txt": "x"}]}) == 400
    assert status("/v1/score", {"model": "reranker", "text_1": ["a", "b"], "text_2": ["c", "d", "e"]}) == 400
    assert status("/v1/rerank", {"model": "nonesuch", "query": QUERY, "documents": ["x"]}) == 404
    reply = httpx.post(f"{base}/v1/embeddings", json={"model": "reranker", "input": "x"})
    assert reply.status_code == 400 and "reranker" in reply.json()["error"]["message"]
    served_model = state.router.models["reranker"]
    capacity = served_model.llm.max_batch_size + state.limits.max_waiting_requests
    served_model.in_flight += capacity - 1  # as if that many pairs were queued already
    try:
        assert status("/v1/rerank", {"model": "reranker", "query": QUERY, "documents": ["a", "b"]}) == 429
    finally:
        served_model.in_flight -= capacity - 1


def test_concurrent_reranks_share_forward_passes(served):
    base, state, reranker = served
    batcher = state.router.models["reranker"].service.batcher
    real = batcher.run

    def slow(pairs):
        time.sleep(0.3)
        return real(pairs)

    async def fire():
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            replies = await asyncio.gather(*[http.post("/v1/score", json={"model": "reranker", "text_1": QUERY,
                                                                           "text_2": [d]}) for d in DOCUMENTS])
        return [r.json()["data"][0]["score"] for r in replies]

    batcher.run, before = slow, batcher.forward_calls
    try:
        scores = asyncio.run(fire())
    finally:
        batcher.run = real
    assert batcher.forward_calls - before <= 3  # six requests, at most three forwards
    assert torch.allclose(torch.tensor(scores), torch.tensor(reranker.score(QUERY, DOCUMENTS)), atol=1e-5)
