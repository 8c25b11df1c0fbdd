"""Chat templates: the Jinja program a model ships to turn messages into its prompt text.

Templates come from downloaded files, so they are untrusted code: they run in Jinja's immutable
sandbox (jinja2 >= 3.1.6, past the known sandbox escapes), see only plain JSON data, and get the
same helpers transformers gives them (`raise_exception`, `strftime_now`, a `tojson` that keeps
non-ASCII text), so a template renders here exactly as `tokenizer.apply_chat_template(...,
tokenize=False)` renders it. Renders run in a worker process with time, memory and output
limits (loader/template_worker.py), in the sandbox of loader/template_sandbox.py (this process
never imports jinja2); request `chat_template_kwargs` cannot replace the names levante itself
gives the template (`RESERVED_NAMES`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from levante.errors import InvalidRequest, ModelLoadError
from levante.loader import template_worker

# Used when a model ships no template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + (message['content'] or '') + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma's turn format, for Gemma checkpoints that ship no template (base models such as gemma3:270m).
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "{% if message['role'] == 'system' %}{{ '<start_of_turn>user\n' + message['content'] + '\n\n' }}"
    "{% else %}{{ ('' if loop.index0 > 0 and messages[loop.index0 - 1]['role'] == 'system' else "
    "'<start_of_turn>' + role + '\n') + (message['content'] or '') + '<end_of_turn>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def _plain(value: Any) -> Any:
    """Rebuild the template's inputs from JSON types, so no object exposes methods to the sandbox."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (bool, int, float, str):
        if isinstance(value, base):
            return base(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: _plain(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic models
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def one_line(error: Exception) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# What levante (or transformers' apply_chat_template) passes, and the helpers it provides: request
# `chat_template_kwargs` may add variables, never replace these.
RESERVED_NAMES = frozenset({
    "messages", "tools", "documents", "add_generation_prompt", "continue_final_message", "tokenize",
    "return_dict", "return_assistant_tokens_mask", "chat_template", "padding", "truncation", "max_length",
    "return_tensors", "bos_token", "eos_token", "pad_token", "unk_token", "raise_exception", "strftime_now",
    "namespace", "range", "dict", "lipsum", "cycler", "joiner", "loop", "self", "varargs", "kwargs", "caller",
})


class ChatTemplate:
    """A compiled chat template; `render` turns OpenAI-style messages into prompt text.

    Compile errors raise `ModelLoadError` (the model's file is at fault); render errors, including
    the template's own `raise_exception` ("roles must alternate"), raise `InvalidRequest`.
    """

    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        self.source = source
        self.special_tokens = {"bos_token": bos_token, "eos_token": eos_token}
        try:
            template_worker.compile_in_worker(source)  # a broken template fails at load
        except template_worker.TemplateFailed as error:
            raise ModelLoadError(f"invalid chat template: {error}") from None

    @classmethod
    def fallback(cls, bos_token: str = "", eos_token: str = "", vocabulary: Any = ()) -> ChatTemplate:
        """For models that ship no template: Gemma's turns when the vocabulary has
        `<start_of_turn>`, else ChatML (`<|im_start|>role ... <|im_end|>`)."""
        source = GEMMA_TEMPLATE if "<start_of_turn>" in vocabulary else CHATML_TEMPLATE
        return cls(source, bos_token, eos_token)

    def render(self, messages: list[dict], tools: list[dict] | None = None,
               add_generation_prompt: bool = True, template_kwargs: Mapping | None = None, **extra: Any) -> str:
        """The prompt text. Message keys whose value is None are dropped (an OpenAI client sends
        `content: null` beside `tool_calls`), as transformers does; `template_kwargs` (a request's)
        and `extra` reach the template as variables (e.g. `enable_thinking`)."""
        extra = {**(template_kwargs or {}), **extra}
        if reserved := sorted(str(name) for name in extra if name in RESERVED_NAMES or str(name).startswith("_")):
            raise InvalidRequest(f"chat_template_kwargs: {', '.join(reserved)} cannot be set by a request "
                                 "(reserved for the chat template's own inputs)")
        messages = [{key: value for key, value in _plain(message).items() if value is not None}
                    for message in messages]
        context = _plain({**self.special_tokens, "documents": None, **extra})
        context.update(messages=messages, tools=_plain(tools), add_generation_prompt=add_generation_prompt)
        try:
            return template_worker.render(self.source, context)
        except template_worker.TemplateFailed as error:
            raise InvalidRequest(f"chat template failed: {error}") from None
