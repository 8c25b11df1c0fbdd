"""Gemma 3 image processing and prompt expansion, as transformers' Gemma3ImageProcessor(Pil) and
Gemma3Processor do it, without transformers.

Pixels: optional pan-and-scan crops of the original (uint8), each image and crop resized
with PIL bilinear to the tower's square size, rescaled by 1/255 (in float64, then float32)
and normalised with mean/std 0.5.

Prompt: each `<start_of_image>` placeholder becomes
"\\n\\n<start_of_image>" + "<image_soft_token>" x mm_tokens_per_image + "<end_of_image>\\n\\n";
with crops, "Here is the original image {that} and here are some crops to help you see
better {crop} {crop} ...". transformers replaces text before tokenizing, so the newlines
merge with neighbouring text ("\\n" + "\\n\\n" -> one "\\n\\n\\n" token): here the text run
on each side of an expansion (up to the nearest special token) is decoded, joined with the
expansion's text and encoded again, giving the ids transformers gives.

The soft tokens of one image (or crop) attend to each other both ways: each is one
`bidirectional_spans` entry and one `ImageInput` (its pixels, `[3, size, size]`).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from levante.errors import InvalidRequest, ModelLoadError
from levante.multimodal.images import to_rgb
from levante.multimodal.inputs import ImageInput, MultiModalPrompt

BOI, EOI, IMAGE_TOKEN = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
_RESAMPLE = {0: Image.NEAREST, 1: Image.LANCZOS, 2: Image.BILINEAR, 3: Image.BICUBIC, 4: Image.BOX, 5: Image.HAMMING}


@dataclass
class Gemma3ImageSettings:
    size: tuple[int, int] = (896, 896)  # (height, width)
    resample: int = 2  # PIL bilinear
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    do_pan_and_scan: bool = False
    pan_and_scan_min_crop_size: int = 256
    pan_and_scan_max_num_crops: int = 4
    pan_and_scan_min_ratio_to_activate: float = 1.2

    @classmethod
    def from_dicts(cls, preprocessor: dict, vision_config: dict) -> Gemma3ImageSettings:
        """preprocessor_config.json (values may be null: Gemma3Processor's defaults apply) over the tower's size."""
        settings = cls()
        side = int(vision_config.get("image_size") or 896)
        settings.size = (side, side)
        size = preprocessor.get("size")
        if isinstance(size, dict) and size.get("height") and size.get("width"):
            settings.size = (int(size["height"]), int(size["width"]))
        for name in ("resample", "rescale_factor", "do_pan_and_scan", "pan_and_scan_min_crop_size",
                     "pan_and_scan_max_num_crops", "pan_and_scan_min_ratio_to_activate"):
            if preprocessor.get(name) is not None:
                setattr(settings, name, type(getattr(settings, name))(preprocessor[name]))
        for name in ("image_mean", "image_std"):
            value = preprocessor.get(name)
            if value is not None:
                setattr(settings, name, tuple(float(v) for v in (value if isinstance(value, list) else [value] * 3)))
        return settings

    def fingerprint(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True, default=list)


def pan_and_scan_crops(image: np.ndarray, min_crop_size: int, max_num_crops: int,
                       min_ratio_to_activate: float) -> list[np.ndarray]:
    """Crops of a [H, W, C] array, by transformers' Gemma3ImageProcessor.pan_and_scan rules ([] when none)."""
    height, width = image.shape[:2]
    long_side, short_side = max(width, height), min(width, height)
    if long_side / short_side < min_ratio_to_activate:
        return []
    # Crops split the long side only (width on ties, as transformers does).
    num_crops = min(int(math.floor(long_side / short_side + 0.5)), int(math.floor(long_side / min_crop_size)))
    num_crops = min(max_num_crops, max(2, num_crops))
    num_w, num_h = (num_crops, 1) if width >= height else (1, num_crops)
    crop_w, crop_h = int(math.ceil(width / num_w)), int(math.ceil(height / num_h))
    if min(crop_w, crop_h) < min_crop_size:
        return []
    return [image[top:top + crop_h, left:left + crop_w]
            for top, left in itertools.product([crop_h * i for i in range(num_h)],
                                               [crop_w * i for i in range(num_w)])]


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from None
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path} is not a JSON object")
    return value


class Gemma3ImageProcessor:
    def __init__(self, settings: Gemma3ImageSettings | None = None):
        self.settings = settings or Gemma3ImageSettings()

    def crops(self, image: Image.Image, do_pan_and_scan: bool | None = None) -> list[np.ndarray]:
        """The image and its pan-and-scan crops, uint8 [H, W, 3] each, original first."""
        s = self.settings
        array = np.asarray(to_rgb(image))
        pas = s.do_pan_and_scan if do_pan_and_scan is None else do_pan_and_scan
        extra = pan_and_scan_crops(array, s.pan_and_scan_min_crop_size, s.pan_and_scan_max_num_crops,
                                   s.pan_and_scan_min_ratio_to_activate) if pas else []
        return [array, *extra]

    def pixels(self, array: np.ndarray) -> torch.Tensor:
        """One uint8 [H, W, 3] image -> float32 [3, height, width] as the tower takes it."""
        s = self.settings
        height, width = s.size
        resized = np.asarray(Image.fromarray(np.ascontiguousarray(array)).resize(
            (width, height), resample=_RESAMPLE[s.resample]))
        lut = self._lookup()
        return torch.from_numpy(np.stack([lut[c][resized[..., c]] for c in range(3)]))

    def _lookup(self) -> np.ndarray:
        """[3, 256] float32: each uint8 value rescaled and normalised per channel, by the very operations
        transformers applies to every pixel (rescale in float64, cast to float32, then (x - mean) / std)."""
        s = self.settings
        key = (s.rescale_factor, s.image_mean, s.image_std)
        if getattr(self, "_lut_key", None) != key:
            values = (np.arange(256).astype(np.float64) * s.rescale_factor).astype(np.float32)
            mean = np.array(s.image_mean, dtype=np.float32)[:, None]
            std = np.array(s.image_std, dtype=np.float32)[:, None]
            self._lut, self._lut_key = (values[None, :] - mean) / std, key
        return self._lut

    def preprocess(self, image: Image.Image, do_pan_and_scan: bool | None = None) -> torch.Tensor:
        """[1 + num_crops, 3, height, width] float32."""
        return torch.stack([self.pixels(a) for a in self.crops(image, do_pan_and_scan)])


class Gemma3Processor:
    """Token ids with one `<start_of_image>` per image, plus the images -> `MultiModalPrompt`."""

    image_placeholder = BOI  # one image, as the chat template writes it

    def __init__(self, tokenizer, image_processor: Gemma3ImageProcessor, *, boi_id: int, eoi_id: int,
                 image_token_id: int, tokens_per_image: int):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.boi_id, self.eoi_id, self.image_token_id = boi_id, eoi_id, image_token_id
        self.tokens_per_image = tokens_per_image
        backend = getattr(tokenizer, "backend", tokenizer)
        # Special tokens cut the text into pieces tokenized apart; other added tokens (Gemma's runs of
        # newlines and spaces) merge with their neighbours, so they are re-encoded as text.
        special = {i for i, token in backend.get_added_tokens_decoder().items() if token.special}
        self._split_ids = special | {boi_id, eoi_id, image_token_id}

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, config: dict, tokenizer=None) -> Gemma3Processor:
        """`config` is the model's raw config.json dict."""
        folder = Path(model_dir)
        if tokenizer is None:
            from levante.loader.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_folder(folder)
        preprocessor = _read_json(folder / "preprocessor_config.json")
        processor_config = _read_json(folder / "processor_config.json")
        settings = Gemma3ImageSettings.from_dicts(preprocessor, config.get("vision_config") or {})

        def token_id(keys: tuple[str, str], text: str, default: int) -> int:
            value = next((config[k] for k in keys if config.get(k) is not None), None)
            value = tokenizer.token_to_id(text) if value is None else value
            return int(default if value is None else value)

        tokens = int(config.get("mm_tokens_per_image") or processor_config.get("image_seq_length")
                     or preprocessor.get("image_seq_length") or 256)
        return cls(tokenizer, Gemma3ImageProcessor(settings),
                   boi_id=token_id(("boi_token_index", "boi_token_id"), BOI, 255999),
                   eoi_id=token_id(("eoi_token_index", "eoi_token_id"), EOI, 256000),
                   image_token_id=token_id(("image_token_index", "image_token_id"), IMAGE_TOKEN, 262144),
                   tokens_per_image=tokens)

    # -- the prompt -----------------------------------------------------------------------

    def _expansion(self, num_crops: int) -> list[str | list[int]]:
        """What one placeholder becomes: text pieces and runs of special ids, alternating."""
        image = [self.boi_id] + [self.image_token_id] * self.tokens_per_image + [self.eoi_id]
        if not num_crops:
            return ["\n\n", image, "\n\n"]
        parts: list[str | list[int]] = ["Here is the original image \n\n", image,
                                        "\n\n and here are some crops to help you see better \n\n"]
        for i in range(num_crops):
            if i:
                parts.append("\n\n \n\n")
            parts.append(list(image))
        parts.append("\n\n")
        return parts

    def expand(self, token_ids: list[int], crops_per_image: list[int]) -> list[int]:
        """`token_ids` with each `<start_of_image>` expanded (text re-encoded around it)."""
        places = [i for i, t in enumerate(token_ids) if t == self.boi_id]
        if len(places) != len(crops_per_image):
            raise InvalidRequest(f"the prompt has {len(places)} image placeholders ({BOI}) "
                                 f"but {len(crops_per_image)} images were given")
        return expand_placeholders(self.tokenizer, self._split_ids, token_ids, places,
                                   [self._expansion(n) for n in crops_per_image])

    def process(self, token_ids: list[int], images: list[Image.Image],
                do_pan_and_scan: bool | None = None) -> MultiModalPrompt:
        crops = [self.image_processor.crops(image, do_pan_and_scan) for image in images]
        ids = self.expand(list(token_ids), [len(c) - 1 for c in crops])
        starts = [i for i, t in enumerate(ids) if t == self.image_token_id
                  and (i == 0 or ids[i - 1] != self.image_token_id)]
        arrays = [a for image_crops in crops for a in image_crops]
        if len(starts) != len(arrays):  # the prompt carried soft tokens of its own
            raise InvalidRequest(f"the prompt contains {IMAGE_TOKEN} tokens outside images")
        settings = self.image_processor.settings.fingerprint().encode()
        inputs, spans = [], []
        for start, array in zip(starts, arrays):
            digest = hashlib.sha256(settings)
            digest.update(f"{array.shape}".encode())
            digest.update(np.ascontiguousarray(array).tobytes())
            inputs.append(ImageInput(key=f"gemma3:{digest.hexdigest()}", offset=start, length=self.tokens_per_image,
                                     tensors={"pixel_values": self.image_processor.pixels(array)}))
            spans.append((start, start + self.tokens_per_image))
        return MultiModalPrompt(token_ids=ids, images=inputs, bidirectional_spans=spans)


def expand_placeholders(tokenizer, split_ids: set[int], token_ids: list[int], places: list[int],
                        expansions: list[list[str | list[int]]]) -> list[int]:
    """`token_ids` with the token at each of `places` (ascending) replaced by its expansion (text pieces and
    runs of fixed ids), as if the text had been replaced before tokenizing: the text run on each side
    (up to the nearest id of `split_ids`) is decoded, joined with the expansion's text and encoded again."""
    out: list[int] = []
    text = ""  # pending text: the run before the next special id
    cursor = 0

    def flush_run(end: int) -> None:
        """Move token_ids[cursor:end] into out/text: fixed ids up to the last split token, text after."""
        nonlocal cursor, text
        run_start = cursor
        for j in range(end - 1, cursor - 1, -1):
            if token_ids[j] in split_ids:
                run_start = j + 1
                break
        if run_start > cursor:
            emit_text()
            out.extend(token_ids[cursor:run_start])
        text += tokenizer.decode(token_ids[run_start:end])
        cursor = end

    def emit_text() -> None:
        nonlocal text
        if text:
            out.extend(tokenizer.encode(text, add_special_tokens=False))
            text = ""

    for place, expansion in zip(places, expansions):
        flush_run(place)
        for part in expansion:
            if isinstance(part, str):
                text += part
            else:
                emit_text()
                out.extend(part)
        cursor = place + 1
        # the text after the expansion joins the run that follows, up to the next split token
        nxt = next((j for j in range(cursor, len(token_ids)) if token_ids[j] in split_ids), len(token_ids))
        text += tokenizer.decode(token_ids[cursor:nxt])
        cursor = nxt
    emit_text()
    out.extend(token_ids[cursor:])
    return out
