"""From a chat request to what the engine runs: prompt ids, sampling params, tool handling."""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from levante.engine.sampling_params import SamplingParams
from levante.engine.structured import StructuredOutput
from levante.errors import InvalidRequest
from levante.loader.reasoning import ReasoningParser
from levante.multimodal.inputs import MultiModalPrompt
from levante.serve.protocol import ChatCompletionRequest, Grammar, NamedToolChoice, ResponseFormat
from levante.serve.tool_parsers import ToolCall, parser_for, tool_call_grammar


@dataclass
class ChatPlan:
    prompt_ids: list[int]
    params: SamplingParams
    tools: list[dict] | None = None  # function definitions offered to the model
    tool_parser: object | None = None  # parses the model's tool calls; None when tools are off
    logprobs: bool = False
    top_logprobs: int = 0
    extra: dict = field(default_factory=dict)
    multimodal: MultiModalPrompt | None = None  # the prompt with its images, when the messages carry some
    reasoning: ReasoningParser | None = None  # splits the thinking from the answer; None when the model does not think

    @property
    def prompt(self) -> list[int] | MultiModalPrompt:
        """What the engine runs."""
        return self.multimodal if self.multimodal is not None else self.prompt_ids

    def split_reasoning(self, text: str) -> tuple[str | None, str]:
        """(the thinking or None, the answer) of a reply."""
        return self.reasoning.split(text) if self.reasoning is not None else (None, text)

    def read_reply(self, text: str) -> tuple[str | None, str | None, list[ToolCall]]:
        """(reasoning, content, tool calls) of a finished reply: the thinking is split off first, and
        the tool parser reads only the answer."""
        reasoning, content = self.split_reasoning(text)
        if self.tool_parser is None:
            return reasoning, content, []
        content, calls = self.tool_parser.parse(content)
        return reasoning, content, calls


def plan_chat(llm, body: ChatCompletionRequest, load_image: Callable | None = None) -> ChatPlan:
    """Blocking (it may fetch and decode images): run it off the event loop. `load_image(url_or_path)`
    turns image sources into images (default: multimodal/images.py's `load_image`, any local path)."""
    tools = [t.function.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    use_tools = bool(tools) and body.tool_choice != "none"
    template_tools = [{"type": "function", "function": t} for t in tools] if use_tools else None
    prompt_ids, multimodal = render_chat(llm, [m.model_dump(exclude_none=True) for m in body.messages],
                                         template_tools, True, template_kwargs(body), load_image)
    engine = llm.engine
    top = body.top_logprobs or 0
    params = body.sampling_params(engine.model_config.vocab_size, body.output_limit,
                                  logprobs=top if body.logprobs else None)
    parser = parser_for(llm.chat_template.source, engine.model_config.model_type, tools) if use_tools else None
    if parser is not None and parser.family in ("mistral", "llama"):
        params.skip_special_tokens = False  # their call markers are control tokens
    if llm.chat_renderer.reasoning_needs_special_tokens:
        params.skip_special_tokens = False
    params.structured = structured_output(body.response_format, body.grammar)
    if use_tools and body.tool_choice not in (None, "auto"):
        if params.structured is not None:
            raise InvalidRequest("tool_choice: cannot be combined with response_format or grammar")
        named = body.tool_choice.function.name if isinstance(body.tool_choice, NamedToolChoice) else None
        grammar = tool_call_grammar(tools, parser.family, "named" if named else "required", named,
                                    parallel=body.parallel_tool_calls and named is None,
                                    token_to_id=llm.tokenizer.token_to_id)
        params.structured = StructuredOutput("lark", grammar)
    return ChatPlan(prompt_ids, params, tools if use_tools else None, parser, body.logprobs, top,
                    multimodal=multimodal, reasoning=llm.chat_renderer.reasoning_parser(prompt_ids))


def template_kwargs(body: ChatCompletionRequest) -> dict | None:
    """The request's `chat_template_kwargs`, with `reasoning_effort` for templates that read it
    (gpt-oss); the kwargs win when both set it."""
    if body.reasoning_effort is None:
        return body.chat_template_kwargs
    return {"reasoning_effort": body.reasoning_effort, **(body.chat_template_kwargs or {})}


def render_chat(llm, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True,
                template_kwargs: dict | None = None, load_image: Callable | None = None) -> tuple[list[int], MultiModalPrompt | None]:
    """(the prompt ids as the engine runs them, the `MultiModalPrompt` that carries the pixels when the
    messages have images), rendered as `LLM.chat` renders them (loader/chat_prompt.py). Blocking: it
    may fetch and decode images."""
    prompt = llm.chat_renderer.render(messages, tools, add_generation_prompt, load_image, template_kwargs)
    if isinstance(prompt, MultiModalPrompt):
        return prompt.token_ids, prompt
    return prompt, None


def structured_output(response_format: ResponseFormat | None, grammar: Grammar | None) -> StructuredOutput | None:
    if response_format is not None and grammar is not None:
        raise InvalidRequest("response_format: cannot be combined with grammar")
    if grammar is not None:
        kind = {"json": "json_schema", "llguidance": "lark"}.get(grammar.type, grammar.type)
        value = grammar.value
        if kind == "json_schema" and isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise InvalidRequest(f"grammar: the JSON schema is not valid JSON: {e}") from None
        return StructuredOutput(kind, value)
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return StructuredOutput("json_object")
    spec = response_format.json_schema
    if spec is None or spec.json_schema is None:
        raise InvalidRequest("response_format.json_schema: a 'schema' is required")
    return StructuredOutput("json_schema", spec.json_schema)
