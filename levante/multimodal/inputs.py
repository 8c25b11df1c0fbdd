"""What a multimodal prompt hands the engine.

A family's processor (e.g. `multimodal/qwen_vl.py`, `multimodal/gemma3.py`) turns
token ids with one placeholder per image plus the images themselves into a
`MultiModalPrompt`: the placeholders expanded to as many tokens as the vision
encoder will produce, and one `ImageInput` per image saying where its rows go.

The engine never looks inside `ImageInput.tensors`; it gives them to the
model's `encode_images` (results cached by `ImageInput.key`) and scatters the
returned rows into the token embeddings at `offset : offset + length`.

Model side (a vision-language model implements):
    encode_images(images: list[ImageInput]) -> list[Tensor[length, hidden]]
    embed_input_ids(input_ids) -> Tensor[num_tokens, hidden]
    forward(input_ids, positions, inputs_embeds=None) -> hidden
`positions` is `[num_tokens]`, or `[3, num_tokens]` for M-RoPE models.
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
