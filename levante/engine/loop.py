"""Drives `Engine.step()` from one background thread for concurrent callers.

Callers never touch the engine directly: they queue commands (add, abort) that
the loop applies between steps, and receive outputs through a callback. With no
work the thread waits on a condition variable, so an idle engine uses no CPU.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

from levante.engine.engine import Engine
from levante.engine.outputs import RequestOutput
from levante.engine.sampling_params import SamplingParams

logger = logging.getLogger("levante")

# Receives each RequestOutput of its request, or the exception that ended it.
OutputCallback = Callable[[RequestOutput | BaseException], None]


class EngineLoop:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: deque[Callable[[], None]] = deque()
        self._callbacks: dict[str, OutputCallback] = {}
        self._wakeup = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="levante-engine", daemon=True)
        self._thread.start()

    def submit(self, request_id: str, prompt: str | list[int], params: SamplingParams,
               callback: OutputCallback) -> None:
        def add():
            try:
                self.engine.add_request(request_id, prompt, params)
                self._callbacks[request_id] = callback
            except Exception as e:  # reported to the caller, never kills the loop
                callback(e)
        self._enqueue(add)

    def call(self, function: Callable[[], object]) -> Future:
        """Run `function` on the engine's thread between two steps (e.g. loading a LoRA adapter);
        its result or exception arrives through the returned future."""
        future: Future = Future()

        def run():
            try:
                future.set_result(function())
            except Exception as e:  # the caller's to handle, never the loop's
                future.set_exception(e)
        self._enqueue(run)
        return future

    def abort(self, request_id: str) -> None:
        def abort():
            self._callbacks.pop(request_id, None)
            self.engine.abort_request(request_id)
        self._enqueue(abort)

    def stop(self) -> None:
        with self._wakeup:
            self._stopped = True
            self._wakeup.notify()
        self._thread.join(timeout=10)

    def _enqueue(self, command: Callable[[], None]) -> None:
        with self._wakeup:
            self._commands.append(command)
            self._wakeup.notify()

    def _run(self) -> None:
        while True:
            with self._wakeup:
                while not self._stopped and not self._commands and not self.engine.has_unfinished_requests():
                    self._wakeup.wait()
                if self._stopped:
                    return
                commands, self._commands = self._commands, deque()
            for command in commands:
                command()
            if self.engine.has_unfinished_requests():
                self._step()

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # a failed step fails its requests, not the server
            logger.exception("engine step failed")
            for request_id, callback in list(self._callbacks.items()):
                self.engine.abort_request(request_id)
                callback(e)
            self._callbacks.clear()
            return
        for output in outputs:
            callback = self._callbacks.get(output.request_id)
            if callback is not None:
                callback(output)
            if output.finished:
                self._callbacks.pop(output.request_id, None)
