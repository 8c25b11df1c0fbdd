"""Requests checked against the served model and the server's limits, before anything reaches the engine.

The schemas (serve/protocol.py) check types and fixed ranges; what depends on the
model (its vocabulary) or on the server's flags (serve/limits.py) is checked here.
Every refusal is an `InvalidRequest` whose message starts with the field it names.
"""
from __future__ import annotations

from levante.errors import InvalidRequest
from levante.serve.limits import RequestLimits
from levante.serve.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields


def check_sampling(body: SamplingFields, vocab_size: int, limits: RequestLimits) -> None:
    stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
    if len(stops) > limits.max_stop:
        raise InvalidRequest(f"stop: at most {limits.max_stop} stop strings")
    for stop in stops:
        if len(stop) > limits.max_stop_length:
            raise InvalidRequest(f"stop: a stop string may have at most {limits.max_stop_length} characters")
    if body.logit_bias and len(body.logit_bias) > limits.max_logit_bias:
        raise InvalidRequest(f"logit_bias: at most {limits.max_logit_bias} entries")
    check_token_ids("stop_token_ids", body.stop_token_ids or [], vocab_size)


def check_token_ids(field: str, ids: list[int], vocab_size: int) -> None:
    if ids and (min(ids) < 0 or max(ids) >= vocab_size):
        raise InvalidRequest(f"{field}: token ids must be in [0, {vocab_size})")


def check_chat(body: ChatCompletionRequest, vocab_size: int, limits: RequestLimits) -> None:
    check_sampling(body, vocab_size, limits)
    if len(body.messages) > limits.max_messages:
        raise InvalidRequest(f"messages: at most {limits.max_messages} messages")
    if body.tools and len(body.tools) > limits.max_tools:
        raise InvalidRequest(f"tools: at most {limits.max_tools} tools")
    images = sum(1 for message in body.messages if isinstance(message.content, list)
                 for part in message.content if _is_image(part))
    if images > limits.max_images:
        raise InvalidRequest(f"messages: at most {limits.max_images} images in one request")


def check_completion(body: CompletionRequest, vocab_size: int, limits: RequestLimits) -> None:
    check_sampling(body, vocab_size, limits)
    prompts = body.prompts()
    if len(prompts) > limits.max_prompts:
        raise InvalidRequest(f"prompt: at most {limits.max_prompts} prompts in one request")
    for prompt in prompts:
        if not isinstance(prompt, str):
            check_token_ids("prompt", prompt, vocab_size)


def _is_image(part) -> bool:
    return isinstance(part, dict) and (part.get("type") in ("image_url", "image", "input_image")
                                       or "image_url" in part)
