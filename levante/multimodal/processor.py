"""Which image processor a model folder needs, if any.

    processor = load_processor(model_dir, config)        # None for text-only models
    prompt = processor.process(token_ids, [pil_image])   # -> MultiModalPrompt
    engine.add_request(request_id, prompt, params)

A processor also says how its chat template writes an image (`image_placeholder`, text
used where a template cannot render image parts itself). A new family registers its
processor class in `PROCESSORS` by `model_type`.
"""
from __future__ import annotations

import json
from pathlib import Path

from levante.errors import ModelLoadError
from levante.multimodal.qwen_vl import QwenVLProcessor


# model_type -> processor class; each takes (preprocessor_config dict, raw config dict).
PROCESSORS: dict[str, type] = {
    "qwen2_vl": QwenVLProcessor,
    "qwen2_5_vl": QwenVLProcessor,
    "qwen3_vl": QwenVLProcessor,
}


def load_processor(model_dir: str | Path, config):
    """The image processor for a vision-language model folder; None for text models.

    `config` is the model's `ModelConfig` (its `raw` dict is read) or the raw config.json dict.
    """
    raw = getattr(config, "raw", config) or {}
    cls = PROCESSORS.get(raw.get("model_type", ""))
    if cls is None:
        return None
    path = Path(model_dir) / "preprocessor_config.json"
    try:
        preprocessor = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from None
    return cls(preprocessor, raw)
