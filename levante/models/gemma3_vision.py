"""Gemma 3 with images (Gemma3ForConditionalGeneration): a SigLIP tower, a projector, the Gemma 3
text decoder.

Projector (transformers' Gemma3MultiModalProjector): the tower's [patches, vision_hidden] rows,
seen as a square grid, are average-pooled to `mm_tokens_per_image` rows, RMS-normed
(Gemma's 1 + weight) and multiplied by `mm_input_projection_weight` [vision_hidden, hidden].

Order of operations as transformers: text ids are embedded and scaled by sqrt(hidden)
(rounded to the dtype); the projected image rows replace the image tokens' rows unscaled.
Image soft tokens of one image attend to each other both ways: the processor reports the
spans (`MultiModalPrompt.bidirectional_spans`) and the runner widens the attention mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from levante.config import ModelConfig
from levante.layers.norms import RMSNorm
from levante.models.gemma3 import Gemma3ForCausalLM
from levante.models.siglip import SiglipVisionModel
from levante.multimodal.inputs import ImageInput


class Gemma3MultiModalProjector(nn.Module):
    def __init__(self, vision: dict, hidden_size: int, tokens_per_image: int):
        super().__init__()
        vision_hidden = int(vision["hidden_size"])
        self.mm_input_projection_weight = nn.Parameter(torch.empty(vision_hidden, hidden_size), requires_grad=False)
        self.mm_soft_emb_norm = RMSNorm(vision_hidden, float(vision.get("layer_norm_eps", 1e-6)), unit_offset=True)
        self.patches_per_side = int(vision["image_size"]) // int(vision["patch_size"])
        tokens_per_side = int(tokens_per_image ** 0.5)
        if tokens_per_side ** 2 != tokens_per_image or self.patches_per_side % tokens_per_side:
            raise ValueError(f"mm_tokens_per_image {tokens_per_image} does not pool a "
                             f"{self.patches_per_side}x{self.patches_per_side} patch grid")
        self.kernel = self.patches_per_side // tokens_per_side

    def forward(self, vision_rows: torch.Tensor) -> torch.Tensor:
        """[images, patches, vision_hidden] -> [images, tokens_per_image, hidden]."""
        images, _, vision_hidden = vision_rows.shape
        side = self.patches_per_side
        grid = vision_rows.transpose(1, 2).reshape(images, vision_hidden, side, side)
        pooled = F.avg_pool2d(grid, kernel_size=self.kernel, stride=self.kernel).flatten(2).transpose(1, 2)
        return torch.matmul(self.mm_soft_emb_norm(pooled), self.mm_input_projection_weight).type_as(vision_rows)


class Gemma3ForConditionalGeneration(Gemma3ForCausalLM):
    encode_batch = 8  # images (or pan-and-scan crops) through the tower at once
    # Checkpoint layouts in the wild: transformers 4.5x / 5 (`model.vision_tower.`), older
    # (`vision_tower.vision_model.`), both with `multi_modal_projector.` at either level.
    checkpoint_prefixes = [("model.vision_tower.", "vision_tower."), ("vision_tower.vision_model.", "vision_tower."),
                           ("model.multi_modal_projector.", "multi_modal_projector.")]

    def __init__(self, config: ModelConfig):
        raw = config.raw
        if "tie_word_embeddings" not in raw and "tie_word_embeddings" not in (raw.get("text_config") or {}):
            config.tie_word_embeddings = True  # Gemma3Config's default; released checkpoints have no lm_head
        # transformers' Gemma3ForConditionalGeneration does not soft-cap the logits, whatever text_config says
        # (Gemma3ForCausalLM does; the released checkpoints set no cap).
        config.final_logit_softcapping = None
        super().__init__(config)
        vision = dict(config.raw.get("vision_config") or {})
        for key in ("hidden_size", "image_size", "patch_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size"):
            if key not in vision:
                vision[key] = _SIGLIP_DEFAULTS[key]
        self.tokens_per_image = int(config.raw.get("mm_tokens_per_image") or 256)
        self.image_token_id = int(config.raw.get("image_token_index", config.raw.get("image_token_id", 262144)))
        self.vision_tower = SiglipVisionModel(vision)
        self.multi_modal_projector = Gemma3MultiModalProjector(vision, config.hidden_size, self.tokens_per_image)

    @torch.inference_mode()
    def encode_images(self, images: list[ImageInput]) -> list[torch.Tensor]:
        """One [tokens_per_image, hidden] tensor per image (each a 'pixel_values' [3, size, size])."""
        if not images:
            return []
        device = self.multi_modal_projector.mm_input_projection_weight.device
        out = []
        for first in range(0, len(images), self.encode_batch):  # bounds activation memory (4096 patches each)
            group = images[first:first + self.encode_batch]
            pixels = torch.stack([image.tensors["pixel_values"] for image in group]).to(device)
            out.extend(self.multi_modal_projector(self.vision_tower(pixels)).unbind(0))
        return out

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        # transformers embeds out-of-vocabulary image tokens as id 0 (their rows are replaced anyway)
        input_ids = torch.where(input_ids < self.config.vocab_size, input_ids, torch.zeros_like(input_ids))
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.embed_input_ids(input_ids)
        return self.model(input_ids, positions, inputs_embeds)


# transformers' SiglipVisionConfig defaults (Gemma 3's config.json lists only what differs from these).
_SIGLIP_DEFAULTS = {"hidden_size": 768, "image_size": 224, "patch_size": 16, "num_hidden_layers": 12,
                "num_attention_heads": 12, "intermediate_size": 3072}
