"""`levante chat`: the Textual app. The conversation itself lives in `ChatSession` (session.py),
saved after every turn in `ConversationStore` (levante/conversations.py); this file is only the screen."""
from __future__ import annotations

import asyncio
import collections
import datetime
import json
import logging

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import Footer, Input, Markdown, Static
from textual.worker import Worker, WorkerState

from levante.errors import LevanteError
from levante.tui.session import (ChatSession, TextDelta, ToolCall, ToolResult, TurnEnd, TurnError, image_part,
                                 user_content)
from levante.conversations import ConversationStore
from levante.tui.widgets import AssistantMessage, LogNotice, Notice, PromptInput, ToolCallView, UserMessage

HELP = """Commands:
  /system PROMPT     set the system prompt (/system alone clears it)
  /temperature X     sampling temperature (also /top_p X, /max_tokens N, /seed N)
  /model             the model and the settings in use
  /tools             MCP tools offered to the model, and servers that failed
  /image PATH|URL    attach an image to the next message
  /clear             forget this conversation's messages
  /new               start a new conversation (this one stays in /history)
  /history           saved conversations;  /load ID  resumes one
  /help  /quit
Keys: Enter sends, Up/Down recall what you sent, Ctrl+C stops a generation, Ctrl+Q quits."""


class ChatApp(App):
    TITLE = "levante chat"
    CSS = """
    #log { height: 1fr; padding: 0 1; }
    #status { height: 1; padding: 0 1; color: $text-muted; background: $surface; }
    #prompt { dock: bottom; }
    """
    BINDINGS = [
        Binding("ctrl+c", "stop", "Stop generation", priority=True),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(self, session: ChatSession, store: ConversationStore, *, conversation_id: int | None = None,
                 server_label: str = "", tools_host=None):
        super().__init__()
        self.session = session
        self.store = store
        self.conversation_id = conversation_id
        self.server_label = server_label
        self.tools_host = tools_host  # an object with async serve() / close(), e.g. McpToolHost; or None
        self.pending_images: list[dict] = []
        self.turn = None  # the worker running the current turn
        self.busy = False
        self.turn_running = False
        self.last_stats = ""

    # --- layout --------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield VerticalScroll(id="log")
        yield Static(id="status")
        yield PromptInput(placeholder="Message, or /help", id="prompt")
        yield Footer()

    async def on_mount(self) -> None:
        self.query_one("#prompt", Input).focus()
        self.log_handler = _LogToLog()
        logging.getLogger().addHandler(self.log_handler)  # warnings (a failed MCP server...) into the log view
        self.set_interval(0.5, self._drain_log)
        if self.tools_host is not None:
            self.tools_host.on_ready = self._tools_ready
            self.run_worker(self.tools_host.serve(), group="tools", exit_on_error=False)
        if self.conversation_id is not None:
            await self.load_conversation(self.conversation_id)
        else:
            await self.notice(f"Chatting with {self.session.model}{self.server_label}. /help lists the commands.")
        self.update_status()

    async def _tools_ready(self) -> None:
        host = self.tools_host
        failures = "; ".join(f"{name}: {why}" for name, why in host.failures.items())
        await self.notice(f"MCP: {len(host.openai_tools())} tool(s) ready (/tools lists them)"
                          + (f"; failed: {failures}" if failures else ""), error=bool(failures))

    async def on_unmount(self) -> None:
        logging.getLogger().removeHandler(self.log_handler)
        await self.session.client.close()  # its connections belong to this loop: close them while it runs

    async def _drain_log(self) -> None:
        while self.log_handler.lines:
            await self.notice(self.log_handler.lines.popleft(), error=True, kind=LogNotice)

    @property
    def log_view(self) -> VerticalScroll:
        return self.query_one("#log", VerticalScroll)

    @property
    def generating(self) -> bool:
        """From sending until the turn's answer is shown and saved (stopped or not)."""
        return self.busy

    def update_status(self, state: str = "") -> None:
        s = self.session.settings
        parts = [state or self.last_stats]
        if self.pending_images:
            parts.append(f"{len(self.pending_images)} image(s) attached")
        if self.conversation_id is not None:
            parts.append(f"conversation {self.conversation_id}")
        parts += [f"temperature {s.temperature}", f"top_p {s.top_p}", f"max_tokens {s.max_tokens}",
                  self.session.model]
        self.query_one("#status", Static).update(" · ".join(p for p in parts if p))

    async def notice(self, text: str, error: bool = False, kind: type[Notice] = Notice) -> Notice:
        widget = kind(text, error)
        await self.log_view.mount(widget)
        self.log_view.scroll_end(animate=False)
        return widget

    # --- input ---------------------------------------------------------------------------------

    async def on_input_submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        event.input.value = ""
        if not text:
            return
        if isinstance(event.input, PromptInput):
            event.input.remember(text)
        if text.startswith("/"):
            await self.command(text)
        elif self.generating:
            self.notify("Still answering: wait, or stop it with Ctrl+C.", severity="warning")
        else:
            await self.send(text)

    async def send(self, text: str) -> None:
        content = user_content(text, self.pending_images)
        self.pending_images = []
        self.busy = True
        await self.log_view.mount(UserMessage(content))
        self.log_view.scroll_end(animate=False)
        self.turn = self.run_worker(self.run_turn(content), group="turn", exclusive=True, exit_on_error=False)

    async def run_turn(self, content) -> None:
        self.turn_running = True  # from here on, a cancel runs the `finally` below
        self.update_status("answering… (Ctrl+C stops)")
        answer, stream, views, stopped = None, None, {}, False
        try:
            async for event in self.session.send(content):
                if isinstance(event, TextDelta):
                    if answer is None:
                        answer = AssistantMessage()
                        await self.log_view.mount(answer)
                        stream = Markdown.get_stream(answer)
                    await stream.write(event.text)
                elif isinstance(event, ToolCall):
                    if stream is not None:
                        await stream.stop()
                    answer = stream = None
                    views[event.id] = ToolCallView(event.id, event.name, event.arguments)
                    await self.log_view.mount(views[event.id])
                elif isinstance(event, ToolResult):
                    views[event.id].set_result(event.content, event.is_error)
                elif isinstance(event, TurnEnd):
                    self.last_stats = _stats(event)
                elif isinstance(event, TurnError):
                    await self.notice(f"error: {event.message}", error=True)
                self.log_view.scroll_end(animate=False)
        except asyncio.CancelledError:
            stopped = True
            raise
        finally:
            try:
                if stream is not None:
                    await stream.stop()
                if stopped:
                    self.last_stats = "stopped"
                    for view in views.values():
                        if view.result is None:
                            view.set_result("error: stopped by the user", True)
                    await self.notice("[stopped]")
                self.save()
                self.update_status()
            finally:
                self.busy = self.turn_running = False

    async def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR:  # a bug: say so in the log rather than die or go quiet
            error = event.worker.error
            await self.notice(f"internal error: {type(error).__name__}: {error}", error=True)

    def action_stop(self) -> None:
        if self.generating and self.turn_running and not self.turn.is_cancelled:
            self.turn.cancel()
        elif self.generating:
            self.notify("Starting the answer; press Ctrl+C again to stop it.")
        else:
            self.notify("Nothing to stop. Ctrl+Q or /quit quits.")

    async def action_quit(self) -> None:
        if self.generating and self.turn_running:
            self.turn.cancel()
            try:
                await self.turn.wait()
            except Exception:  # WorkerCancelled: it was stopped, as asked
                pass
        if self.tools_host is not None:
            await self.tools_host.close()
        self.exit()

    # --- conversations -------------------------------------------------------------------------

    def save(self) -> None:
        if not self.session.messages:
            return
        if self.conversation_id is None:
            self.conversation_id = self.store.create(self.session.model)
        self.store.save(self.conversation_id, self.session.messages, self.session.model)

    async def load_conversation(self, conversation_id: int) -> None:
        messages = self.store.load(conversation_id)
        self.session.messages = messages
        self.conversation_id = conversation_id
        await self.log_view.remove_children()
        await self.notice(f"Conversation {conversation_id} resumed ({len(messages)} messages).")
        views: dict[str, ToolCallView] = {}
        for message in messages:
            role = message.get("role")
            if role == "system":
                await self.notice(f"system: {message.get('content')}")
            elif role == "user":
                await self.log_view.mount(UserMessage(message.get("content")))
            elif role == "assistant":
                if message.get("content"):
                    await self.log_view.mount(AssistantMessage(message["content"]))
                for call in message.get("tool_calls") or []:
                    fn = call.get("function", {})
                    view = views[call.get("id")] = ToolCallView(call.get("id"), fn.get("name", "?"),
                                                                fn.get("arguments", ""))
                    await self.log_view.mount(view)
            elif role == "tool" and message.get("tool_call_id") in views:
                content = str(message.get("content"))
                views[message["tool_call_id"]].set_result(content, content.startswith("error:"))
        self.log_view.scroll_end(animate=False)

    # --- slash commands ------------------------------------------------------------------------

    async def command(self, text: str) -> None:
        name, _, argument = text[1:].partition(" ")
        name, argument = name.lower().replace("-", "_"), argument.strip()
        if name in ("quit", "exit", "q"):
            await self.action_quit()
            return
        if self.generating and name not in ("help", "model", "tools", "history"):
            self.notify("Still answering: wait, or stop it with Ctrl+C.", severity="warning")
            return
        handler = getattr(self, f"cmd_{name}", None)
        if handler is None:
            await self.notice(f"unknown command /{name}; /help lists them", error=True)
            return
        try:
            await handler(argument)
        except (LevanteError, ValueError) as e:
            await self.notice(f"/{name}: {e}", error=True)
        self.update_status()

    async def cmd_help(self, _: str) -> None:
        await self.notice(HELP)

    async def cmd_system(self, prompt: str) -> None:
        self.session.set_system(prompt or None)
        await self.notice(f"system prompt set: {prompt}" if prompt else "system prompt cleared")
        self.save()

    async def _set_number(self, key: str, argument: str, kind=float, low=None, high=None) -> None:
        settings = self.session.settings
        if not argument:
            await self.notice(f"{key} is {getattr(settings, key)}")
            return
        try:
            value = kind(argument)
        except ValueError:
            raise ValueError(f"'{argument}' is not a {'whole ' if kind is int else ''}number") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise ValueError(f"{key} must be between {low} and {high if high is not None else 'any'}")
        setattr(settings, key, value)
        await self.notice(f"{key} set to {value}")

    async def cmd_temperature(self, argument: str) -> None:
        await self._set_number("temperature", argument, float, 0.0, 2.0)

    async def cmd_top_p(self, argument: str) -> None:
        await self._set_number("top_p", argument, float, 0.0, 1.0)

    async def cmd_max_tokens(self, argument: str) -> None:
        await self._set_number("max_tokens", argument, int, 1)

    async def cmd_seed(self, argument: str) -> None:
        await self._set_number("seed", argument, int, 0)

    async def cmd_clear(self, _: str) -> None:
        self.session.clear()
        self.pending_images = []
        await self.log_view.remove_children()
        if self.conversation_id is not None:
            self.store.save(self.conversation_id, self.session.messages)
        await self.notice("conversation cleared")

    async def cmd_new(self, _: str) -> None:
        system = self.session.system
        self.session.messages = []
        self.session.set_system(system)
        self.conversation_id = None
        self.pending_images = []
        await self.log_view.remove_children()
        await self.notice("new conversation" + (f" (system prompt kept: {system})" if system else ""))

    async def cmd_history(self, _: str) -> None:
        rows = self.store.list()
        if not rows:
            await self.notice("no saved conversations yet")
            return
        lines = ["Saved conversations (/load ID resumes one):"]
        for row in rows:
            when = datetime.datetime.fromtimestamp(row.updated).strftime("%Y-%m-%d %H:%M")
            mark = "*" if row.id == self.conversation_id else " "
            lines.append(f"{mark}{row.id:>4}  {when}  {row.messages:>3} msgs  {row.model}  {row.title}")
        await self.notice("\n".join(lines))

    async def cmd_load(self, argument: str) -> None:
        if not argument.isdigit():
            raise ValueError("usage: /load ID (see /history)")
        await self.load_conversation(int(argument))

    async def cmd_image(self, argument: str) -> None:
        if not argument:
            raise ValueError("usage: /image PATH")
        self.pending_images.append(image_part(argument))
        await self.notice(f"image attached to the next message: {argument}")

    async def cmd_model(self, _: str) -> None:
        lines = [f"model: {self.session.model}", f"server: {self.session.client.base_url}{self.server_label}"]
        try:
            models = await self.session.client.models.list()
            for card in models.data:
                extra = card.model_extra or {}
                details = ", ".join(f"{k} {', '.join(map(str, v)) if isinstance(v, list) else v}"
                                    for k, v in extra.items() if k not in ("object", "created"))
                mark = "*" if card.id == self.session.model else " "
                lines.append(f"{mark} {card.id} (owned by {card.owned_by}{', ' + details if details else ''})")
        except Exception as e:  # the listing is informative only
            lines.append(f"(the server's model list is unavailable: {e})")
        settings = self.session.settings.request_options()
        settings.update(settings.pop("extra_body", {}))
        lines.append("settings: " + json.dumps(settings))
        if self.session.system:
            lines.append(f"system prompt: {self.session.system}")
        await self.notice("\n".join(lines))

    async def cmd_tools(self, _: str) -> None:
        tools = self.session.tools
        if tools is None:
            await self.notice("no tools (start with --mcp-config FILE or set MCP_CONFIG_PATH)")
            return
        offered = tools.openai_tools()
        lines = [f"{len(offered)} tool(s) offered to the model:"]
        for tool in offered:
            fn = tool.get("function", {})
            lines.append(f"  {fn.get('name')}: {' '.join(str(fn.get('description', '')).split())[:100]}")
        for server, reason in (getattr(tools, "failures", None) or {}).items():
            lines.append(f"  failed server {server}: {reason}")
        await self.notice("\n".join(lines))


class _LogToLog(logging.Handler):
    """Keeps warnings from any thread until the app shows them (the terminal is the app's)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: collections.deque[str] = collections.deque(maxlen=100)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname.lower()}: {record.getMessage()}")


def _stats(end: TurnEnd) -> str:
    if end.completion_tokens and end.seconds > 0:
        return f"{end.completion_tokens} tokens, {end.completion_tokens / end.seconds:.1f} tok/s"
    return f"{end.seconds:.1f}s"
