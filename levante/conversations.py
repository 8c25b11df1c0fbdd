"""Conversations kept in SQLite, shared by `levante chat` and the web chat of `levante serve`.

One row per conversation, one per message (its OpenAI chat JSON). A conversation belongs to an
owner: '' for the local user (the terminal app on its own engine, a server without --api-key), or a
salted, slow hash of the API key that made it (never the key itself), so that several keys sharing
one file do not see each other's conversations. `ConversationStore(path, owner)` is one owner's
view; `store.as_owner(other)` another view on the same file.

The file lives in the user's data folder: `$LEVANTE_DATA_DIR`, else `$XDG_DATA_HOME/levante`,
else `~/.local/share/levante` (`chats.sqlite3`). Several processes may use it at once (WAL).
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from levante.errors import ConversationNotFound

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    title TEXT NOT NULL DEFAULT '',
    model TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    updated REAL NOT NULL,
    owner TEXT NOT NULL DEFAULT '',
    renamed INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS messages (
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    message TEXT NOT NULL,
    PRIMARY KEY (conversation_id, position)
);
CREATE TABLE IF NOT EXISTS settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""
# Columns added after the first release of the schema: (name, definition), added to older files on open.
ADDED_COLUMNS = (("owner", "TEXT NOT NULL DEFAULT ''"), ("renamed", "INTEGER NOT NULL DEFAULT 0"))
TITLE_WIDTH = 60
MAX_TITLE = 200
KEY_HASH_ITERATIONS = 200_000  # PBKDF2-SHA256: API keys may be short words, so the hash is slow to guess


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

    def to_json(self) -> dict:
        return {"id": self.id, "title": self.title, "model": self.model, "created": self.created,
                "updated": self.updated, "message_count": self.messages}


class ConversationStore:
    """Saves, lists, searches, renames and deletes one owner's conversations; a conversation is its
    list of OpenAI chat messages."""

    def __init__(self, path: str | Path | None = None, owner: str = ""):
        self.path = Path(path) if path else data_dir() / "chats.sqlite3"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.owner = owner
        self.lock = threading.Lock()  # one connection, used from several threads (the server's)
        self.db = sqlite3.connect(self.path, check_same_thread=False, timeout=10)
        with self.lock:
            self.db.execute("PRAGMA foreign_keys = ON")
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.executescript(SCHEMA)
            self._migrate()

    def as_owner(self, owner: str) -> ConversationStore:
        """The same file (connection and lock shared), seen as `owner`."""
        view = copy.copy(self)
        view.owner = owner
        return view

    def owner_of(self, api_key: str | None) -> str:
        """The owner a request with `api_key` acts as: '' without a key, else the key's salted hash."""
        if not api_key:
            return ""
        return _key_hash(self._salt(), api_key)

    def close(self) -> None:
        self.db.close()

    # -- one conversation -----------------------------------------------------------------------------

    def create(self, model: str = "", title: str = "") -> int:
        now = time.time()
        with self.lock, self.db:
            cursor = self.db.execute("INSERT INTO conversations (title, model, created, updated, owner, renamed) "
                                     "VALUES (?, ?, ?, ?, ?, ?)",
                                     (_clip(title), model, now, now, self.owner, int(bool(title))))
        return int(cursor.lastrowid)

    def save(self, conversation_id: int, messages: list[dict], model: str | None = None) -> None:
        """Replace the conversation's messages with `messages`; the title is its first user text
        unless the conversation was given one."""
        rows = [(conversation_id, i, json.dumps(m, ensure_ascii=False)) for i, m in enumerate(messages)]
        with self.lock, self.db:
            self._require(conversation_id)
            self.db.execute("DELETE FROM messages WHERE conversation_id = ?", (conversation_id,))
            self.db.executemany("INSERT INTO messages (conversation_id, position, message) VALUES (?, ?, ?)", rows)
            self.db.execute("UPDATE conversations SET title = CASE renamed WHEN 1 THEN title ELSE ? END, "
                            "updated = ?, model = COALESCE(?, model) WHERE id = ?",
                            (title_of(messages), time.time(), model, conversation_id))

    def load(self, conversation_id: int) -> list[dict]:
        with self.lock:
            self._require(conversation_id)
            rows = self.db.execute("SELECT message FROM messages WHERE conversation_id = ? ORDER BY position",
                                   (conversation_id,)).fetchall()
        return [json.loads(row[0]) for row in rows]

    def info(self, conversation_id: int) -> ConversationInfo:
        with self.lock:
            self._require(conversation_id)
            row = self.db.execute(
                "SELECT c.id, c.title, c.model, c.created, c.updated, COUNT(m.position) FROM conversations c "
                "LEFT JOIN messages m ON m.conversation_id = c.id WHERE c.id = ? GROUP BY c.id",
                (conversation_id,)).fetchone()
        return ConversationInfo(*row)

    def rename(self, conversation_id: int, title: str) -> None:
        """Give the conversation a title of its own (kept when it is saved again); '' returns to
        the title taken from its first user message."""
        title = _clip(title)
        with self.lock, self.db:
            self._require(conversation_id)
            if title:
                self.db.execute("UPDATE conversations SET title = ?, renamed = 1 WHERE id = ?",
                                (title, conversation_id))
                return
            first = self.db.execute("SELECT message FROM messages WHERE conversation_id = ? ORDER BY position",
                                    (conversation_id,)).fetchall()
            self.db.execute("UPDATE conversations SET title = ?, renamed = 0 WHERE id = ?",
                            (title_of([json.loads(r[0]) for r in first]), conversation_id))

    def delete(self, conversation_id: int) -> None:
        with self.lock, self.db:
            self.db.execute("DELETE FROM conversations WHERE id = ? AND owner = ?", (conversation_id, self.owner))

    # -- many ---------------------------------------------------------------------------------------------

    def list(self, limit: int = 50, query: str | None = None) -> list[ConversationInfo]:
        """The most recently updated conversations that have messages, newest first; with `query`, those
        whose title or messages contain it (case-insensitive for ASCII letters)."""
        where, params = "c.owner = ?", [self.owner]
        if query:
            pattern = "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            where += (" AND (c.title LIKE ? ESCAPE '\\' OR EXISTS (SELECT 1 FROM messages s WHERE "
                      "s.conversation_id = c.id AND s.message LIKE ? ESCAPE '\\'))")
            params += [pattern, pattern]
        with self.lock:
            rows = self.db.execute(
                "SELECT c.id, c.title, c.model, c.created, c.updated, COUNT(m.position) FROM conversations c "
                f"JOIN messages m ON m.conversation_id = c.id WHERE {where} GROUP BY c.id "
                "ORDER BY c.updated DESC, c.id DESC LIMIT ?", (*params, limit)).fetchall()
        return [ConversationInfo(*row) for row in rows]

    # -- inside -------------------------------------------------------------------------------------------

    def _require(self, conversation_id: int) -> None:
        """ConversationNotFound unless the conversation exists and is this owner's (another owner's
        conversation is not found either: its existence is not told). Call with the lock held."""
        row = self.db.execute("SELECT 1 FROM conversations WHERE id = ? AND owner = ?",
                              (conversation_id, self.owner)).fetchone()
        if row is None:
            raise ConversationNotFound(f"no conversation {conversation_id}")

    def _migrate(self) -> None:
        have = {row[1] for row in self.db.execute("PRAGMA table_info(conversations)")}
        for name, definition in ADDED_COLUMNS:
            if name not in have:
                self.db.execute(f"ALTER TABLE conversations ADD COLUMN {name} {definition}")
        self.db.execute("CREATE INDEX IF NOT EXISTS conversations_by_owner ON conversations (owner, updated)")
        self.db.commit()

    def _salt(self) -> str:
        with self.lock, self.db:
            self.db.execute("INSERT OR IGNORE INTO settings (name, value) VALUES ('key_salt', ?)",
                            (secrets.token_hex(16),))
            return self.db.execute("SELECT value FROM settings WHERE name = 'key_salt'").fetchone()[0]


@functools.lru_cache(maxsize=64)
def _key_hash(salt: str, api_key: str) -> str:
    digest = hashlib.pbkdf2_hmac("sha256", api_key.encode(), bytes.fromhex(salt), KEY_HASH_ITERATIONS)
    return "pbkdf2-sha256:" + digest.hex()


def _clip(title: str) -> str:
    return " ".join(str(title).split())[:MAX_TITLE]


def title_of(messages: list[dict], width: int = TITLE_WIDTH) -> str:
    """A conversation's title: its first user message's text, on one line, at most `width` characters."""
    for message in messages:
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                content = " ".join(part.get("text", "") for part in content
                                   if isinstance(part, dict) and part.get("type") == "text")
            text = " ".join(str(content or "").split())
            return text if len(text) <= width else text[: width - 1] + "…"
    return ""
