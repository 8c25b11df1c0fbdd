"""Every generation request's one road through the server.

    adapter (chat, completions, responses, MCP server tool): parse the body ... format the events
        -> Pipeline.chat_events(body) / completion_events(body)
             route     `model` -> the model (and LoRA adapter) that runs it, held for the
                       request; loaded first if need be (serve/router.py)       (404, 503)
             validate  against the vocabulary and the server's limits           (400, serve/validate.py)
             admit     a bounded number of sequences in flight                  (429 + Retry-After)
             plan      template, token ids, images, grammar, off the event loop (serve/chat.py)
             submit    to the EngineLoop; outputs come back as events
        <- events: Routed (the model), Round (a generation begins), Output (its progress), ToolsOffered,
                   McpCalls, Searched, Finish

Adapters only turn a body into a call here and events into their API's JSON; the MCP tool loop
(serve/mcp_loop.py) runs its rounds through the same `plan_chat` and `generate`. A client that
goes away closes the event stream, which aborts its requests and frees their KV blocks.
"""
from __future__ import annotations

import asyncio
import dataclasses
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
from levante.serve.router import Route


# -- events ------------------------------------------------------------------------------------------

@dataclass
class Routed:
    """The request's model is known (always the first event): the name its responses report (the
    model or LoRA adapter it named) and that model's tokenizer."""
    model: str
    tokenizer: object


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


Event = Routed | Round | Output | ToolsOffered | McpCalls | Searched | Finish


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
        self._grammar_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="levante-grammar")

    @property
    def in_flight(self) -> int:
        """Sequences admitted and not yet done, every model's."""
        return sum(model.in_flight for model in self.state.router.models.values())

    # route and admit
    @asynccontextmanager
    async def routed(self, model: str | None, tasks: tuple[str, ...] = ("generate",)) -> AsyncIterator[Route]:
        """What runs a request for `model`, held while the block runs: 404 for a name not served, 400
        for a model of another task than `tasks`, 503 when it cannot be loaded (or woken) in time or its
        engine has stopped."""
        async with self.state.router.use(model, tasks) as route:
            problem = route.loop.problem if route.loop is not None else None
            if problem:
                raise ServiceUnavailable(problem)
            yield route

    @asynccontextmanager
    async def admitted(self, route: Route, sequences: int):
        """Hold room for `sequences` more on the route's model (texts, pairs or audio chunks for a model that
        does not generate); Overloaded once its running slots (a forward's batch) and the waiting room
        (--max-waiting-requests) are full."""
        served = route.model
        capacity = route.llm.max_batch_size + self.state.limits.max_waiting_requests
        if served.in_flight + sequences > capacity:
            self.state.metrics.requests.labels(served.name, "rejected").inc()
            raise Overloaded(f"the server is busy ({served.in_flight} sequences in flight for '{served.name}'); "
                             "retry shortly")
        served.in_flight += sequences
        try:
            yield
        finally:
            served.in_flight -= sequences

    # the two kinds of request
    async def chat_events(self, body: ChatCompletionRequest) -> AsyncIterator[Event]:
        from levante.serve.mcp_loop import McpChat, offers_mcp_tools
        from levante.serve.web_search import search_for_chat

        async with self.routed(body.model) as route:
            validate.check_chat(body, route.llm.engine.model_config.vocab_size, self.state.limits)
            async with self.admitted(route, body.n):
                yield Routed(route.name, route.llm.tokenizer)
                search = await search_for_chat(self.state, body)  # None unless web_search_options asks for it
                if search is not None:
                    body = search.body
                    yield Searched(search.outcome.summary())
                if offers_mcp_tools(self.state, body):
                    async for event in McpChat(self, route, body).events():
                        yield event
                    return
                plan = await self.plan_chat(route, body)
                yield Round(plan)
                async for output in self.generate(route, plan.prompt, plan.params):
                    yield output

    async def completion_events(self, body: CompletionRequest) -> AsyncIterator[Event]:
        async with self.routed(body.model) as route:
            validate.check_completion(body, route.llm.engine.model_config.vocab_size, self.state.limits)
            async with self.admitted(route, body.n * len(body.prompts())):
                yield Routed(route.name, route.llm.tokenizer)
                plan = await self.plan_completion(route, body)
                yield Round(plan)
                async for output in self.generate(route, plan.prompts, plan.params):
                    yield output

    async def count_chat_tokens(self, body: ChatCompletionRequest) -> int:
        """The prompt tokens `body` would run (template, tools and images as planned), without running it."""
        async with self.routed(body.model) as route:
            validate.check_chat(body, route.llm.engine.model_config.vocab_size, self.state.limits)
            plan = await asyncio.to_thread(plan_chat, route.llm, body, self.state.load_image)
            return len(plan.prompt_ids)

    # plan
    async def plan_chat(self, route: Route, body: ChatCompletionRequest,
                        structured: StructuredOutput | None = None) -> ChatPlan:
        """Render (in a thread: images may be fetched), then compile any grammar (in a thread, time-limited).
        `structured` replaces the request's own constraint (the MCP loop's answer round)."""
        engine = route.llm.engine

        def plan() -> ChatPlan:
            chat_plan = plan_chat(route.llm, body, self.state.load_image)
            engine.check_prompt(chat_plan.prompt_ids)
            return chat_plan

        chat_plan = await asyncio.to_thread(plan)
        if structured is not None:
            chat_plan.params.structured = structured
        await self.compile_grammar(route, chat_plan.params.structured)
        return chat_plan

    async def plan_completion(self, route: Route, body: CompletionRequest) -> CompletionPlan:
        engine = route.llm.engine
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

    async def compile_grammar(self, route: Route, spec: StructuredOutput | None) -> None:
        """Compile a structured-output grammar in a worker thread, so that neither the event loop nor
        the engine thread waits on it; past --grammar-timeout the request is refused."""
        if spec is None:
            return
        compiler = route.llm.engine.grammars
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
    async def generate(self, route: Route, prompts, params: SamplingParams) -> AsyncIterator[Output]:
        """Submit one prompt (ids or a MultiModalPrompt) or a list of prompt ids to the route's model,
        with its LoRA adapter; yield `Output`s as they come. Outputs are cumulative, so a slow reader
        only ever holds the latest one per prompt. Closing the iterator early aborts what is still running."""
        single = not prompts or not isinstance(prompts, list) or isinstance(prompts[0], int)
        prompts = [prompts] if single else prompts
        params = dataclasses.replace(params, lora=route.lora)
        loop, event_loop = route.loop, asyncio.get_running_loop()
        latest: dict[int, RequestOutput | BaseException] = {}
        arrived = asyncio.Event()

        def receiver(index: int):
            def put(item):
                latest[index] = item
                arrived.set()
            return lambda item: event_loop.call_soon_threadsafe(put, item)

        request_ids = [uuid.uuid4().hex for _ in prompts]
        remaining = set(range(len(prompts)))
        watch = _Watch(self.state.metrics, route.model.name)
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
                self.state.metrics.requests.labels(route.model.name, "abort").inc()


class _Watch:
    """Time to first token, inter-token latency and token counts for /metrics."""

    def __init__(self, metrics, model_name: str):
        self.metrics, self.model_name = metrics, model_name
        self.started = self.last = time.monotonic()
        self.emitted: dict[int, int] = {}

    def observe(self, index: int, output: RequestOutput) -> None:
        m, model, now = self.metrics, self.model_name, time.monotonic()
        first = index not in self.emitted
        (m.ttft if first else m.itl).labels(model).observe(now - (self.started if first else self.last))
        self.last = now
        if first:
            m.prompt_tokens.labels(model).inc(len(output.prompt_token_ids))
        tokens = sum(len(c.token_ids) for c in output.outputs)
        m.generation_tokens.labels(model).inc(tokens - self.emitted.get(index, 0))
        self.emitted[index] = tokens
        if output.finished:
            for c in output.outputs:
                m.requests.labels(model, c.finish_reason or "unknown").inc()
