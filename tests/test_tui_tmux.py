"""Smoke test of `levante chat` in a real terminal: tmux runs it, we type, read the screen, quit."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from levante.tui.store import ConversationStore

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")]

REPO = Path(__file__).resolve().parents[1]


def test_chat_in_tmux(tmp_path, tiny_model):
    socket = f"levante-test-{os.getpid()}"
    tmux = ["tmux", "-L", socket]
    env = {"PYTHONPATH": str(REPO), "LEVANTE_DATA_DIR": str(tmp_path / "data"), "TERM": "xterm-256color"}
    command = [sys.executable, "-m", "levante", "chat", "-m", str(tiny_model("llama")), "--dtype", "float32",
               "--max-model-len", "256", "--kv-cache-gb", "0.05", "--max-tokens", "16", "--temperature", "0"]
    shell = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + shlex.join(command)
    shell = f"cd {shlex.quote(str(REPO))} && {shell}; echo LEVANTE-EXITED rc=$?; sleep 60"

    def screen() -> str:
        return subprocess.run([*tmux, "capture-pane", "-p", "-t", "chat"], capture_output=True, text=True).stdout

    def wait_for(needle: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = screen()
            if needle in text:
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"'{needle}' never appeared; the screen:\n{text}")
            time.sleep(0.2)

    subprocess.run([*tmux, "new-session", "-d", "-s", "chat", "-x", "200", "-y", "40", shell], check=True)
    try:
        wait_for("/help lists the commands")
        subprocess.run([*tmux, "send-keys", "-t", "chat", "hello from tmux", "Enter"], check=True)
        text = wait_for("tok/s")  # the status line after the answer: N tokens, N tok/s
        assert "hello from tmux" in text and "conversation 1" in text
        subprocess.run([*tmux, "send-keys", "-t", "chat", "C-c"], check=True)  # nothing to stop: no quit
        subprocess.run([*tmux, "send-keys", "-t", "chat", "/history", "Enter"], check=True)
        assert "1 saved" not in wait_for("Saved conversations")
        subprocess.run([*tmux, "send-keys", "-t", "chat", "C-q"], check=True)
        wait_for("LEVANTE-EXITED rc=0", 30)
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
    store = ConversationStore(tmp_path / "data" / "chats.sqlite3")
    (conversation,) = store.list()
    messages = store.load(conversation.id)
    assert [m["role"] for m in messages] == ["user", "assistant"] and messages[0]["content"] == "hello from tmux"
    store.close()
