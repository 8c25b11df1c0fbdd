"""OpenAI request schemas and their mapping onto SamplingParams.

Every OpenAI parameter is either honoured or refused with a 400 that names it:
unknown fields are rejected by `extra="forbid"`, and parameters OpenAI defines
but levante cannot honour are listed in `UNSUPPORTED` with the reason.
"""
from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from levante.engine.sampling_params import SamplingParams
from levante.errors import InvalidRequest, LevanteError, Overloaded

MAX_N = 16
INT64 = (-(1 << 63), (1 << 63) - 1)
_TOKEN_ID = re.compile(r"-?[0-9]{1,19}")  # a token id as logit_bias keys spell it (ASCII digits)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StreamOptions(Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedToolChoice(Strict):
    class _Function(Strict):
        name: str

    type: Literal["function"] = "function"
    function: _Function


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str = "response"
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]  # OpenAI's values


class Grammar(Strict):
    """mistral.rs's `grammar` extension."""
    type: Literal["regex", "lark", "json_schema", "json", "llguidance", "choice"]
    value: Any


class SamplingFields(Strict):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=INT64[0], le=INT64[1])
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Extensions (vLLM's names)
    top_k: int | None = Field(default=None, ge=-1, le=1 << 31)  # -1 or 0: no limit
    min_p: float = Field(default=0.0, ge=0, le=1)
    repetition_penalty: float = Field(default=1.0, gt=0)
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    grammar: Grammar | None = None

    @model_validator(mode="after")
    def _check_sampling(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        limit = self.output_limit
        if limit is not None and self.min_tokens > limit:
            raise ValueError("min_tokens: must not exceed max_tokens")
        return self

    @property
    def output_limit(self) -> int | None:
        """The most tokens to generate (max_tokens here; chat also has max_completion_tokens)."""
        return self.max_tokens

    def logit_bias_ids(self, vocab_size: int) -> dict[int, float] | None:
        if not self.logit_bias:
            return None
        bias = {}
        for key, value in self.logit_bias.items():
            if not _TOKEN_ID.fullmatch(key):
                raise InvalidRequest(f"logit_bias: key '{key[:40]}' is not a token id")
            token = int(key)
            if not 0 <= token < vocab_size or not -100 <= value <= 100:
                raise InvalidRequest(f"logit_bias: token {key} must be in [0, {vocab_size}) "
                                     "with a bias in [-100, 100]")
            bias[token] = value
        return bias

    def sampling_params(self, vocab_size: int, max_tokens: int | None, logprobs: int | None = None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        return SamplingParams(
            n=self.n, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, logit_bias=self.logit_bias_ids(vocab_size),
            seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids, max_tokens=max_tokens,
            min_tokens=self.min_tokens, ignore_eos=self.ignore_eos, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs, skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
        )


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class WebSearchOptions(BaseModel):
    """OpenAI's `web_search_options`; `user_location` is accepted and not used."""

    model_config = ConfigDict(extra="allow")
    search_context_size: Literal["low", "medium", "high"] = "medium"
    user_location: dict[str, Any] | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: ReasoningEffort | None = None  # reaches the chat template as `reasoning_effort`
    web_search_options: WebSearchOptions | None = None
    # Accepted and ignored: they change nothing about the generated text.
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None

    @model_validator(mode="after")
    def _check_chat(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs to be true")
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise ValueError("tool_choice: requires tools")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = {t.function.name for t in self.tools}
            if self.tool_choice.function.name not in names:
                raise ValueError(f"tool_choice: no tool named '{self.tool_choice.function.name}'")
        return self

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _check_completion(self):
        if self.suffix:
            raise ValueError("suffix: not supported (no fill-in-the-middle)")
        if self.best_of not in (None, self.n):
            raise ValueError("best_of: only best_of == n is supported")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt: must not be empty")
        return self

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class TokenizeRequest(Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("prompt: give exactly one of prompt or messages")
        return self


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[int]


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: int | str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 408: "timeout_error", 413: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}


def error_for(error: BaseException) -> tuple[int, dict, dict]:
    """(status, OpenAI error JSON, headers) for any error a request ends with: levante's own errors carry
    their status (400 unless they say otherwise); anything else is a 500 that says what happened."""
    if isinstance(error, LevanteError):
        status = getattr(error, "status", 400)
        message, param = str(error), _param_of(str(error))
    else:
        status, message, param = 500, f"internal error: {type(error).__name__}: {error}", None
    headers = {"Retry-After": str(error.retry_after)} if isinstance(error, Overloaded) else {}
    return status, error_body(message, ERROR_TYPES.get(status, "invalid_request_error"), param, status), headers


def validation_error(errors: list[dict]) -> tuple[str, str | None]:
    """(message, param) for pydantic's errors of a request body: the first one, naming its field."""
    first = errors[0] if errors else {}
    location = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(location) or None
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        message = f"unsupported parameter '{param}'"
    elif first.get("type") == "json_invalid":
        message, param = "the request body is not valid JSON", None
    elif param and not message.startswith(param.split(".")[0]):
        message = f"{param}: {message}"
    return message, param


def _param_of(message: str) -> str | None:
    """The field an error message starts with ("stop_token_ids: ..."), if it names one."""
    head, colon, _ = message.partition(":")
    return head if colon and head and " " not in head and len(head) < 80 else None
