"""Tool calls in model output: a parser per model family, and grammars that force a call.

Each family writes calls in its own dialect:
  hermes (Qwen, Hermes)  <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>, one block per call
  llama (Llama 3.x)      {"name": ..., "parameters": {...}}, several joined by `;`, maybe after <|python_tag|>
  mistral                [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...] or [TOOL_CALLS]name[ARGS]{...}
  gemma                  ```tool_code\\nname(a=1, b="x")\\n``` (read with `ast`, literals only)
and the hermes, llama and gemma parsers also take a reply that opens with a bare JSON call (or a
```json fence holding one, or a list of them), as Qwen2.5-Coder answers, but only when the name is
one of the offered tools: otherwise it is the user's JSON, and stays content.

`ToolParser.parse(text)` reads a finished reply; `ToolParser.stream()` gives a `StreamingToolParser`
whose `feed(delta)` returns OpenAI-shaped deltas as text arrives. Both run the same code (`parse` is
a stream given all the text at once), so a streamed reply reassembles to what `parse` returns. The
one exception: a call that breaks after its first delta went out (the reply was cut off by
`max_tokens`, or its JSON turns invalid) cannot be taken back from a stream, which drops the rest
of the reply, while `parse` keeps the whole reply as content.

`tool_call_grammar` writes the llguidance Lark grammar for `tool_choice: "required"` or a named tool.
"""
from __future__ import annotations

import ast
import json
import re
import secrets
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from levante.errors import InvalidRequest

FAMILIES = ("hermes", "llama", "mistral", "gemma")
_FAMILY_ALIASES = {"qwen": "hermes"}


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def mistral_call_id() -> str:
    """Mistral's chat templates refuse history whose tool call ids are not 9 letters or digits."""
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class Delta:
    """One piece of a streamed reply: `content` text, or `tool_call` in OpenAI's streaming shape:
    `{"index", "id", "type": "function", "function": {"name", "arguments": ""}}` opens a call, then
    `{"index", "function": {"arguments": fragment}}` carries its arguments piece by piece."""
    content: str | None = None
    tool_call: dict | None = None


def collect(deltas: list[Delta]) -> tuple[str | None, list[ToolCall]]:
    """Reassemble streamed deltas into `parse`'s result. Content is None when calls carry the reply
    and nothing but whitespace is left beside them."""
    content = "".join(delta.content for delta in deltas if delta.content is not None)
    calls: dict[int, dict] = {}
    for delta in deltas:
        if delta.tool_call is None:
            continue
        call = calls.setdefault(delta.tool_call["index"], {"id": "", "name": "", "arguments": ""})
        call["id"] = delta.tool_call.get("id", call["id"])
        call["name"] = delta.tool_call["function"].get("name", call["name"])
        call["arguments"] += delta.tool_call["function"].get("arguments", "")
    tool_calls = [ToolCall(**calls[index]) for index in sorted(calls)]
    if tool_calls and not content.strip():
        return None, tool_calls
    return content, tool_calls


# --- reading JSON that may still be arriving -------------------------------------------------------

class _Incomplete(Exception):
    """The text stops before the construct being read does; more text may complete it."""


class _Malformed(Exception):
    """The text cannot be the construct being read."""


_WHITESPACE = " \t\r\n"
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_STRUCTURAL = re.compile(r'["{}\[\]]')
_SCALAR = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?|true|false|null")
_CLOSERS = {"{": "}", "[": "]"}
# Keys a bare JSON object may have and still be a call; any other key means it is the user's JSON.
_CALL_KEYS = {"name", "arguments", "parameters", "type", "id"}
_ARGUMENT_KEYS = ("arguments", "parameters")


def _decode(text: str):
    """A JSON value; `_Malformed` for anything `json` cannot take (bad escapes, control characters,
    nesting too deep, integers too long): model output is untrusted input."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise _Malformed from None


def _encode(value) -> str:
    """JSON text of a decoded value, as written where it can be: non-ASCII kept, unless it holds a lone
    surrogate (`"\\ud800"` decodes to one), which no UTF-8 response could carry: then escaped."""
    text = json.dumps(value, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value)
    return text


def _is_name(value) -> bool:
    """A tool name a response can carry: text, not empty, valid UTF-8."""
    if not isinstance(value, str) or not value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _skip_whitespace(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WHITESPACE:
        i += 1
    return i


def _expect(text: str, i: int, literal: str) -> int:
    """The index after `literal`, which must stand at `i`."""
    if text.startswith(literal, i):
        return i + len(literal)
    if literal.startswith(text[i:]):
        raise _Incomplete
    raise _Malformed


def _string_end(text: str, i: int) -> int:
    if i >= len(text):
        raise _Incomplete
    if text[i] != '"':
        raise _Malformed
    match = _STRING.match(text, i)
    if match is None:
        raise _Incomplete
    return match.end()


def _value_end(text: str, i: int) -> int:
    """The end of the JSON value that starts at `i`. Only strings and nesting are checked here;
    `json.loads` checks the whole call once it is complete."""
    if i >= len(text):
        raise _Incomplete
    if text[i] == '"':
        return _string_end(text, i)
    if text[i] in _CLOSERS:
        return _container_end(text, i)
    match = _SCALAR.match(text, i)
    if match is None:
        if any(word.startswith(text[i:]) for word in ("true", "false", "null", "-")):
            raise _Incomplete
        raise _Malformed
    if match.end() == len(text):
        raise _Incomplete  # a number may go on
    return match.end()


def _container_end(text: str, i: int) -> int:
    open_brackets = [_CLOSERS[text[i]]]
    j = i + 1
    while (match := _STRUCTURAL.search(text, j)) is not None:
        j = match.start()
        char = text[j]
        if char == '"':
            j = _string_end(text, j)
            continue
        if char in _CLOSERS:
            open_brackets.append(_CLOSERS[char])
        elif char != open_brackets.pop():
            raise _Malformed
        elif not open_brackets:
            return j + 1
        j += 1
    raise _Incomplete


@dataclass
class _PartialCall:
    """A call as far as it has been read: `arguments` only ever grows, so what was sent stays true."""
    name: str | None = None
    arguments: str = ""
    done: bool = False


# Vets a bare JSON call's name (is it an offered tool?); None where a marker already says "call".
_Accept = Callable[[str], bool] | None


def _object_members(text: str, i: int, members: dict[str, tuple[int, int | None]]) -> int:
    """Read the JSON object at `i`, recording where each member's value lies (its end is None while
    the value is still open); returns the object's end."""
    i = _skip_whitespace(text, _expect(text, i, "{"))
    if text.startswith("}", i):
        return i + 1
    while True:
        key_end = _string_end(text, i)
        key = _decode(text[i:key_end])
        i = _skip_whitespace(text, _expect(text, _skip_whitespace(text, key_end), ":"))
        members[key] = (i, None)
        end = _value_end(text, i)
        members[key] = (i, end)
        i = _skip_whitespace(text, end)
        if text.startswith("}", i):
            return i + 1
        i = _skip_whitespace(text, _expect(text, i, ","))


def _read_call_object(text: str, i: int, calls: list[_PartialCall], accept: _Accept) -> int:
    """Read `{"name": ..., "arguments": {...}}` at `i` into a new entry of `calls`; returns its end.
    `accept` (bare JSON only) vets the name and rules out objects with keys a call never has."""
    call = _PartialCall()
    calls.append(call)
    members: dict[str, tuple[int, int | None]] = {}
    try:
        end = _object_members(text, i, members)
    except _Incomplete:
        _fill_call(call, text, members, accept, complete=False)
        raise
    _fill_call(call, text, members, accept, complete=True)
    _decode(text[i:end])
    return end


def _fill_call(call: _PartialCall, text: str, members: dict, accept: _Accept,
               complete: bool) -> None:
    if accept is not None and not members.keys() <= _CALL_KEYS:
        raise _Malformed
    name_start, name_end = members.get("name", (0, None))
    if name_end is not None:
        name = _decode(text[name_start:name_end])
        if not _is_name(name) or (accept is not None and not accept(name)):
            raise _Malformed
        call.name = name
    key = next((key for key in _ARGUMENT_KEYS if key in members), None)
    if key is not None:
        call.arguments = _arguments_so_far(text, *members[key])
    if complete:
        if call.name is None:
            raise _Malformed
        call.arguments = call.arguments if key is not None else "{}"
        call.done = True


def _arguments_so_far(text: str, start: int, end: int | None) -> str:
    """An object is streamed as written; a string holding JSON (some models quote the arguments)
    is decoded, so it waits until it is complete."""
    if end is None:
        return text[start:] if text.startswith("{", start) else ""
    value = _decode(text[start:end])
    if isinstance(value, str):
        value = _decode(value)
        if not isinstance(value, dict):
            raise _Malformed
        return _encode(value)
    if not isinstance(value, dict):
        raise _Malformed
    return text[start:end]


def _read_call_array(text: str, i: int, calls: list[_PartialCall], accept: _Accept) -> int:
    """`[call, call, ...]`, at least one call."""
    i = _skip_whitespace(text, _expect(text, i, "["))
    while True:
        i = _skip_whitespace(text, _read_call_object(text, i, calls, accept))
        if text.startswith("]", i):
            return i + 1
        i = _skip_whitespace(text, _expect(text, i, ","))


def _read_call_sequence(text: str, i: int, calls: list[_PartialCall], accept: _Accept, final: bool) -> int:
    """Calls one after another, joined by `;` (Llama), `,` or whitespace; ends before anything else."""
    while True:
        end = _read_call_object(text, i, calls, accept)
        j = _skip_whitespace(text, end)
        if j < len(text) and text[j] in ";,":
            j = _skip_whitespace(text, j + 1)
        if j == len(text):
            if final:
                return end
            raise _Incomplete  # another call may follow
        if text[j] != "{":
            return end
        i = j


# --- the regions each family writes calls in --------------------------------------------------------

def _read_hermes(text: str, i: int, calls: list[_PartialCall], accept: _Accept, final: bool) -> int:
    i = _skip_whitespace(text, _expect(text, i, "<tool_call>"))
    i = _skip_whitespace(text, _read_call_object(text, i, calls, None))
    if final and i == len(text):
        return i  # the reply ended before its closing tag
    return _expect(text, i, "</tool_call>")


def _read_python_tag(text: str, i: int, calls: list[_PartialCall], accept: _Accept, final: bool) -> int:
    i = _skip_whitespace(text, _expect(text, i, "<|python_tag|>"))
    return _read_call_sequence(text, i, calls, None, final)


def _read_bare_json(text: str, i: int, calls: list[_PartialCall], accept: _Accept, final: bool) -> int:
    """A call object, a list of them, or `;`-joined ones, maybe inside a ```json fence."""
    fenced = text.startswith("```", i)
    if fenced:
        i += 3
        if text.startswith("json", i):
            i += 4
        i = _skip_whitespace(text, i)
    if text.startswith("[", i):
        end = _read_call_array(text, i, calls, accept)
    else:
        end = _read_call_sequence(text, i, calls, accept, final)
    if not fenced:
        return end
    end = _skip_whitespace(text, end)
    if final and end == len(text):
        return end
    return _expect(text, end, "```")


_MISTRAL_WORD = re.compile(r"[^\[\]{}\s]+")


def _word_end(text: str, i: int) -> int:
    match = _MISTRAL_WORD.match(text, i)
    if match is None and i < len(text):
        raise _Malformed
    if match is None or match.end() == len(text):
        raise _Incomplete
    return match.end()


def _read_mistral(text: str, i: int, calls: list[_PartialCall], accept: _Accept, final: bool) -> int:
    """`[TOOL_CALLS][{...}, ...]`, or the v11 form `[TOOL_CALLS]name[ARGS]{...}` (which may carry
    `[CALL_ID]id` before `[ARGS]`); in that form each call has its own `[TOOL_CALLS]`."""
    i = _skip_whitespace(text, _expect(text, i, "[TOOL_CALLS]"))
    if text.startswith("[", i):
        return _read_call_array(text, i, calls, None)
    name_end = _word_end(text, i)
    name, i = text[i:name_end], name_end
    if "[CALL_ID]".startswith(text[i:]):
        raise _Incomplete
    if text.startswith("[CALL_ID]", i):
        i = _word_end(text, i + len("[CALL_ID]"))
    i = _expect(text, i, "[ARGS]")
    call = _PartialCall(name=name)
    calls.append(call)
    try:
        end = _value_end(text, i)
    except _Incomplete:
        call.arguments = _arguments_so_far(text, i, None)
        raise
    call.arguments = _arguments_so_far(text, i, end)
    call.done = True
    return end


def _read_tool_code(text: str, i: int, calls: list[_PartialCall], accept: _Accept, final: bool) -> int:
    """Gemma's ```tool_code fence of Python calls, read once the fence closes."""
    i = _expect(text, i, "```tool_code")
    close = text.find("```", i)
    if close < 0 and not final:
        raise _Incomplete
    body, end = (text[i:], len(text)) if close < 0 else (text[i:close], close + 3)
    for name, arguments in _python_calls(body):
        calls.append(_PartialCall(name, _encode(arguments), done=True))
    return end


def _python_calls(source: str) -> list[tuple[str, dict]]:
    """`f(a=1)` lines, or a list of calls, with literal keyword arguments only: nothing is run."""
    try:
        module = ast.parse(source.strip())
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise _Malformed from None
    nodes = []
    for statement in module.body:
        if not isinstance(statement, ast.Expr):
            raise _Malformed
        value = statement.value
        nodes.extend(value.elts if isinstance(value, (ast.List, ast.Tuple)) else [value])
    if not nodes:
        raise _Malformed
    return [_python_call(node) for node in nodes]


def _python_call(node: ast.AST) -> tuple[str, dict]:
    if not isinstance(node, ast.Call) or node.args:
        raise _Malformed
    if isinstance(node.func, ast.Name):
        name = node.func.id
    elif isinstance(node.func, ast.Attribute):  # default_api.get_weather(...)
        name = node.func.attr
    else:
        raise _Malformed
    arguments = {}
    for keyword in node.keywords:
        if keyword.arg is None:
            raise _Malformed
        try:
            arguments[keyword.arg] = ast.literal_eval(keyword.value)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise _Malformed from None
    try:
        json.dumps(arguments, allow_nan=False)  # `1e999` is a literal, but no JSON
    except (TypeError, ValueError, RecursionError):
        raise _Malformed from None
    return name, arguments


# Text that opens a region anywhere in a reply -> the reader of that region.
_READERS = {
    "<tool_call>": _read_hermes,
    "<|python_tag|>": _read_python_tag,
    "[TOOL_CALLS]": _read_mistral,
    "```tool_code": _read_tool_code,
    "```json": _read_bare_json,
}
_FAMILY_MARKERS = {
    "hermes": ("<tool_call>", "```json"),
    "llama": ("<|python_tag|>", "```json"),
    "mistral": ("[TOOL_CALLS]",),
    "gemma": ("```tool_code", "```json"),
}


def _opens_bare_json(text: str) -> bool | None:
    """Whether a reply starting with `text` (whitespace stripped) starts with a JSON value, bare or
    fenced; None while it cannot yet tell."""
    if not text:
        return None
    if text[0] in "{[":
        return True
    if not text.startswith("```"):
        return None if "```".startswith(text) else False
    rest = text[3:]
    if len(rest) < 4 and "json".startswith(rest):
        return None
    rest = rest.removeprefix("json").lstrip()
    return rest[0] in "{[" if rest else None


# --- parsers ---------------------------------------------------------------------------------------

def _canonical_family(family: str) -> str:
    family = _FAMILY_ALIASES.get(family, family)
    if family not in FAMILIES:
        raise ValueError(f"unknown tool call family {family!r}; expected one of {', '.join(FAMILIES)}")
    return family


class ToolParser:
    """Reads one family's tool calls out of replies to a request that offered `tools`."""

    def __init__(self, family: str, tools: list[dict] | None = None):
        self.family = _canonical_family(family)
        self.tool_names = {_function(tool)["name"] for tool in tools or ()}
        # Bare JSON is a call only when it names an offered tool, so without tools there is none.
        self.bare_json = self.family != "mistral" and bool(self.tool_names)
        self.markers = tuple(marker for marker in _FAMILY_MARKERS[self.family]
                             if self.bare_json or _READERS[marker] is not _read_bare_json)
        self.new_id = mistral_call_id if self.family == "mistral" else new_call_id

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a finished reply; content is the text outside the calls."""
        return collect(self.stream().finish(text))

    def stream(self) -> StreamingToolParser:
        return StreamingToolParser(self)


@dataclass
class _Region:
    start: int
    reader: Callable[..., int]
    sent: list[list[int]] = field(default_factory=list)  # per call read so far: [index, argument chars sent]


class StreamingToolParser:
    """Turns a reply's text, fed as it is generated, into content and tool call deltas.

    Text that may begin a call (`<tool_c`, a leading `{`) is held back until it is known. Whitespace
    before a call, between calls and after the last one is dropped; whitespace between a call and
    the text that follows it is kept.
    """

    def __init__(self, parser: ToolParser):
        self.parser = parser
        self._text = ""
        self._position = 0  # text before this has been sent, as content or as calls
        self._at_start = parser.bare_json  # a leading JSON call is still possible
        self._after_call = False
        self._region: _Region | None = None
        self._released: int | None = None  # a marker at this offset turned out not to open a call
        self._calls_sent = 0
        self._broken = False  # a call broke after it began streaming

    @property
    def broken(self) -> bool:
        """A call broke after it began streaming: the rest of the reply is dropped (see the module's docstring)."""
        return self._broken

    def feed(self, text: str) -> list[Delta]:
        self._text += text
        return self._advance(final=False)

    def finish(self, text: str = "") -> list[Delta]:
        """Feed the last text and flush everything held back."""
        self._text += text
        return self._advance(final=True)

    def _advance(self, final: bool) -> list[Delta]:
        deltas: list[Delta] = []
        progressed = True
        while progressed and not self._broken:
            step = self._region_step if self._region is not None else self._content_step
            progressed = step(final, deltas)
        return _merge_content(deltas)

    def _content_step(self, final: bool, deltas: list[Delta]) -> bool:
        """Send content up to the next region, holding back what might open one; True once a region opens."""
        rest = self._text[self._position:]
        if self._after_call:
            if not rest.strip(_WHITESPACE):  # between calls, or trailing: dropped unless text follows
                if final:
                    self._position = len(self._text)
                return False
            self._after_call = False
        if self._at_start:
            opens = _opens_bare_json(rest.lstrip(_WHITESPACE))
            if opens is None and not final:
                return False
            self._at_start = False
            if opens:
                return self._open_region(self._position + len(rest) - len(rest.lstrip(_WHITESPACE)),
                                         _read_bare_json, rest, deltas)
        marker_at, marker = self._find_marker()
        if marker is not None:
            return self._open_region(marker_at, _READERS[marker], rest, deltas)
        if final:
            self._send_content(rest, deltas)
        else:
            self._send_content(rest[:len(rest) - self._marker_prefix_length(rest)].rstrip(_WHITESPACE), deltas)
        return False

    def _open_region(self, start: int, reader: Callable[..., int], rest: str, deltas: list[Delta]) -> bool:
        """Content before the region goes out now, all but the whitespace next to it."""
        self._send_content(rest[:start - self._position].rstrip(_WHITESPACE), deltas)
        self._region = _Region(start, reader)
        return True

    def _find_marker(self) -> tuple[int, str | None]:
        found, first = len(self._text), None
        for marker in self.parser.markers:
            at = self._text.find(marker, self._position)
            if at == self._released:
                at = self._text.find(marker, at + 1)
            if 0 <= at < found:
                found, first = at, marker
        return found, first

    def _marker_prefix_length(self, rest: str) -> int:
        """How many trailing characters could be the start of a marker."""
        longest = max(map(len, self.parser.markers))
        for length in range(min(len(rest), longest - 1), 0, -1):
            tail = rest[-length:]
            if any(marker.startswith(tail) for marker in self.parser.markers):
                return length
        return 0

    def _send_content(self, text: str, deltas: list[Delta]) -> None:
        if text:
            deltas.append(Delta(content=text))
            self._position += len(text)

    def _region_step(self, final: bool, deltas: list[Delta]) -> bool:
        """Read the open region again with the new text; True once it has closed or been given up."""
        region = self._region
        calls: list[_PartialCall] = []
        accept = self.parser.tool_names.__contains__
        try:
            end = region.reader(self._text, region.start, calls, accept, final)
        except _Incomplete:
            if not final:
                self._send_calls(region, calls, deltas)
                return False
            end = None
        except _Malformed:
            end = None
        if end is None:
            self._give_up(region)
            return True
        self._send_calls(region, calls, deltas)
        self._region, self._position, self._after_call = None, end, True
        return True

    def _give_up(self, region: _Region) -> None:
        """A region that is no call after all: its text is content again, unless a call from it was
        already sent. A stream cannot take that back, so the rest of the reply is dropped."""
        self._region = None
        if region.sent:
            self._broken = True
        else:
            self._released = region.start

    def _send_calls(self, region: _Region, calls: list[_PartialCall], deltas: list[Delta]) -> None:
        for number, call in enumerate(calls):
            if call.name is None:
                break
            if number == len(region.sent):
                region.sent.append([self._calls_sent, 0])
                deltas.append(Delta(tool_call={
                    "index": self._calls_sent, "id": self.parser.new_id(), "type": "function",
                    "function": {"name": call.name, "arguments": ""}}))
                self._calls_sent += 1
            index, sent = region.sent[number]
            if len(call.arguments) > sent:
                deltas.append(Delta(tool_call={"index": index, "function": {"arguments": call.arguments[sent:]}}))
                region.sent[number][1] = len(call.arguments)


def _merge_content(deltas: list[Delta]) -> list[Delta]:
    merged: list[Delta] = []
    for delta in deltas:
        if delta.content is not None and merged and merged[-1].content is not None:
            merged[-1] = Delta(content=merged[-1].content + delta.content)
        else:
            merged.append(delta)
    return merged


# --- which family ----------------------------------------------------------------------------------

_TEMPLATE_SIGNS = (  # text in a chat template that gives its family away, checked in this order
    ("[TOOL_CALLS]", "mistral"), ("<tool_call>", "hermes"), ("<|python_tag|>", "llama"),
    ("<|start_header_id|>", "llama"), ("tool_code", "gemma"), ("<start_of_turn>", "gemma"),
    ("<|im_start|>", "hermes"),
)
_NAME_SIGNS = (
    (("mistral", "mixtral", "ministral", "magistral", "devstral", "codestral", "pixtral"), "mistral"),
    (("gemma",), "gemma"),
    (("llama-3", "llama3", "llama-4", "llama4"), "llama"),
    (("qwen", "hermes"), "hermes"),
)


def family_for(model_name_or_chat_template: str, architecture: str = "") -> str:
    """The tool call family of a model, told by its chat template or else its name or architecture
    (`Qwen2ForCausalLM`); Hermes-style tags when nothing tells."""
    for sign, family in _TEMPLATE_SIGNS:
        if sign in model_name_or_chat_template:
            return family
    for text in (model_name_or_chat_template.lower(), architecture.lower()):
        for words, family in _NAME_SIGNS:
            if any(word in text for word in words):
                return family
    return "hermes"


def parser_for(model_name_or_chat_template: str, architecture: str = "",
               tools: list[dict] | None = None) -> ToolParser:
    return ToolParser(family_for(model_name_or_chat_template, architecture), tools)


# --- grammars for tool_choice "required" and named -------------------------------------------------

# JSON as the templates render it (Python's `json.dumps`), so a forced call looks like the examples.
_JSON_STYLE = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False, "lenient": True}


def tool_call_grammar(tools: list[dict], family: str, mode: str = "required", name: str | None = None,
                      parallel: bool = True, token_to_id: Callable[[str], int | None] | None = None) -> str:
    """An llguidance Lark grammar that admits only tool calls in the family's syntax, to the tools
    offered (`mode="required"`) or the one named (`mode="named"`), each call's arguments matching its
    tool's JSON schema; `parallel` allows more than one call.

    `token_to_id` (the tokenizer's) lets a marker the vocabulary holds as one token (Qwen's
    `<tool_call>`, Mistral's `[TOOL_CALLS]`) match as that token, which llguidance tells apart from
    the same text spelled in pieces; the spelled form is allowed too.
    """
    family = _canonical_family(family)
    chosen = _chosen_tools(tools, mode, name)
    key = "parameters" if family in ("llama", "gemma") else "arguments"
    schemas = [_call_schema(tool, key) for tool in chosen]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    call_rule = "call: %json " + json.dumps({**schema, "x-guidance": _JSON_STYLE}, ensure_ascii=False)

    def marker(text: str) -> str:
        token_id = token_to_id(text) if token_to_id else None
        return json.dumps(text) if token_id is None else f"(<[{token_id}]> | {json.dumps(text)})"

    def repeated(item: str, separator: str) -> str:
        return f"{item} ({json.dumps(separator)} {item})*" if parallel else item

    if family == "hermes":
        rules = [f"start: {repeated('block', chr(10))}",
                 f'block: {marker("<tool_call>")} "\\n" call "\\n" {marker("</tool_call>")}']
    elif family == "mistral":
        rules = [f'start: {marker("[TOOL_CALLS]")} "[" {repeated("call", ", ")} "]"']
    elif family == "llama":
        rules = [f"start: {repeated('call', '; ')}"]
    else:  # gemma: JSON, which a schema can constrain; its ```tool_code form is parsed but not forced
        rules = [f"start: {repeated('call', chr(10))}"]
    return "\n".join([*rules, call_rule]) + "\n"


def _function(tool: Mapping) -> Mapping:
    """The function of an OpenAI tool (`{"type": "function", "function": {...}}`) or a bare one."""
    return tool.get("function", tool)


def _chosen_tools(tools: list[dict], mode: str, name: str | None) -> list[Mapping]:
    functions = [_function(tool) for tool in tools or ()]
    if mode == "named":
        functions = [function for function in functions if function["name"] == name]
        if not functions:
            raise InvalidRequest(f"tool_choice names function {name!r}, which is not among the tools")
    elif mode != "required":
        raise ValueError(f"mode must be 'required' or 'named', not {mode!r}")
    if not functions:
        raise InvalidRequest("tool_choice requires a tool call, but no tools were given")
    return functions


def _call_schema(function: Mapping, arguments_key: str) -> dict:
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, arguments_key: parameters},
        "required": ["name", arguments_key],
        "additionalProperties": False,
    }
