"""Gemma 3n with images and audio (Gemma3nForConditionalGeneration): the MobileNet-v5 tower, the USM audio
encoder, an embedder for each into the text width, and the Gemma 3n text decoder.

The vocabulary is text ids, then the vision ids (`vision_config.vocab_offset`), then the audio ids. Token ids
of the vision and audio ranges (the end-of-image/audio markers among them) are embedded by that modality's
embedder ("hard" tokens: its table, a norm, the projection, a norm without scale); the image and audio soft
tokens are then replaced by the encoders' rows ("soft": a norm, the projection, the norm). The per-layer
inputs always come from the token ids (ids past the text vocabulary read row 0).

An image: the tower's [2048, side, side] map as side^2 rows, times sqrt(2048), embedded. An audio clip: the
encoder's rows, those of padding frames and those past its length up to `audio_soft_tokens_per_image`
replaced by the embedding of the last audio id (as transformers pads). On the CPU the towers keep float32
weights whatever the model's dtype (convolutions, #1650); their rows are cast to it.
"""
from __future__ import annotations

import torch
from torch import nn

from levante.config import ModelConfig
from levante.layers.norms import RMSNorm
from levante.models.gemma3n import Gemma3nForCausalLM
from levante.models.gemma3n_audio import AudioEncoder
from levante.models.mobilenet_v5 import OUT_CHANNELS, MobileNetV5Encoder
from levante.multimodal.inputs import ImageInput


class MultimodalEmbedder(nn.Module):
    """Soft rows or hard token ids of one modality -> the text width."""

    def __init__(self, width: int, vocab_size: int, vocab_offset: int, text_hidden: int, eps: float):
        super().__init__()
        self.vocab_size, self.vocab_offset = vocab_size, vocab_offset
        self.embedding = nn.Embedding(vocab_size, width)
        self.embedding.weight.requires_grad_(False)
        self.hard_embedding_norm = RMSNorm(width, eps)
        self.soft_embedding_norm = RMSNorm(width, eps)
        self.embedding_projection = nn.Linear(width, text_hidden, bias=False)
        self.embedding_projection.weight.requires_grad_(False)
        self.embedding_post_projection_norm = RMSNorm(text_hidden, eps, scale=False)

    def soft(self, rows: torch.Tensor) -> torch.Tensor:
        return self.embedding_post_projection_norm(self.embedding_projection(self.soft_embedding_norm(rows)))

    def hard(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.hard_embedding_norm(self.embedding(ids - self.vocab_offset))
        return self.embedding_post_projection_norm(self.embedding_projection(rows))


def _float32_on_cpu(make):
    """Build a tower in float32 when the model is built on the CPU (its convolutions, #1650)."""
    if torch.empty(0).device.type != "cpu":
        return make()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        return make()
    finally:
        torch.set_default_dtype(previous)


class Gemma3nForConditionalGeneration(Gemma3nForCausalLM):
    checkpoint_prefixes = [("model.vision_tower.timm_model.", "vision_tower."), ("model.audio_tower.", "audio_tower."),
                           ("model.embed_vision.", "embed_vision."), ("model.embed_audio.", "embed_audio."),
                           ("model.language_model.", "model.")]
    encode_batch = 8  # images through the tower at once

    def __init__(self, config: ModelConfig):
        if "tie_word_embeddings" not in config.raw:
            config.tie_word_embeddings = True
        super().__init__(config)
        raw, hidden = config.raw, config.hidden_size
        vision, audio = dict(raw.get("vision_config") or {}), dict(raw.get("audio_config") or {})
        self.image_token_id = int(raw.get("image_token_id", 262145))
        self.audio_token_id = int(raw.get("audio_token_id", 262273))
        self.audio_tokens = int(raw.get("audio_soft_tokens_per_image", 188))
        self.vision_tower = _float32_on_cpu(lambda: MobileNetV5Encoder(vision.get("model_args")))
        self.audio_tower = _float32_on_cpu(lambda: AudioEncoder(audio))
        eps = float(config.rms_norm_eps)
        self.embed_vision = MultimodalEmbedder(int(vision.get("hidden_size", OUT_CHANNELS)),
                                               int(vision.get("vocab_size", 128)),
                                               int(vision.get("vocab_offset", 262144)), hidden,
                                               float(vision.get("rms_norm_eps", eps)))
        self.embed_audio = MultimodalEmbedder(int(audio.get("hidden_size", 1536)), int(audio.get("vocab_size", 128)),
                                              int(audio.get("vocab_offset", 262272)), hidden,
                                              float(audio.get("rms_norm_eps", eps)))
        self.vision_width = int(vision.get("hidden_size", OUT_CHANNELS))

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = self.model.embed_input_ids(input_ids)
        for embedder, upper in ((self.embed_vision, self.embed_audio.vocab_offset),
                                (self.embed_audio, self.config.vocab_size)):
            inside = (input_ids >= embedder.vocab_offset) & (input_ids < upper)
            if bool(inside.any()):
                ids = torch.where(inside, input_ids, embedder.vocab_offset + embedder.vocab_size - 1)
                embeds = torch.where(inside.unsqueeze(-1), embedder.hard(ids).to(embeds.dtype), embeds)
        return embeds

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.embed_input_ids(input_ids)
        return self.model(input_ids, positions, inputs_embeds)

    @torch.inference_mode()
    def encode_images(self, inputs: list[ImageInput]) -> list[torch.Tensor]:
        """One [tokens, hidden] tensor per input: an image ('pixel_values' [3, H, W]) or an audio clip
        ('input_features' [frames, bins] and 'input_features_mask' [frames], True for real frames)."""
        out: list[torch.Tensor | None] = [None] * len(inputs)
        images = [i for i, item in enumerate(inputs) if "pixel_values" in item.tensors]
        for first in range(0, len(images), self.encode_batch):
            group = images[first:first + self.encode_batch]
            for i, rows in zip(group, self._encode_pixels([inputs[i].tensors["pixel_values"] for i in group])):
                out[i] = rows
        for i, item in enumerate(inputs):
            if "input_features" in item.tensors:  # one clip at a time: its own length, as transformers alone
                out[i] = self._encode_audio(item.tensors["input_features"], item.tensors["input_features_mask"])
        return out

    def _encode_pixels(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        weight = self.vision_tower.conv_stem.conv.weight
        features = self.vision_tower(torch.stack(pixels).to(weight.device, weight.dtype))
        rows = features.flatten(2).transpose(1, 2) * self.vision_width ** 0.5  # [images, side^2, 2048]
        return self.embed_vision.soft(rows.to(self.embed_vision.embedding.weight.dtype))

    def _encode_audio(self, features: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        weight = self.audio_tower.subsample_conv_projection.input_proj_linear.weight
        rows, padding = self.audio_tower(features.unsqueeze(0).to(weight.device, weight.dtype),
                                         ~valid.unsqueeze(0).to(weight.device))
        dtype = self.embed_audio.embedding.weight.dtype
        rows = self.embed_audio.soft(rows[0].to(dtype))
        if rows.size(0) > self.audio_tokens:
            raise ValueError(f"an audio clip gave {rows.size(0)} rows, more than the {self.audio_tokens} "
                             "tokens a clip has")
        pad = self.embed_audio.hard(torch.tensor([self.config.vocab_size - 1], device=rows.device))
        rows = torch.where(padding[0].unsqueeze(-1), pad, rows)
        return torch.cat([rows, pad.expand(self.audio_tokens - rows.size(0), -1)])
