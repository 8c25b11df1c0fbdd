"""`levante chat`: the conversation layer, the SQLite store, and the Textual app driven by its pilot.

Two kinds of server stand behind these tests, labelled per test:
- levante's own server (in-process, `LocalServer`) with a tiny random model: the real road, checked
  against `LLM.chat` greedy output;
- a scripted OpenAI-compatible endpoint (tests/scripted_openai.py) for UI behaviour that needs a
  given model answer: streaming held mid-answer, tool calls, errors. Tools are run by a real
  in-process provider (it computes), and what the app sends back is checked.
"""
from __future__ import annotations

import asyncio
import base64
import gc
import json
import logging
import threading
import time

import openai
import pytest

from levante.tui.app import ChatApp
from levante.tui.session import ChatSession, Settings, ToolResult, TurnEnd, TurnError
from levante.conversations import ConversationStore, data_dir
from levante.tui.widgets import AssistantMessage, LogNotice, Notice, ToolCallView, UserMessage
from scripted_openai import scripted_endpoint, text, tool_call


class Calculator:
    """A real tool provider: it does the arithmetic it is asked for."""

    def __init__(self):
        self.calls = []
        self.failures = {"broken-server": "could not start: no such command 'nope'"}

    def openai_tools(self):
        return [{"type": "function", "function": {
            "name": "multiply", "description": "Multiply two integers",
            "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                           "required": ["a", "b"]}}}]

    async def call_tool(self, name, arguments):
        self.calls.append((name, arguments))

        class Result:
            pass

        result = Result()
        if name != "multiply":
            result.content, result.is_error = f"unknown tool {name}", True
        else:
            result.content, result.is_error = str(arguments["a"] * arguments["b"]), False
        return result


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("LEVANTE_DATA_DIR", str(tmp_path / "data"))
    s = ConversationStore()
    yield s
    s.close()


def _session(base_url, model="scripted", tools=None, **settings):
    client = openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=60)
    return ChatSession(client, model, tools, Settings(**settings) if settings else Settings())


async def _until(pilot, predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


async def _type(pilot, text):
    app = pilot.app
    app.query_one("#prompt").value = text
    await pilot.press("enter")
    await pilot.pause()


def _answers(app):
    return [w.source for w in app.query(AssistantMessage)]


def _notices(app):
    """The app's own lines (command answers, errors); logged lines arrive on a timer, see `_logged`."""
    return [w.text for w in app.query(Notice) if not isinstance(w, LogNotice)]


def _logged(app):
    return [w.text for w in app.query(LogNotice)]


@pytest.fixture(autouse=True)
def _no_stale_clients():
    """An unclosed `AsyncOpenAI` from an earlier test (this file's or another's) schedules its own close
    on whatever loop runs when it is collected, and that loop's log then shows the failure: collect
    such garbage here, outside any loop, where the client's `__del__` does nothing."""
    gc.collect()
    yield
    gc.collect()


# --- store ------------------------------------------------------------------------------------------

def test_store_location(tmp_path, monkeypatch):
    monkeypatch.delenv("LEVANTE_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert data_dir() == tmp_path / "xdg" / "levante"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_dir() == tmp_path / "home" / ".local" / "share" / "levante"
    monkeypatch.setenv("LEVANTE_DATA_DIR", str(tmp_path / "mine"))
    assert data_dir() == tmp_path / "mine"


def test_store_saves_lists_and_loads(store, tmp_path):
    assert store.path.parent == tmp_path / "data"
    a = store.create("m1")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "first question " * 10},
                {"role": "assistant", "content": None,
                 "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "42"}]
    store.save(a, messages)
    b = store.create("m2")
    assert [c.id for c in store.list()] == [a]  # an empty conversation is not listed
    store.save(b, [{"role": "user", "content": [{"type": "text", "text": "look"},
                                                {"type": "image_url", "image_url": {"url": "data:,"}}]}])
    rows = store.list()
    assert [c.id for c in rows] == [b, a]
    assert rows[0].title == "look" and rows[1].messages == 4 and rows[1].model == "m1"
    assert rows[1].title.startswith("first question") and len(rows[1].title) <= 60
    assert store.load(a) == messages
    again = ConversationStore()  # another process sees the same file
    assert again.load(b)[0]["content"][0]["text"] == "look"
    again.close()
    from levante.errors import ConversationNotFound

    with pytest.raises(ConversationNotFound, match="no conversation 999"):
        store.load(999)


# --- the conversation layer (scripted endpoint, real tool provider) --------------------------------------

def test_tool_loop_runs_tools_and_sends_results_back():
    async def run(base_url, endpoint):
        tools = Calculator()
        session = _session(base_url, tools=tools, temperature=0.0)
        session.set_system("You are terse.")
        endpoint.scripts = [
            [text("Let me compute."), tool_call(0, "call_a", "multiply", '{"a": 6, "b": 7}'),
             tool_call(1, "call_b", "multiply", '{"a": 12, "b": 12}')],
            [text("6×7 is "), text("42 and 12² is 144.")],
        ]
        events = [e async for e in session.send("what is 6*7 and 12*12?")]
        return session, tools, events

    with scripted_endpoint() as (base_url, endpoint):
        session, tools, events = asyncio.run(run(base_url, endpoint))
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["TextDelta", "TurnEnd", "ToolCall", "ToolResult", "ToolCall", "ToolResult",
                     "TextDelta", "TextDelta", "TurnEnd"]
    assert tools.calls == [("multiply", {"a": 6, "b": 7}), ("multiply", {"a": 12, "b": 12})]
    results = [e for e in events if isinstance(e, ToolResult)]
    assert [(r.id, r.content, r.is_error) for r in results] == [("call_a", "42", False), ("call_b", "144", False)]
    first, second = endpoint.requests
    assert first["tools"] == tools.openai_tools() and first["stream"] and first["temperature"] == 0.0
    assert first["messages"] == [{"role": "system", "content": "You are terse."},
                                 {"role": "user", "content": "what is 6*7 and 12*12?"}]
    assistant, tool_a, tool_b = second["messages"][2:]
    assert assistant["content"] == "Let me compute."
    assert [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in assistant["tool_calls"]] == [("call_a", "multiply", {"a": 6, "b": 7}),
                                                  ("call_b", "multiply", {"a": 12, "b": 12})]
    assert tool_a == {"role": "tool", "tool_call_id": "call_a", "content": "42"}
    assert tool_b == {"role": "tool", "tool_call_id": "call_b", "content": "144"}
    assert session.messages[-1] == {"role": "assistant", "content": "6×7 is 42 and 12² is 144."}
    assert events[-1].completion_tokens == 2


def test_tool_loop_bad_arguments_and_bounded_rounds():
    async def run(base_url, endpoint):
        tools = Calculator()
        session = _session(base_url, tools=tools)
        session.max_tool_rounds = 2
        endpoint.scripts = [[tool_call(0, "c1", "multiply", '{"a": 6,')],
                            [tool_call(0, "c2", "divide", '{"a": 1}')],
                            [tool_call(0, "c3", "multiply", '{"a": 2, "b": 3}')],  # ignores tool_choice none
                            [text("fine")]]
        events = [e async for e in session.send("go")]
        return tools, session, events, [e async for e in session.send("next")]

    with scripted_endpoint() as (base_url, endpoint):
        tools, session, events, after = asyncio.run(run(base_url, endpoint))
    results = [e for e in events if isinstance(e, ToolResult)]
    assert results[0].is_error and "not valid JSON" in results[0].content
    assert results[1].is_error and "unknown tool divide" in results[1].content
    assert len(results) == 2 and tools.calls == [("divide", {"a": 1})]
    assert isinstance(events[-1], TurnError) and "after 2 rounds" in events[-1].message
    assert [r.get("tool_choice") for r in endpoint.requests[:3]] == [None, None, "none"]
    # the unanswered call is not left in the history, so the next turn's request is valid
    assert "tool_calls" not in endpoint.requests[3]["messages"][-2] and [type(e) for e in after][-1] is TurnEnd


def test_tool_loop_repeated_call_asks_for_an_answer():
    async def run(base_url, endpoint):
        session = _session(base_url, tools=Calculator())
        endpoint.scripts = [[tool_call(0, "c1", "multiply", '{"a": 2, "b": 3}')],
                            [tool_call(0, "c2", "multiply", '{"a":2,"b":3}')],
                            [text("6")]]
        return [e async for e in session.send("2*3")]

    with scripted_endpoint() as (base_url, endpoint):
        events = asyncio.run(run(base_url, endpoint))
    assert [r.get("tool_choice") for r in endpoint.requests] == [None, None, "none"]
    assert isinstance(events[-1], TurnEnd) and sum(isinstance(e, ToolResult) for e in events) == 2


def test_stopping_during_a_tool_call_keeps_the_history_valid():
    """Scripted endpoint asks for two tools; the first hangs and the turn is cancelled (Ctrl+C in the app)."""
    class SlowTools(Calculator):
        async def call_tool(self, name, arguments):
            await asyncio.sleep(60)

    async def run(base_url, endpoint):
        session = _session(base_url, tools=SlowTools())
        endpoint.scripts = [[tool_call(0, "c1", "multiply", '{"a": 1, "b": 2}'),
                             tool_call(1, "c2", "multiply", '{"a": 3, "b": 4}')]]

        async def consume():
            async for _ in session.send("go"):
                pass

        task = asyncio.create_task(consume())
        while len(session.messages) < 2:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return session.messages

    with scripted_endpoint() as (base_url, endpoint):
        messages = asyncio.run(run(base_url, endpoint))
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool"]
    assert [(m["tool_call_id"], m["content"]) for m in messages[2:]] == [("c1", "error: stopped by the user"),
                                                                        ("c2", "error: stopped by the user")]


def test_server_error_is_reported_and_the_turn_not_kept():
    async def run(base_url, endpoint):
        session = _session(base_url)
        endpoint.error = (400, "this model does not accept images")
        events = [e async for e in session.send("hi")]
        return session, events

    with scripted_endpoint() as (base_url, endpoint):
        session, events = asyncio.run(run(base_url, endpoint))
    assert [type(e) for e in events] == [TurnError]
    assert events[0].message == "this model does not accept images (HTTP 400)"
    assert session.messages == []


def test_unreachable_server_is_an_error_event():
    from live_server import free_port

    async def run():
        session = _session(f"http://127.0.0.1:{free_port()}/v1")
        return [e async for e in session.send("hi")], session.messages

    events, messages = asyncio.run(run())
    assert [type(e) for e in events] == [TurnError] and "cannot reach http://127.0.0.1:" in events[0].message
    assert messages == []


# --- the app, through Textual's pilot ----------------------------------------------------------------

def test_pilot_streams_an_answer_and_saves_it(store):
    """Scripted endpoint: the stream holds mid-answer so the test sees the partial text on screen."""
    async def run(base_url, endpoint):
        release = threading.Event()
        endpoint.scripts = [[text("Here is "), text("`code`:\n\n"), release,
                             text("```python\nprint('hi')\n```\n")]]
        app = ChatApp(_session(base_url), store)
        async with app.run_test() as pilot:
            await _type(pilot, "show me code")
            await _until(pilot, lambda: _answers(app) == ["Here is `code`:\n\n"], what="the first half")
            assert app.generating
            release.set()
            await _until(pilot, lambda: not app.generating, what="the end")
            assert _answers(app) == ["Here is `code`:\n\n```python\nprint('hi')\n```\n"]
            assert [w.text for w in app.query(UserMessage)] == ["show me code"]
            # markdown rendered: a fenced code block widget with the code, highlighted as python
            from textual.widgets._markdown import MarkdownFence

            fences = list(app.query(MarkdownFence))
            assert len(fences) == 1 and fences[0].lexer == "python" and "print('hi')" in fences[0].code
            return app.conversation_id

    with scripted_endpoint() as (base_url, endpoint):
        conversation = asyncio.run(run(base_url, endpoint))
    assert store.load(conversation) == [
        {"role": "user", "content": "show me code"},
        {"role": "assistant", "content": "Here is `code`:\n\n```python\nprint('hi')\n```\n"}]


def test_pilot_shows_tool_calls_collapsed_with_results(store):
    """Scripted endpoint asks for a tool; the real Calculator answers; the app shows both, collapsed."""
    async def run(base_url, endpoint):
        endpoint.scripts = [[tool_call(0, "call_x", "multiply", '{"a": 19, "b": 23}')],
                            [text("19 × 23 = 437")]]
        app = ChatApp(_session(base_url, tools=Calculator()), store)
        async with app.run_test() as pilot:
            await _type(pilot, "19*23?")
            await _until(pilot, lambda: not app.generating and _answers(app), what="the answer")
            (view,) = app.query(ToolCallView)
            assert view.collapsed and view.tool_name == "multiply" and view.result == "437" and not view.is_error
            assert view.title.startswith("tool multiply(") and view.title.endswith("✓")
            assert _answers(app) == ["19 × 23 = 437"]
            await _type(pilot, "/tools")
            assert "multiply: Multiply two integers" in _notices(app)[-1]
            assert "failed server broken-server: could not start" in _notices(app)[-1]
            return app.conversation_id

    with scripted_endpoint() as (base_url, endpoint):
        conversation = asyncio.run(run(base_url, endpoint))
    assert endpoint.requests[1]["messages"][-1] == {"role": "tool", "tool_call_id": "call_x", "content": "437"}
    assert [m["role"] for m in store.load(conversation)] == ["user", "assistant", "tool", "assistant"]


def test_pilot_ctrl_c_stops_without_quitting(store):
    """Scripted endpoint holds the stream as a slow model would; Ctrl+C closes it, the app carries on."""
    async def run(base_url, endpoint):
        never = threading.Event()
        endpoint.scripts = [[text("I will talk "), text("forever"), never], [text("ok")]]
        app = ChatApp(_session(base_url), store)
        async with app.run_test() as pilot:
            await _type(pilot, "talk")
            await _until(pilot, lambda: _answers(app) == ["I will talk forever"], what="the partial answer")
            await pilot.press("ctrl+c")
            await _until(pilot, lambda: not app.generating, what="the stop")
            assert app.is_running and "[stopped]" in _notices(app)
            await _until(pilot, lambda: endpoint.disconnects == 1, what="the server seeing the disconnect")
            await pilot.press("ctrl+c")  # nothing to stop: still running
            assert app.is_running
            await _type(pilot, "again")
            await _until(pilot, lambda: not app.generating and len(_answers(app)) == 2, what="the next answer")
            assert _answers(app)[1] == "ok"
            never.set()
            messages = app.session.messages
            await pilot.press("ctrl+q")
            return messages

    with scripted_endpoint() as (base_url, endpoint):
        messages = asyncio.run(run(base_url, endpoint))
    assert messages == [{"role": "user", "content": "talk"},
                        {"role": "assistant", "content": "I will talk forever"},
                        {"role": "user", "content": "again"}, {"role": "assistant", "content": "ok"}]
    assert endpoint.requests[1]["messages"] == messages[:3]


def test_pilot_history_resume_and_commands(store, tmp_path):
    """Scripted endpoint: slash commands change what is sent; a saved conversation is listed and resumed."""
    async def first(base_url, endpoint):
        endpoint.scripts = [[text("Paris.")]]
        app = ChatApp(_session(base_url), store)
        async with app.run_test() as pilot:
            await _type(pilot, "/system Answer in one word.")
            await _type(pilot, "/temperature 0.2")
            await _type(pilot, "/temperature hot")
            assert "not a number" in _notices(app)[-1]
            await _type(pilot, "/max_tokens 0")
            assert "max_tokens must be between 1" in _notices(app)[-1]
            await _type(pilot, "Capital of France?")
            await _until(pilot, lambda: not app.generating and _answers(app), what="the answer")
            await _type(pilot, "/model")
            assert "scripted (owned by scripted, max_model_len 1234)" in _notices(app)[-1]
            assert '"temperature": 0.2' in _notices(app)[-1]
            await _type(pilot, "/bogus")
            assert "unknown command /bogus" in _notices(app)[-1]
            prompt = app.query_one("#prompt")
            await pilot.press("up", "up")
            assert prompt.value == "/model"
            await pilot.press("down", "down")
            assert prompt.value == ""
            return app.conversation_id

    async def second(base_url, endpoint, conversation):
        endpoint.scripts = [[text("Berlin.")], [text("Madrid.")]]
        app = ChatApp(_session(base_url), store)
        async with app.run_test() as pilot:
            await _type(pilot, "/history")
            assert f"{conversation:>4}" in _notices(app)[-1] and "Capital of France?" in _notices(app)[-1]
            await _type(pilot, f"/load {conversation}")
            assert app.conversation_id == conversation
            assert [w.text for w in app.query(UserMessage)] == ["Capital of France?"]
            assert _answers(app) == ["Paris."]
            assert "system: Answer in one word." in _notices(app)
            await _type(pilot, "And of Germany?")
            await _until(pilot, lambda: not app.generating and len(_answers(app)) == 2, what="the answer")
            await _type(pilot, "/new")
            assert app.conversation_id is None and not _answers(app)
            await _type(pilot, "And of Spain?")
            await _until(pilot, lambda: not app.generating and _answers(app), what="the answer")
            await _type(pilot, "/load 12345")
            assert "no conversation 12345" in _notices(app)[-1]
            return app.conversation_id

    with scripted_endpoint() as (base_url, endpoint):
        conversation = asyncio.run(first(base_url, endpoint))
        request = endpoint.requests[0]
        assert request["temperature"] == 0.2
        assert request["messages"] == [{"role": "system", "content": "Answer in one word."},
                                       {"role": "user", "content": "Capital of France?"}]
        newer = asyncio.run(second(base_url, endpoint, conversation))
    resumed, fresh = endpoint.requests[1:]
    assert [m["content"] for m in resumed["messages"]] == ["Answer in one word.", "Capital of France?", "Paris.",
                                                           "And of Germany?"]
    assert [m["content"] for m in fresh["messages"]] == ["Answer in one word.", "And of Spain?"]
    assert len(store.load(conversation)) == 5 and newer != conversation
    assert [c.id for c in store.list()] == [newer, conversation]



def test_pilot_shows_logged_warnings_apart_and_closes_its_client(store):
    """A warning logged by any thread shows as a log line, never in place of a command's answer; on exit
    the app closes its HTTP client inside its own loop (none left for a later loop to collect)."""
    async def run(base_url):
        app = ChatApp(_session(base_url), store)
        async with app.run_test() as pilot:
            threading.Thread(target=lambda: logging.getLogger("levante.test").warning("a server went away")).start()
            await _until(pilot, lambda: _logged(app), what="the logged line")
            await _type(pilot, "/bogus")
            assert "unknown command /bogus" in _notices(app)[-1]
            logged = _logged(app)
        return app.session.client, logged

    with scripted_endpoint() as (base_url, endpoint):
        client, logged = asyncio.run(run(base_url))
    assert logged == ["warning: a server went away"]
    assert client.is_closed()


PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4DwABBAEAwS2OUAAAAABJRU5ErkJggg==")


def test_pilot_image_is_sent_as_a_data_url_and_errors_shown(store, tmp_path):
    """Scripted endpoint answering 400 as a text-only server would: the error is shown, the turn not kept."""
    (tmp_path / "dot.png").write_bytes(PNG)
    (tmp_path / "notes.txt").write_text("hello")

    async def run(base_url, endpoint):
        endpoint.error = (400, "'scripted' is a text-only model: it does not accept image input")
        app = ChatApp(_session(base_url), store)
        async with app.run_test() as pilot:
            await _type(pilot, f"/image {tmp_path / 'missing.png'}")
            assert "no image at" in _notices(app)[-1]
            await _type(pilot, f"/image {tmp_path / 'notes.txt'}")
            assert "does not look like an image" in _notices(app)[-1]
            await _type(pilot, "/image https://example.com/cat.png")
            assert app.pending_images[-1] == {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
            app.pending_images.clear()
            await _type(pilot, f"/image {tmp_path / 'dot.png'}")
            assert app.pending_images
            await _type(pilot, "what is in this picture?")
            await _until(pilot, lambda: not app.generating, what="the error")
            assert "error: 'scripted' is a text-only model: it does not accept image input (HTTP 400)" \
                in _notices(app)
            assert "[1 image]" in str(app.query(UserMessage).first().render())
            return app.session.messages, app.pending_images

    with scripted_endpoint() as (base_url, endpoint):
        messages, pending = asyncio.run(run(base_url, endpoint))
    content = endpoint.requests[0]["messages"][0]["content"]
    assert content == [{"type": "text", "text": "what is in this picture?"},
                       {"type": "image_url", "image_url": {"url": "data:image/png;base64," +
                                                          base64.b64encode(PNG).decode()}}]
    assert messages == [] and pending == []


# --- the real road: levante's server in-process with a tiny random model ---------------------------------

def test_pilot_local_engine_matches_llm_chat(store, tiny_model, tmp_path):
    """LocalServer + the app + a tiny random llama: the streamed answer equals `LLM.chat` at temperature 0."""
    from levante import LLM, SamplingParams
    from levante.tui.local import LocalServer

    llm = LLM(str(tiny_model("llama")), dtype="float32", max_model_len=256, kv_cache_gb=0.05, warmup=False)
    question = [{"role": "user", "content": "hello there"}]
    expected = llm.chat(question, SamplingParams(temperature=0.0, max_tokens=12))[0].outputs[0].text

    async def run(server):
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0, timeout=60)
        session = ChatSession(client, "tiny", None, Settings(temperature=0.0, max_tokens=12))
        app = ChatApp(session, store)
        async with app.run_test() as pilot:
            await _type(pilot, "hello there")
            await _until(pilot, lambda: not app.generating, what="the answer")
            await _type(pilot, "/model")
            model_info = _notices(app)[-1]
            # an image to this text-only model: the server's own error, shown as it is, the turn not kept
            await _type(pilot, f"/image {image}")
            await _type(pilot, "what is this?")
            await _until(pilot, lambda: not app.generating, what="the error")
            return session.messages, model_info, _notices(app)[-1]

    image = tmp_path / "dot.png"
    image.write_bytes(PNG)
    with LocalServer(llm, "tiny") as server:
        messages, model_info, error = asyncio.run(run(server))
        client = openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0)
        with pytest.raises(openai.BadRequestError) as direct:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(PNG).decode()}}]}])
        bad_key = openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad_key.models.list()
    assert messages == [*question, {"role": "assistant", "content": expected}]
    assert "tiny (owned by levante, status loaded, type chat, max_model_len 256, input_modalities text)" in model_info
    assert error == f"error: {direct.value.body['message']} (HTTP 400)"


def test_pilot_ctrl_c_aborts_the_request_in_the_local_engine(store, tiny_model):
    """LocalServer + tiny random llama: Ctrl+C mid-answer closes the stream, the engine aborts the request."""
    from levante import LLM
    from levante.tui.local import LocalServer

    llm = LLM(str(tiny_model("llama")), dtype="float32", max_model_len=4096, kv_cache_gb=0.05, warmup=False)
    aborted, abort = [], llm.engine.abort_request
    llm.engine.abort_request = lambda request_id: (aborted.append(request_id), abort(request_id))

    async def run(server):
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0, timeout=60)
        settings = Settings(temperature=0.0, max_tokens=4000, extra={"min_tokens": 4000})  # a long answer
        session = ChatSession(client, "tiny", None, settings)
        app = ChatApp(session, store)
        async with app.run_test() as pilot:
            await _type(pilot, "hello there")
            await _until(pilot, lambda: _answers(app) and len(_answers(app)[0]) > 0, what="the first tokens")
            assert llm.engine.has_unfinished_requests()
            await pilot.press("ctrl+c")
            await _until(pilot, lambda: not app.generating, what="the stop")
            await _until(pilot, lambda: not llm.engine.has_unfinished_requests(), 10, "the engine to drop it")
            assert app.is_running and "[stopped]" in _notices(app)
            return session.messages

    with LocalServer(llm, "tiny") as server:
        messages = asyncio.run(run(server))
    assert len(aborted) == 1  # the server saw the client go and aborted the request (its KV blocks freed)
    assert messages[-1]["role"] == "assistant" and messages[-1]["content"]
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


# --- the command line ----------------------------------------------------------------------------------

def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys):
    """In-process `levante.cli.main` (tests/test_cli.py checks the subprocess road for other commands)."""
    from levante.cli import main

    monkeypatch.setenv("LEVANTE_DATA_DIR", str(tmp_path))
    cases = [(["--url", "notaurl"], "--url must be an http(s) URL"),
             (["--url", "http://127.0.0.1:1"], "cannot reach http://127.0.0.1:1/v1"),
             (["--resume", "99"], "no conversation 99"),
             (["--url", "http://127.0.0.1:1", "--mcp-config", str(tmp_path / "none.json")], "none.json")]
    for args, needle in cases:
        assert main(["chat", *args]) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("levante: error: ") and needle in lines[0], lines
