"""Smoke test of `levante chat` in a real terminal: tmux runs it, we type, read the screen, quit."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from levante.conversations import ConversationStore

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")]

REPO = Path(__file__).resolve().parents[1]


def flat(text: str) -> str:
    """Screen text with the layout taken out: box-drawing borders dropped and every run of
    whitespace (line breaks included) one space, so a line wrapped at any width still matches."""
    return " ".join(BORDERS.sub(" ", text).split())


BORDERS = re.compile("[\u2500-\u259f\u2800-\u28ff]")
EXITED = "LEVANTE-EXITED"  # the shell's line once `levante chat` has exited, with its status


class Terminal:
    """`levante chat ARGS` in a detached tmux session on a private socket."""

    def __init__(self, tmp_path, args: list[str]):
        self.tmux = ["tmux", "-L", f"levante-test-{os.getpid()}"]
        env = {"PYTHONPATH": str(REPO), "LEVANTE_DATA_DIR": str(tmp_path / "data"), "TERM": "xterm-256color"}
        command = [sys.executable, "-m", "levante", "chat", *args]
        shell = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + shlex.join(command)
        shell = f"cd {shlex.quote(str(REPO))} && {shell}; echo {EXITED} rc=$?; sleep 60"
        subprocess.run([*self.tmux, "new-session", "-d", "-s", "chat", "-x", "200", "-y", "50", shell], check=True)

    def screen(self) -> str:
        return subprocess.run([*self.tmux, "capture-pane", "-p", "-t", "chat"], capture_output=True, text=True).stdout

    def send(self, *keys: str) -> None:
        subprocess.run([*self.tmux, "send-keys", "-t", "chat", *keys], check=True)

    def wait_for(self, needle: str, hang: float = 600) -> str:
        """The screen once `needle` shows on it, however the app or the terminal wrapped it.

        Waits on the app, not on a clock: as long as `levante chat` runs (a loaded machine may take
        minutes to start it), and fails at once, with the screen, when it has exited without showing
        `needle`. `hang` only bounds a process that neither shows it nor exits."""
        deadline = time.monotonic() + hang
        while True:
            text = self.screen()
            if flat(needle) in flat(text):
                return text
            if EXITED in text or time.monotonic() > deadline:
                state = "exited" if EXITED in text else f"hung for {hang:.0f} s"
                raise AssertionError(f"'{needle}' never appeared; levante chat {state}; the screen:\n{text}")
            time.sleep(0.2)

    def close(self) -> None:
        subprocess.run([*self.tmux, "kill-server"], capture_output=True)


def test_chat_in_tmux_remote_server(tmp_path, tiny_model):
    """--url/--api-key against levante's server (in this process); no --model: the server's first model."""
    from levante import LLM
    from levante.tui.local import LocalServer

    llm = LLM(str(tiny_model("llama")), dtype="float32", max_model_len=256, kv_cache_gb=0.05, warmup=False)
    with LocalServer(llm, "tiny-remote") as server:
        terminal = Terminal(tmp_path, ["--url", server.base_url, "--api-key", server.api_key, "--max-tokens", "8"])
        try:
            terminal.wait_for("Chatting with tiny-remote.")
            terminal.send("/model", "Enter")
            card = flat(terminal.wait_for("tiny-remote (owned by levante,"))  # the /v1/models card's fields
            assert "max_model_len 256" in card.split("tiny-remote (owned by levante,", 1)[1]
            terminal.send("hi", "Enter")
            terminal.wait_for("tok/s")
            terminal.send("/quit", "Enter")
            terminal.wait_for(f"{EXITED} rc=0")
        finally:
            terminal.close()


def test_ctrl_c_in_tmux_stops_the_answer(tmp_path):
    """Scripted endpoint (holds its stream like a slow model): the terminal's Ctrl+C stops the answer, not the app."""
    import threading

    from scripted_openai import scripted_endpoint, text

    never = threading.Event()
    with scripted_endpoint() as (base_url, endpoint):
        endpoint.scripts = [[text("The answer is long"), never], [text("second answer")]]
        terminal = Terminal(tmp_path, ["--url", base_url, "--model", "scripted"])
        try:
            terminal.wait_for("Chatting with scripted.")
            terminal.send("first", "Enter")
            terminal.wait_for("The answer is long")
            terminal.send("C-c")
            terminal.wait_for("[stopped]")
            deadline = time.monotonic() + 10
            while endpoint.disconnects != 1 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert endpoint.disconnects == 1  # the stream was closed
            terminal.send("second", "Enter")
            terminal.wait_for("second answer")
            terminal.send("/quit", "Enter")
            terminal.wait_for(f"{EXITED} rc=0")
        finally:
            never.set()
            terminal.close()
    assert endpoint.requests[1]["messages"][1] == {"role": "assistant", "content": "The answer is long"}


def test_chat_in_tmux(tmp_path, tiny_model):
    """The local engine: type, see the answer and the status line, Ctrl+C with nothing to stop, /history, Ctrl+Q."""
    terminal = Terminal(tmp_path, ["-m", str(tiny_model("llama")), "--dtype", "float32", "--max-model-len", "256",
                                   "--kv-cache-gb", "0.05", "--max-tokens", "16", "--temperature", "0"])
    try:
        terminal.wait_for("/help lists the commands")
        terminal.send("hello from tmux", "Enter")
        text = terminal.wait_for("tok/s")  # the status line after the answer: N tokens, N tok/s
        assert "hello from tmux" in flat(text) and "conversation 1" in flat(text)
        terminal.send("C-c")  # nothing to stop: the app stays
        terminal.send("/history", "Enter")
        terminal.wait_for("Saved conversations")
        terminal.send("C-q")
        terminal.wait_for(f"{EXITED} rc=0")
    finally:
        terminal.close()
    store = ConversationStore(tmp_path / "data" / "chats.sqlite3")
    (conversation,) = store.list()
    messages = store.load(conversation.id)
    assert [m["role"] for m in messages] == ["user", "assistant"] and messages[0]["content"] == "hello from tmux"
    store.close()
