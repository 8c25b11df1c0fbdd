"""Every generation request's one road through the server.

    adapter (chat, completions, responses, MCP server tool): parse the body ... format the events
        -> Pipeline.chat_events(body) / completion_events(body)
             check     the model is served, loaded, and its engine alive        (404, 503)
             validate  against the vocabulary and the server's limits           (400, serve/validate.py)
             admit     a bounded number of sequences in flight                  (429 + Retry-After)
             plan      template, token ids, images, grammar, off the event loop (serve/chat.py)
             submit    to the EngineLoop; outputs come back as events
        <- events: Round (a generation begins), Output (its progress), ToolsOffered, McpCalls, Searched,
                   Finish

Adapters only turn a body into a call here and events into their API's JSON; the MCP tool loop
(serve/mcp_loop.py) runs its rounds through the same `plan_chat` and `generate`. A client that
goes away closes the event stream, which aborts its requests and frees their KV blocks.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from levante.engine.outputs import RequestOutput
from levante.engine.sampling_params import SamplingParams
from levante.engine.structured import StructuredOutput
from levante.errors import InvalidRequest, Overloaded, ServiceUnavailable
from levante.serve import validate
from levante.serve.chat import ChatPlan, plan_chat
from levante.serve.protocol import ChatCompletionRequest, CompletionRequest


# -- events ------------------------------------------------------------------------------------------

@dataclass
class Round:
    """A generation begins: its plan (how to read its text), and whether the server runs its tool calls."""
    plan: ChatPlan | CompletionPlan
    server_runs_tools: bool = False


@dataclass
class Output:
    """The latest (cumulative) output for prompt `index` of the current round. `shown`: False for a
    round the MCP loop holds back (it may be a tool call); it still counts for usage."""
    index: int
    output: RequestOutput
    shown: bool = True


@dataclass
class ToolsOffered:
    """The MCP tools the model is offered in this request (serve/tool_selection.py), by name."""
    names: list[str]


@dataclass
class McpCalls:
    """Tool calls the server ran (serve/mcp_loop.py), with their results."""
    calls: list[dict]


@dataclass
class Searched:
    """The web search made for this request (serve/web_search.py), as the response reports it."""
    summary: dict


@dataclass
class Finish:
    """The MCP loop's end: the reply's finish reason (plain rounds finish with their outputs)."""
    reason: str


Event = Round | Output | ToolsOffered | McpCalls | Searched | Finish


@dataclass
class CompletionPlan:
    prompts: list[list[int]]
    texts: list[str | None]  # each prompt as given, when it was text (for echo)
    params: SamplingParams
    extra: dict = field(default_factory=dict)


# -- the road ----------------------------------------------------------------------------------------

class Pipeline:
    def __init__(self, state):
        self.state = state
        self.in_flight = 0  # sequences admitted and not yet done
        self._grammar_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="levante-grammar")

    # check and admit
    def check(self, model: str | None) -> None:
        state = self.state
        state.check(model)
        problem = state.loop.problem if state.loop is not None else None
        if problem:
            raise ServiceUnavailable(problem)

    @asynccontextmanager
    async def admitted(self, sequences: int):
        """Hold room for `sequences` more; Overloaded once the engine's running slots and the waiting
        room (--max-waiting-requests) are full."""
        engine = self.state.llm.engine
        capacity = engine.config.max_num_seqs + self.state.limits.max_waiting_requests
        if self.in_flight + sequences > capacity:
            self.state.metrics.requests.labels("rejected").inc()
            raise Overloaded(f"the server is busy ({self.in_flight} sequences in flight); retry shortly")
        self.in_flight += sequences
        try:
            yield
        finally:
            self.in_flight -= sequences

    # the two kinds of request
    async def chat_events(self, body: ChatCompletionRequest) -> AsyncIterator[Event]:
        from levante.serve.mcp_loop import McpChat, offers_mcp_tools
        from levante.serve.web_search import search_for_chat

        self.check(body.model)
        validate.check_chat(body, self.state.llm.engine.model_config.vocab_size, self.state.limits)
        async with self.admitted(body.n):
            search = await search_for_chat(self.state, body)  # None unless web_search_options asks for it
            if search is not None:
                body = search.body
                yield Searched(search.outcome.summary())
            if offers_mcp_tools(self.state, body):
                async for event in McpChat(self, body).events():
                    yield event
                return
            plan = await self.plan_chat(body)
            yield Round(plan)
            async for output in self.generate(plan.prompt, plan.params):
                yield output

    async def completion_events(self, body: CompletionRequest) -> AsyncIterator[Event]:
        self.check(body.model)
        validate.check_completion(body, self.state.llm.engine.model_config.vocab_size, self.state.limits)
        async with self.admitted(body.n * len(body.prompts())):
            plan = await self.plan_completion(body)
            yield Round(plan)
            async for output in self.generate(plan.prompts, plan.params):
                yield output

    # plan
    async def plan_chat(self, body: ChatCompletionRequest, structured: StructuredOutput | None = None) -> ChatPlan:
        """Render (in a thread: images may be fetched), then compile any grammar (in a thread, time-limited).
        `structured` replaces the request's own constraint (the MCP loop's answer round)."""
        state = self.state
        engine = state.llm.engine

        def plan() -> ChatPlan:
            chat_plan = plan_chat(state.llm, body, state.load_image)
            engine.check_prompt(chat_plan.prompt_ids)
            return chat_plan

        chat_plan = await asyncio.to_thread(plan)
        if structured is not None:
            chat_plan.params.structured = structured
        await self.compile_grammar(chat_plan.params.structured)
        return chat_plan

    async def plan_completion(self, body: CompletionRequest) -> CompletionPlan:
        engine = self.state.llm.engine
        params = body.sampling_params(engine.model_config.vocab_size, body.max_tokens, logprobs=body.logprobs,
                                      prompt_logprobs=body.logprobs if body.echo and body.logprobs is not None
                                      else None)
        prompts = body.prompts()

        def tokenize() -> list[list[int]]:
            ids = [engine.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
            for one in ids:
                engine.check_prompt(one)
            return ids

        ids = await asyncio.to_thread(tokenize)
        return CompletionPlan(ids, [p if isinstance(p, str) else None for p in prompts], params)

    async def compile_grammar(self, spec: StructuredOutput | None) -> None:
        """Compile a structured-output grammar in a worker thread, so that neither the event loop nor
        the engine thread waits on it; past --grammar-timeout the request is refused."""
        if spec is None:
            return
        compiler = self.state.llm.engine.grammars
        timeout = self.state.limits.grammar_timeout
        # The vocabulary's llguidance tokenizer is built once per engine, by the first constrained request
        # (seconds on a busy machine): they are not this grammar's, so they do not count against the timeout.
        await asyncio.get_running_loop().run_in_executor(self._grammar_pool, lambda: compiler.ll_tokenizer)
        future = asyncio.get_running_loop().run_in_executor(self._grammar_pool, compiler.prepare, spec)
        try:
            await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise InvalidRequest(f"response_format: the grammar took longer than {timeout:g} s to compile "
                                 "(--grammar-timeout)") from None

    # submit and follow
    async def generate(self, prompts, params: SamplingParams) -> AsyncIterator[Output]:
        """Submit one prompt (ids or a MultiModalPrompt) or a list of prompt ids; yield `Output`s as
        they come. Outputs are cumulative, so a slow reader only ever holds the latest one per prompt.
        Closing the iterator early aborts what is still running."""
        single = not prompts or not isinstance(prompts, list) or isinstance(prompts[0], int)
        prompts = [prompts] if single else prompts
        loop, event_loop = self.state.loop, asyncio.get_running_loop()
        latest: dict[int, RequestOutput | BaseException] = {}
        arrived = asyncio.Event()

        def receiver(index: int):
            def put(item):
                latest[index] = item
                arrived.set()
            return lambda item: event_loop.call_soon_threadsafe(put, item)

        request_ids = [uuid.uuid4().hex for _ in prompts]
        remaining = set(range(len(prompts)))
        watch = _Watch(self.state.metrics)
        try:
            for index, (request_id, prompt) in enumerate(zip(request_ids, prompts)):
                loop.submit(request_id, prompt, params, receiver(index))
            while remaining:
                await arrived.wait()
                arrived.clear()
                items = sorted(latest.items())
                latest.clear()
                for index, item in items:
                    if isinstance(item, BaseException):
                        raise item
                    watch.observe(index, item)
                    if item.finished:
                        remaining.discard(index)
                    yield Output(index, item)
        finally:
            for index in remaining:
                loop.abort(request_ids[index])
                self.state.metrics.requests.labels("abort").inc()


class _Watch:
    """Time to first token, inter-token latency and token counts for /metrics."""

    def __init__(self, metrics):
        self.metrics = metrics
        self.started = self.last = time.monotonic()
        self.emitted: dict[int, int] = {}

    def observe(self, index: int, output: RequestOutput) -> None:
        m, now = self.metrics, time.monotonic()
        first = index not in self.emitted
        (m.ttft if first else m.itl).observe(now - (self.started if first else self.last))
        self.last = now
        if first:
            m.prompt_tokens.inc(len(output.prompt_token_ids))
        tokens = sum(len(c.token_ids) for c in output.outputs)
        m.generation_tokens.inc(tokens - self.emitted.get(index, 0))
        self.emitted[index] = tokens
        if output.finished:
            for c in output.outputs:
                m.requests.labels(c.finish_reason or "unknown").inc()
