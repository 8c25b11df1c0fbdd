"""Reasoning output: a model's thinking apart from its answer, as vLLM's reasoning parsers split it.

Reasoning models (Qwen3, QwQ, DeepSeek-R1 and their kin) think inside `<think>...</think>`, then
answer. Either the model writes the opening `<think>` itself (Qwen3), or the chat template writes
it at the end of the generation prompt (QwQ, DeepSeek-R1, Qwen3-Thinking-2507), so that the reply
begins inside the thinking and only its `</think>` shows. A `ReasoningParser`, told whether the
prompt left a think block open (`thinking`), splits a reply into (reasoning, content):

    <think>\\nLet me see.\\n</think>\\n\\nHello!   ->  ("Let me see.", "Hello!")
    Let me see.\\n</think>\\n\\nHello!            ->  the same, when the prompt ended in "<think>\\n"
    <think>\\nLet me                             ->  ("Let me", "")     cut off while thinking
    Hello!                                      ->  (None, "Hello!")   no thinking
    <think>\\n\\n</think>\\n\\nHello!             ->  (None, "Hello!")   empty thinking (/no_think)

Only a `<think>` that opens the reply starts reasoning: the same tag later in an answer is text.
The whitespace around the tags is the template's layout, not the model's words, and is dropped.
`split` reads a finished reply; `stream()` gives a `StreamingReasoningParser` whose `feed(delta)`
returns the reasoning and content pieces as text arrives. `split` is a stream fed everything at
once, so a streamed reply reassembles to what `split` returns.

Which models think is told by their chat template (`reasoning_markers`); a template that reads
`enable_thinking` (Qwen3) also honours Qwen3's `/think` and `/no_think` switches (`thinking_switch`).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from levante.multimodal.messages import text_of

THINK_START, THINK_END = "<think>", "</think>"
_WHITESPACE = " \t\r\n"
_SWITCH = re.compile(r"/(no_)?think\b")
_MODEL_TYPES = ("qwen3", "qwen3_moe")  # families that think, whatever their template says


def reasoning_markers(template_source: str, model_type: str = "") -> tuple[str, str] | None:
    """The (start, end) tags the model thinks between, or None for a model that does not think:
    its chat template writes or reads `</think>`, or its family is one that thinks."""
    if THINK_END in template_source or model_type in _MODEL_TYPES:
        return THINK_START, THINK_END
    return None


def prompt_opens_thinking(prompt_text: str, start: str = THINK_START) -> bool:
    """Whether the generation prompt ends inside a think block its template opened (`...<think>\\n`)."""
    return prompt_text.rstrip(_WHITESPACE).endswith(start)


def thinking_switch(template_source: str, messages: list[dict], template_kwargs: Mapping | None) -> dict | None:
    """The template variables with `enable_thinking` set by Qwen3's soft switch: the last `/think` or
    `/no_think` in the latest user or system message that has one. Only for a template that reads
    `enable_thinking`, and never over a request's own `enable_thinking`. (A Qwen3 model answers a
    `/no_think` with an empty think block; asking the template for it makes that so for every model.)"""
    if "enable_thinking" not in template_source or "enable_thinking" in (template_kwargs or {}):
        return dict(template_kwargs) if template_kwargs is not None else None
    for message in reversed(messages):
        if message.get("role") not in ("user", "system"):
            continue
        switches = _SWITCH.findall(text_of(message.get("content")))
        if switches:
            return {**(template_kwargs or {}), "enable_thinking": switches[-1] != "no_"}
    return dict(template_kwargs) if template_kwargs is not None else None


@dataclass(frozen=True)
class ReasoningDelta:
    """One piece of a streamed reply: `reasoning` text or `content` text (the other is None)."""
    reasoning: str | None = None
    content: str | None = None


class ReasoningParser:
    """Splits one request's replies into reasoning and content. `thinking`: the prompt left a think
    block open, so a reply starts as reasoning."""

    def __init__(self, start: str = THINK_START, end: str = THINK_END, thinking: bool = False):
        self.start, self.end, self.thinking = start, end, thinking

    def split(self, text: str) -> tuple[str | None, str]:
        """(reasoning, content) of a finished reply; reasoning is None when there was none."""
        deltas = self.stream().finish(text)
        reasoning = "".join(d.reasoning for d in deltas if d.reasoning is not None)
        return reasoning or None, "".join(d.content for d in deltas if d.content is not None)

    def stream(self) -> StreamingReasoningParser:
        return StreamingReasoningParser(self)


# The stream's states: a `<think>` may still open the reply (also when the prompt opened one: some
# models write it again); inside the thinking; just past `</think>` (its whitespace dropped); in the answer.
_OPENING, _REASONING, _CLOSED, _CONTENT = "opening", "reasoning", "closed", "content"


class StreamingReasoningParser:
    """Turns a reply's text, fed as it is generated, into reasoning and content pieces. What could
    still be a tag (`<thi`, `</thin`) or whitespace next to one is held back until it is known."""

    def __init__(self, parser: ReasoningParser):
        self.start, self.end = parser.start, parser.end
        self._thinking = parser.thinking
        self._state = _OPENING
        self._text = ""
        self._position = 0  # text before this has been sent (or dropped)
        self._reasoning_sent = False  # whitespace at the reasoning's start is dropped until it begins

    def feed(self, text: str) -> list[ReasoningDelta]:
        self._text += text
        return self._advance(final=False)

    def finish(self, text: str = "") -> list[ReasoningDelta]:
        """Feed the last text and send what was held back (whitespace that ends a reasoning is dropped)."""
        self._text += text
        return self._advance(final=True)

    def _advance(self, final: bool) -> list[ReasoningDelta]:
        deltas: list[ReasoningDelta] = []
        step = {_OPENING: self._opening, _REASONING: self._reasoning, _CLOSED: self._closed, _CONTENT: self._content}
        while step[self._state](final, deltas):
            pass
        return deltas

    def _opening(self, final: bool, deltas: list) -> bool:
        rest = self._text[self._position:]
        head = rest.lstrip(_WHITESPACE)
        if head.startswith(self.start):
            self._position = len(self._text) - len(head) + len(self.start)
            self._state = _REASONING
            return True
        if self.start.startswith(head) and not final:
            return False  # nothing but whitespace and the beginning of a `<think>` so far
        self._state = _REASONING if self._thinking else _CONTENT
        return True

    def _reasoning(self, final: bool, deltas: list) -> bool:
        rest = self._text[self._position:]
        if not self._reasoning_sent:
            rest = rest.lstrip(_WHITESPACE)
            self._position = len(self._text) - len(rest)
        at = rest.find(self.end)
        if at >= 0:
            after = self._position + at + len(self.end)
            self._send_reasoning(rest[:at].rstrip(_WHITESPACE), deltas)
            self._position, self._state = after, _CLOSED
            return True
        held = 0 if final else _prefix_length(rest, self.end)
        self._send_reasoning(rest[:len(rest) - held].rstrip(_WHITESPACE), deltas)
        return False

    def _send_reasoning(self, text: str, deltas: list) -> None:
        if text:
            deltas.append(ReasoningDelta(reasoning=text))
            self._position += len(text)
            self._reasoning_sent = True

    def _closed(self, final: bool, deltas: list) -> bool:
        rest = self._text[self._position:]
        self._position = len(self._text) - len(rest.lstrip(_WHITESPACE))
        if self._position == len(self._text):
            return False
        self._state = _CONTENT
        return True

    def _content(self, final: bool, deltas: list) -> bool:
        rest = self._text[self._position:]
        if rest:
            deltas.append(ReasoningDelta(content=rest))
            self._position = len(self._text)
        return False


def _prefix_length(text: str, tag: str) -> int:
    """How many trailing characters of `text` could begin `tag`."""
    for length in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-length:]):
            return length
    return 0
