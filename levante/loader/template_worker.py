"""Chat templates rendered in a worker process, with a time limit and a memory limit.

A template is a program from a model file. Jinja's sandbox stops it from reaching Python
internals, but not from looping 10^10 times or building a gigabyte string, and a thread cannot
be stopped once it runs one. So renders run in small worker processes (Python with jinja2 and
chat_template.py only, not torch): each has an address-space limit (`MEMORY_LIMIT`), and a render
that outlives `TIMEOUT_S` has its worker killed. The output is capped at `MAX_OUTPUT` characters.
Whatever happens, the caller gets `InvalidRequest` with one line, and the server lives.

Protocol: length-prefixed JSON over the worker's stdin/stdout, one request at a time per worker:
{"source", "context", "max_output"} -> {"text"} or {"error"} (a null context: compile only), after the worker's
{"ready"} once it has imported what it needs: the time limit counts from then, so that a Python slow to start on a
busy machine never fails a template. Workers are kept for the next render; at most `MAX_WORKERS` run at once.
"""
from __future__ import annotations

import atexit
import json
import os
import select
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

TIMEOUT_S = 10.0  # seconds a compile or render may take, once its worker is up
BOOT_TIMEOUT_S = 120.0  # seconds a new worker may take to start (a loaded machine boots Pythons slowly)
MEMORY_LIMIT = 1 << 30  # bytes of address space a render may add to the worker's own
MAX_OUTPUT = 8 << 20  # characters of prompt text (~2M tokens)
MAX_WORKERS = 4
_HEADER = struct.Struct("<I")
# Loads levante/loader/chat_template.py without levante/__init__.py (which imports torch).
_BOOTSTRAP = """
import sys, types
root = sys.argv[1]
for name in ("levante", "levante.loader"):
    module = types.ModuleType(name)
    module.__path__ = [root + "/" + name.replace(".", "/")]
    sys.modules[name] = module
from levante.loader.template_worker import serve
serve()
"""


class TemplateFailed(Exception):
    """A render failed: the template's error, or a limit it ran into (one line)."""


# -- the worker side ---------------------------------------------------------------------------------

def serve() -> None:
    """The worker's loop: compile (and keep) templates, render requests until stdin closes."""
    from levante.loader.chat_template import one_line
    from levante.loader.template_sandbox import compile_template

    _limit_memory()
    compiled: dict[str, object] = {}
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    _send(stdout, {"ready": True})
    while (request := _receive(stdin)) is not None:
        try:
            if request["source"] not in compiled:
                if len(compiled) >= 8:
                    compiled.clear()
                compiled[request["source"]] = compile_template(request["source"])
            template = compiled[request["source"]]
            reply = {"text": "" if request["context"] is None else
                     _render(template, request["context"], request["max_output"])}
        except MemoryError:
            reply = {"error": f"the chat template used more than {MEMORY_LIMIT >> 20} MB of memory (stopped)"}
        except TemplateFailed as error:
            reply = {"error": str(error)}
        except Exception as error:  # the template is foreign code: any failure is the request's
            reply = {"error": one_line(error)}
        _send(stdout, reply)


def _render(template, context: dict, max_output: int) -> str:
    parts, size = [], 0
    for part in template.generate(**context):
        size += len(part)
        if size > max_output:
            raise TemplateFailed(f"the chat template's output passed {max_output} characters (stopped)")
        parts.append(part)
    return "".join(parts)


def _limit_memory() -> None:
    try:
        import resource

        with open("/proc/self/statm") as statm:
            used = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (used + MEMORY_LIMIT, used + MEMORY_LIMIT))
    except (ImportError, OSError, ValueError):  # not Linux: the time limit still holds
        pass


def _receive(stream) -> dict | None:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    return json.loads(stream.read(_HEADER.unpack(header)[0]))


def _send(stream, message: dict) -> None:
    data = json.dumps(message).encode()
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


# -- the caller side ---------------------------------------------------------------------------------

class _Worker:
    def __init__(self):
        root = str(Path(__file__).resolve().parents[2])
        self.process = subprocess.Popen([sys.executable, "-I", "-c", _BOOTSTRAP, root], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.ready = False

    def call(self, message: dict, timeout: float) -> dict:
        if not self.ready:
            try:
                self._reply(time.monotonic() + BOOT_TIMEOUT_S)  # {"ready": true}
            except TimeoutError:
                raise EOFError from None  # never started: as if it died
            self.ready = True
        deadline = time.monotonic() + timeout
        data = json.dumps(message).encode()
        self.process.stdin.write(_HEADER.pack(len(data)) + data)
        self.process.stdin.flush()
        return self._reply(deadline)

    def _reply(self, deadline: float) -> dict:
        header = self._read(_HEADER.size, deadline)
        return json.loads(self._read(_HEADER.unpack(header)[0], deadline))

    def _read(self, size: int, deadline: float) -> bytes:
        fd, chunks, left = self.process.stdout.fileno(), [], size
        while left:
            if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise TimeoutError
            chunk = os.read(fd, left)
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            stream.close()


class _Pool:
    def __init__(self):
        self.idle: list[_Worker] = []
        self.lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(MAX_WORKERS)
        atexit.register(self.close)

    def render(self, source: str, context: dict | None) -> str:
        message = {"source": source, "context": context, "max_output": MAX_OUTPUT}
        with self.slots:
            with self.lock:
                worker = self.idle.pop() if self.idle else None
            worker = worker or _Worker()
            try:
                reply = worker.call(message, TIMEOUT_S)
            except TimeoutError:
                worker.close()
                raise TemplateFailed(f"the chat template took longer than {TIMEOUT_S:g} s (stopped)") from None
            except (OSError, EOFError, ValueError, struct.error):
                worker.close()
                raise TemplateFailed("the chat template's renderer died (out of memory?)") from None
            with self.lock:
                self.idle.append(worker)
        if "error" in reply:
            raise TemplateFailed(reply["error"])
        return reply["text"]

    def close(self) -> None:
        with self.lock:
            workers, self.idle = self.idle, []
        for worker in workers:
            worker.close()


_pool: _Pool | None = None
_pool_lock = threading.Lock()


def render(source: str, context: dict) -> str:
    """`source` rendered with `context` (plain JSON values) in a worker, within the limits above."""
    return _the_pool().render(source, context)


def start_worker() -> None:
    """Have one worker starting now, so that the first compile does not wait for a Python to boot
    (`levante serve` calls this before it imports the engine and the web stack: the worker boots on another core)."""
    pool = _the_pool()
    with pool.lock:
        if not pool.idle:
            pool.idle.append(_Worker())


def compile_in_worker(source: str) -> None:
    """Compile `source` in a worker (`TemplateFailed` if it does not): Jinja folds constant
    expressions while compiling (`{{ 'x' * 10**10 }}`), so even that never runs in this process."""
    _the_pool().render(source, None)


def _the_pool() -> _Pool:
    global _pool
    with _pool_lock:
        _pool = _pool or _Pool()
    return _pool
