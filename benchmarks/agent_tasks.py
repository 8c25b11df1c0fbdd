"""Everyday agent tasks: does the model finish them with nine real MCP servers registered?

    python benchmarks/agent_tasks.py [--model qwen2.5-coder:0.5b] [--modes ranked,all] [--tasks a,b]
                                     [--max-tokens 160] [--out results.json]

Tool-call plumbing is tested elsewhere (tests/test_mcp_nine.py); this measures what a user sees.
A small world is made in a temporary folder: files, a git repository, a sqlite database, a memory
graph, a page served on loopback (the only thing fetched). The nine servers the tests use serve it:
time, git, fetch, sqlite (PyPI; sqlite in its own virtual environment), filesystem, memory,
everything, sequential-thinking (npm; `make mcp-servers` installs them all) and a second levante's
`--mcp-port` server (smollm2:135m). Then for each mode `levante serve --mcp-config` runs the model
(default: the default model), and each task is one chat request at temperature 0, checked by
reading the answer (or, for a task that changes the world, the world). Modes:
  ranked  the tools as levante offers them: the relevant ones when they exceed --mcp-max-tools (the default)
  all     every tool in every request, in the servers' order (a --mcp-max-tools above their count, as
          mistral.rs and Ollama offer them)
Prints a row per task (pass or fail per mode, the calls made, seconds) and the success rate per
mode; `--out` keeps the answers and calls as JSON. Runs for minutes: prefill of the tool
definitions and decode on CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable
from zoneinfo import ZoneInfo

import httpx

ROOT = Path(__file__).resolve().parent.parent
NPM_BIN = ROOT / ".mcp-servers" / "node_modules" / ".bin"
SQLITE_SERVER = ROOT / ".mcp-servers" / "sqlite-venv" / "bin" / "mcp-server-sqlite"
LEVANTE = [sys.executable, "-m", "levante.cli"]
ORDERS = 23
PAGE = ("<html><head><title>Notice board</title></head><body><h1>Notice board</h1>"
        "<p>Welcome back. The password of the day is pumpkin.</p><p>The canteen closes at 3 pm.</p></body></html>")


# -- the world the tasks work on ---------------------------------------------------------------------

@dataclass
class World:
    folder: Path
    files: Path
    repo: Path
    database: Path
    memory: Path
    site: str


def make_world(folder: Path, site: str) -> World:
    files = folder / "files"
    (files / "projects").mkdir(parents=True)
    (files / "secret.txt").write_text("The secret word is lighthouse.\n")
    for name in ("alpha.py", "beta.md", "gamma.csv"):
        (files / "projects" / name).write_text(f"{name}\n")
    (files / "report.txt").write_text("quarterly report\n" * 25)  # 425 bytes
    repo = _make_repo(folder / "repo")
    database = folder / "shop.db"
    with sqlite3.connect(database) as db:
        db.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
        db.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER, total REAL)")
        db.executemany("INSERT INTO customers (name) VALUES (?)", [("Ana",), ("Bo",), ("Cy",)])
        db.executemany("INSERT INTO orders (customer_id, total) VALUES (?, ?)",
                       [(1 + i % 3, 10.0 + i) for i in range(ORDERS)])
    memory = folder / "memory.jsonl"
    memory.write_text(json.dumps({"type": "entity", "name": "Alice", "entityType": "person",
                                  "observations": ["Alice's favourite colour is green"]}) + "\n")
    return World(folder, files, repo, database, memory, site)


def _make_repo(folder: Path) -> Path:
    folder.mkdir(parents=True)
    env = {"GIT_AUTHOR_NAME": "Dev", "GIT_AUTHOR_EMAIL": "dev@example.org", "GIT_COMMITTER_NAME": "Dev",
           "GIT_COMMITTER_EMAIL": "dev@example.org", "HOME": str(folder), "PATH": "/usr/bin:/bin"}

    def git(*args):
        subprocess.run(["git", "-C", str(folder), *args], check=True, env=env, capture_output=True)

    git("init", "-q", "-b", "main")
    for name, text, message in [("README.md", "hello\n", "Initial commit"),
                                ("app.py", "print('hi')\n", "Add the app"),
                                ("config.yaml", "timeout: 30\n", "Fix the login timeout")]:
        (folder / name).write_text(text)
        git("add", name)
        git("commit", "-q", "-m", message)
    (folder / "config.yaml").write_text("timeout: 60\n")  # changed, not committed
    return folder


@contextlib.contextmanager
def loopback_site(pages: dict[str, str]):
    """`pages` served on 127.0.0.1 (the only address any task fetches); yields the base URL."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = pages.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Type", "text/plain" if self.path.endswith(".txt") else "text/html")
            self.end_headers()
            self.wfile.write((body or "not found").encode())

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def mcp_config(world: World, levante_mcp_url: str) -> dict:
    for path in (NPM_BIN, SQLITE_SERVER):
        if not path.exists():
            sys.exit(f"{path} is missing: run `make mcp-servers` first")
    python = sys.executable
    return {"mcpServers": {
        "time": {"command": python, "args": ["-m", "mcp_server_time", "--local-timezone", "UTC"]},
        "git": {"command": python, "args": ["-m", "mcp_server_git", "--repository", str(world.repo)]},
        "fetch": {"command": python, "args": ["-m", "mcp_server_fetch", "--allow-private-ips"]},  # loopback only
        "sqlite": {"command": str(SQLITE_SERVER), "args": ["--db-path", str(world.database)]},
        "filesystem": {"command": str(NPM_BIN / "mcp-server-filesystem"), "args": [str(world.files)]},
        "memory": {"command": str(NPM_BIN / "mcp-server-memory"), "env": {"MEMORY_FILE_PATH": str(world.memory)}},
        "everything": {"command": str(NPM_BIN / "mcp-server-everything"), "args": ["stdio"]},
        "thinking": {"command": str(NPM_BIN / "mcp-server-sequential-thinking")},
        "levante": {"url": levante_mcp_url},
    }}


# -- the tasks ---------------------------------------------------------------------------------------

@dataclass
class Run:
    """A task's request as the checker sees it: the world after it, the answer, when it ran."""
    world: World
    answer: str
    started: datetime
    ended: datetime


@dataclass
class Task:
    name: str
    prompt: Callable[[World], str]
    check: Callable[[Run], bool]


def _has(*words: str) -> Callable[[Run], bool]:
    return lambda run: all(word.lower() in run.answer.lower() for word in words)


def _clock(zone: str, fixed: Callable[[], datetime] | None = None) -> Callable[[Run], bool]:
    """The answer states, as hh:mm (leading zero or not, 12- or 24-hour), the time in `zone` at `fixed()`,
    or else at a minute while the request ran."""
    def check(run: Run) -> bool:
        if fixed is not None:
            moments = [fixed()]
        else:
            minutes = int((run.ended - run.started).total_seconds() // 60) + 2
            moments = [run.started + timedelta(minutes=m - 1) for m in range(minutes + 1)]
        for moment in moments:
            local = moment.astimezone(ZoneInfo(zone))
            for hour in {local.hour, (local.hour - 1) % 12 + 1}:
                if re.search(rf"(?<!\d)0?{hour}:{local.minute:02d}(?!\d)", run.answer):
                    return True
        return False
    return check


def _new_york_morning() -> datetime:
    today = datetime.now(ZoneInfo("America/New_York")).date()
    return datetime(today.year, today.month, today.day, 9, 30, tzinfo=ZoneInfo("America/New_York"))


def _file_holds(relative: str, text: str) -> Callable[[Run], bool]:
    def check(run: Run) -> bool:
        path = run.world.files / relative
        return path.is_file() and text in path.read_text()
    return check


def _remembered(text: str) -> Callable[[Run], bool]:
    return lambda run: run.world.memory.is_file() and text in run.world.memory.read_text()


TASKS = [
    Task("read_file", lambda w: f"Read the file {w.files}/secret.txt and tell me the secret word.",
         _has("lighthouse")),
    Task("list_folder", lambda w: f"List the files in the folder {w.files}/projects.",
         _has("alpha.py", "beta.md", "gamma.csv")),
    Task("file_size", lambda w: f"How many bytes is the file {w.files}/report.txt?", _has("425")),
    Task("write_file", lambda w: f"Write a file {w.files}/todo.txt that contains the text: buy milk",
         _file_holds("todo.txt", "buy milk")),
    Task("count_rows", lambda w: "How many rows does the orders table of the sqlite database have?", _has(str(ORDERS))),
    Task("list_tables", lambda w: "Which tables are in the sqlite database?", _has("customers", "orders")),
    Task("latest_commit", lambda w: f"What is the message of the latest commit in the git repository {w.repo}?",
         _has("login timeout")),
    Task("uncommitted", lambda w: f"Which file has changes that are not committed in the git repository {w.repo}?",
         _has("config.yaml")),
    Task("fetch_word", lambda w: f"Fetch the page {w.site}/ and tell me the password of the day written on it.",
         _has("pumpkin")),
    Task("remember", lambda w: "Remember this in your memory: my car is parked on level 3.", _remembered("level 3")),
    Task("recall", lambda w: "What is Alice's favourite colour? Look it up in your memory.", _has("green")),
    Task("time_now", lambda w: "What time is it in Tokyo right now?", _clock("Asia/Tokyo")),
    Task("convert_time", lambda w: "It is 09:30 in New York today. What time is it then in London?",
         _clock("Europe/London", _new_york_morning)),
]


# -- running them ------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def levante(args: list[str], log: Path, ready_timeout: float = 900):
    """`levante serve ARGS` on a free loopback port until /health is 200; yields its base URL."""
    port = free_port()
    with open(log, "w") as out:
        process = subprocess.Popen([*LEVANTE, "serve", "--host", "127.0.0.1", "--port", str(port), "--no-webui",
                                    *args], stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if process.poll() is not None:
                sys.exit(f"levante serve {' '.join(args)} exited; see {log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                sys.exit(f"levante serve was not ready in {ready_timeout:.0f} s; see {log}")
            time.sleep(0.5)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def run_task(base: str, model: str, task: Task, world: World, max_tokens: int) -> dict:
    prompt = task.prompt(world)
    started, clock = datetime.now(ZoneInfo("UTC")), time.monotonic()
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": max_tokens}
    response = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=3600)
    seconds, ended = time.monotonic() - clock, datetime.now(ZoneInfo("UTC"))
    if response.status_code != 200:
        return {"task": task.name, "ok": False, "status": response.status_code, "answer": response.text,
                "calls": [], "seconds": seconds}
    choice = response.json()["choices"][0]
    answer = choice["message"].get("content") or ""
    calls = [{"name": c["name"], "arguments": c["arguments"], "is_error": c["is_error"], "result": c["content"][:300],
              **({"repeat_of": c["repeat_of"]} if "repeat_of" in c else {})}
             for c in choice["message"].get("mcp_calls", [])]
    ok = task.check(Run(world, answer, started, ended))
    return {"task": task.name, "ok": ok, "status": 200, "answer": answer, "calls": calls,
            "finish_reason": choice["finish_reason"], "offered": response.json().get("mcp_tools_offered", []),
            "seconds": seconds}


def run_mode(mode: str, args, tasks: list[Task], scratch: Path) -> list[dict]:
    """All tasks against one `levante serve` over one world (the tasks that change it touch apart things)."""
    results = []
    mcp_port = free_port()
    with loopback_site({"/robots.txt": "User-agent: *\nAllow: /\n", "/": PAGE}) as site, \
            levante(["--model", "smollm2:135m", "--mcp-port", str(mcp_port), "--max-model-len", "512"],
                    scratch / f"{mode}-levante-mcp.log"):
        world = make_world(scratch / mode, site)
        config = scratch / mode / "mcp.json"
        config.write_text(json.dumps(mcp_config(world, f"http://127.0.0.1:{mcp_port}/mcp")))
        extra = ["--mcp-max-tools", "100000"] if mode == "all" else []
        with levante(["--model", args.model, "--mcp-config", str(config), *extra], scratch / f"{mode}.log") as base:
            for task in tasks:
                result = run_task(base, args.model, task, world, args.max_tokens)
                results.append({"mode": mode, **result})
                calls = ", ".join(f"{c['name']}({c['arguments']})" + (" [error]" if c["is_error"] else "")
                                  for c in result["calls"])
                print(f"  {mode:6} {task.name:14} {'pass' if result['ok'] else 'FAIL'} {result['seconds']:6.1f} s  "
                      f"calls: {calls or '-'}  answer: {' '.join(result['answer'].split())[:160]!r}", flush=True)
    return results


def report(results: list[dict], modes: list[str], tasks: list[Task]) -> None:
    by = {(r["mode"], r["task"]): r for r in results}
    print(f"\n{'task':16}" + "".join(f"{mode:>10}" for mode in modes))
    for task in tasks:
        print(f"{task.name:16}" + "".join(f"{'pass' if by[(m, task.name)]['ok'] else 'fail':>10}" for m in modes))
    print(f"{'success':16}" + "".join(
        f"{sum(by[(m, t.name)]['ok'] for t in tasks):>7}/{len(tasks):<2}" for m in modes))
    for mode in modes:
        seconds = sum(by[(mode, t.name)]["seconds"] for t in tasks)
        done = sum(by[(mode, t.name)]["ok"] for t in tasks)
        print(f"{mode}: {done}/{len(tasks)} tasks ({100 * done / len(tasks):.0f}%), {seconds:.0f} s of requests")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder:0.5b")
    parser.add_argument("--modes", default="ranked,all", help="ranked, all, or both (comma-separated)")
    parser.add_argument("--tasks", default=None, help="comma-separated task names (default: all)")
    parser.add_argument("--max-tokens", type=int, default=160, help="per round of the tool loop")
    parser.add_argument("--out", type=Path, default=None, help="write every answer and call here (JSON)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (worlds and server logs)")
    args = parser.parse_args()
    modes = args.modes.split(",")
    wanted = set(args.tasks.split(",")) if args.tasks else None
    tasks = [t for t in TASKS if wanted is None or t.name in wanted]
    scratch = Path(tempfile.mkdtemp(prefix="levante-agent-tasks-"))
    print(f"{len(tasks)} tasks, modes {', '.join(modes)}, model {args.model}; logs in {scratch}", flush=True)
    try:
        results = [r for mode in modes for r in run_mode(mode, args, tasks, scratch)]
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    report(results, modes, tasks)
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
