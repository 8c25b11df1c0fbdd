"""From OpenAI-style chat messages to the prompt the engine runs: the one road for every face.

`LLM.chat`, the server's chat routes, `/tokenize`, the CLI and the TUI all render through a
`ChatRenderer`, so one conversation gives the same token ids whoever sends it:

    renderer = ChatRenderer(tokenizer, processor, model_name)
    prompt = renderer.render(messages, tools)      # list[int], or a MultiModalPrompt with images

What it does to the messages before the template (`template_messages`), each for a reason:
- an assistant tool call's `arguments`, which OpenAI clients send as JSON text, is decoded to an
  object: templates write `arguments | tojson` (Qwen2.5, Llama 3.1, Mistral), which would quote
  the text a second time; transformers' own examples pass objects;
- the `content: null` that OpenAI clients send beside an assistant's tool calls becomes "": Qwen3's
  template reads the content of every assistant turn (and fails on a missing one, in transformers too);
- image parts become `{"type": "image"}` and `input_audio` parts `{"type": "audio"}` (the template writes
  the model's placeholder; audio only for a processor that `takes_audio`), or, for a template that knows
  text only (the fallbacks), the placeholder text itself;
- a text model's content given as text parts only is joined into one string, as its template
  may expect a string;
- for a template that reads `enable_thinking` (Qwen3), Qwen3's `/think` and `/no_think` switches in the
  messages set it, unless the caller sets it (loader/reasoning.py's `thinking_switch`).

`renderer.reasoning_parser(prompt_ids)` gives the parser that splits a reply to that prompt into its
thinking and its answer (None for a model that does not think): the server and `LLM.chat` both read
replies with it.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from levante.errors import InvalidRequest
from levante.loader.chat_template import ChatTemplate
from levante.loader.reasoning import ReasoningParser, prompt_opens_thinking, reasoning_markers, thinking_switch
from levante.multimodal.inputs import MultiModalPrompt
from levante.multimodal.messages import extract_images, flatten, has_images, join_text_parts


def template_for(tokenizer) -> ChatTemplate:
    """The tokenizer's chat template, or a fallback (Gemma's turns or ChatML) when it has none."""
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    if tokenizer.chat_template:
        return ChatTemplate(tokenizer.chat_template, bos, eos)
    vocabulary = {"<start_of_turn>"} if tokenizer.token_to_id("<start_of_turn>") is not None else ()
    return ChatTemplate.fallback(bos, eos, vocabulary)


def decode_tool_arguments(messages: list) -> list[dict]:
    """Copies of the messages (dicts or pydantic models) with each assistant tool call's
    `arguments` decoded from JSON text to an object (arguments that are not JSON stay as they are),
    and the content beside tool calls "" where it is null."""
    prepared = []
    for message in messages:
        message = dict(message.model_dump(exclude_none=True) if hasattr(message, "model_dump") else message)
        if message.get("tool_calls"):
            message["tool_calls"] = [_decoded_call(call) for call in message["tool_calls"]]
            if message.get("content") is None:
                message["content"] = ""
        prepared.append(message)
    return prepared


def _decoded_call(call: Mapping) -> dict:
    call = dict(call)
    function = dict(call.get("function") or {})
    if isinstance(function.get("arguments"), str):
        try:
            function["arguments"] = json.loads(function["arguments"])
        except ValueError:
            pass
    call["function"] = function
    return call


class ChatRenderer:
    """Renders conversations for one model: its chat template, tokenizer and image processor
    (None for text models)."""

    def __init__(self, tokenizer, processor=None, model_name: str = "this model", model_type: str = ""):
        self.tokenizer = tokenizer
        self.processor = processor
        self.model_name = model_name
        self.template = template_for(tokenizer)
        self.reasoning_markers = reasoning_markers(self.template.source, model_type)  # None: it does not think
        # Decoding must keep special tokens for the think tags to show (they are plain tokens in Qwen3).
        self.reasoning_needs_special_tokens = bool(self.reasoning_markers) and _special(tokenizer,
                                                                                        self.reasoning_markers)

    def template_messages(self, messages: list, load_image: Callable | None = None) -> tuple[list[dict], list]:
        """(the messages as the template gets them, the images (and audio clips) they carry, in order).
        `load_image(url_or_path)` turns image sources into images (default: multimodal/images.py's)."""
        messages = decode_tool_arguments(messages)
        if not has_images(messages):
            return (join_text_parts(messages) if self.processor is None else messages), []
        if self.processor is None:
            raise InvalidRequest(f"model '{self.model_name}' does not accept images or audio "
                                 "(image_url and input_audio content parts)")
        messages, images = extract_images(messages, load_image, getattr(self.processor, "takes_audio", False))
        if not self.tokenizer.chat_template:  # the fallback templates know text content only
            messages = flatten(messages, self.processor.image_placeholder,
                               getattr(self.processor, "audio_placeholder", ""))
        return messages, images

    def text(self, messages: list, tools: list[dict] | None = None, add_generation_prompt: bool = True,
             load_image: Callable | None = None, template_kwargs: dict | None = None) -> tuple[str, list]:
        """(the prompt text the template writes, the images it carries)."""
        messages, images = self.template_messages(messages, load_image)
        template_kwargs = thinking_switch(self.template.source, messages, template_kwargs)
        text = self.template.render(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                    template_kwargs=template_kwargs)
        return text, images

    def render(self, messages: list, tools: list[dict] | None = None, add_generation_prompt: bool = True,
               load_image: Callable | None = None, template_kwargs: dict | None = None
               ) -> list[int] | MultiModalPrompt:
        """The prompt the engine runs: token ids, or with images a `MultiModalPrompt` whose
        placeholders are expanded to the image's tokens. Blocking: it may fetch and decode images."""
        text, images = self.text(messages, tools, add_generation_prompt, load_image, template_kwargs)
        token_ids = self.tokenizer.encode(text, add_special_tokens=False)
        return self.processor.process(token_ids, images) if images else token_ids

    def reasoning_parser(self, prompt_ids: list[int]) -> ReasoningParser | None:
        """The parser for replies to this prompt, which knows whether the prompt opened the thinking
        (its tail ends in `<think>`); None for a model that does not think."""
        if self.reasoning_markers is None:
            return None
        start, end = self.reasoning_markers
        tail = self.tokenizer.decode(prompt_ids[-32:])  # special tokens kept: a `<think>` may be one
        return ReasoningParser(start, end, thinking=prompt_opens_thinking(tail, start))


def _special(tokenizer, texts) -> bool:
    """Whether any of `texts` is one special token, which decoding drops unless told to keep it."""
    ids = [tokenizer.token_to_id(text) for text in texts]
    return any(i is not None and not tokenizer.decode([i], skip_special_tokens=True) for i in ids)
