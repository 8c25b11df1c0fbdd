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
