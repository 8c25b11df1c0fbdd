"""What the MCP tool loop (serve/mcp_loop.py) writes into the conversation for the model.

Strong tool-using servers keep what the model reads short and plain; a small model more so, since
every token of a tool's definition is prompt time and a place to get lost. So:
  tool definitions  each tool as the servers define it, its description and each parameter's cut to
                    their first sentence (DESCRIPTION_CHARS at most), schema keys a model does not
                    need (title, $schema, additionalProperties, examples) left out;
  guidance          one system paragraph (GUIDANCE) on when to call a tool and how to answer, after
                    the conversation's own system message, or as the first message;
  results           each result as the tool returned it, cut at RESULT_CHARS;
  the answer round  the last user turn asks for the answer from the results, restating the request.
"""
from __future__ import annotations

import re

from levante.multimodal.messages import text_of

DESCRIPTION_CHARS = 200
RESULT_CHARS = 6000
REQUEST_CHARS = 400  # of the user's request restated in the answer round
GUIDANCE = ("You can call tools. When the request needs one, call the one tool that does what the user asks, "
            "with the arguments the request gives (paths, names and values exactly as written) and no optional "
            "arguments it does not ask for. When the tool results are in, answer the user from them in plain "
            "words.")
ANSWER_NUDGE = "Using the tool results above, answer in plain text:"
_DROPPED_KEYS = {"title", "$schema", "additionalProperties", "examples"}
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def tool_definition(tool) -> dict:
    """An MCP tool (levante.mcp.McpTool) as the model is offered it: OpenAI's function shape, compact."""
    return {"type": "function", "function": {"name": tool.name, "description": first_sentence(tool.description),
                                             "parameters": _compact_schema(tool.parameters)}}


def first_sentence(text: str, limit: int = DESCRIPTION_CHARS) -> str:
    """`text`'s first sentence, whitespace folded, at most `limit` characters (cut at a word)."""
    text = " ".join((text or "").split())
    end = _SENTENCE_END.search(text)
    if end is not None:
        text = text[:end.end()]
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0] + "..."


def _compact_schema(schema):
    if isinstance(schema, list):
        return [_compact_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    compact = {}
    for key, value in schema.items():
        if key in _DROPPED_KEYS:
            continue
        if key == "description" and isinstance(value, str):
            compact[key] = first_sentence(value)
        elif key == "properties" and isinstance(value, dict):
            compact[key] = {name: _compact_schema(spec) for name, spec in value.items()}
        else:
            compact[key] = _compact_schema(value)
    return compact


def with_guidance(messages: list[dict]) -> list[dict]:
    """The conversation with GUIDANCE: after the first system message's text, or as a system message first."""
    if messages and messages[0].get("role") == "system":
        own = text_of(messages[0].get("content")).rstrip()
        return [{**messages[0], "content": f"{own}\n\n{GUIDANCE}" if own else GUIDANCE}, *messages[1:]]
    return [{"role": "system", "content": GUIDANCE}, *messages]


def result_text(content: str) -> str:
    """A tool result as the model reads it: cut at RESULT_CHARS, saying how much was left out."""
    if len(content) <= RESULT_CHARS:
        return content
    return f"{content[:RESULT_CHARS]}\n[... {len(content) - RESULT_CHARS} more characters not shown]"


def answer_request(messages: list[dict]) -> str:
    """The answer round's last user turn: ANSWER_NUDGE and the request it answers (the last user message)."""
    request = next((text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
    request = " ".join(request.split())
    if len(request) > REQUEST_CHARS:
        request = request[:REQUEST_CHARS].rsplit(" ", 1)[0] + "..."
    return f"{ANSWER_NUDGE} {request}" if request else ANSWER_NUDGE
