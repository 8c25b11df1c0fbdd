"""A Hugging Face Hub on a loopback port, serving repos built in the test (point HF_ENDPOINT at it).

It answers what `huggingface_hub` asks for, as the Hub does:
* ``GET /api/models/{repo}[/revision/{rev}]``: the commit sha and the file list (``siblings``);
* ``GET /api/models/{repo}/tree/{rev}``: each file with its size and blob id;
* ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: the file, with ``X-Repo-Commit``, ``ETag`` and
  ``Content-Length``, and ``Range: bytes=N-`` answered with 206 (resumed downloads);
* 404 with ``X-Error-Code`` RepoNotFound / RevisionNotFound / EntryNotFound, 401 for a private
  repo without the right token (with "Invalid credentials" for a wrong one), and 401/403 with
  ``X-Error-Code: GatedRepo`` for a gated repo whose terms the token's account has not accepted.
`drop_once` names files whose first download is cut off halfway (the connection closed).
`forged` makes it a hostile mirror: "sha" (the model info's commit), "commit" (every X-Repo-Commit
header) or "etag" (every ETag) sent instead of the true value.
Every request is recorded in `requests` as (method, path, Range header).
"""
from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    branches: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit sha
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> {path: content}
    token: str | None = None  # private: only this token may read it
    gated: bool = False  # terms not accepted by anyone: 401 without a token, 403 with one


def _sha(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


class FakeHub:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.drop_once: set[str] = set()
        self.forged: dict[str, str] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add(self, repo_id: str, files: dict[str, bytes], branch: str = "main", token: str | None = None) -> str:
        """Commit `files` (the whole tree) to `branch` of `repo_id`; the new commit's sha."""
        repo = self.repos.setdefault(repo_id, Repo(token=token))
        sha = _sha(f"{repo_id}:{branch}:{len(repo.commits)}")
        repo.commits[sha] = dict(files)
        repo.branches[branch] = sha
        return sha

    def add_folder(self, repo_id: str, folder: Path, branch: str = "main", **extra: bytes) -> str:
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        return self.add(repo_id, {**files, **extra}, branch)

    def downloads(self) -> list[str]:
        """Paths of the files sent with GET (repeats included), in order."""
        return [path.split("/resolve/", 1)[1].split("/", 1)[1] for method, path, _ in self.requests
                if method == "GET" and "/resolve/" in path]


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def do_HEAD(self):
            self._answer(head=True)

        def do_GET(self):
            self._answer(head=False)

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, str(value))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _error(self, status: int, code: str | None, message: str, head: bool):
            headers = {"Content-Type": "application/json"}
            if code:
                headers["X-Error-Code"] = code
            headers["X-Error-Message"] = message
            self._send(status, json.dumps({"error": message}).encode(), headers, head)

        def _repo(self, repo_id: str, head: bool) -> Repo | None:
            repo = hub.repos.get(repo_id)
            auth = self.headers.get("Authorization")
            if repo is not None and repo.gated:
                self._error(403 if auth else 401, "GatedRepo", "Access to this model is restricted", head)
                return None
            if repo is None or (repo.token and auth is None):
                self._error(401 if repo is not None else 404, "RepoNotFound", "Repository not found", head)
                return None
            if repo.token and auth != f"Bearer {repo.token}":
                self._error(401, None, "Invalid credentials in Authorization header", head)
                return None
            return repo

        def _commit(self, repo: Repo, revision: str, head: bool) -> str | None:
            sha = repo.branches.get(revision) or (revision if revision in repo.commits else None)
            if sha is None and revision == hub.forged.get("sha"):  # a hostile mirror answers for its forgery
                sha = next(iter(repo.branches.values()))
            if sha is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
            return sha

        def _answer(self, head: bool):
            raw = urlparse(self.path).path
            path = unquote(raw)
            hub.requests.append((self.command, path, self.headers.get("Range")))
            parts = [unquote(part) for part in raw.strip("/").split("/")]  # an encoded / stays in its part
            if parts[:2] == ["api", "models"] and len(parts) == 4:  # the default branch's info
                parts += ["revision", "main"]
            if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
                repo_id, kind, revision = "/".join(parts[2:4]), parts[4], parts[5]
                repo = self._repo(repo_id, head)
                sha = repo and self._commit(repo, revision, head)
                if sha is None:
                    return
                files = repo.commits[sha]
                if kind == "revision":
                    body = {"id": repo_id, "modelId": repo_id, "sha": hub.forged.get("sha", sha),
                            "private": bool(repo.token),
                            "siblings": [{"rfilename": name} for name in files]}
                else:
                    body = [{"type": "file", "path": name, "size": len(data), "oid": _sha(name + str(len(data)))}
                            for name, data in files.items()]
                return self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"}, head)
            if len(parts) >= 5 and parts[2] == "resolve":
                repo_id, revision, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
                repo = self._repo(repo_id, head)
                sha = repo and self._commit(repo, revision, head)
                if sha is None:
                    return
                data = repo.commits[sha].get(name)
                if data is None:
                    return self._error(404, "EntryNotFound", f"{name} does not exist", head)
                return self._file(sha, name, data, head)
            self._error(404, None, "not found", head)

        def _file(self, sha: str, name: str, data: bytes, head: bool):
            etag = hub.forged.get("etag", hashlib.sha256(data).hexdigest())
            headers = {"X-Repo-Commit": hub.forged.get("commit", sha), "ETag": f'"{etag}"',
                       "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
            start = 0
            ranged = self.headers.get("Range")
            if ranged and ranged.startswith("bytes=") and not head:
                start = int(ranged[len("bytes="):].split("-")[0])
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            if head:
                return self._send(200, data, headers, head=True)
            if name in hub.drop_once:  # the connection breaks halfway through the body
                hub.drop_once.discard(name)
                self.send_response(200)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[:len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return
            self._send(206 if start else 200, data[start:], headers)

    return Handler
