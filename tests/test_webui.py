"""The web chat in a real browser (Debian's Chromium, driven by Playwright) against levante's own
server and a tiny random model: what the page shows is what the API returns for the same request.

Screenshots of every state go to each test's tmp folder (`shots`); the page may reach no other
origin, and a console error or uncaught exception fails the test (tests/browser.py).
"""
from __future__ import annotations

import base64
import io
import json
import re
import time

import httpx
import openai
import pytest

from browser import Tab, launch
from levante import LLM
from levante.conversations import ConversationStore
from levante.serve.webui import WebUI
from live_server import live_server
from live_server import metric as server_metric

pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra (make test installs it)")

MAX_POSITIONS = 8192  # room for a long answer, so that Stop lands mid-stream
HOSTILE = ("Look: <img src=x onerror=\"document.title='pwned'\"> then [click me](javascript:document.title='pwned') "
           "and <script>document.title='pwned'</script> end")


# -- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = launch(playwright)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from tiny_models import build

    folder = build("qwen2", tmp_path_factory.mktemp("tiny-qwen2-long"), max_position_embeddings=MAX_POSITIONS)
    return LLM(str(folder), dtype="float32", max_model_len=MAX_POSITIONS)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    return tmp_path_factory.mktemp("store") / "chats.sqlite3"


@pytest.fixture(scope="module")
def server(llm, store_path):
    with live_server(llm, "tiny", webui=WebUI(store_path=store_path)) as (base, state):
        yield base


@pytest.fixture
def shots(tmp_path):
    folder = tmp_path / "screenshots"
    folder.mkdir()
    return folder


@pytest.fixture
def tab(browser, server, shots):
    opened = Tab(browser, server, shots)
    yield opened
    opened.check()
    opened.close()


# -- helpers ----------------------------------------------------------------------------------------

def set_settings(page, **values):
    page.click("#settings-button")
    for name, value in values.items():
        page.fill(f"#settings-form [name={name}]", str(value))
    page.click("#settings-save")
    page.wait_for_selector("#settings", state="hidden")


def send(page, text: str):
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def wait_answer(page, timeout=60_000):
    """The last answer, once it is finished (its Copy button appears when streaming ends) and saved;
    an error the page shows instead fails at once, with its text."""
    done = "body:not(.busy):not([data-saving]) .message.assistant:last-child .actions .copy"
    page.wait_for_selector(f"{done}, #banner.error", timeout=timeout)
    error = page.locator("#banner.error")
    assert not error.is_visible(), f"the page shows an error: {error.inner_text()}"
    return page.locator(".message.assistant").last


def conversation_id(page) -> int:
    page.wait_for_selector("body[data-conversation]")
    return int(page.get_attribute("body", "data-conversation"))


def stored(base: str, conversation: int, key: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = httpx.get(f"{base}/v1/levante/conversations/{conversation}", headers=headers)
    response.raise_for_status()
    return response.json()


def words(text: str) -> str:
    return " ".join(text.split())


def api_answer(base: str, body: dict, key: str = "unused") -> str:
    """The same request through the official client, not streamed."""
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)
    fields = {k: v for k, v in body.items() if k not in ("stream", "stream_options", "model", "messages")}
    response = client.chat.completions.create(model=body["model"], messages=body["messages"], **fields)
    return response.choices[0].message.content


def metric(base: str, name: str, **labels) -> float:
    """The /metrics sample `name` with `labels` (0 when the server has not counted one yet)."""
    return server_metric(base, name, **labels) or 0.0


def regex_literal(text: str) -> str:
    return re.sub(r"([\\.^$|?*+()\[\]{}])", r"\\\1", text)


# -- tests ------------------------------------------------------------------------------------------

def test_answer_is_the_apis_greedy_answer_and_survives_a_reload(tab, server):
    page = tab.open()
    tab.shot("01-empty")
    set_settings(page, temperature=0, top_p=1, max_tokens=24, seed=7, system="You are terse.")
    with page.expect_request("**/v1/chat/completions") as request:
        send(page, "Say something.")
    body = request.value.post_data_json
    assert body["stream"] is True and body["temperature"] == 0 and body["max_tokens"] == 24 and body["seed"] == 7
    assert body["messages"] == [{"role": "system", "content": "You are terse."},
                                {"role": "user", "content": "Say something."}]
    answer = wait_answer(page)
    tab.shot("02-answered")
    expected = api_answer(server, body)
    conversation = conversation_id(page)
    saved = stored(server, conversation)["messages"]
    assert saved == [*body["messages"], {"role": "assistant", "content": expected}]
    assert words(answer.locator(".bubble").inner_text()) == words(expected)
    assert float(answer.locator(".stats").get_attribute("data-ttft-ms")) > 0

    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    item = page.locator(f"#conversations li[data-id='{conversation}']")
    assert item.inner_text().startswith("Say something.")
    item.locator(".conversation-title").click()
    page.wait_for_selector(".message.assistant")
    tab.shot("03-reloaded")
    assert words(page.locator(".message.assistant .bubble").inner_text()) == words(expected)
    assert page.locator(".message.user").inner_text().startswith("Say something.")


def test_stop_aborts_the_request_and_frees_the_kv_cache(tab, server):
    page = tab.open()
    set_settings(page, temperature=0, max_tokens=MAX_POSITIONS - 64, extra='{"ignore_eos": true}')
    aborted = metric(server, "levante_requests_total", finish_reason="abort")
    send(page, "Talk for a long time.")
    page.wait_for_function("() => document.querySelector('.message.assistant .bubble')?.textContent.length > 20")
    assert metric(server, "levante_kv_cache_usage_ratio") > 0
    tab.shot("04-streaming")
    page.keyboard.press("Escape")
    answer = wait_answer(page)
    tab.shot("05-stopped")
    assert "stopped" in answer.locator(".stats").inner_text()
    deadline = time.monotonic() + 20
    while metric(server, "levante_kv_cache_usage_ratio") > 0 or metric(server, "levante_num_requests_running") > 0:
        assert time.monotonic() < deadline, httpx.get(f"{server}/metrics").text
        time.sleep(0.1)
    assert metric(server, "levante_requests_total", finish_reason="abort") == aborted + 1
    partial = stored(server, conversation_id(page))["messages"][-1]["content"]
    assert 20 < len(partial) and partial.startswith(answer.locator(".bubble").inner_text()[:10])


def test_a_terminal_conversation_continues_in_the_browser_and_back(tab, server, store_path):
    terminal = ConversationStore(store_path)  # as `levante chat` keeps it (no key: the local user)
    conversation = terminal.create("tiny")
    terminal.save(conversation, [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 6 times 7?"},
        {"role": "assistant", "content": None, "reasoning_content": "Multiply: six sevens.",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "multiply", "arguments": "{\"a\": 6, \"b\": 7}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
        {"role": "assistant", "content": "It is **42**.\n\n```python\nprint(6 * 7)\n```"},
    ])
    page = tab.open()
    page.locator(f"#conversations li[data-id='{conversation}'] .conversation-title").click()
    page.wait_for_selector(".card.tool")
    card = page.locator(".card.tool")
    assert not card.evaluate("node => node.open")  # collapsed until asked
    card.locator("summary").click()
    assert "multiply" in card.inner_text() and '"a": 6' in card.inner_text() and "42" in card.inner_text()
    reasoning = page.locator("details.reasoning")
    assert not reasoning.evaluate("node => node.open") and "six sevens" in reasoning.text_content()
    assert page.locator(".markdown strong").inner_text() == "42"
    assert page.locator(".code-bar span").first.inner_text() == "python"
    assert page.locator(".code code .hljs-built_in, .code code .hljs-number").count() > 0
    tab.shot("06-from-the-terminal")

    set_settings(page, temperature=0, max_tokens=12, system="Answer briefly.")
    with page.expect_request("**/v1/chat/completions") as request:
        send(page, "And 6 times 8?")
    wait_answer(page)
    sent = request.value.post_data_json["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "tool", "assistant", "user"]
    assert "reasoning_content" not in sent[2]  # shown, not sent back
    back = terminal.load(conversation)  # the terminal sees the browser's turn
    assert len(back) == 7 and back[-2] == {"role": "user", "content": "And 6 times 8?"}

    from levante.tui.session import ChatSession, Settings, TurnEnd

    async def terminal_turn():
        client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
        session = ChatSession(client, "tiny", settings=Settings(temperature=0, max_tokens=8), messages=back)
        events = [event async for event in session.send("Thanks!")]
        assert isinstance(events[-1], TurnEnd)
        terminal.save(conversation, session.messages)

    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:  # Playwright's sync API holds this thread's event loop
        pool.submit(asyncio.run, terminal_turn()).result()
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    page.locator(f"#conversations li[data-id='{conversation}'] .conversation-title").click()
    page.wait_for_selector(".message.user >> text=Thanks!")
    assert page.locator(".message.user").count() == 3
    terminal.close()


@pytest.fixture(scope="module")
def thinking_server(tiny_reasoning_model, store_path):
    """A tiny random Qwen3 with Qwen3's own chat template: the server splits its <think> part off."""
    llm = LLM(str(tiny_reasoning_model()), dtype="float32", max_model_len=512, warmup=False)
    with live_server(llm, "tiny-qwen3", webui=WebUI(store_path=store_path)) as (base, _):
        yield base, llm


def test_streamed_reasoning_is_folded_away(browser, thinking_server, shots):
    """The reply is fixed by a grammar (tests/test_reasoning.py), so the split is known text: the page
    folds the streamed `reasoning_content`, keeps it unfolded while later deltas redraw the answer,
    stores it, and does not send it back."""
    from test_reasoning import script_grammar

    base, llm = thinking_server
    grammar = {"grammar": {"type": "lark", "value": script_grammar(
        llm.tokenizer, "<think>\nThe user says hi.\n" + "Hmm. " * 10 + "\n</think>\n\nHello there!")}}
    tab = Tab(browser, base, shots)
    page = tab.open()
    set_settings(page, temperature=0, max_tokens=400, extra=json.dumps(grammar))
    with page.expect_request("**/v1/chat/completions") as request:
        send(page, "Hi")
    page.click("details.reasoning summary")  # unfolded while it streams...
    answer = wait_answer(page)
    reasoning = answer.locator("details.reasoning")
    assert reasoning.evaluate("node => node.open")  # ...and still, after every delta redrew it
    assert reasoning.locator("summary").inner_text() == "Reasoning"
    tab.shot("22-reasoning-unfolded")
    reasoning.locator("summary").click()
    assert not reasoning.evaluate("node => node.open")
    tab.shot("23-reasoning-folded")
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    body = request.value.post_data_json
    fields = {k: v for k, v in body.items() if k not in ("stream", "stream_options", "model", "messages")}
    expected = client.chat.completions.create(model=body["model"], messages=body["messages"],
                                              extra_body=fields).choices[0].message
    assert answer.locator(".bubble").inner_text() == expected.content == "Hello there!"
    assert words(reasoning.locator(".reasoning-text").text_content()) == words(expected.reasoning_content)
    assert expected.reasoning_content.startswith("The user says hi.")
    saved = stored(base, conversation_id(page))["messages"][-1]
    assert saved == {"role": "assistant", "content": "Hello there!", "reasoning_content": expected.reasoning_content}
    set_settings(page, extra="{}", max_tokens=4)
    with page.expect_request("**/v1/chat/completions") as again:
        send(page, "Thanks")
    wait_answer(page)
    assert again.value.post_data_json["messages"][-2] == {"role": "assistant", "content": "Hello there!"}
    tab.check()
    tab.close()


@pytest.fixture(scope="module")
def plain_server(llm, tmp_path_factory):
    """The page without its built libraries, as before `make web`: their folder does not exist."""
    folder = tmp_path_factory.mktemp("no-vendor")
    with live_server(llm, "tiny", webui=WebUI(vendor=folder / "not-built", store_path=folder / "chats.sqlite3")) \
            as (base, _):
        yield base


@pytest.mark.parametrize("libraries", ["markdown", "plain"])
def test_a_hostile_answer_stays_inert(browser, shots, request, libraries):
    server = request.getfixturevalue("server" if libraries == "markdown" else "plain_server")
    tab = Tab(browser, server, shots)
    if libraries == "plain":  # the libraries' files are 404s: plain text, and the page says so
        tab.expected_errors.append("404")
    try:
        _hostile_answer(tab, server, libraries)
    finally:
        tab.check()
        tab.close()


def _hostile_answer(tab, server, libraries):
    page = tab.open()
    title = page.title()
    grammar = {"grammar": {"type": "regex", "value": regex_literal(HOSTILE)}}
    set_settings(page, temperature=0, max_tokens=400, extra=json.dumps(grammar))
    send(page, "Say something dangerous.")
    answer = wait_answer(page)
    tab.shot(f"07-hostile-{libraries}")
    bubble = answer.locator(".bubble")
    assert words(bubble.inner_text()).startswith(words("Look: <img src=x onerror="))  # shown as text
    assert "<script>document.title='pwned'</script>" in bubble.inner_text()
    assert bubble.locator("img, script").count() == 0
    for link in bubble.locator("a").all():
        assert not (link.get_attribute("href") or "").lower().startswith("javascript")
        link.click()
    if libraries == "markdown":
        assert bubble.locator("a").inner_text() == "click me"  # the link is there, inert
        assert not page.locator("#plain-note").is_visible()
    else:
        assert bubble.locator("a").count() == 0 and "[click me](javascript:" in bubble.inner_text()
        assert "make web" in page.locator("#plain-note").inner_text()
    page.wait_for_timeout(300)
    assert page.title() == title
    policy = httpx.get(f"{server}/").headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "unsafe-eval" not in policy
    tab.expected_errors.append("TrustedHTML")  # and no HTML string reaches the DOM but through DOMPurify:
    assert page.evaluate("""() => { try { document.createElement('div').innerHTML = '<b>x</b>'; return 'taken'; }
                                    catch (error) { return error.name; } }""") == "TypeError"


def test_regenerate_and_edit_into_a_branch(tab, server):
    page = tab.open()
    set_settings(page, temperature=0, max_tokens=10)
    send(page, "First question")
    first = wait_answer(page).locator(".bubble").inner_text()
    original = conversation_id(page)
    page.click(".message.assistant .action >> text=Regenerate")
    assert words(wait_answer(page).locator(".bubble").inner_text()) == words(first)  # greedy: the same again
    assert page.locator(".message").count() == 2
    page.hover(".message.user")
    page.click(".message.user .action >> text=Edit")
    page.fill(".editor textarea", "Second question")
    tab.shot("08-editing")
    page.click(".editor button[type=submit]")
    wait_answer(page)
    branch = conversation_id(page)
    tab.shot("09-branched")
    assert branch != original
    assert [m["content"] for m in stored(server, original)["messages"]][0] == "First question"
    assert stored(server, branch)["messages"][0]["content"] == "Second question"


def test_conversations_search_rename_export_import_delete(tab, server, shots):
    page = tab.open()
    set_settings(page, temperature=0, max_tokens=6)
    send(page, "zebra crossing")
    wait_answer(page)
    conversation = conversation_id(page)
    page.fill("#search", "ZEBRA")
    page.wait_for_function("() => document.querySelectorAll('#conversations li.conversation').length === 1")
    item = page.locator(f"#conversations li[data-id='{conversation}']")
    page.once("dialog", lambda dialog: dialog.accept("Stripes"))
    item.locator("button[title=Rename]").click()
    page.wait_for_selector(f"#conversations li[data-id='{conversation}'] >> text=Stripes")
    tab.shot("10-renamed")
    with page.expect_download() as download:
        item.locator("button[title='Export as JSON']").click()
    exported = shots / "exported.json"
    download.value.save_as(exported)
    data = json.loads(exported.read_text())
    assert data["title"] == "Stripes" and data["messages"][0]["content"] == "zebra crossing"
    page.once("dialog", lambda dialog: dialog.accept())
    item.locator("button[title=Delete]").click()
    page.wait_for_selector(f"#conversations li[data-id='{conversation}']", state="detached")
    assert httpx.get(f"{server}/v1/levante/conversations/{conversation}").status_code == 404
    page.set_input_files("#import-file", str(exported))
    page.wait_for_selector("#banner >> text=Imported 1 conversation")
    page.wait_for_selector("#conversations li >> text=Stripes")
    tab.shot("11-imported")


def test_keyboard_theme_and_a_phone_width_window(browser, server, shots):
    tab = Tab(browser, server, shots, viewport=(390, 800))
    page = tab.open()
    requests = []
    page.on("request", lambda r: requests.append(r.url) if "/chat/completions" in r.url else None)
    page.fill("#prompt", "line one")
    page.press("#prompt", "Shift+Enter")
    page.keyboard.type("line two")
    assert page.input_value("#prompt") == "line one\nline two" and not requests
    assert not page.locator("#sidebar").is_visible() or page.locator("#sidebar").bounding_box()["x"] < 0
    set_settings(page, temperature=0, max_tokens=8)
    page.press("#prompt", "Enter")
    wait_answer(page)
    assert len(requests) == 1
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390  # nothing wider than the phone
    tab.shot("12-phone")
    page.click("#open-sidebar")
    page.wait_for_timeout(300)
    assert page.locator("#sidebar").bounding_box()["x"] >= 0
    tab.shot("13-phone-list")
    page.click("#close-sidebar")
    page.wait_for_timeout(300)
    before = page.get_attribute("html", "data-theme")
    page.click("#theme")
    after = page.get_attribute("html", "data-theme")
    assert {before, after} == {"light", "dark"}
    tab.shot(f"14-phone-{after}")
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert page.get_attribute("html", "data-theme") == after  # kept
    tab.check()
    tab.close()


def test_images_are_refused_cleanly_by_a_text_only_model(tab, server):
    page = tab.open()
    assert page.locator("#attach").is_disabled()
    assert page.inner_text("#model-note") == "text only"
    drop_image(page)
    page.wait_for_selector("#banner.error >> text=takes text only")
    assert page.locator("#attachments img").count() == 0
    tab.shot("15-text-only")
    models = httpx.get(f"{server}/v1/models").json()["data"]
    assert models[0]["input_modalities"] == ["text"]


def drop_image(page, kind: str = "drop"):
    """Drops (or pastes) a small PNG made in the page, as a user would drag a file in."""
    page.evaluate("""async (kind) => {
        const canvas = Object.assign(document.createElement('canvas'), {width: 64, height: 48});
        const context = canvas.getContext('2d');
        context.fillStyle = '#c33'; context.fillRect(0, 0, 64, 48);
        context.fillStyle = '#3c3'; context.fillRect(16, 12, 32, 24);
        const blob = await new Promise((resolve) => canvas.toBlob(resolve, 'image/png'));
        const transfer = new DataTransfer();
        transfer.items.add(new File([blob], 'square.png', {type: 'image/png'}));
        if (kind === 'paste') {
            document.getElementById('prompt').dispatchEvent(new ClipboardEvent('paste', {clipboardData: transfer, bubbles: true}));
        } else {
            document.getElementById('main').dispatchEvent(new DragEvent('drop', {dataTransfer: transfer, bubbles: true}));
        }
    }""", kind)


def png(width=40, height=30) -> bytes:
    from tiny_vlm_models import random_image

    buffer = io.BytesIO()
    random_image(width, height, seed=3).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def vision_server(tmp_path_factory, store_path):
    from tiny_vlm_models import build

    folder = build("qwen2_5_vl", tmp_path_factory.mktemp("tiny-vlm"))
    llm = LLM(str(folder), dtype="float32", block_size=4, num_kv_blocks=512, warmup=False)
    with live_server(llm, "tiny-vlm", webui=WebUI(store_path=store_path)) as (base, _):
        yield base


def test_images_go_to_a_vision_model_by_button_drop_and_paste(browser, vision_server, shots, tmp_path):
    tab = Tab(browser, vision_server, shots)
    page = tab.open()
    assert page.inner_text("#model-note") == "takes images" and not page.locator("#attach").is_disabled()
    image = tmp_path / "photo.png"
    image.write_bytes(png())
    page.set_input_files("#attach-file", str(image))  # the attach button's file picker
    drop_image(page, "drop")
    drop_image(page, "paste")
    page.wait_for_function("() => document.querySelectorAll('#attachments img').length === 3")
    tab.shot("16-attached")
    set_settings(page, temperature=0, max_tokens=12)
    with page.expect_request("**/v1/chat/completions") as request:
        send(page, "What is in it?")
    answer = wait_answer(page)
    tab.shot("17-vision-answer")
    body = request.value.post_data_json
    parts = body["messages"][-1]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "image_url", "image_url"]
    assert parts[1]["image_url"]["url"] == "data:image/png;base64," + base64.b64encode(png()).decode()
    assert page.locator(".message.user .images img").count() == 3
    expected = api_answer(vision_server, body)
    assert words(answer.locator(".bubble").inner_text()) == words(expected)
    tab.check()
    tab.close()


def test_the_api_key_is_asked_once_and_conversations_belong_to_it(browser, llm, shots, tmp_path):
    key = "correct horse battery staple"
    store = tmp_path / "keyed.sqlite3"
    with live_server(llm, "tiny", api_key=key, webui=WebUI(store_path=store)) as (base, _):
        tab = Tab(browser, base, shots)
        tab.expected_errors.append("401")
        page = tab.open(ready=False)
        page.wait_for_selector("#key-dialog[open]")
        tab.shot("18-key-asked")
        page.fill("#key-form [name=key]", "wrong")
        page.click("#key-form button.primary")
        page.wait_for_selector("#key-dialog[open] >> text=refused the saved API key")
        page.fill("#key-form [name=key]", key)
        page.click("#key-form button.primary")
        page.wait_for_selector("body[data-ready=true]")
        set_settings(page, temperature=0, max_tokens=6)
        send(page, "A secret question")
        wait_answer(page)
        conversation = conversation_id(page)
        page.reload()  # the key is kept: no second prompt
        page.wait_for_selector("body[data-ready=true]")
        assert not page.locator("#key-dialog").evaluate("node => node.open")
        page.wait_for_selector(f"#conversations li[data-id='{conversation}']")
        tab.shot("19-key-kept")
        page.goto(base + "/docs")  # Swagger, offline, with the same key
        page.wait_for_selector(".swagger-ui .opblock", timeout=30_000)
        tab.shot("20-docs")
        tab.check()
        tab.close()
        assert httpx.get(f"{base}/").status_code == 200  # the page itself needs no key...
        assert httpx.get(f"{base}/v1/levante/conversations").status_code == 401  # ...its data does
    local = ConversationStore(store)  # the local user (no key) does not see the key's conversation
    assert local.list() == []
    owner = local.owner_of(key)
    assert key not in owner and [c.id for c in local.as_owner(owner).list()] == [conversation]
    raw = store.read_bytes() + (store.with_name(store.name + "-wal").read_bytes()
                                if store.with_name(store.name + "-wal").exists() else b"")
    assert key.encode() not in raw
    local.close()


def test_enter_saves_the_key_and_escape_cancels(browser, llm, shots, tmp_path):
    """As a user does it: the key typed and Enter pressed is the key saved (Save is the dialogs' default
    button); Escape cancels and saves nothing. The settings dialog behaves the same."""
    key = "enter is save"
    stored_key = "() => localStorage.getItem('levante.apiKey')"
    settings = "() => JSON.parse(localStorage.getItem('levante.settings') || '{}')"
    with live_server(llm, "tiny", api_key=key, webui=WebUI(store_path=tmp_path / "keyed.sqlite3")) as (base, _):
        tab = Tab(browser, base, shots)
        tab.expected_errors.append("401")
        page = tab.open(ready=False)
        page.wait_for_selector("#key-dialog[open]")
        page.fill("#key-form [name=key]", "wrong")
        page.press("#key-form [name=key]", "Enter")
        page.wait_for_selector("#key-dialog[open] >> text=refused the saved API key")  # it was saved, and tried
        assert page.evaluate(stored_key) == "wrong"
        page.fill("#key-form [name=key]", "never saved")
        page.keyboard.press("Escape")
        page.wait_for_selector("#banner.error >> text=No API key")
        assert not page.locator("#key-dialog").evaluate("node => node.open")
        assert page.evaluate(stored_key) == "wrong"
        page.click("#key-button")
        page.wait_for_selector("#key-dialog[open]")
        page.fill("#key-form [name=key]", key)
        page.press("#key-form [name=key]", "Enter")
        page.wait_for_selector("body[data-ready=true]")
        assert page.evaluate(stored_key) == key
        tab.shot("21-key-by-enter")
        page.click("#settings-button")
        page.fill("#settings-form [name=max_tokens]", "7")
        page.press("#settings-form [name=max_tokens]", "Enter")
        page.wait_for_selector("#settings", state="hidden")
        assert page.evaluate(settings)["max_tokens"] == "7"
        page.click("#settings-button")
        page.fill("#settings-form [name=max_tokens]", "9")
        page.keyboard.press("Escape")
        page.wait_for_selector("#settings", state="hidden")
        assert page.evaluate(settings)["max_tokens"] == "7"
        page.click("#settings-button")
        page.click("#settings-form .dialog-cancel")
        page.wait_for_selector("#settings", state="hidden")
        assert page.evaluate(settings)["max_tokens"] == "7"
        tab.check()
        tab.close()


def in_thread(coroutine):
    """Run `coroutine` to its end in a thread of its own (Playwright's sync API holds this thread's loop)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


@pytest.mark.slow
def test_mcp_calls_show_as_cards(browser, default_llm, shots, tmp_path):
    """The default model asks the real time server (the server runs the MCP loop); the page shows the
    call as a card with its arguments and result, and the answer that uses it."""
    from levante.mcp import McpConfig, McpToolManager
    from mcp_servers import time_server

    manager = McpToolManager(McpConfig.from_dict({"mcpServers": {"time": time_server()}}))
    in_thread(manager.start())
    model = "qwen2.5-coder:0.5b"
    try:
        with live_server(default_llm, model, mcp=manager,
                         webui=WebUI(store_path=tmp_path / "chats.sqlite3")) as (base, _):
            tab = Tab(browser, base, shots)
            page = tab.open()
            set_settings(page, temperature=0, max_tokens=100)
            send(page, "What time is it in Tokyo?")
            answer = wait_answer(page, timeout=600_000)
            card = answer.locator(".card.mcp").first
            assert "time_get_current_time" in card.locator("summary").inner_text()
            assert "time" in card.locator("summary").inner_text() and "done" in card.locator("summary").inner_text()
            card.locator("summary").click()
            tab.shot("21-mcp-card")
            arguments = json.loads(card.locator(".card-arguments").inner_text())
            assert arguments["timezone"] == "Asia/Tokyo"
            stamp = json.loads(card.locator(".card-result").inner_text())["datetime"]
            hour, minute = int(stamp[11:13]), stamp[14:16]
            assert re.search(rf"(?<!\d)0?{hour}:{minute}(?!\d)", answer.locator(".bubble").inner_text())
            saved = stored(base, conversation_id(page))["messages"][-1]
            assert saved["mcp_calls"][0]["name"] == "time_get_current_time"
            tab.check()
            tab.close()
    finally:
        manager.close()


@pytest.mark.slow
def test_a_wheel_carries_the_page_and_its_libraries(browser, tiny_model, shots, tmp_path):
    """Build the wheel (as pip does for `pip install .`), install it alone into a fresh virtual environment
    (its dependencies seen through a path file, offline), serve from there, and render markdown in Chromium."""
    import os
    import subprocess
    import sys
    import sysconfig
    import zipfile
    from pathlib import Path

    from live_server import free_port
    from levante.serve.webui import VENDOR

    repo = Path(__file__).resolve().parent.parent
    if not (VENDOR / "marked.esm.js").is_file() and not __import__("shutil").which("npm"):
        pytest.skip("neither built web libraries (make web) nor npm to build them")
    source = tmp_path / "source"
    tracked = subprocess.run(["git", "-C", str(repo), "ls-files", "pyproject.toml", "setup.py", "MANIFEST.in",
                              "README.md", "tools", "levante"], capture_output=True, text=True, check=True).stdout
    for name in tracked.split():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes((repo / name).read_bytes())
    if VENDOR.is_dir():
        __import__("shutil").copytree(VENDOR, source / "levante" / "web" / "vendor")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("levante-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"levante/web/static/index.html", "levante/web/vendor/marked.esm.js", "levante/web/vendor/purify.es.mjs",
            "levante/web/vendor/highlight.es.min.js", "levante/web/docs/index.html"} <= names
    fresh = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(fresh)], check=True)
    python = fresh / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, capture_output=True)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "test-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")  # after its own levante
    where = subprocess.run([str(python), "-c", "import levante; print(levante.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(site)), where
    port = free_port()
    env = {**os.environ, "LEVANTE_DATA_DIR": str(tmp_path / "data")}
    server = subprocess.Popen([str(python), "-m", "levante", "serve", "-m", str(tiny_model("qwen2")), "--port",
                               str(port), "--dtype", "float32", "--max-model-len", "512"],
                              cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while not any("ready" in line for line in lines):
            assert server.poll() is None, "".join(lines)
            lines.append(server.stderr.readline())
        tab = Tab(browser, f"http://127.0.0.1:{port}", shots)
        page = tab.open()
        markdown = "Some **bold** and `code`"
        set_settings(page, temperature=0, max_tokens=120,
                     extra=json.dumps({"grammar": {"type": "regex", "value": regex_literal(markdown)}}))
        send(page, "Say it in markdown.")
        bubble = wait_answer(page).locator(".bubble")
        assert bubble.locator("strong").inner_text() == "bold" and bubble.locator("code").inner_text() == "code"
        assert not page.locator("#plain-note").is_visible()
        tab.shot("22-from-the-wheel")
        tab.check()
        tab.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
