"""Chat templates render as transformers renders them, and a hostile template cannot escape."""
from __future__ import annotations

from pathlib import Path

import pytest
from tokenizer_refs import ours, transformers_tokenizer

from levante.errors import InvalidRequest, ModelLoadError
from levante.loader.chat_template import ChatTemplate

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Météo actuelle d'une ville — current weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Zürich"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
SIMPLE = [{"role": "user", "content": "Hello! Ça va?"}]
WITH_SYSTEM = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Write hello world in Python."},
    {"role": "assistant", "content": "print('hello world')"},
    {"role": "user", "content": "Now in 中文."},
]
TOOL_HISTORY = [
    {"role": "user", "content": "Weather in Paris and Tokyo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"id": "call_2", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "東京", "unit": "celsius"}'}},
    ]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    {"role": "tool", "tool_call_id": "call_2", "content": '{"temp": 18}'},
    {"role": "assistant", "content": "Paris 21°C, Tokyo 18°C."},
]
CASES = {
    "simple": (SIMPLE, None),
    "system": (WITH_SYSTEM, None),
    "tools": (SIMPLE, [WEATHER_TOOL]),
    "tool_history": (TOOL_HISTORY, [WEATHER_TOOL]),
}


def model_template(alias):
    tokenizer = ours(alias)
    return ChatTemplate(tokenizer.chat_template, tokenizer.bos_token or "", tokenizer.eos_token or "")


@pytest.mark.parametrize("alias", ["qwen2.5-coder:0.5b", "smollm2:135m"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_renders_like_transformers(alias, case, add_generation_prompt):
    messages, tools = CASES[case]
    if alias == "smollm2:135m" and case == "tool_history":
        messages = messages[:1] + messages[-1:]  # its template reads message['content'] of every message
    ours_text = model_template(alias).render(messages, tools=tools, add_generation_prompt=add_generation_prompt)
    reference = transformers_tokenizer(alias).apply_chat_template(
        messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert ours_text == reference


def test_qwen_tool_rendering_details():
    text = model_template("qwen2.5-coder:0.5b").render(TOOL_HISTORY, tools=[WEATHER_TOOL])
    assert '"description": "Météo actuelle' in text  # tojson keeps non-ASCII
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert "<|im_start|>user\n<tool_response>\n{\"temp\": 21}\n</tool_response>\n<tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")


HELPERS = (
    "{{ messages[0]['content'] | tojson }}|{{ {'k': ['é', 1]} | tojson(indent=2) }}|"
    "{{ bos_token }}{{ eos_token }}|{{ flag }}|{{ strftime_now('%Y') | length }}|"
    "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}|"
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}"
)


def test_helpers_match_transformers():
    reference = transformers_tokenizer("qwen2.5-coder:0.5b")
    messages = WITH_SYSTEM
    ours_text = ChatTemplate(HELPERS, "<|endoftext|>", "<|im_end|>").render(messages, flag="on")
    expected = reference.apply_chat_template(messages, chat_template=HELPERS, tokenize=False, flag="on")
    assert ours_text == expected
    assert '"You are terse."|{\n  "k": [\n    "é",' in ours_text


def test_fallback_is_chatml():
    text = ChatTemplate.fallback().render(WITH_SYSTEM[:2])
    assert text == ("<|im_start|>system\nYou are terse.<|im_end|>\n"
                    "<|im_start|>user\nWrite hello world in Python.<|im_end|>\n<|im_start|>assistant\n")
    assert not ChatTemplate.fallback().render(SIMPLE, add_generation_prompt=False).endswith("assistant\n")


def test_raise_exception_and_runtime_errors_are_invalid_requests():
    template = ChatTemplate(
        "{% if messages[0].role != 'user' %}{{ raise_exception('Roles must alternate\nuser/assistant') }}{% endif %}ok")
    assert template.render(SIMPLE) == "ok"
    with pytest.raises(InvalidRequest, match="Roles must alternate user/assistant$"):
        template.render(WITH_SYSTEM)
    with pytest.raises(InvalidRequest, match="chat template failed"):
        ChatTemplate("{{ messages[0]['content'] + 1 }}").render(SIMPLE)


def test_syntax_error_is_a_load_error():
    with pytest.raises(ModelLoadError, match="invalid chat template: TemplateSyntaxError"):
        ChatTemplate("{% for m in messages %}{{ m }}")


MALICIOUS = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('echo pwned > /tmp/levante_pwned') }}",
    "{{ joiner.__init__.__globals__['__builtins__']['__import__']('os').getcwd() }}",
    "{{ namespace.__init__.__globals__ }}",
    "{% set ns = namespace(__class__=1) %}{{ ns }}",
    "{{ messages.append({'role': 'user'}) }}",  # immutable sandbox: no mutation of inputs
    "{{ (messages|first).update({'role': 'x'}) }}",
]


@pytest.mark.parametrize("source", MALICIOUS)
def test_malicious_templates_are_refused(source):
    with pytest.raises(InvalidRequest, match="chat template failed: (SecurityError|UndefinedError)"):
        ChatTemplate(source).render([{"role": "user", "content": "hi"}])
    assert not Path("/tmp/levante_pwned").exists()


def test_unsafe_attribute_renders_as_undefined():
    """Printing an unsafe attribute yields an empty Undefined, as in transformers: nothing leaks."""
    assert ChatTemplate("[{{ raise_exception.__globals__ }}{{ bos_token.__class__ }}]").render(SIMPLE) == "[]"


def test_inputs_reach_the_template_as_plain_data():
    class Sneaky(str):
        def danger(self):
            raise AssertionError("called")

    template = ChatTemplate("{{ messages[0].content.danger() }}")
    with pytest.raises(InvalidRequest):
        template.render([{"role": "user", "content": Sneaky("hi")}])


# -- limits: a render that loops, grows or floods is stopped, and the next render works ----------------

LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"  # 10^10 steps
HOSTILE = {
    "loop": (LOOP, "took longer than"),
    "output flood": ("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
                     "took longer than|output passed"),
    "gigabyte string": ("{{ 'x' * (messages|length * 5000000000) }}", "memory"),
    "doubling": ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                 "{% endfor %}{{ ns.s|length }}", "memory|took longer than"),
    "wide filter": ("{{ 'x'|center(messages|length * 5000000000) }}", "memory"),
}


@pytest.fixture
def short_limits(monkeypatch):
    from levante.loader import template_worker

    monkeypatch.setattr(template_worker, "TIMEOUT_S", 1.0)
    monkeypatch.setattr(template_worker, "MAX_OUTPUT", 1 << 20)


@pytest.mark.parametrize("name", HOSTILE)
def test_runaway_templates_are_stopped(name, short_limits):
    source, message = HOSTILE[name]
    with pytest.raises(InvalidRequest, match=f"chat template failed: the chat template.*({message})"):
        ChatTemplate(source).render(SIMPLE)
    assert ChatTemplate.fallback().render(SIMPLE).startswith("<|im_start|>user")  # renders go on


def test_constant_bombs_never_run_in_this_process(short_limits):
    """Jinja folds constant expressions while compiling: compiling happens in a worker too, so
    neither loading nor rendering such a template grows this process."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for source in ["{{ 'x' * 3000000000 }}", "{{ 'x' * 900000000 }}", "{{ 'x'|center(3000000000) }}"]:
        with pytest.raises((ModelLoadError, InvalidRequest), match="the chat template (took longer|used more)"):
            ChatTemplate(source).render(SIMPLE)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 200_000  # KiB


@pytest.mark.parametrize("name", ["messages", "tools", "add_generation_prompt", "tokenize", "bos_token",
                                  "raise_exception", "namespace", "range", "documents", "_private"])
def test_request_kwargs_cannot_replace_reserved_names(name):
    template = ChatTemplate.fallback()
    with pytest.raises(InvalidRequest, match=f"chat_template_kwargs: {name} cannot be set by a request"):
        template.render(SIMPLE, template_kwargs={name: "x"})
    assert "thinking" in ChatTemplate("{{ enable_thinking }}").render(SIMPLE, template_kwargs={
        "enable_thinking": "thinking"})


def test_a_runaway_template_fails_its_request_and_the_server_lives(tiny_model, tmp_path, short_limits):
    import shutil

    import httpx

    from levante import LLM
    from live_server import live_server

    folder = tmp_path / "model"
    shutil.copytree(tiny_model("qwen2"), folder)
    (folder / "chat_template.jinja").write_text(
        "{% if messages[-1]['content'] == 'loop' %}" + LOOP + "{% endif %}"
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}<|assistant|>")
    llm = LLM(str(folder), dtype="float32", max_model_len=128)
    with live_server(llm, "tiny") as (base, _):
        def chat(content, **extra):
            return httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
                "model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": content}], **extra})

        failed = chat("loop")
        assert failed.status_code == 400 and "took longer than 1 s" in failed.json()["error"]["message"]
        reserved = chat("hi", chat_template_kwargs={"messages": []})
        assert reserved.status_code == 400 and "reserved" in reserved.json()["error"]["message"]
        assert chat("hi").status_code == 200
        assert httpx.get(f"{base}/health").json() == {"status": "ok"}
