"""The pieces of the chat log: user and assistant messages, tool calls (collapsed), notices."""
from __future__ import annotations

import json

from rich.text import Text
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import Collapsible, Input, Markdown, Static


class PromptInput(Input):
    """The message line; Up and Down walk through what was sent before."""

    BINDINGS = [Binding("up", "history(-1)", "Previous", show=False),
                Binding("down", "history(1)", "Next", show=False)]

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.history: list[str] = []
        self._position = 0

    def remember(self, text: str) -> None:
        if text and (not self.history or self.history[-1] != text):
            self.history.append(text)
        self._position = len(self.history)

    def action_history(self, step: int) -> None:
        if not self.history:
            return
        self._position = max(0, min(len(self.history), self._position + step))
        self.value = self.history[self._position] if self._position < len(self.history) else ""
        self.cursor_position = len(self.value)


class UserMessage(Static):
    DEFAULT_CSS = """
    UserMessage { margin: 1 0 0 0; padding: 0 1; background: $primary 15%; color: $text; }
    """

    def __init__(self, content: str | list[dict]):
        self.text, images = _text_and_images(content)
        label = Text(self.text)
        if images:
            label.append(f"  [{images} image{'s' if images > 1 else ''}]", style="italic")
        super().__init__(label)


class AssistantMessage(Markdown):
    """The model's answer, rendered as markdown (code fences highlighted) while it streams in."""

    DEFAULT_CSS = """
    AssistantMessage { margin: 1 0 0 0; padding: 0 1; }
    """


class ToolCallView(Collapsible):
    """One tool call, collapsed: the title says which tool and how it went; open it for arguments and result."""

    DEFAULT_CSS = """
    ToolCallView { margin: 1 0 0 0; }
    ToolCallView .tool-result-error { color: $error; }
    """

    def __init__(self, call_id: str, name: str, arguments: str):
        self.call_id, self.tool_name, self.arguments = call_id, name, arguments
        self.result: str | None = None
        self.is_error = False
        self._arguments = Static(Text("arguments: " + _pretty_json(arguments)), classes="tool-arguments")
        self._result = Static(Text("running…"), classes="tool-result")
        super().__init__(Vertical(self._arguments, self._result), title=self._title_text(), collapsed=True)

    def set_result(self, content: str, is_error: bool) -> None:
        self.result, self.is_error = content, is_error
        self._result.update(Text("result: " + content))
        self._result.set_class(is_error, "tool-result-error")
        self.title = self._title_text()

    def _title_text(self) -> str:
        arguments = " ".join(self.arguments.split())
        if len(arguments) > 60:
            arguments = arguments[:59] + "…"
        state = "…" if self.result is None else ("✗ error" if self.is_error else "✓")
        return f"tool {self.tool_name}({arguments}) {state}"


class Notice(Static):
    """A line from the app itself: help, command answers, errors, "stopped"."""

    DEFAULT_CSS = """
    Notice { margin: 1 0 0 0; padding: 0 1; color: $text-muted; }
    Notice.error { color: $error; }
    """

    def __init__(self, text: str, error: bool = False):
        self.text = text
        super().__init__(Text(text), classes="error" if error else "")


class LogNotice(Notice):
    """A warning or error logged by any thread (a failed MCP server...), shown when the app next drains them."""


def _text_and_images(content: str | list[dict] | None) -> tuple[str, int]:
    if isinstance(content, list):
        text = " ".join(p.get("text", "") for p in content if p.get("type") == "text")
        return text, sum(1 for p in content if p.get("type") == "image_url")
    return str(content or ""), 0


def _pretty_json(text: str) -> str:
    try:
        return json.dumps(json.loads(text), ensure_ascii=False)
    except ValueError:
        return text
