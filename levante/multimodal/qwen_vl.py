"""Qwen2-VL family image processing (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), without transformers.

Reproduces `Qwen2VLImageProcessor` (PIL backend) from the checkpoint's
preprocessor_config.json: RGB (transparency over white), `smart_resize` to multiples of
patch_size * merge_size within [min_pixels, max_pixels] (bicubic), rescale, normalise,
the frame repeated `temporal_patch_size` times, and patches flattened to
`[grid_t * grid_h * grid_w, C * T * P * P]` in merge-block order.

Then the prompt: each `<|image_pad|>` (one per image, as the chat template writes it)
grows to grid_t * grid_h * grid_w / merge**2 copies, and the M-RoPE positions follow
transformers' `get_rope_index`: text counts up on all three axes; an image's tokens take
(start + t, start + row, start + column) and the text after it resumes at
start + max(rows, columns).
"""
from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

from levante.errors import InvalidRequest, ModelLoadError
from levante.multimodal.images import to_rgb
from levante.multimodal.inputs import ImageInput, MultiModalPrompt

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Both sides multiples of `factor`, area within [min_pixels, max_pixels], aspect kept (as transformers)."""
    if max(height, width) / min(height, width) > 200:
        raise InvalidRequest(f"image aspect ratio must be under 200, got {max(height, width) / min(height, width):.0f}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


class QwenVLProcessor:
    image_placeholder = "<|vision_start|><|image_pad|><|vision_end|>"  # one image, as the chat template writes it

    def __init__(self, preprocessor: dict, config: dict):
        size = preprocessor.get("size") or {}
        self.min_pixels = int(preprocessor.get("min_pixels") or size.get("shortest_edge") or 56 * 56)
        self.max_pixels = int(preprocessor.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280)
        vision = config.get("vision_config") or {}
        self.patch_size = int(preprocessor.get("patch_size") or vision.get("patch_size", 14))
        self.temporal_patch_size = int(preprocessor.get("temporal_patch_size") or vision.get("temporal_patch_size", 2))
        self.merge_size = int(preprocessor.get("merge_size") or vision.get("spatial_merge_size", 2))
        self.do_resize = preprocessor.get("do_resize", True)
        self.resample = int(preprocessor.get("resample", 3))  # PIL.Image.BICUBIC
        self.do_rescale = preprocessor.get("do_rescale", True)
        self.rescale_factor = float(preprocessor.get("rescale_factor", 1 / 255))
        self.do_normalize = preprocessor.get("do_normalize", True)
        self.mean = np.array(preprocessor.get("image_mean") or CLIP_MEAN, dtype=np.float32)
        self.std = np.array(preprocessor.get("image_std") or CLIP_STD, dtype=np.float32)
        self.do_convert_rgb = preprocessor.get("do_convert_rgb", True)
        text = config.get("text_config") or {}
        token = config.get("image_token_id", text.get("image_token_id", config.get("image_token_index")))
        if token is None:
            raise ModelLoadError("config.json names no image_token_id")
        self.image_token_id = int(token)

    # -- pixels -----------------------------------------------------------
    def preprocess(self, image) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """One PIL image -> (patches [t*h*w, C*T*P*P] float32, (t, h, w) in patches)."""
        from PIL import Image

        image = to_rgb(image) if self.do_convert_rgb else image
        if self.do_resize:
            factor = self.patch_size * self.merge_size
            height, width = smart_resize(image.height, image.width, factor, self.min_pixels, self.max_pixels)
            image = image.resize((width, height), resample=Image.Resampling(self.resample))
        pixels = np.array(image)
        pixels = pixels[..., None] if pixels.ndim == 2 else pixels
        pixels = np.moveaxis(pixels, -1, 0)  # CHW
        if self.do_rescale:
            pixels = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            pixels = ((pixels.astype(np.float32).T - self.mean) / self.std).T
        return self.patchify(np.asarray(pixels, dtype=np.float32))

    def patchify(self, pixels: np.ndarray) -> tuple[torch.Tensor, tuple[int, int, int]]:
        p, m, tp = self.patch_size, self.merge_size, self.temporal_patch_size
        channels, height, width = pixels.shape
        gh, gw = height // p, width // p
        patches = pixels.reshape(channels, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
        patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], tp, p, p))
        return torch.from_numpy(np.ascontiguousarray(patches).reshape(gh * gw, channels * tp * p * p)), (1, gh, gw)

    # -- prompt -----------------------------------------------------------
    def num_tokens(self, grid: tuple[int, int, int]) -> int:
        t, h, w = grid
        return t * h * w // (self.merge_size ** 2)

    def process(self, token_ids: list[int], images: list) -> MultiModalPrompt:
        """Expand one placeholder per image, attach the pixel patches, compute M-RoPE positions."""
        slots = [i for i, token in enumerate(token_ids) if token == self.image_token_id]
        if len(slots) != len(images):
            raise InvalidRequest(f"the prompt has {len(slots)} image placeholders for {len(images)} images")
        ids: list[int] = []
        inputs: list[ImageInput] = []
        previous = 0
        for slot, image in zip(slots, images):
            ids.extend(token_ids[previous:slot])
            patches, grid = self.preprocess(image)
            length = self.num_tokens(grid)
            digest = hashlib.sha256(patches.numpy().tobytes())
            digest.update(repr(grid).encode())
            inputs.append(ImageInput(digest.hexdigest(), len(ids), length,
                                     {"pixel_values": patches, "image_grid_thw": torch.tensor(grid)}))
            ids.extend([self.image_token_id] * length)
            previous = slot + 1
        ids.extend(token_ids[previous:])
        positions, delta = self.mrope_positions(len(ids), inputs)
        return MultiModalPrompt(ids, inputs, positions, delta)

    def mrope_positions(self, num_tokens: int, images: list[ImageInput]) -> tuple[torch.Tensor, int]:
        """[3, num_tokens] positions and the delta a generated token adds to its index."""
        m = self.merge_size
        parts, cursor, index = [], 0, 0
        for image in images:
            text = image.offset - index
            parts.append(torch.arange(text).expand(3, -1) + cursor)
            cursor += text
            t, h, w = (int(v) for v in image.tensors["image_grid_thw"])
            gh, gw = h // m, w // m
            grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij"))
            parts.append(grid.reshape(3, -1) + cursor)
            cursor += max(gh, gw)
            index = image.offset + image.length
        parts.append(torch.arange(num_tokens - index).expand(3, -1) + cursor)
        positions = torch.cat(parts, dim=1)
        return positions, int(positions.max()) + 1 - num_tokens if num_tokens else 0
