"""Embedding models against sentence-transformers: MiniLM (real), tiny EmbeddingGemma and Qwen3-Embedding."""
import pytest
import torch
import torch.nn.functional as F

from levante import LLM
from levante.errors import InvalidRequest
from levante.loader.auto import open_model
from tiny_embedding_models import QWEN3_QUERY_PROMPT, build_embedding_gemma, build_qwen3_embedding, load_reference

SENTENCES = [
    "The cat sat on the mat.", "A man is playing a guitar.", "Quantum computers use qubits.",
    "How do I bake sourdough bread?", "Paris is the capital of France.", "", "a", "?!",
    "Ceci n'est pas une pipe.", "Der schnelle braune Fuchs springt über den faulen Hund.",
    "東京は日本の首都です。", "你好，世界！", "Привет, как дела?", "مرحبا بالعالم", "🙂🚀🔥 emoji only? 🎉",
    "SELECT * FROM users WHERE id = 42;", "def fib(n): return n if n < 2 else fib(n-1) + fib(n-2)",
    "The mitochondria is the powerhouse of the cell.", "I love machine learning and natural language processing.",
    "Stock markets fell sharply on Monday after the announcement.", "She sells sea shells by the sea shore.",
    "Water boils at 100 degrees Celsius at sea level.", "The Eiffel Tower was completed in 1889.",
    "GPU memory bandwidth limits decoding speed.", "Tokenization splits text into subword units.",
    "What's the weather like tomorrow in Berlin?", "Call me Ishmael.", "   leading and trailing spaces   ",
    "UPPERCASE TEXT SHOULD BE LOWERCASED BY THE TOKENIZER", "numbers 3.14159 2.71828 1.41421 and 1e-9",
    "https://example.com/path?query=1&x=y", "email me at someone@example.org",
    "Line one\nLine two\n\tTabbed line three", "A very short one.", "Photosynthesis converts light to energy.",
    "The quick brown fox jumps over the lazy dog. " * 8, "Embeddings map text to vectors in a metric space.",
    "Rust and Python are both popular programming languages.", "He scored the winning goal in extra time.",
    "Solar panels generate electricity from sunlight.", "Is this sentence similar to the previous one?",
    "The Great Wall of China is visible from low orbit — or is it?", "Ðiacritics: café, naïve, résumé, coöperate",
    "Mathematics: ∑ x² ≥ 0 for all real x", "[CLS] literal special token text [SEP]",
    "word " * 300, "The meeting was moved to Thursday at 3 pm.", "Dogs are loyal companions.",
    "A neural network learns weights by gradient descent.", "Goodbye!",
]

TINY_TEXTS = [s for s in SENTENCES[:14] if s]  # the tiny byte-level tokenizer makes no tokens of ""


@pytest.fixture(scope="module")
def gemma_folder(tmp_path_factory):
    return build_embedding_gemma(tmp_path_factory.mktemp("emb") / "embedding-gemma")


@pytest.fixture(scope="module")
def qwen3_folder(tmp_path_factory):
    return build_qwen3_embedding(tmp_path_factory.mktemp("emb") / "qwen3-embedding")


def _assert_close(ours, reference, threshold=0.9999):
    cosine = F.cosine_similarity(torch.as_tensor(ours), torch.as_tensor(reference), dim=-1)
    assert cosine.min().item() >= threshold, cosine


def test_minilm_matches_sentence_transformers(minilm):
    assert len(SENTENCES) == 50
    reference = load_reference(minilm.embedder.source.path).encode(SENTENCES, convert_to_tensor=True)
    ours = minilm.embed(SENTENCES, as_tensor=True)
    assert ours.shape == (50, 384)
    _assert_close(ours, reference)
    assert torch.allclose(ours.norm(dim=-1), torch.ones(50), atol=1e-5)


def test_minilm_inputs_batching_and_errors(minilm):
    ids = minilm.embedder.token_ids(SENTENCES[:6])
    by_text = minilm.embed(SENTENCES[:6], as_tensor=True)
    assert torch.allclose(minilm.embed(ids, as_tensor=True), by_text, atol=1e-6)
    assert torch.allclose(minilm.embed(ids[1], as_tensor=True)[0], by_text[1], atol=1e-6)
    one_by_one = torch.stack([minilm.embed(s, as_tensor=True)[0] for s in SENTENCES[:6]])
    assert torch.allclose(one_by_one, by_text, atol=1e-5)
    embedder = minilm.embedder
    assert len(embedder._batches([[1] * n for n in range(1, 300)])) > 1  # budgets split big requests
    assert len(ids[-1]) <= embedder.max_length and len(embedder.token_ids("word " * 300)[0]) == 256
    with pytest.raises(InvalidRequest, match="Matryoshka"):
        minilm.embed("hello", dimensions=128)
    with pytest.raises(InvalidRequest, match="at most 256"):
        minilm.embed([[101] * 300])
    with pytest.raises(InvalidRequest, match="token ids"):
        minilm.embed([10**6])
    with pytest.raises(InvalidRequest, match="embedding model"):
        minilm.generate("hello")


def test_embedding_gemma_matches_sentence_transformers(gemma_folder):
    llm = LLM(str(gemma_folder), dtype="float32")
    assert llm.embedder.model.is_causal is False and llm.embedder.dimensions == 64
    texts = TINY_TEXTS + [SENTENCES[35]]  # the long one spans several sliding windows
    reference = load_reference(gemma_folder)
    _assert_close(llm.embed(texts), reference.encode(texts))
    _assert_close(llm.embed(texts, prompt_name="query"), reference.encode(texts, prompt_name="query"))
    full = llm.embed(texts, as_tensor=True)
    short = llm.embed(texts, dimensions=16, as_tensor=True)
    assert short.shape == (len(texts), 16)
    assert torch.allclose(short, F.normalize(full[:, :16], dim=-1), atol=1e-6)
    with pytest.raises(InvalidRequest, match="between 1 and 64"):
        llm.embed("x", dimensions=65)
    with pytest.raises(InvalidRequest, match="unknown prompt name"):
        llm.embed("x", prompt_name="nope")


def test_qwen3_embedding_matches_sentence_transformers(qwen3_folder):
    source = open_model(str(qwen3_folder))
    assert source.config.architecture == "Qwen3ForCausalLM" and source.is_embedding  # #1707
    assert source.pipeline.pooling == ("lasttoken",) and source.pipeline.normalize
    llm = LLM(str(qwen3_folder), dtype="float32")
    assert llm.embedder.model.is_causal is True
    texts = TINY_TEXTS
    reference = load_reference(qwen3_folder)
    _assert_close(llm.embed(texts), reference.encode(texts))
    _assert_close(llm.embed(texts, prompt_name="query"), reference.encode(texts, prompt_name="query"))
    _assert_close(llm.embed(texts, prompt=QWEN3_QUERY_PROMPT), reference.encode(texts, prompt_name="query"))


def test_loader_tells_embedding_from_causal(tmp_path, gemma_folder, tiny_model):
    from levante.errors import UnsupportedArchitecture
    from levante.loader.auto import is_embedding_model

    assert is_embedding_model(str(gemma_folder)) and not is_embedding_model(str(tiny_model("qwen2")))
    pipeline = open_model(str(gemma_folder)).pipeline
    assert pipeline.pooling == ("mean",) and len(pipeline.dense) == 2 and pipeline.normalize
    assert pipeline.matryoshka and pipeline.prompts["query"].startswith("task: search result")
    weird = tmp_path / "weird"
    weird.mkdir()
    (weird / "modules.json").write_text("[]")
    (weird / "config.json").write_text((gemma_folder / "config.json").read_text().replace("gemma3_text", "frob"))
    with pytest.raises(UnsupportedArchitecture, match="frob.*bert"):
        open_model(str(weird))


def test_cli_says_an_embedding_model_does_not_generate(minilm):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "levante", "run", "-m", "all-minilm:l6-v2", "hi"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "embedding model" in result.stderr and len(result.stderr.strip().splitlines()) == 1
