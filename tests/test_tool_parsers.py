"""Tool call parsing per model family, streamed and whole; grammars that force calls (tool calls in
history: tests/test_chat_prompt.py)."""
from __future__ import annotations

import functools
import json
import random
import re

import pytest
from tokenizer_refs import ours

from levante.errors import InvalidRequest
from levante.loader.chat_template import ChatTemplate
from levante.serve.tool_parsers import (
    FAMILIES, Delta, ToolCall, ToolParser, collect, family_for, parser_for, tool_call_grammar,
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time",
    "parameters": {"type": "object", "properties": {"zone": {"type": "integer"}}, "required": ["zone"],
                   "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
PARIS = '{"city": "Paris"}'
TOKYO = '{"city": "東京", "unit": "celsius"}'

# What qwen2.5-coder:0.5b answers to "What's the weather in Paris?" with get_weather offered.
QWEN_CODER_REPLY = ('```json\n{\n  "name": "get_weather",\n  "arguments": {\n    "city": "Paris",\n'
                    '    "unit": "celsius"\n  }\n}\n```')

# family, reply, expected content, expected [(name, arguments)]
CASES = {
    "hermes_one": ("hermes", f'<tool_call>\n{{"name": "get_weather", "arguments": {PARIS}}}\n</tool_call>',
                   None, [("get_weather", PARIS)]),
    "hermes_parallel_with_content": (
        "hermes",
        f'Let me check both.\n\n<tool_call>\n{{"name": "get_weather", "arguments": {PARIS}}}\n</tool_call>\n'
        f'<tool_call>\n{{"name": "get_weather", "arguments": {TOKYO}}}\n</tool_call>\n',
        "Let me check both.", [("get_weather", PARIS), ("get_weather", TOKYO)]),
    "hermes_arguments_first": (
        "hermes", '<tool_call>\n{"arguments": {"zone": 2}, "name": "get_time"}\n</tool_call>',
        None, [("get_time", '{"zone": 2}')]),
    "hermes_unclosed_at_end": ("hermes", '<tool_call>\n{"name": "get_time", "arguments": {"zone": 1}}',
                               None, [("get_time", '{"zone": 1}')]),
    "hermes_no_arguments": ("hermes", '<tool_call>\n{"name": "get_time"}\n</tool_call>', None, [("get_time", "{}")]),
    "hermes_quoted_arguments": (
        "hermes", '<tool_call>\n{"name": "get_time", "arguments": "{\\"zone\\": 3}"}\n</tool_call>',
        None, [("get_time", '{"zone": 3}')]),
    "qwen_coder_fenced": ("qwen", QWEN_CODER_REPLY, None,
                          [("get_weather", '{\n    "city": "Paris",\n    "unit": "celsius"\n  }')]),
    "qwen_coder_bare": ("qwen", f'{{"name": "get_weather", "arguments": {PARIS}}}', None, [("get_weather", PARIS)]),
    "qwen_coder_list": (
        "qwen", f'[{{"name": "get_weather", "arguments": {PARIS}}}, {{"name": "get_time", "arguments": {{"zone": 9}}}}]',
        None, [("get_weather", PARIS), ("get_time", '{"zone": 9}')]),
    "qwen_coder_fence_after_text": (
        "qwen", f'I will call the tool.\n```json\n{{"name": "get_weather", "arguments": {PARIS}}}\n```\nDone.',
        "I will call the tool.\nDone.", [("get_weather", PARIS)]),
    "llama_json": ("llama", f'{{"name": "get_weather", "parameters": {PARIS}}}', None, [("get_weather", PARIS)]),
    "llama_python_tag_several": (
        "llama", f'<|python_tag|>{{"name": "get_weather", "parameters": {PARIS}}}; '
                 f'{{"name": "get_weather", "parameters": {TOKYO}}}',
        None, [("get_weather", PARIS), ("get_weather", TOKYO)]),
    "mistral_list": (
        "mistral", f'[TOOL_CALLS][{{"name": "get_weather", "arguments": {PARIS}}}, '
                   f'{{"name": "get_time", "arguments": {{"zone": 1}}}}]',
        None, [("get_weather", PARIS), ("get_time", '{"zone": 1}')]),
    "mistral_v11": (
        "mistral", f'[TOOL_CALLS]get_weather[ARGS]{PARIS}[TOOL_CALLS]get_time[CALL_ID]a1b2c3d4e[ARGS]{{"zone": 5}}',
        None, [("get_weather", PARIS), ("get_time", '{"zone": 5}')]),
    "gemma_tool_code": (
        "gemma", 'I will look.\n```tool_code\nget_weather(city="Paris", unit="celsius")\nget_time(zone=-2)\n```',
        "I will look.", [("get_weather", '{"city": "Paris", "unit": "celsius"}'), ("get_time", '{"zone": -2}')]),
    "gemma_tool_code_list": ("gemma", '```tool_code\n[default_api.get_time(zone=1), get_weather(city="Oslo")]\n```',
                             None, [("get_time", '{"zone": 1}'), ("get_weather", '{"city": "Oslo"}')]),
    "gemma_json": ("gemma", f'{{"name": "get_weather", "parameters": {PARIS}}}', None, [("get_weather", PARIS)]),
}

# Replies that are content, whole: (family, reply)
CONTENT = {
    "plain": ("hermes", "Paris is sunny today.\n"),
    "partial_marker": ("hermes", "a <tool_c b"),
    "marker_at_end": ("hermes", "look: <tool_"),
    "malformed_json": ("hermes", "Here: <tool_call>\nnot json\n</tool_call> ok"),
    "malformed_nesting": ("hermes", '<tool_call>\n{"name": "get_time", "arguments": {"zone": 1]}\n</tool_call>'),
    # issue 28: JSONDecodeError ("Expecting ':' delimiter") escaped the parser as a 500
    "bare_json_arguments_not_json": ("qwen", 'Files:\n{"name": "get_time", "arguments": {"zone" 1}}'),
    "bare_json_call_not_json": ("qwen", '{"name": "get_time", "arguments": {"zone" 1}}'),
    "hermes_bad_escape": ("hermes", '<tool_call>\n{"name": "get\\qtime", "arguments": {}}\n</tool_call>'),
    "hermes_name_not_text": ("hermes", '<tool_call>\n{"name": {"a" 1}, "arguments": {}}\n</tool_call>'),
    "hermes_lone_surrogate_name": ("hermes", '<tool_call>\n{"name": "\\ud800", "arguments": {}}\n</tool_call>'),
    "hermes_deep_arguments": ("hermes", '<tool_call>\n{"name": "get_time", "arguments": {"a": '
                              + "[" * 100000 + "]" * 100000 + "}}\n</tool_call>"),
    "gemma_infinity": ("gemma", "```tool_code\nget_time(zone=1e999)\n```"),
    "bare_json_unknown_name": ("qwen", '{"name": "Bob", "arguments": {"age": 3}}'),
    "bare_json_user_object": ("qwen", '{"city": "Paris", "population": 2100000}'),
    "fenced_user_json": ("qwen", '```json\n{"name": "levante", "version": "0.1"}\n```'),
    "json_list_of_numbers": ("qwen", "[1, 2, 3] are numbers"),
    "code_fence": ("qwen", "```python\nprint({'name': 1})\n```"),
    "llama_prose": ("llama", "The answer is {x}."),
    "mistral_broken": ("mistral", "[TOOL_CALLS] oops {"),
    "gemma_code": ("gemma", "```tool_code\nimport os\nos.remove('x')\n```"),
    "gemma_not_literal": ("gemma", '```tool_code\nget_weather(city=__import__("os").getcwd())\n```'),
    "gemma_positional": ("gemma", '```tool_code\nget_weather("Paris")\n```'),
}


def summary(result):
    content, calls = result
    return content, [(call.name, call.arguments) for call in calls]


def streamed(parser: ToolParser, text: str, seed: int) -> list[Delta]:
    rng = random.Random(seed)
    stream, deltas, i = parser.stream(), [], 0
    while i < len(text):
        size = rng.randint(1, 7)
        deltas += stream.feed(text[i:i + size])
        i += size
    return deltas + stream.finish()


@pytest.mark.parametrize("case", CASES)
def test_parse(case):
    family, text, content, calls = CASES[case]
    result = ToolParser(family, TOOLS).parse(text)
    assert summary(result) == (content, calls)
    for call in result[1]:
        assert isinstance(json.loads(call.arguments), dict)
        assert re.fullmatch(r"[A-Za-z0-9]{9}" if family == "mistral" else r"call_[0-9a-f]{24}", call.id)
    assert len({call.id for call in result[1]}) == len(result[1])


@pytest.mark.parametrize("case", CONTENT)
def test_not_a_call_stays_content(case):
    family, text = CONTENT[case]
    assert summary(ToolParser(family, TOOLS).parse(text)) == (text, [])


def test_bare_json_needs_offered_tools():
    assert summary(ToolParser("qwen").parse(QWEN_CODER_REPLY)) == (QWEN_CODER_REPLY, [])
    assert summary(ToolParser("qwen", [TIME]).parse(QWEN_CODER_REPLY)) == (QWEN_CODER_REPLY, [])


# A stream cannot take back a call it has begun to send; `parse` sees the whole reply at once.
STREAM_DIFFERS = {"malformed_nesting", "bare_json_call_not_json", "hermes_deep_arguments"}


@pytest.mark.parametrize("case", [*CASES, *(case for case in CONTENT if case not in STREAM_DIFFERS)])
def test_stream_reassembles_to_parse(case):
    family, text = (CASES[case][:2] if case in CASES else CONTENT[case])
    parser = ToolParser(family, TOOLS)
    expected = summary(parser.parse(text))
    for seed in range(8):
        assert summary(collect(streamed(parser, text, seed))) == expected, seed


def test_stream_delta_shape():
    family, text, _, calls = CASES["hermes_parallel_with_content"]
    deltas = streamed(ToolParser(family, TOOLS), text, seed=3)
    first_call = next(i for i, delta in enumerate(deltas) if delta.tool_call is not None)
    assert "".join(delta.content for delta in deltas[:first_call]) == "Let me check both."
    opened = {}
    for delta in deltas[first_call:]:
        call = delta.tool_call
        assert delta.content is None and call is not None
        if call["index"] not in opened:
            assert set(call) == {"index", "id", "type", "function"} and call["type"] == "function"
            assert call["function"] == {"name": "get_weather", "arguments": ""}
            opened[call["index"]] = call["id"]
        else:
            assert set(call) == {"index", "function"} and set(call["function"]) == {"arguments"}
    assert list(opened) == [0, 1]
    fragments = [d.tool_call["function"]["arguments"] for d in deltas[first_call:] if d.tool_call["index"] == 0]
    assert len([f for f in fragments if f]) > 1  # the arguments stream, not arrive at the end
    assert "".join(fragments) == PARIS


def test_stream_holds_back_a_possible_marker():
    stream = ToolParser("hermes", TOOLS).stream()
    assert stream.feed("Hi <tool_c") == [Delta(content="Hi")]
    assert stream.feed("ool") == [Delta(content=" <tool_cool")]
    assert stream.feed(" and <tool_") == [Delta(content=" and")]
    assert stream.finish() == [Delta(content=" <tool_")]


def test_stream_holds_back_a_leading_json_until_its_name():
    stream = ToolParser("qwen", TOOLS).stream()
    assert stream.feed('```json\n{\n  "name": "get_wea') == []
    first = stream.feed('ther",\n  "arguments": {"ci')
    assert first[0].tool_call["function"]["name"] == "get_weather"
    assert first[1].tool_call["function"]["arguments"] == '{"ci'
    user_json = ToolParser("qwen", TOOLS).stream()
    assert user_json.feed('{"name": "Bob"') == [Delta(content='{"name": "Bob"')]  # known not a call


@pytest.mark.parametrize("text, sent_arguments", [
    ('<tool_call>\n{"name": "get_time", "arguments": {"zone": 1', '{"zone": 1'),  # cut off by max_tokens
    (CONTENT["malformed_nesting"][1], '{"zone": 1'),
])
def test_call_that_breaks_after_it_began_streaming(text, sent_arguments):
    """The stream already sent the call's start and cannot take it back; parse keeps the text."""
    parser = ToolParser("hermes", TOOLS)
    assert summary(parser.parse(text)) == (text, [])
    content, calls = collect(streamed(parser, text, seed=0))
    assert content is None and [(c.name, c.arguments) for c in calls] == [("get_time", sent_arguments)]


def test_tool_call_openai_shape():
    call = ToolCall("call_" + "0" * 24, "get_time", '{"zone": 1}')
    assert call.to_openai() == {"id": call.id, "type": "function",
                                "function": {"name": "get_time", "arguments": '{"zone": 1}'}}


def test_family_for():
    assert family_for(ours("qwen2.5-coder:0.5b").chat_template) == "hermes"
    assert family_for("{{ '[TOOL_CALLS]' }}") == "mistral"
    assert family_for("{{ '<|start_header_id|>' }}{{ '<|python_tag|>' }}") == "llama"
    assert family_for(ChatTemplate.fallback(vocabulary={"<start_of_turn>"}).source) == "gemma"
    assert family_for(ChatTemplate.fallback().source) == "hermes"  # ChatML
    assert family_for("meta-llama/Llama-3.2-1B-Instruct") == "llama"
    assert family_for("mistralai/Ministral-8B-Instruct-2410") == "mistral"
    assert family_for("google/gemma-3-1b-it") == "gemma"
    assert family_for("some-model", "Gemma3ForCausalLM") == "gemma"
    assert family_for("some-model", "Qwen2ForCausalLM") == "hermes"
    assert parser_for("qwen2.5-coder:0.5b", tools=TOOLS).parse(QWEN_CODER_REPLY)[1][0].name == "get_weather"


# --- grammars -------------------------------------------------------------------------------------

@functools.cache
def ll_tokenizer():
    llguidance = pytest.importorskip("llguidance")
    tokenizer = ours("qwen2.5-coder:0.5b")
    return llguidance.LLTokenizer(tokenizer.backend.to_str(), eos_token=tokenizer.eos_token_id)


def accepts(grammar: str, text: str) -> bool:
    import llguidance

    tokenizer = ll_tokenizer()
    matcher = llguidance.LLMatcher(tokenizer, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    return matcher.consume_tokens(tokenizer.tokenize_str(text, parse_special=True)) and matcher.is_accepting()


def hermes(*calls):
    return "\n".join(f"<tool_call>\n{call}\n</tool_call>" for call in calls)


WEATHER_CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
TIME_CALL = '{"name": "get_time", "arguments": {"zone": 2}}'
# family -> (one good call, how calls are joined, a call whose arguments break the schema)
GRAMMAR_FORMS = {
    "hermes": (hermes(WEATHER_CALL), hermes(WEATHER_CALL, TIME_CALL), hermes('{"name": "get_time", "arguments": {"zone": "2"}}')),
    "llama": (WEATHER_CALL.replace("arguments", "parameters"),
              f"{WEATHER_CALL}; {TIME_CALL}".replace("arguments", "parameters"),
              '{"name": "get_weather", "parameters": {"unit": "celsius"}}'),
    "mistral": (f"[TOOL_CALLS][{WEATHER_CALL}]", f"[TOOL_CALLS][{WEATHER_CALL}, {TIME_CALL}]",
                '[TOOL_CALLS][{"name": "get_time", "arguments": {"zone": 1, "extra": 2}}]'),
    "gemma": (WEATHER_CALL.replace("arguments", "parameters"),
              f"{WEATHER_CALL}\n{TIME_CALL}".replace("arguments", "parameters"),
              '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "kelvin"}}'),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_required_grammar(family):
    import llguidance

    one, two, bad_arguments = GRAMMAR_FORMS[family]
    token_to_id = ours("qwen2.5-coder:0.5b").token_to_id
    grammar = tool_call_grammar(TOOLS, family, "required", token_to_id=token_to_id)
    assert llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_lark(grammar), ll_tokenizer()) == ""
    assert accepts(grammar, one) and accepts(grammar, two)
    assert not accepts(grammar, bad_arguments)
    assert not accepts(grammar, "The weather is fine.")
    assert not accepts(grammar, one.replace("get_weather", "get_wether"))
    assert not accepts(grammar, one.replace('": "', '":"'))  # the templates' JSON spacing is kept
    single = tool_call_grammar(TOOLS, family, "required", parallel=False, token_to_id=token_to_id)
    assert accepts(single, one) and not accepts(single, two)
    # what the grammar forces, the family's parser reads back
    assert [call.name for call in ToolParser(family, TOOLS).parse(two)[1]] == ["get_weather", "get_time"]


def test_named_grammar():
    token_to_id = ours("qwen2.5-coder:0.5b").token_to_id
    grammar = tool_call_grammar(TOOLS, "qwen", "named", name="get_time", parallel=False, token_to_id=token_to_id)
    assert "get_weather" not in grammar
    assert accepts(grammar, hermes(TIME_CALL)) and not accepts(grammar, hermes(WEATHER_CALL))
    # Qwen's vocabulary holds `<tool_call>` as one token, which the spelled-out text does not match.
    assert not accepts(tool_call_grammar(TOOLS, "qwen", "named", name="get_time"), hermes(TIME_CALL))
    with pytest.raises(InvalidRequest):
        tool_call_grammar(TOOLS, "hermes", "named", name="nope")
    with pytest.raises(InvalidRequest):
        tool_call_grammar([], "hermes", "required")
