"""The web chat's server side over HTTP: the page and its headers, /docs offline, the conversation
routes (owned per API key, the same SQLite store as `levante chat`), `--no-webui`, and `levante
serve` printing where to point a browser. The page itself is tested in Chromium (test_webui.py)."""
from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import time

import httpx
import pytest

from levante import LLM
from levante.conversations import ConversationStore
from levante.serve.webui import STATIC, WebUI
from live_server import free_port, live_server

ROUTE = "/v1/levante/conversations"
TURN = [{"role": "user", "content": "Hello, ça va?"}, {"role": "assistant", "content": "Oui."}]


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(str(tiny_model("qwen2")), dtype="float32", max_model_len=256)


@pytest.fixture(scope="module")
def served(llm, tmp_path_factory):
    store = tmp_path_factory.mktemp("webui") / "chats.sqlite3"
    with live_server(llm, "tiny", api_key="sesame", webui=WebUI(store_path=store)) as (base, _):
        yield base, store


def auth(key="sesame"):
    return {"Authorization": f"Bearer {key}"}


def test_the_page_is_served_with_a_strict_policy_and_no_key(served):
    base, _ = served
    page = httpx.get(f"{base}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self';" in policy and "unsafe" not in policy
    assert "frame-ancestors 'none'" in policy and page.headers["x-content-type-options"] == "nosniff"
    scripts = re.findall(r"<script[^>]*>", page.text)
    assert scripts and all('src="/ui/' in tag for tag in scripts)  # no inline script
    assert "<script>" not in page.text and not re.search(r"<[^>]*\son[a-z]+\s*=", page.text)  # no handlers
    js = httpx.get(f"{base}/ui/app.js", headers={"Accept-Encoding": "gzip"})
    assert js.status_code == 200 and js.headers["content-encoding"] == "gzip"
    assert "javascript" in js.headers["content-type"] and "content-security-policy" in js.headers
    escape = httpx.get(f"{base}/ui/%2e%2e/%2e%2e/serve/conversations.py")  # out of the page's folder: no
    assert escape.status_code == 404 and "import" not in escape.text
    assert httpx.get(f"{base}/v1/models").status_code == 401  # the API still needs the key
    assert httpx.get(f"{base}{ROUTE}").status_code == 401


def test_docs_are_offline(served):
    base, _ = served
    docs = httpx.get(f"{base}/docs")
    assert docs.status_code == 200 and "cdn" not in docs.text.lower()
    assets = re.findall(r'(?:src|href)="([^"]+)"', docs.text)
    assert assets and all(a.startswith("/docs/") for a in assets)
    for asset in assets:
        assert httpx.get(f"{base}{asset}").status_code == 200, asset
    assert "script-src 'self';" in docs.headers["content-security-policy"]
    assert httpx.get(f"{base}/openapi.json").status_code == 401
    assert httpx.get(f"{base}/openapi.json", headers=auth()).json()["paths"][ROUTE]


def test_models_say_which_take_images(served):
    base, _ = served
    card = httpx.get(f"{base}/v1/models", headers=auth()).json()["data"][0]
    assert card["type"] == "chat" and card["input_modalities"] == ["text"]


def test_conversations_crud_search_export_import(served):
    base, _ = served
    created = httpx.post(f"{base}{ROUTE}", json={"model": "tiny", "messages": TURN}, headers=auth())
    assert created.status_code == 201
    conversation = created.json()
    cid = conversation["id"]
    assert conversation["title"] == "Hello, ça va?" and conversation["message_count"] == 2
    assert conversation["messages"] == TURN
    longer = TURN + [{"role": "user", "content": "Encore"}]
    saved = httpx.put(f"{base}{ROUTE}/{cid}", json={"messages": longer}, headers=auth()).json()
    assert saved["message_count"] == 3 and saved["model"] == "tiny"
    renamed = httpx.patch(f"{base}{ROUTE}/{cid}", json={"title": "  My   chat "}, headers=auth()).json()
    assert renamed["title"] == "My chat"
    httpx.put(f"{base}{ROUTE}/{cid}", json={"messages": longer}, headers=auth())  # a save keeps the name
    exported = httpx.get(f"{base}{ROUTE}/{cid}", headers=auth()).json()
    assert exported["title"] == "My chat" and exported["messages"] == longer
    for query, found in (("ÇA VA", False), ("ça va", True), ("encore", True), ("my chat", True), ("100%", False)):
        ids = [c["id"] for c in httpx.get(f"{base}{ROUTE}", params={"q": query}, headers=auth()).json()["data"]]
        assert (cid in ids) == found, query
    copy = httpx.post(f"{base}{ROUTE}", json=exported, headers=auth())  # an export imports as it is
    assert copy.status_code == 201 and copy.json()["id"] != cid and copy.json()["title"] == "My chat"
    assert copy.json()["messages"] == longer
    assert httpx.delete(f"{base}{ROUTE}/{cid}", headers=auth()).json()["deleted"] is True
    assert httpx.get(f"{base}{ROUTE}/{cid}", headers=auth()).status_code == 404
    assert httpx.delete(f"{base}{ROUTE}/{cid}", headers=auth()).status_code == 404


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": "hello"}, "messages"),
    ({"title": "x" * 201, "messages": []}, "title"),
    ({"messages": [], "colour": "red"}, "colour"),
])
def test_bad_conversations_are_refused_naming_the_field(served, body, param):
    base, _ = served
    response = httpx.post(f"{base}{ROUTE}", json=body, headers=auth())
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_bad_ids_and_limits(served):
    base, _ = served
    for path in (f"{ROUTE}/0", f"{ROUTE}/abc", f"{ROUTE}/{1 << 70}", f"{ROUTE}?limit=0", f"{ROUTE}?limit=99999"):
        assert httpx.get(f"{base}{path}", headers=auth()).status_code == 400, path
    assert httpx.get(f"{base}{ROUTE}/999999", headers=auth()).status_code == 404


def test_conversations_belong_to_the_key_that_made_them(llm, tmp_path):
    store = tmp_path / "chats.sqlite3"
    with live_server(llm, "tiny", api_key="first key", webui=WebUI(store_path=store)) as (base, _):
        cid = httpx.post(f"{base}{ROUTE}", json={"messages": TURN}, headers=auth("first key")).json()["id"]
    with live_server(llm, "tiny", api_key="second key", webui=WebUI(store_path=store)) as (base, _):
        assert httpx.get(f"{base}{ROUTE}", headers=auth("second key")).json()["data"] == []
        for method in ("GET", "DELETE"):
            assert httpx.request(method, f"{base}{ROUTE}/{cid}", headers=auth("second key")).status_code == 404
        assert httpx.put(f"{base}{ROUTE}/{cid}", json={"messages": []}, headers=auth("second key")).status_code == 404
    with live_server(llm, "tiny", webui=WebUI(store_path=store)) as (base, _):  # no key: the local user's
        assert httpx.get(f"{base}{ROUTE}").json()["data"] == []
    local = ConversationStore(store)
    assert [c.id for c in local.as_owner(local.owner_of("first key")).list()] == [cid]
    owners = [row[0] for row in sqlite3.connect(store).execute("SELECT owner FROM conversations")]
    assert owners == [local.owner_of("first key")] and "first key" not in owners[0]
    local.close()


def test_an_older_store_file_gains_owners_and_keeps_its_conversations(tmp_path):
    path = tmp_path / "chats.sqlite3"
    old = sqlite3.connect(path)  # the schema `levante chat` wrote before conversations had owners
    old.executescript("""
        CREATE TABLE conversations (id INTEGER PRIMARY KEY AUTOINCREMENT, title TEXT NOT NULL DEFAULT '',
            model TEXT NOT NULL DEFAULT '', created REAL NOT NULL, updated REAL NOT NULL);
        CREATE TABLE messages (conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            position INTEGER NOT NULL, message TEXT NOT NULL, PRIMARY KEY (conversation_id, position));
        INSERT INTO conversations (title, model, created, updated) VALUES ('old one', 'm', 1, 1);
        INSERT INTO messages VALUES (1, 0, '{"role": "user", "content": "old one"}');
    """)
    old.commit()
    old.close()
    store = ConversationStore(path)
    assert [(c.id, c.title) for c in store.list()] == [(1, "old one")]
    store.rename(1, "renamed")
    store.save(1, [{"role": "user", "content": "new first message"}])
    assert store.info(1).title == "renamed"
    store.rename(1, "")  # back to the automatic title
    assert store.info(1).title == "new first message"
    store.close()


def test_no_webui_serves_no_page_and_no_conversations(llm):
    with live_server(llm, "tiny") as (base, _):
        assert httpx.get(f"{base}/").status_code == 404
        assert httpx.get(f"{base}/ui/app.js").status_code == 404
        assert httpx.get(f"{base}{ROUTE}").status_code == 404
        assert httpx.get(f"{base}/docs").status_code == 200


def test_levante_serve_prints_the_address_and_serves_the_page(tiny_model, tmp_path):
    port = free_port()
    env = {**os.environ, "LEVANTE_DATA_DIR": str(tmp_path / "data")}
    process = subprocess.Popen([sys.executable, "-m", "levante", "serve", "-m", str(tiny_model("qwen2")), "--port",
                                str(port), "--dtype", "float32", "--max-model-len", "128"],
                               stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        lines = []
        while not any("ready" in line for line in lines):
            assert time.monotonic() < deadline and process.poll() is None, "".join(lines)
            lines.append(process.stderr.readline())
        ready = next(line for line in lines if "ready" in line)
        assert f"web chat at http://127.0.0.1:{port}/" in ready and f"API at http://127.0.0.1:{port}/v1" in ready
        page = httpx.get(f"http://127.0.0.1:{port}/", headers={"Accept-Encoding": "gzip"})
        assert page.status_code == 200 and "levante" in page.text
        assert not (tmp_path / "data").exists()  # the store is opened on first use only
        httpx.post(f"http://127.0.0.1:{port}{ROUTE}", json={"messages": TURN}).raise_for_status()
        assert ConversationStore(tmp_path / "data" / "chats.sqlite3").list()[0].title == "Hello, ça va?"
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_page_files_are_the_ones_in_the_package():
    names = {p.name for p in STATIC.iterdir()}
    assert {"index.html", "app.js", "app.css", "api.js", "markdown.js", "view.js", "sidebar.js"} <= names
    for script in STATIC.glob("*.js"):
        text = script.read_text()
        assert "innerHTML" not in text and "eval(" not in text and "new Function" not in text, script.name
        assert "http://" not in text and "https://" not in text, script.name  # nothing fetched from elsewhere


def test_missing_vendor_files_are_404_not_500(llm, tmp_path):
    """Before `make web` (or in an install without the built libraries): each library file is a 404 the
    page falls back from (test_webui.py), never a 500 with a traceback in the log."""
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "uvicorn", "levante", "")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with live_server(llm, "tiny", webui=WebUI(vendor=tmp_path / "not-built")) as (base, _):
            for name in ("marked.esm.js", "purify.es.mjs", "highlight-light.css", "%2e%2e/index.html", "a/b.js"):
                r = httpx.get(f"{base}/ui/vendor/{name}")
                assert r.status_code == 404 and r.json()["error"]["code"] == 404, name
            assert httpx.get(f"{base}/").status_code == 200 and httpx.get(f"{base}/ui/app.js").status_code == 200
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert not [r for r in records if r.exc_info or r.levelno >= logging.ERROR], records
