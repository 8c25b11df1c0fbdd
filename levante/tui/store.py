"""Conversations kept in SQLite: one row per conversation, one per message (its OpenAI JSON).

The file lives in the user's data folder: `$LEVANTE_DATA_DIR`, else `$XDG_DATA_HOME/levante`,
else `~/.local/share/levante`.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from levante.errors import InvalidRequest

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    title TEXT NOT NULL DEFAULT '',
    model TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    message TEXT NOT NULL,
    PRIMARY KEY (conversation_id, position)
);
"""


def data_dir() -> Path:
    if os.environ.get("LEVANTE_DATA_DIR"):
        return Path(os.environ["LEVANTE_DATA_DIR"]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base).expanduser() / "levante"


@dataclass(frozen=True)
class ConversationInfo:
    id: int
    title: str
    model: str
    created: float
    updated: float
    messages: int


class ConversationStore:
    """Saves and lists conversations; a conversation is its list of OpenAI chat messages."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else data_dir() / "chats.sqlite3"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, check_same_thread=False)
        self.db.execute("PRAGMA foreign_keys = ON")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def create(self, model: str = "", title: str = "") -> int:
        now = time.time()
        with self.db:
            cursor = self.db.execute("INSERT INTO conversations (title, model, created, updated) VALUES (?, ?, ?, ?)",
                                     (title, model, now, now))
        return int(cursor.lastrowid)

    def save(self, conversation_id: int, messages: list[dict], model: str | None = None) -> None:
        """Replace the conversation's messages with `messages`; the title is its first user text."""
        self._require(conversation_id)
        title = _title(messages)
        with self.db:
            self.db.execute("DELETE FROM messages WHERE conversation_id = ?", (conversation_id,))
            self.db.executemany("INSERT INTO messages (conversation_id, position, message) VALUES (?, ?, ?)",
                                [(conversation_id, i, json.dumps(m)) for i, m in enumerate(messages)])
            self.db.execute("UPDATE conversations SET title = ?, updated = ?, model = COALESCE(?, model) "
                            "WHERE id = ?", (title, time.time(), model, conversation_id))

    def load(self, conversation_id: int) -> list[dict]:
        self._require(conversation_id)
        rows = self.db.execute("SELECT message FROM messages WHERE conversation_id = ? ORDER BY position",
                               (conversation_id,))
        return [json.loads(row[0]) for row in rows]

    def list(self, limit: int = 50) -> list[ConversationInfo]:
        """The most recently updated conversations that have messages, newest first."""
        rows = self.db.execute(
            "SELECT c.id, c.title, c.model, c.created, c.updated, COUNT(m.position) FROM conversations c "
            "JOIN messages m ON m.conversation_id = c.id GROUP BY c.id ORDER BY c.updated DESC, c.id DESC "
            "LIMIT ?", (limit,))
        return [ConversationInfo(*row) for row in rows]

    def delete(self, conversation_id: int) -> None:
        with self.db:
            self.db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    def _require(self, conversation_id: int) -> None:
        if self.db.execute("SELECT 1 FROM conversations WHERE id = ?", (conversation_id,)).fetchone() is None:
            raise InvalidRequest(f"no conversation {conversation_id} (see /history)")


def _title(messages: list[dict], width: int = 60) -> str:
    for message in messages:
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                content = " ".join(part.get("text", "") for part in content if part.get("type") == "text")
            text = " ".join(str(content or "").split())
            return text if len(text) <= width else text[: width - 1] + "…"
    return ""
