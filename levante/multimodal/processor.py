"""Which image processor a model folder needs, if any.

    processor = load_processor(model_dir, config, tokenizer)   # None for text-only models
    prompt = processor.process(token_ids, [pil_image])         # -> MultiModalPrompt
    engine.add_request(request_id, prompt, params)

`token_ids` carry one image placeholder per image, as the model's chat template writes
it; `processor.image_placeholder` is that text, for templates that cannot render image
parts themselves. A processor with `takes_audio` (Gemma 3n) also takes `AudioClip`s
(multimodal/audio.py) in that list, in prompt order, and has an `audio_placeholder`.
A new family adds a factory to `PROCESSORS` by config `model_type`.
"""
from __future__ import annotations

import json
from pathlib import Path

from levante.errors import ModelLoadError


def _read_preprocessor(model_dir: Path) -> dict:
    path = model_dir / "preprocessor_config.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from None


def _qwen_vl(model_dir: Path, raw: dict, tokenizer):
    from levante.multimodal.qwen_vl import QwenVLProcessor

    return QwenVLProcessor(_read_preprocessor(model_dir), raw)


def _gemma3(model_dir: Path, raw: dict, tokenizer):
    from levante.multimodal.gemma3 import Gemma3Processor  # the vlm-gemma branch

    return Gemma3Processor.from_pretrained(model_dir, raw, tokenizer)


def _gemma3n(model_dir: Path, raw: dict, tokenizer):
    from levante.multimodal.gemma3n import Gemma3nProcessor

    return Gemma3nProcessor.from_pretrained(model_dir, raw, tokenizer)


# model_type -> factory(model_dir, raw config dict, tokenizer or None) -> processor
PROCESSORS = {
    "qwen2_vl": _qwen_vl,
    "qwen2_5_vl": _qwen_vl,
    "qwen3_vl": _qwen_vl,
    "gemma3": _gemma3,
    "gemma3n": _gemma3n,
}


def load_processor(model_dir: str | Path, config, tokenizer=None):
    """The image processor for a vision-language model folder; None for text models.

    `config` is the model's `ModelConfig` (its `raw` dict is read) or the raw config.json dict.
    """
    raw = getattr(config, "raw", config) or {}
    factory = PROCESSORS.get(raw.get("model_type", ""))
    return None if factory is None else factory(Path(model_dir), raw, tokenizer)
