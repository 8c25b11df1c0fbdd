"""The tool-call and reasoning parsers fed hostile model output: every family's call formats built,
then truncated, cut, spliced, nested inside each other and mixed with prose and thinking; and raw
text and bytes. Model output is untrusted input: whole or streamed in random pieces, a parser
returns text or calls, never raises, and what it returns a response can carry (names and UTF-8
text; arguments a JSON object). A stream that did not break reassembles to what `parse` returns.

Bounded and fixed in `make test` (derandomized, FUZZ_PARSER_EXAMPLES examples per test);
`make fuzz` runs more, from random seeds.
"""
from __future__ import annotations

import json
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from levante.loader.reasoning import ReasoningParser
from levante.serve.tool_parsers import FAMILIES, ToolParser, collect

EXAMPLES = int(os.environ.get("FUZZ_PARSER_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize="FUZZ_PARSER_RANDOM" not in os.environ,
                suppress_health_check=list(HealthCheck), database=None)

TOOLS = [{"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
         for name in ("get_weather", "get_time", "read_file")]
NAMES = ["get_weather", "get_time", "read_file", "unknown_tool", "", "a b", "été", "x" * 40]
# Pieces that open, close or break the constructs the parsers read.
FRAGMENTS = ["{", "}", "[", "]", '"', "\\", ":", ",", ";", " ", "\n", "<tool_call>", "</tool_call>", "<tool_c",
             "<|python_tag|>", "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]", "```", "```json", "```tool_code", "<think>",
             "</think>", "</thi", '"name"', '"arguments"', '"parameters"', '"\\ud800"', '"\\x"', '"\\u12"',
             '"a\nb"', "1" * 5000, "[" * 3000, "{\"a\":" * 1500, "null", "tru", "-", "1e999", "\x00", "\ud7ff",
             "é", "😀"]

scalars = (st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
           | st.text(max_size=8))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=12)
arguments = st.dictionaries(st.sampled_from(["city", "zone", "path", "q", "é"]), json_values, max_size=3)


@st.composite
def call_objects(draw, key: str) -> str:
    """One call as JSON: a name, its arguments (an object, quoted JSON, or something that is neither),
    sometimes another key, in some layout."""
    call = {"name": draw(st.sampled_from(NAMES))}
    shape = draw(st.sampled_from(["object", "quoted", "other", "missing"]))
    if shape != "missing":
        value = draw(arguments)
        call[key] = {"object": value, "quoted": json.dumps(value), "other": draw(json_values)}[shape]
    if draw(st.booleans()) and draw(st.booleans()):
        call[draw(st.sampled_from(["id", "type", "extra"]))] = draw(scalars)
    items = list(call.items())
    draw(st.randoms()).shuffle(items)
    return json.dumps(dict(items), indent=draw(st.sampled_from([None, 2])), ensure_ascii=draw(st.booleans()))


def _python_value(value) -> str:
    return repr(value)


@st.composite
def regions(draw) -> str:
    """A span of calls in one of the formats a family writes."""
    form = draw(st.sampled_from(["hermes", "bare", "list", "fenced", "python_tag", "mistral_list",
                                 "mistral_v11", "tool_code"]))
    key = draw(st.sampled_from(["arguments", "parameters"]))
    calls = draw(st.lists(call_objects(key), min_size=1, max_size=3))
    if form == "hermes":
        return "\n".join(f"<tool_call>\n{call}\n</tool_call>" for call in calls)
    if form == "bare":
        return draw(st.sampled_from(["; ", ", ", "\n"])).join(calls)
    if form == "list":
        return "[" + ", ".join(calls) + "]"
    if form == "fenced":
        return "```json\n" + (calls[0] if len(calls) == 1 else "[" + ", ".join(calls) + "]") + "\n```"
    if form == "python_tag":
        return "<|python_tag|>" + "; ".join(calls)
    if form == "mistral_list":
        return "[TOOL_CALLS][" + ", ".join(calls) + "]"
    if form == "mistral_v11":
        call_id = draw(st.sampled_from(["", "[CALL_ID]a1b2c3d4e"]))
        return "".join(f"[TOOL_CALLS]{draw(st.sampled_from(NAMES[:4]))}{call_id}[ARGS]{json.dumps(draw(arguments))}"
                       for _ in calls)
    lines = [f"{draw(st.sampled_from(NAMES[:4]))}(" + ", ".join(f"{k}={_python_value(v)}" for k, v in
                                                                   draw(arguments).items() if k.isidentifier()) + ")"
             for _ in calls]
    return "```tool_code\n" + "\n".join(lines) + "\n```"


@st.composite
def mutated(draw, base) -> str:
    """`base` with a few edits: truncated, a piece cut out, a fragment or another region spliced in."""
    text = draw(base)
    for _ in range(draw(st.integers(0, 3))):
        edit = draw(st.sampled_from(["truncate", "cut", "insert", "nest"]))
        at = draw(st.integers(0, len(text)))
        if edit == "truncate":
            text = text[:at]
        elif edit == "cut":
            text = text[:at] + text[at + draw(st.integers(1, 8)):]
        elif edit == "insert":
            text = text[:at] + draw(st.sampled_from(FRAGMENTS)) + text[at:]
        else:
            text = text[:at] + draw(regions()) + text[at:]
    return text


prose = st.sampled_from(["", "Let me check.", "The answer is {x}.", "ok ", "[1, 2]", "```python\nprint(1)\n```",
                         "<think>\nhmm\n</think>\n\n", "Done.\n"])
replies = st.one_of(
    mutated(regions()),
    mutated(st.lists(st.one_of(prose, regions()), min_size=1, max_size=4).map("".join)),
    st.lists(st.sampled_from(FRAGMENTS), max_size=12).map("".join),
    st.text(max_size=200),
    st.binary(max_size=200).map(lambda data: data.decode("utf-8", "replace")),
)


def _pieces(text: str, cuts: list[int]) -> list[str]:
    points = sorted({min(max(cut, 0), len(text)) for cut in cuts} | {0, len(text)})
    return [text[a:b] for a, b in zip(points, points[1:])]


def _check_reply(content, calls) -> None:
    """What a response carries: text or None, calls with a name and a JSON object, all valid UTF-8."""
    assert content is None or isinstance(content, str)
    for call in calls:
        assert isinstance(call.name, str) and call.name
        assert isinstance(json.loads(call.arguments), dict)
    json.dumps({"content": content, "tool_calls": [call.to_openai() for call in calls]},
               ensure_ascii=False).encode("utf-8")


@FUZZ
@given(text=replies, family=st.sampled_from(FAMILIES), offered=st.booleans(),
       cuts=st.lists(st.integers(0, 400), max_size=12))
def test_tool_parsers_take_any_output(text, family, offered, cuts):
    parser = ToolParser(family, TOOLS if offered else None)
    whole = parser.parse(text)
    _check_reply(*whole)
    stream = parser.stream()
    deltas = [delta for piece in _pieces(text, cuts) for delta in stream.feed(piece)] + stream.finish()
    streamed = collect(deltas)
    if stream.broken:  # a call that broke after its first delta went out: the rest of the reply is dropped
        json.dumps([delta.__dict__ for delta in deltas], ensure_ascii=False).encode("utf-8")
    else:
        _check_reply(*streamed)
        assert _summary(streamed) == _summary(whole)


def _summary(result):
    content, calls = result
    return content, [(call.name, call.arguments) for call in calls]


@FUZZ
@given(text=st.one_of(replies, mutated(st.lists(st.sampled_from(["<think>", "</think>", "\n", " ", "a", "<th", "</",
                                                                   "Hello"]), max_size=10).map("".join))),
       thinking=st.booleans(), cuts=st.lists(st.integers(0, 400), max_size=12))
def test_reasoning_parser_takes_any_output(text, thinking, cuts):
    parser = ReasoningParser(thinking=thinking)
    reasoning, content = parser.split(text)
    assert (reasoning is None or isinstance(reasoning, str)) and isinstance(content, str)
    stream = parser.stream()
    deltas = [delta for piece in _pieces(text, cuts) for delta in stream.feed(piece)] + stream.finish()
    streamed = "".join(d.reasoning for d in deltas if d.reasoning is not None) or None
    assert (streamed, "".join(d.content for d in deltas if d.content is not None)) == (reasoning, content)
