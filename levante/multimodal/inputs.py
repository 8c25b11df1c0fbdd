"""What a multimodal prompt hands the engine.

A family's processor (e.g. `multimodal/qwen_vl.py`, `multimodal/gemma3.py`) turns
token ids with one placeholder per image plus the images themselves into a
`MultiModalPrompt`: the placeholders expanded to as many tokens as the vision
encoder will produce, and one `ImageInput` per image saying where its rows go.

The engine never looks inside `ImageInput.tensors`; it gives them to the
model's `encode_images` (results cached by `ImageInput.key`) and scatters the
returned rows into the token embeddings at `offset : offset + length`.

Model side (a vision-language model implements):
    encode_images(images: list[ImageInput]) -> list[Tensor[length, width]]
    embed_input_ids(input_ids) -> Tensor[num_tokens, hidden]
    forward(input_ids, positions, inputs_embeds=None, **extra) -> hidden
and may set / define:
    uses_mrope = True      the runner then passes positions [3, num_tokens] (see below)
    merge_image_rows(embeds, token_index, rows) -> (inputs_embeds, extra forward kwargs)
                           when encoder rows carry more than the embedding (Qwen3-VL's
                           DeepStack features: width = hidden * (1 + k)); without it the
                           runner does `embeds.index_copy(0, token_index, rows)`.
`positions` is `[num_tokens]`, or `[3, num_tokens]` for M-RoPE models.

What the engine does with a `MultiModalPrompt` (engine/runner.py, engine/kv_cache.py):
- The first time any placeholder span of a sequence is scheduled, every image of that
  sequence not in the encoder cache (engine/encoder_cache.py, LRU bounded by rows, keyed
  by `ImageInput.key`) is encoded, all such images of the step in one `encode_images` call.
- Each step slices, per sequence, the encoder rows of the placeholder tokens it computes,
  so chunked prefill may cut an image span anywhere (exact for causal attention; a model
  with bidirectional image spans gets each span in one chunk: see below).
- Positions of an M-RoPE model: `mrope_positions[:, i]` for prompt token i, and
  `i + mrope_position_delta` on all three axes past the prompt (text-only prompts: i).
- Prefix caching: a KV block's hash covers its token ids and the (key, offset) of every
  image whose span overlaps it, since placeholder ids are the same for every image.
- `bidirectional_spans`: the runner gives each query inside a span a key limit at the
  span's end (`AttentionMetadata.key_limits`, layers/attention.py), so an image's tokens
  see each other both ways (also on sliding layers, as transformers' Gemma 3); the
  scheduler never ends a chunk inside a span (`keep_spans_whole`, engine/scheduler.py).

Families: a processor (multimodal/processor.py `load_processor`) builds the prompt from
token ids with one placeholder per image; `LLM.chat` / `LLM.generate(..., images=)` and
the server call it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class ImageInput:
    """One image placed in a prompt."""

    key: str  # content hash of the pixels and processor settings: the encoder-cache key
    offset: int  # index in the prompt's token ids of its first placeholder token
    length: int  # number of placeholder tokens = rows the encoder returns
    tensors: dict[str, torch.Tensor] = field(default_factory=dict, compare=False, hash=False)


@dataclass
class MultiModalPrompt:
    token_ids: list[int]
    images: list[ImageInput] = field(default_factory=list)
    # M-RoPE models: [3, len(token_ids)] position ids for the prompt; a generated token
    # at index i has position i + mrope_position_delta on all three axes.
    mrope_positions: torch.Tensor | None = None
    mrope_position_delta: int = 0
    # Models whose image tokens attend to each other both ways (Gemma 3): [start, end) spans.
    bidirectional_spans: list[tuple[int, int]] = field(default_factory=list)
